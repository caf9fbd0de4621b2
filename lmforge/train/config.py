"""Training configuration: `RunConfig(model, train, data)` and how it is assembled.

Precedence, lowest to highest: the dataclass defaults below (or, on resume, the checkpoint's
config), a shipped recipe (`lmforge/recipes/NAME.yaml`), a `--config` YAML file, then
`--section.key VALUE` overrides. The `model` section mirrors `DecoderConfig`; every key in it
defaults to "unset" so that `model.preset` supplies the shape and only the keys the user sets
override it. `model.vocab_size` always comes from the prepared data's tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from lmforge.config import config_field, deep_merge, from_dict, load_yaml, parse_overrides
from lmforge.errors import LMForgeError
from lmforge.models.decoder import DecoderConfig, config_from_preset
from lmforge.train.adapters import LoRAConfig
from lmforge.train.energy import DEFAULT_REGION as DEFAULT_CARBON_REGION
from lmforge.train.energy import REGION_HELP as CARBON_REGION_HELP

DEFAULT_PRESET = "small"



def _model_section() -> type:
    """A dataclass with the keys of every model family's config (DecoderConfig's first), each
    Optional and unset (None) by default; `resolve_model` checks them against the preset's family."""
    from lmforge.models.registry import families, family_of_preset

    fields, seen = [], set()
    default_family = family_of_preset(DEFAULT_PRESET)
    for fam in families().values():
        hints = typing.get_type_hints(fam.config_cls)
        for f in dataclasses.fields(fam.config_cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            tp = hints[f.name]
            help_ = f.metadata.get("help", "")
            if fam is not default_family:  # keys of the default preset's family need no label
                help_ = f"({fam.name}) {help_}"
            if f.name == "preset":
                fields.append((f.name, Optional[str], config_field(DEFAULT_PRESET, f"{help_} (default {DEFAULT_PRESET}, or the "
                                                                      "objective's family default; keys set here "
                                                                      "override it)")))
            else:
                fields.append((f.name, Optional[tp], config_field(None, help_)))
    cls = dataclasses.make_dataclass("ModelConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = "Model keys of every family; unset keys take the preset's value."
    return cls


ModelConfig = _model_section()


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation, checkpointing and hardware settings."""

    objective: str = config_field("causal_lm", "training objective (see lmforge.train.objectives.PRETRAINING)")
    max_steps: int = config_field(1000, "optimizer steps to train for")
    max_minutes: Optional[float] = config_field(None, "wall-clock budget in minutes (total over resumes) covering "
                                            "everything the run does: an early evaluation and checkpoint (4 steps "
                                            "in) measure their cost, the final ones are reserved, and the cosine "
                                            "schedule ends at the step count that fits")
    micro_batch_size: int = config_field(16, "sequences per forward/backward pass (per process)")
    grad_accum: int = config_field(1, "micro-batches accumulated per optimizer step (per process)")
    seq_len: Optional[int] = config_field(None, "tokens per training sequence; default model.block_size (must not exceed it)")
    lr: float = config_field(1e-3, "peak learning rate")
    min_lr: Optional[float] = config_field(None, "learning rate at the end of the cosine decay; default lr / 10")
    warmup_steps: int = config_field(100, "linear warmup steps from 0 to lr")
    weight_decay: float = config_field(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)")
    beta1: float = config_field(0.9, "AdamW beta1")
    beta2: float = config_field(0.95, "AdamW beta2")
    eps: float = config_field(1e-8, "AdamW epsilon")
    optimizer: Literal["adamw", "muon"] = config_field("adamw", "adamw | muon; muon = Muon for the blocks' weight matrices "
                                                      "(peak lr muon_lr) and AdamW (peak lr lr) for the rest")
    muon_lr: float = config_field(0.02, "Muon peak learning rate (follows the same warmup + cosine shape as lr)")
    muon_momentum: float = config_field(0.95, "Muon momentum (Nesterov)")
    muon_weight_decay: float = config_field(0.0, "decoupled weight decay of the Muon matrices")
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this value (0 = no clipping)")
    eval_every: int = config_field(250, "evaluate every N steps (and always at the end; 0 = only at the end)")
    eval_iters: int = config_field(20, "validation batches (of micro_batch_size sequences) per evaluation")
    log_every: int = config_field(10, "write a metrics.jsonl row every N steps (and at steps 1 and the last)")
    ckpt_every: int = config_field(500, "checkpoint every N steps (and always at the end; 0 = only at the end)")
    keep_checkpoints: int = config_field(3, "keep the newest N checkpoints (0 = keep all)")
    keep_best: bool = config_field(False, "also keep the model of the lowest validation loss in RUN/checkpoints/best "
                                   "(written at each evaluation that improves on it; a model directory, not resumable). "
                                   "Loading RUN still gives the last checkpoint; load RUN/checkpoints/best for this one")
    seed: int = config_field(1337, "seed of the weight init, the data windows and dropout")
    compile: bool = config_field(False, "torch.compile the model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = config_field(
        "auto", "auto | float32 | bfloat16 | float16; auto = bf16 autocast on CUDA if supported, else fp32")
    device: Literal["auto", "cpu", "cuda"] = config_field("auto", "auto | cpu | cuda; auto = cuda if available")
    parallelism: Literal["ddp", "fsdp"] = config_field(
        "ddp", "under torchrun: ddp = a full replica per process (DistributedDataParallel); fsdp = FSDP2, every "
        "block's weights, gradients and optimizer state sharded across processes (bf16 gathered weights with bf16 "
        "training, fp32 gradient reduction; sharded checkpoints, the last one also consolidated). A single process "
        "without torchrun ignores it")
    activation_checkpointing: bool = config_field(False, "recompute each block's activations in the backward pass "
                                                  "instead of keeping them (less memory, about a third more compute)")
    peak_flops: Optional[float] = config_field(None, "peak FLOP/s of one device for the MFU figure; default from a small "
                                           "table (GPUs) or a nominal CPU estimate")
    progress: bool = config_field(True, "show a progress bar on stderr")
    carbon_region: str = config_field(DEFAULT_CARBON_REGION, f"{CARBON_REGION_HELP}; metrics.jsonl rows and the run "
                                      "summary carry energy_kwh and kg_co2e (lmforge/train/energy.py)")


@dataclass
class DataConfig:
    """Which splits of the prepared data directory to read."""

    train_split: str = config_field("train", "split trained on (SPLIT.bin)")
    val_split: str = config_field("val", "split evaluated on (SPLIT.bin)")


@dataclass
class ObjectiveConfig:
    """Settings of the pretraining objectives other than causal_lm (train.objective)."""

    mask_prob: float = config_field(0.15, "mlm: share of tokens selected for prediction (ModernBERT uses 0.3)")
    whole_word_mask: bool = config_field(False, "mlm: select whole words (all their WordPiece '##' / BPE pieces) together")
    noise_density: float = config_field(0.15, "span_corruption: share of each window's tokens dropped from the source (T5)")
    mean_span_length: float = config_field(3.0, "span_corruption: mean length of a dropped span (T5)")
    num_sentinels: int = config_field(100, "span_corruption: sentinel ids (<extra_id_i>, or the last rows of the model vocabulary)")
    infill_ratio: float = config_field(0.3, "text_infilling: share of tokens replaced by mask spans (BART)")
    poisson_lambda: float = config_field(3.0, "text_infilling: mean span length, Poisson distributed (BART)")
    permute_sentences: bool = config_field(True, "text_infilling: shuffle the sentences of each window first (BART)")
    image_augment: float = config_field(0.0, "clip: strength of the random view of each training image (resized crop, "
                                        "rotation, flip, colour jitter, grey scale; lmforge.data.images.augment); 0 = none")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # type: ignore[valid-type]
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


# Train keys that may differ between a checkpoint's config and the config a run is resumed with.
RESUMABLE_TRAIN_KEYS = ("max_steps", "max_minutes", "eval_every", "eval_iters", "log_every", "ckpt_every",
                        "keep_checkpoints", "keep_best", "progress", "compile", "device", "peak_flops",
                        "carbon_region")
RESUMABLE_CHANGES = frozenset(f"train.{k}" for k in RESUMABLE_TRAIN_KEYS)


def recipe_path(name: str) -> Path:
    """The YAML file of a recipe shipped in lmforge/recipes/."""
    root = resources.files("lmforge.recipes")
    available = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
    if name not in available:
        import difflib

        near = difflib.get_close_matches(name, available, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise LMForgeError(f"unknown recipe '{name}'{hint}; recipes: {', '.join(available) or 'none'}")
    return Path(str(root / f"{name}.yaml"))


def gather_config_dict(config_file: str | None = None, overrides: typing.Sequence[str] | dict = (),
                       recipe: str | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge base, recipe, config file and overrides into one nested dict (not yet validated)."""
    merged: dict[str, Any] = dict(base or {})
    if recipe:
        merged = deep_merge(merged, load_yaml(recipe_path(recipe)))
    if config_file:
        merged = deep_merge(merged, load_yaml(config_file))
    over = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    return deep_merge(merged, over)


def build_config(config_file: str | None = None, overrides: typing.Sequence[str] | dict = (),
                 recipe: str | None = None, base: dict[str, Any] | None = None) -> RunConfig:
    """RunConfig from the layers above, every key and value type checked."""
    return from_dict(RunConfig, gather_config_dict(config_file, overrides, recipe, base))


def resolve_model(cfg: RunConfig, data_vocab_size: int) -> Any:
    """The model config to train (of the preset's family): preset, then the keys the user set,
    vocab from the data. A pretraining objective of another family (mlm, span corruption) starts
    from that family's default preset while model.preset is the decoder default."""
    from lmforge.models.registry import family_of_preset
    from lmforge.train.objectives import pretraining_spec

    preset = cfg.model.preset or DEFAULT_PRESET
    spec = pretraining_spec(cfg.train.objective)
    if preset == DEFAULT_PRESET and spec.default_preset is not None:
        preset = spec.default_preset
    family = family_of_preset(preset)
    user = {k: v for k, v in dataclasses.asdict(cfg.model).items() if v is not None and k != "preset"}
    valid = {f.name for f in dataclasses.fields(family.config_cls)}
    foreign = sorted(set(user) - valid)
    if foreign:
        raise LMForgeError(f"model.{foreign[0]} is not a key of the {family.name} family (model.preset {preset}); "
                           f"its keys: {', '.join(sorted(valid - {'preset'}))}")
    if "vocab_size" in user and user["vocab_size"] < data_vocab_size:
        raise LMForgeError(f"model.vocab_size ({user['vocab_size']}) is smaller than the data's tokenizer "
                           f"vocabulary ({data_vocab_size}); remove model.vocab_size to use the tokenizer's")
    user["vocab_size"] = max(user.get("vocab_size", 0), data_vocab_size)
    return family.config_from_preset(preset, **user)


def resolved_dict(cfg: RunConfig, model_cfg: DecoderConfig) -> dict[str, Any]:
    """The config as written to RUN/config.yaml: model keys fully resolved, seq_len/min_lr filled in."""
    d = dataclasses.asdict(cfg)
    d["model"] = dataclasses.asdict(model_cfg)
    d["train"]["seq_len"] = effective_seq_len(cfg, model_cfg)
    d["train"]["min_lr"] = effective_min_lr(cfg)
    return d


def effective_seq_len(cfg: RunConfig, model_cfg: DecoderConfig) -> int:
    return cfg.train.seq_len if cfg.train.seq_len is not None else model_cfg.block_size


def effective_min_lr(cfg: RunConfig) -> float:
    return cfg.train.min_lr if cfg.train.min_lr is not None else cfg.train.lr / 10


def validate(cfg: RunConfig, model_cfg: Any) -> None:
    """Value checks the type system cannot express, each naming its key."""
    validate_train(cfg.train)
    seq = effective_seq_len(cfg, model_cfg)
    if seq <= 0:
        raise LMForgeError(f"train.seq_len must be positive, got {seq}")
    if seq > model_cfg.block_size:
        raise LMForgeError(f"train.seq_len ({seq}) is longer than model.block_size ({model_cfg.block_size}); "
                           f"raise model.block_size or lower train.seq_len")


def validate_train(t: TrainConfig) -> None:
    """Checks of the `train` section alone (every method's loop settings)."""
    positive = ("max_steps", "micro_batch_size", "grad_accum", "eval_iters", "log_every")
    for key in positive:
        if getattr(t, key) <= 0:
            raise LMForgeError(f"train.{key} must be positive, got {getattr(t, key)}")
    for key in ("warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints", "weight_decay", "grad_clip"):
        if getattr(t, key) < 0:
            raise LMForgeError(f"train.{key} must not be negative, got {getattr(t, key)}")
    if t.lr <= 0:
        raise LMForgeError(f"train.lr must be positive, got {t.lr}")
    min_lr = t.min_lr if t.min_lr is not None else t.lr / 10
    if min_lr < 0 or min_lr > t.lr:
        raise LMForgeError(f"train.min_lr must be between 0 and train.lr ({t.lr}), got {t.min_lr}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise LMForgeError(f"train.max_minutes must be positive, got {t.max_minutes}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise LMForgeError(f"train.{key} must be in [0, 1), got {getattr(t, key)}")


def config_hash(resolved: dict[str, Any]) -> str:
    """sha256 of the resolved config without the keys that may change on resume."""
    flat = {k: v for k, v in flatten(resolved).items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix == "":
            out.update(flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key (old -> new)' for every key that differs and may not change on resume."""
    a, b = flatten(saved), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key} ({a.get(key)} -> {b.get(key)})")
    return diffs


def _type_str(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(tp)):
        return (_type_str(args[0]) if len(args) == 1 else "|".join(map(_type_str, args))) + "?"
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def config_help(root: type | None = None, command: str = "lmforge train",
                defaults: dict[str, dict[str, Any]] | None = None) -> str:
    """Every config key with its type, default and help, for `lmforge train --help-config` (or, with
    `root`, a fine-tuning method's config: `lmforge finetune METHOD --help-config`).

    A type ending in '?' also accepts none/null (meaning "unset": use the default or the preset).
    """
    root = root or RunConfig
    rows = []
    for section in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        hints = typing.get_type_hints(cls)
        inst = cls()
        for f in dataclasses.fields(cls):
            default = getattr(inst, f.name)
            default = ((defaults or {}).get(section.name) or {}).get(f.name, default)  # the command's own
            shown = "preset" if section.name == "model" and default is None else json.dumps(default)
            rows.append((f"{section.name}.{f.name}", _type_str(hints[f.name]), shown, f.metadata.get("help", "")))
    kw = max(len(r[0]) for r in rows)
    tw = max(len(r[1]) for r in rows)
    dw = max(len(r[2]) for r in rows)
    lines = [f"Config keys of `{command}`: set them in a --config YAML file (under the section name),",
             "a --recipe, or as --section.key VALUE. Precedence: defaults < recipe < --config < flags.",
             *(["model.* keys default to model.preset's value; model.vocab_size comes from the data's tokenizer."]
               if root is RunConfig else []),
             "A type ending in '?' also accepts 'none'.", "",
             f"  {'key':<{kw}}  {'type':<{tw}}  {'default':<{dw}}  help"]
    for key, tp, default, help_ in rows:
        lines.append(f"  {key:<{kw}}  {tp:<{tw}}  {default:<{dw}}  {help_}")
    return "\n".join(lines)
