"""Python API of `lmforge finetune`: the same methods, keyword arguments instead of flags.

    from lmforge.finetune.api import finetune
    finetune("dpo", base="runs/chat-demo", data="pairs.jsonl", out="runs/dpo",
             config={"train": {"lr": 5e-5, "max_steps": 100}, "dpo": {"beta": 0.1}})
    finetune("grpo", base="runs/chat-demo", data="prompts.jsonl", out="runs/grpo",
             reward=["lmforge.finetune.rewards:task_verifier"], config={"grpo.num_generations": 8})
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Sequence


def _flags(config: dict[str, Any] | None, prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in (config or {}).items():
        if isinstance(v, dict):
            out += _flags(v, f"{prefix}{k}.")
        else:
            out += [f"--{prefix}{k}", "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def finetune(method: str, base: str | Path, data: str | Path, out: str | Path, *, val_data: str | Path | None = None,
             val_fraction: float | None = None, config: dict[str, Any] | None = None, config_file: str | None = None,
             recipe: str | None = None, reward: Sequence[str] | None = None,
             reward_weights: Sequence[float] | None = None, resume: str | None = None, overwrite: bool = False,
             **extra: Any) -> dict[str, Any]:
    """Run `lmforge finetune METHOD` in this process; returns the run summary. `config` holds config
    keys nested ({"train": {"lr": 1e-5}}) or dotted ({"train.lr": 1e-5})."""
    from lmforge.finetune.scaffold import run

    args = types.SimpleNamespace(base=str(base), data=str(data), out=str(out),
                                 val_data=str(val_data) if val_data else None, val_fraction=val_fraction,
                                 config=config_file, recipe=recipe, resume=resume, overwrite=overwrite,
                                 reward=list(reward or []), reward_weights=list(reward_weights) if reward_weights else None,
                                 help_config=False, **extra)
    return run(method, args, _flags(config))
