"""`lmforge finetune reward`: a reward model from preference pairs (Bradley-Terry).

The model is the base decoder with its LM head replaced by a scalar score head read at the last
real token of prompt + completion (family "decoder_classifier", num_labels 1; models/heads.py).
Loss -logsigmoid(r_chosen - r_rejected [- margin]) (+ reward.center_coef * mean((r_c + r_r)^2)).
Logs accuracy, margin and the mean chosen / rejected reward. The run directory loads with
`LLM.load` and scores with `LLM.score(prompt, completion)` / `lmforge score`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from lmforge.data.alignment_data import ReadStats, encode_pairs, read_preferences
from lmforge.finetune import align_common as C
from lmforge.finetune.preference import PairBatches, RewardObjective
from lmforge.train.config import TrainConfig


@dataclass
class RewardSection:
    center_coef: float = field(default=0.0, metadata={"help": "reward centring coefficient (0 = off; TRL's center_rewards_coefficient)"})
    use_margin: bool = field(default=False, metadata={"help": "subtract each pair's 'margin' field inside the loss"})
    max_length: Optional[int] = field(default=None, metadata={"help": "prompt + completion tokens; longer pairs are dropped (default: the model's context)"})


@dataclass
class RewardRunConfig:
    train: C.AlignTrainConfig = field(default_factory=C.AlignTrainConfig)
    reward: RewardSection = field(default_factory=RewardSection)


CONFIG = RewardRunConfig  # `lmforge finetune reward --help-config`


def add_arguments(parser: Any) -> None:
    pass


def make_task(args: Any, overrides: Sequence[str] = ()) -> tuple[Any, TrainConfig]:
    from lmforge.models.heads import DecoderClassifier
    from lmforge.train import distributed as D
    from lmforge.train.job import TrainJob

    cfg = C.build_section_config(RewardRunConfig, args, overrides, {})
    llm = C.load_base(args.base)
    tok = llm.tokenizer
    max_len = cfg.reward.max_length or int(llm.model.cfg.block_size)
    stats = ReadStats()
    pairs = read_preferences(args.data, stats)
    val_pairs = read_preferences(args.val_data, stats) if getattr(args, "val_data", None) else None
    if val_pairs is None:
        pairs, val_pairs = C.split_val(pairs, getattr(args, "val_fraction", None), cfg.train.seed)
    train_enc = encode_pairs(tok, pairs, max_len, stats)
    val_enc = encode_pairs(tok, val_pairs, max_len, stats) if val_pairs else []
    for note in stats.notes:
        C.say("reward", note)
    pad = C.pad_id_of(tok)
    t = cfg.train
    per_step = t.grad_accum * D.world_size()
    source = PairBatches(train_enc, t.micro_batch_size, per_step, t.seed, pad)
    val_source = PairBatches(val_enc, t.micro_batch_size, 1, 0, pad) if val_enc else None
    base = llm.model

    def build_model() -> torch.nn.Module:
        # The loop seeds before this, so the fresh score head is initialised reproducibly.
        return DecoderClassifier.from_decoder(base, num_labels=1)

    task = TrainJob(name="reward", config=C.resolved("reward", args, cfg), build_model=build_model,
                objective=RewardObjective(cfg.reward.center_coef, cfg.reward.use_margin), train_batches=source,
                eval_batches=(lambda: val_source.fixed_batches(t.micro_batch_size)) if val_source else None,
                files=C.model_files(llm, args.base), data_fingerprint={"data": C.file_sha(args.data)},
                report_perplexity=C.REPORT_PPL,
                description=f"{len(train_enc)} pairs, global batch {t.micro_batch_size * per_step} pairs")
    return task, t


def run(args: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from lmforge.train.loop import train_job

    task, t = make_task(args, overrides)
    return train_job(task, t, args.out, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
