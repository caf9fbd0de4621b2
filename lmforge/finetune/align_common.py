"""What the alignment methods (reward, dpo, grpo, ppo) share: loading the base model, the files a
run carries, the config assembly and the validation split."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmforge.config import from_dict
from lmforge.errors import LMForgeError
from lmforge.train.config import TrainConfig

def _h(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class AlignTrainConfig(TrainConfig):
    """The loop's TrainConfig with defaults for fine-tuning a trained model (not pretraining)."""

    max_steps: int = _h(200, "optimizer steps to train for")
    lr: float = _h(1e-5, "peak learning rate")
    warmup_steps: int = _h(10, "linear warmup steps from 0 to lr")
    weight_decay: float = _h(0.0, "AdamW weight decay (not applied to norms, biases, embeddings)")
    micro_batch_size: int = _h(8, "pairs (reward, dpo) or completions (grpo, ppo) per forward/backward pass")
    eval_every: int = _h(50, "evaluate every N steps (and always at the end; 0 = only at the end)")
    ckpt_every: int = _h(100, "checkpoint every N steps (and always at the end; 0 = only at the end)")
    eval_iters: int = _h(10, "unused by preference / RL methods (every validation pair is evaluated)")


@dataclass
class RLTrainConfig(AlignTrainConfig):
    """GRPO / PPO: micro-batches of 32 completions, evaluation only at the end (no validation loss)."""

    micro_batch_size: int = _h(32, "completions per forward/backward pass; rollout batch per process = "
                                   "minibatches x grad_accum x micro_batch_size")
    eval_every: int = _h(0, "evaluate every N steps (RL methods have no validation loss; 0 = only at the end)")


ALIGN_TRAIN_DEFAULTS: dict[str, Any] = {}  # defaults live in the dataclasses above



def load_base(path: str | Path) -> Any:
    """An `LLM` (model + tokenizer) from an lmforge run/model directory or a Hugging Face folder."""
    from lmforge.infer.llm import LLM

    llm = LLM.load(path)
    if llm.tokenizer is None:
        raise LMForgeError(f"--base {path} has no tokenizer; alignment needs text")
    llm.model.train()
    return llm


def model_files(llm: Any, base: str | Path) -> dict[str, bytes]:
    """Tokenizer, chat template and generation config of the base model (SFT's choice of files),
    carried into the run and every checkpoint so the result chats like its base."""
    from lmforge.finetune.sft import model_files as sft_model_files

    return sft_model_files(llm, Path(base))


def build_section_config(cls: type, args: Any, overrides: Sequence[str], defaults: dict[str, Any]) -> Any:
    """The method's config dataclass from defaults < --recipe < --config < --section.key flags."""
    from lmforge.train.config import gather_config_dict

    raw = gather_config_dict(getattr(args, "config", None), overrides, getattr(args, "recipe", None), base=defaults)
    return from_dict(cls, raw)


def file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def split_val(items: list, val_fraction: float | None, seed: int) -> tuple[list, list]:
    """(train, val) by whole examples, a seeded shuffle; no val when val_fraction is 0/None."""
    if not val_fraction:
        return items, []
    if not 0.0 < val_fraction < 1.0:
        raise LMForgeError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(len(items) * val_fraction)))
    if n_val >= len(items):
        raise LMForgeError(f"--val-fraction {val_fraction} leaves no training examples out of {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    val_idx = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val_idx], [items[i] for i in sorted(val_idx)]


def resolved(method: str, args: Any, cfg: Any) -> dict[str, Any]:
    """The config written to RUN/config.yaml and compared on resume."""
    d = dataclasses.asdict(cfg)
    d["run"] = {"method": method, "base": str(getattr(args, "base", None)), "data": str(getattr(args, "data", None)),
                "val_data": str(getattr(args, "val_data", None)), "val_fraction": getattr(args, "val_fraction", None)}
    if getattr(args, "ptx_data", None):
        d["run"]["ptx_data"] = str(args.ptx_data)
    return d


def say(method: str, msg: str) -> None:
    import sys

    print(f"lmforge finetune {method}: {msg}", file=sys.stderr, flush=True)


def pad_id_of(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_id", None)
    return int(pid or 0)


# Preference and RL losses are not language-model losses: no perplexity in their eval rows.
REPORT_PPL = False
