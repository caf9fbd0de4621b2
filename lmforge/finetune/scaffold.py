"""`lmforge finetune METHOD`: the one scaffold every post-training method runs in.

    lmforge finetune METHOD --base MODEL --data FILE --out RUN [--val-data F | --val-fraction F]
                            [--config F.yaml] [--recipe R] [--resume auto] [--overwrite] [--section.key V ...]

A method is a module (METHODS) that holds only what differs:
    CONFIG                 its config dataclass, one field per section (train, data, dpo, ...)
    DEFAULTS               optional {section: {key: value}} over the dataclass defaults
    add_arguments(parser)  optional: its own flags
    FLAG_KEYS              optional {flag attribute: "section.key"}: the config keys its flags set
    build_job(cfg, args)   the TrainJob, from the config and the command line (base, data, val_data, out, ...)
    config_for(args, overrides, saved)  optional: (CONFIG, DEFAULTS) when they depend on the command line
                           (distill: its --task picks the sections of the method whose data it reads)
    MODEL_FLAG             optional: the flag naming the model it trains (default --base; distill: --student)
    final_metrics(out)     optional: what the run summary adds from the run directory
The scaffold does the rest: the config, the job, the one training loop (`train_job`), the summary.

The config has one path, lowest precedence first: the method's defaults, the config its checkpoint
saved (on --resume, so a key set only when the run started is kept), --recipe, --config,
--section.key flags, then the method's own flags (and --val-fraction, where it has data.val_fraction).
Adding a method adds a line to METHODS and a module, never a training loop.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import LMForgeError

METHODS: dict[str, str] = {
    "sft": "lmforge.finetune.sft",
    "reward": "lmforge.finetune.reward_model",
    "dpo": "lmforge.finetune.dpo",
    "grpo": "lmforge.finetune.grpo",
    "ppo": "lmforge.finetune.ppo",
    "classify": "lmforge.finetune.classify",
    "seq2seq": "lmforge.finetune.seq2seq",
    "distill": "lmforge.finetune.distill",
}


def method_module(name: str) -> Any:
    if name not in METHODS:
        raise LMForgeError(f"unknown fine-tuning method '{name}'; methods: {', '.join(METHODS)}")
    try:
        return importlib.import_module(METHODS[name])
    except ModuleNotFoundError as e:
        if e.name == METHODS[name]:
            raise LMForgeError(f"fine-tuning method '{name}' is not available in this version") from None
        raise


def say(method: str, msg: str) -> None:
    """A note for the user on stderr, from the first process only."""
    from lmforge.train import distributed as D

    if D.rank() == 0:
        print(f"lmforge finetune {method}: {msg}", file=sys.stderr, flush=True)


def flag_keys(module: Any) -> dict[str, str]:
    """{attribute of a command-line flag: the "section.key" it sets} of a method."""
    keys = dict(getattr(module, "FLAG_KEYS", {}))
    data = typing.get_type_hints(module.CONFIG).get("data")
    if data is not None and "val_fraction" in {f.name for f in dataclasses.fields(data)}:
        keys["val_fraction"] = "data.val_fraction"
    return keys


def method_config(module: Any, args: Any, overrides: Sequence[str] = (), saved: dict[str, Any] | None = None) -> Any:
    """The method's CONFIG from the layers of the module docstring, every key and type checked."""
    from lmforge.config import deep_merge, from_dict
    from lmforge.train.config import gather_config_dict

    config_cls, defaults = (module.config_for(args, overrides, saved) if hasattr(module, "config_for")
                            else (module.CONFIG, getattr(module, "DEFAULTS", {})))
    sections = [f.name for f in dataclasses.fields(config_cls)]
    base = deep_merge({}, defaults)
    if saved:
        base = deep_merge(base, {k: saved[k] for k in sections if isinstance(saved.get(k), dict)})
    layered = gather_config_dict(getattr(args, "config", None), overrides, getattr(args, "recipe", None), base=base)
    for attr, key in flag_keys(module).items():
        value = getattr(args, attr, None)
        if value is not None:
            section, name = key.split(".")
            layered = deep_merge(layered, {section: {name: value}})
    return from_dict(config_cls, layered)


def prepare(method: str, args: Any, overrides: Sequence[str] = ()) -> tuple[Any, Any]:
    """(TrainJob, config) of `lmforge finetune METHOD` with these flags, ready for `train_job`."""
    from lmforge.finetune.base_model import recorded_base
    from lmforge.train.run_dir import saved_config

    module = method_module(method)
    saved = saved_config(args.resume, Path(args.out)) if getattr(args, "resume", None) else None
    cfg = method_config(module, args, overrides, saved)
    if saved and "val_fraction" not in flag_keys(module) and getattr(args, "val_fraction", None) is None:
        # a method without data.val_fraction records the flag with the run's inputs: resume keeps it too
        args = copy.copy(args)
        args.val_fraction = (saved.get("run") or {}).get("val_fraction")
    job = module.build_job(cfg, args)
    # LoRA (train/adapters.py): every method's job trains the adapters the `lora` section asks for on
    # this base, recorded by absolute path so the run loads from anywhere
    job.lora, job.base = cfg.lora, recorded_base(args.base)
    return job, cfg


def run(method: str, args: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fine-tune: assemble the config, build the job, train it; returns the run summary."""
    from lmforge.train.loop import train_job

    job, cfg = prepare(method, args, overrides)
    summary = train_job(job, cfg.train, args.out, resume=getattr(args, "resume", None),
                        overwrite=getattr(args, "overwrite", False))
    module = method_module(method)
    if hasattr(module, "final_metrics"):
        summary.update(module.final_metrics(Path(args.out)))
    return summary
