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
from typing import Any, Literal, Optional, Sequence

import torch

from lmforge.data.alignment_data import ReadStats, encode_pairs, read_preferences
from lmforge.errors import LMForgeError
from lmforge.finetune import align_common as C
from lmforge.finetune.preference import DPOObjective, PairBatches, reference_logps
from lmforge.train.config import TrainConfig

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
    train: C.AlignTrainConfig = field(default_factory=C.AlignTrainConfig)
    dpo: DPOSection = field(default_factory=DPOSection)


CONFIG = DPORunConfig  # `lmforge finetune dpo --help-config`


def add_arguments(parser: Any) -> None:
    pass


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


def make_task(args: Any, overrides: Sequence[str] = ()) -> tuple[Any, TrainConfig]:
    from lmforge.train.job import TrainJob

    cfg = C.build_section_config(DPORunConfig, args, overrides, {})
    d = cfg.dpo
    if d.beta <= 0:
        raise LMForgeError(f"dpo.beta must be positive, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise LMForgeError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.rpo_alpha is not None and d.rpo_alpha < 0:
        raise LMForgeError(f"dpo.rpo_alpha must be >= 0 (or none), got {d.rpo_alpha}")
    llm = C.load_base(args.base)
    model, tok = llm.model, llm.tokenizer
    max_len = d.max_length or int(model.cfg.block_size)
    stats = ReadStats()
    pairs = read_preferences(args.data, stats)
    val_pairs = read_preferences(args.val_data, stats) if getattr(args, "val_data", None) else None
    if val_pairs is None:
        pairs, val_pairs = C.split_val(pairs, getattr(args, "val_fraction", None), cfg.train.seed)
    train_enc = encode_pairs(tok, pairs, max_len, stats)
    val_enc = encode_pairs(tok, val_pairs, max_len, stats) if val_pairs else []
    for note in stats.notes:
        C.say("dpo", note)
    pad = C.pad_id_of(tok)

    # The reference pass: once, with the base weights, before the policy changes.
    fingerprint = f"{C.file_sha(args.data)}:{len(train_enc)}:{len(val_enc)}:{Path(str(args.base)).resolve()}"
    cached = _load_ref(Path(args.out) / REF_FILE, fingerprint)
    if cached is not None and cached.shape[1] == len(train_enc) + len(val_enc):
        ref = cached
        C.say("dpo", f"reference log-probs reused from {Path(args.out) / REF_FILE}")
    else:
        from lmforge.train.loop import training_precision

        device, autocast = training_precision(cfg.train)  # on the GPU that will train, not the CPU
        C.say("dpo", f"computing reference log-probs of {len(train_enc) + len(val_enc)} pairs on {device}")
        ref = reference_logps(model.to(device), train_enc + val_enc, pad, autocast=autocast)
    ref_train, ref_val = ref[:, :len(train_enc)], ref[:, len(train_enc):]
    t = cfg.train
    from lmforge.train import distributed as D

    per_step = t.grad_accum * D.world_size()
    source = PairBatches(train_enc, t.micro_batch_size, per_step, t.seed, pad, ref_train)
    val_source = PairBatches(val_enc, t.micro_batch_size, 1, 0, pad, ref_val) if val_enc else None
    files = C.model_files(llm, args.base)
    files[REF_FILE] = _ref_bytes(ref, fingerprint)
    holder = {"model": model}

    def build_model() -> torch.nn.Module:
        m = holder.pop("model", None)  # hand over the base weights once; no second copy
        if m is None:
            m = C.load_base(args.base).model
        return m

    task = TrainJob(name="dpo", config=C.resolved("dpo", args, cfg), build_model=build_model,
                objective=DPOObjective(d.beta, d.loss_type, d.label_smoothing, d.rpo_alpha), train_batches=source,
                eval_batches=(lambda: val_source.fixed_batches(t.micro_batch_size)) if val_source else None,
                files=files, data_fingerprint={"data": C.file_sha(args.data)}, report_perplexity=C.REPORT_PPL,
                description=f"{len(train_enc)} pairs, global batch {t.micro_batch_size * per_step} pairs")
    del llm
    gc.collect()
    return task, t


def run(args: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from lmforge.train.loop import train_job

    task, t = make_task(args, overrides)
    return train_job(task, t, args.out, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
