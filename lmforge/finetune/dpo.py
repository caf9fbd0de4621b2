"""`lmforge finetune dpo`: Direct Preference Optimization (Rafailov et al. 2023) on preference pairs.

The reference model's log-probabilities of every chosen and rejected completion are computed once,
before training, and stored with the data (RUN/reference_logps.safetensors, reused on resume); no
reference model is in memory while training. The policy starts as the base model, so the first
step's loss is ln 2 for the sigmoid loss.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmforge.data.table import data_fingerprint
from lmforge.errors import LMForgeError
from lmforge.finetune.align_common import REPORT_PPL, AlignTrainConfig, resolved
from lmforge.finetune.base_model import chat_model_files, load_base, pad_id_of
from lmforge.finetune.preference import DPOObjective, pair_batches, reference_logps, training_pairs
from lmforge.finetune.scaffold import say
from lmforge.train import distributed as D
from lmforge.train.adapters import LoRAConfig
from lmforge.train.job import TrainJob

REF_FILE = "reference_logps.safetensors"


@dataclass
class DPOSection:
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit KL constraint (TRL's beta)"})
    loss_type: Literal["sigmoid", "ipo", "hinge"] = field(default="sigmoid", metadata={"help": "sigmoid | ipo | hinge"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO: assumed label noise in [0, 0.5)"})
    rpo_alpha: Optional[float] = field(default=None, metadata={
        "help": "add rpo_alpha x the NLL of the chosen completions (mean per token) to the loss, as TRL's rpo_alpha "
                "(Pang et al. 2024, iterative reasoning preference optimization); none = plain DPO"})
    max_length: Optional[int] = field(default=None, metadata={"help": "prompt + completion tokens; longer pairs are dropped (default: the model's context)"})


@dataclass
class DPORunConfig:
    train: AlignTrainConfig = field(default_factory=AlignTrainConfig)
    dpo: DPOSection = field(default_factory=DPOSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = DPORunConfig  # `lmforge finetune dpo --help-config`


def _ref_bytes(ref: torch.Tensor, fingerprint: str) -> bytes:
    from safetensors.torch import save

    return save({"ref_logps": ref.contiguous()}, metadata={"fingerprint": fingerprint})


def _load_ref(path: Path, fingerprint: str) -> torch.Tensor | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return f.get_tensor("ref_logps")


def build_job(cfg: DPORunConfig, args: Any) -> TrainJob:
    d, t = cfg.dpo, cfg.train
    if d.beta <= 0:
        raise LMForgeError(f"dpo.beta must be positive, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise LMForgeError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.rpo_alpha is not None and d.rpo_alpha < 0:
        raise LMForgeError(f"dpo.rpo_alpha must be >= 0 (or none), got {d.rpo_alpha}")
    llm = load_base(args.base, "dpo")
    model, tok = llm.model, llm.tokenizer
    train_enc, val_enc = training_pairs("dpo", args, tok, d.max_length or int(model.cfg.block_size), t.seed)
    pad = pad_id_of(tok)

    # The reference pass: once, with the base weights, before the policy changes.
    data_sha = data_fingerprint([args.data])
    fingerprint = f"{data_sha}:{len(train_enc)}:{len(val_enc)}:{Path(str(args.base)).resolve()}"
    cached = _load_ref(Path(args.out) / REF_FILE, fingerprint)
    if cached is not None and cached.shape[1] == len(train_enc) + len(val_enc):
        ref = cached
        say("dpo", f"reference log-probs reused from {Path(args.out) / REF_FILE}")
    else:
        from lmforge.nn.lora import disabled
        from lmforge.train.adapters import prepare_lora
        from lmforge.train.loop import training_precision

        device, autocast = training_precision(t)  # on the GPU that will train, not the CPU
        # LoRA: the policy is base + adapters (QLoRA: over the quantised base) and the reference the
        # same model with its adapters off, so the loop trains exactly the model the reference saw
        prepare_lora(model, cfg.lora, seed=t.seed, device=device)
        say("dpo", f"computing reference log-probs of {len(train_enc) + len(val_enc)} pairs on {device}")
        with disabled(model):
            ref = reference_logps(model.to(device), train_enc + val_enc, pad, autocast=autocast)
    ref_train, ref_val = ref[:, :len(train_enc)], ref[:, len(train_enc):]
    per_step = t.grad_accum * D.world_size()
    source = pair_batches(train_enc, pad, t.micro_batch_size, per_step, t.seed, ref_train)
    val_source = pair_batches(val_enc, pad, t.micro_batch_size, 1, 0, ref_val, shuffle=False) if val_enc else None
    files = chat_model_files(llm, args.base)
    files[REF_FILE] = _ref_bytes(ref, fingerprint)
    holder = {"model": model}

    def build_model() -> torch.nn.Module:
        m = holder.pop("model", None)  # hand over the base weights once; no second copy
        if m is None:
            m = load_base(args.base, "dpo").model
        return m

    job = TrainJob(name="dpo", config=resolved("dpo", args, cfg), build_model=build_model,
                   objective=DPOObjective(d.beta, d.loss_type, d.label_smoothing, d.rpo_alpha), train_batches=source,
                   eval_batches=val_source.all_batches if val_source else None, files=files,
                   data_fingerprint={"data": data_sha}, report_perplexity=REPORT_PPL,
                   description=f"{len(train_enc)} pairs, global batch {t.micro_batch_size * per_step} pairs")
    del llm
    gc.collect()
    return job
