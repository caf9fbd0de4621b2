"""`lmforge finetune METHOD`: post-training methods, each a TrainJob for the one training loop.

    lmforge finetune METHOD --base MODEL --data FILE --out RUN [--val-data F | --val-fraction F]
                            [--config F.yaml] [--recipe R] [--resume auto] [--overwrite] [--section.key V ...]

METHODS maps a method name to its module; a module defines `add_arguments(parser)` (its own flags,
optional) and `run(args, overrides) -> dict` (assemble the config, build the TrainJob, train, return the
summary). Adding a method adds a line here and a module, never a training loop.
"""

METHODS: dict[str, str] = {
    "sft": "lmforge.finetune.sft",
    "reward": "lmforge.finetune.reward_model",
    "dpo": "lmforge.finetune.dpo",
    "grpo": "lmforge.finetune.grpo",
    "ppo": "lmforge.finetune.ppo",
    "classify": "lmforge.finetune.classify",
    "seq2seq": "lmforge.finetune.seq2seq",
}


def method_module(name: str):
    import importlib

    from lmforge.errors import LMForgeError

    if name not in METHODS:
        raise LMForgeError(f"unknown fine-tuning method '{name}'; methods: {', '.join(METHODS)}")
    try:
        return importlib.import_module(METHODS[name])
    except ModuleNotFoundError as e:
        if e.name == METHODS[name]:
            raise LMForgeError(f"fine-tuning method '{name}' is not available in this version") from None
        raise


def layered_config(args, overrides, defaults: dict, sections=("train", "data"), data_flags=()) -> dict:
    """A method's config as a nested dict: its defaults (or, on --resume, the checkpoint's saved
    sections), then --recipe, then --config, then --section.key flags, then the command-line flags
    that set data keys (--val-fraction and the method's `data_flags`, named as their data key).
    Not yet type-checked."""
    from pathlib import Path

    from lmforge.train.config import gather_config_dict

    base_state = None
    if getattr(args, "resume", None):
        from lmforge import checkpoint as ckpt_io
        from lmforge.train.run_dir import resolve_resume

        found = resolve_resume(args.resume, Path(args.out))
        if found is not None:
            state, _ = ckpt_io.load_train_state(found, with_tensors=False)
            saved = state.get("config") or {}
            base_state = {k: saved[k] for k in sections if k in saved}
    layered = gather_config_dict(getattr(args, "config", None), overrides, getattr(args, "recipe", None),
                                 base=base_state or defaults)
    data = {key: getattr(args, key) for key in ("val_fraction", *data_flags) if getattr(args, key, None) is not None}
    if data:
        from lmforge.config import deep_merge

        layered = deep_merge(layered, {"data": data})
    return layered
