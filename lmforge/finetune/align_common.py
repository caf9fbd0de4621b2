"""What the alignment methods (reward, dpo, grpo, ppo) share: the loop's settings for fine-tuning a
trained model, and the run's inputs recorded in its config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmforge.config import config_field
from lmforge.train.config import TrainConfig


@dataclass
class AlignTrainConfig(TrainConfig):
    """The loop's TrainConfig with defaults for fine-tuning a trained model (not pretraining)."""

    max_steps: int = config_field(200, "optimizer steps to train for")
    lr: float = config_field(1e-5, "peak learning rate")
    warmup_steps: int = config_field(10, "linear warmup steps from 0 to lr")
    weight_decay: float = config_field(0.0, "AdamW weight decay (not applied to norms, biases, embeddings)")
    micro_batch_size: int = config_field(8, "pairs (reward, dpo) or completions (grpo, ppo) per forward/backward pass")
    eval_every: int = config_field(50, "evaluate every N steps (and always at the end; 0 = only at the end)")
    ckpt_every: int = config_field(100, "checkpoint every N steps (and always at the end; 0 = only at the end)")
    eval_iters: int = config_field(10, "unused by preference / RL methods (every validation pair is evaluated)")


@dataclass
class RLTrainConfig(AlignTrainConfig):
    """GRPO / PPO: micro-batches of 32 completions, evaluation only at the end (no validation loss)."""

    micro_batch_size: int = config_field(32, "completions per forward/backward pass; rollout batch per process = "
                                   "minibatches x grad_accum x micro_batch_size")
    eval_every: int = config_field(0, "evaluate every N steps (RL methods have no validation loss; 0 = only at the end)")


def resolved(method: str, args: Any, cfg: Any) -> dict[str, Any]:
    """The config written to RUN/config.yaml and compared on resume: the sections, and the run's inputs."""
    d = dataclasses.asdict(cfg)
    d["run"] = {"method": method, "base": str(getattr(args, "base", None)), "data": str(getattr(args, "data", None)),
                "val_data": str(getattr(args, "val_data", None)), "val_fraction": getattr(args, "val_fraction", None)}
    if getattr(args, "ptx_data", None):
        d["run"]["ptx_data"] = str(args.ptx_data)
    return d


# Preference and RL losses are not language-model losses: no perplexity in their eval rows.
REPORT_PPL = False
