"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapter(model, out_dir, base=PATH)  -> out_dir     an lmforge adapter as PEFT writes it
    load_adapter(model, adapter_dir)          -> settings    a PEFT (or lmforge) adapter onto a model
    read_adapter_config(adapter_dir)          -> dict        its checked adapter_config.json

Key names are those of the architecture the base exports to (`lmforge convert --to-hf`):
`base_model.model.<HF module>.lora_A.weight` (r, K) and `.lora_B.weight` (N, r), so
`peft.PeftModel.from_pretrained(hf_model, out_dir)` on the export gives lmforge's logits, and an
adapter PEFT trained on that architecture loads here.

lmforge fuses projections that the HF architecture may keep apart, or the other way round (GPT-2
fuses q|k|v in `c_attn`, Llama does not); nn/lora.py keeps one (A, B) per role segment. An HF module
covered by exactly one segment gets that segment's A and its rows of B, with its own rank and alpha
(PEFT's `rank_pattern` / `alpha_pattern` where they differ from `r` / `lora_alpha`). An HF module
covered by several segments (GPT-2's c_attn under q,k,v) gets them stacked, A = [A_q; A_k; A_v]
and B block-diagonal, each block scaled by its segment's scaling and the module's scaling set to 1:
the same update, exactly. Loading does the reverse: every PEFT module becomes one segment on the
rows it owns. Families without a Hugging Face tensor map keep their own module names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import atomic_write_text, load_tensors, save_tensors
from lmforge.errors import LMForgeError
from lmforge.interop.files import HF_CONFIG, HF_CONFIG_SIDECAR, read_json_file
from lmforge.nn.lora import (DEFAULT_ADAPTER, LoRALinear, LoRASettings, freeze_base, linear_roles,
                             lora_modules, segment_name)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_TASK_TYPES = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# ---- where lmforge's linears lie in the HF architecture ------------------------------------------------

def _origin(base: str | Path | None) -> dict:
    """The HF config the base came from (its config.json, or an import's sidecar), {} if none."""
    if base is None:
        return {}
    for name in (HF_CONFIG_SIDECAR, HF_CONFIG):
        path = Path(base) / name
        if path.is_file():
            data = read_json_file(path)
            return data if isinstance(data, dict) else {}
    return {}


def _module_parts(model: torch.nn.Module, base: str | Path | None) -> tuple[str | None, dict[str, list]]:
    """(HF architecture or None, {lmforge linear: [(module name in the adapter file, first row, end row)]})."""
    from lmforge.models.registry import family_of

    roles = linear_roles(model)
    cfg = getattr(model, "cfg", None)
    interop = None
    if cfg is not None:
        family = family_of(cfg)
        interop = family.interop_module() if family.interop is not None else None
    if interop is None or not hasattr(interop, "hf_tensor_parts"):
        return None, {m: [(m, 0, max(e for _, e in segs.values()))] for m, segs in roles.items()}
    arch = interop.export_architecture(cfg, _origin(base))
    tensors = interop.hf_tensor_parts(cfg, arch)
    parts = {}
    for module in roles:
        entry = tensors.get(f"{module}.weight")
        if entry is not None:
            parts[module] = [(name[: -len(".weight")], start, end) for name, start, end in entry[0]]
    return arch, parts


def hf_module_rows(model: torch.nn.Module, base: str | Path | None = None) -> dict[str, list[tuple[str, int, int]]]:
    """{lmforge linear: [(its module in the exported HF architecture, first row, end row)]}: what
    `--lora.targets` also accepts (PEFT's target_modules: q_proj, c_attn, ...); {} for a family
    without a Hugging Face tensor map."""
    arch, parts = _module_parts(model, base)
    return parts if arch is not None else {}


def _tensor_names(model: torch.nn.Module, base: str | Path | None) -> dict[str, str]:
    """{lmforge parameter: name in the adapter file} for modules_to_save (one-part, untransposed tensors)."""
    from lmforge.models.registry import family_of

    cfg = getattr(model, "cfg", None)
    family = family_of(cfg) if cfg is not None else None
    interop = family.interop_module() if family is not None and family.interop is not None else None
    if interop is None or not hasattr(interop, "hf_tensor_parts"):
        return {}
    tensors = interop.hf_tensor_parts(cfg, interop.export_architecture(cfg, _origin(base)))
    return {lm: parts[0][0] for lm, (parts, transposed) in tensors.items() if len(parts) == 1 and not transposed}


# ---- save ---------------------------------------------------------------------------------------------

def save_adapter(model: torch.nn.Module, out_dir: str | Path, *, base: str | Path | None,
                 name: str = DEFAULT_ADAPTER) -> Path:
    """Write adapter `name` of `model` (and its modules_to_save) into `out_dir` in PEFT's format;
    `base` (recorded as base_model_name_or_path) is the model it adapts."""
    out = Path(out_dir)
    settings: LoRASettings | None = getattr(model, "lora_settings", {}).get(name)
    if settings is None:
        raise LMForgeError(f"the model has no LoRA adapter named '{name}'")
    arch, parts = _module_parts(model, base)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module, lora in lora_modules(model).items():
        if name not in lora.adapters:
            continue
        adapter = lora.adapters[name]
        if module not in parts:
            raise LMForgeError(f"the adapter on '{module}' has no place in the {arch} architecture; "
                               "exclude it from lora.targets")
        for hf_module, p_start, p_end in parts[module]:
            covering = [(s, max(start, p_start), min(end, p_end)) for s, (start, end) in adapter.segments.items()
                        if start < p_end and end > p_start]
            if not covering:
                continue
            A_parts, B_blocks = [], []
            for s, lo, hi in covering:
                seg_start = adapter.segments[s][0]
                A_parts.append(adapter.lora_A[s].weight.detach().float())
                B_blocks.append((lo - p_start, hi - p_start, adapter.lora_B[s].weight.detach().float()[lo - seg_start:
                                                                                                        hi - seg_start],
                                 adapter.scaling[s]))
            r = sum(a.shape[0] for a in A_parts)
            if len(covering) == 1 and (B_blocks[0][0], B_blocks[0][1]) == (0, p_end - p_start):
                B, alpha = B_blocks[0][2], _alpha_for(adapter.scaling[covering[0][0]], r, settings.use_rslora)
            else:  # several segments, or part of the rows: stacked, each block carrying its own scaling
                B = torch.zeros(p_end - p_start, r)
                at = 0
                for (lo, hi, b, scaling), a in zip(B_blocks, A_parts):
                    B[lo:hi, at:at + a.shape[0]] = b * scaling
                    at += a.shape[0]
                alpha = _alpha_for(1.0, r, settings.use_rslora)
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = torch.cat(A_parts).contiguous()
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = B.contiguous()
            ranks[hf_module], alphas[hf_module] = r, alpha
    if not ranks:
        raise LMForgeError(f"adapter '{name}' holds no weights")
    names = _tensor_names(model, base)
    saved = dict(_saved_parameters(model, settings))
    saved_modules = sorted({names.get(n, n).rpartition(".")[0] for n in saved})
    # PEFT wraps every module whose name merely ends with an entry ("classifier" takes DistilBERT's
    # "pre_classifier" too) and expects its tensors in the file: save those as well
    plain = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".adapters." not in n}
    for lm, hf in names.items():
        if lm in plain and any(hf.rpartition(".")[0].endswith(m) for m in saved_modules):
            saved.setdefault(lm, plain[lm])
    for pname, p in saved.items():
        tensors[PEFT_PREFIX + names.get(pname, pname)] = p.detach().float().contiguous()
    r0 = settings.r
    alpha0 = float(settings.alpha if settings.alpha is not None else settings.r)
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": str(base) if base is not None else None,
        "r": r0,
        "lora_alpha": alpha0,
        "lora_dropout": settings.dropout,
        "use_rslora": settings.use_rslora,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != r0},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if not math.isclose(a, alpha0)},
        "modules_to_save": saved_modules or None,
        "fan_in_fan_out": arch == "GPT2LMHeadModel",  # GPT-2's Conv1D stores weights transposed
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": arch} if arch else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return out


def _alpha_for(scaling: float, r: int, rslora: bool) -> float:
    """The lora_alpha that gives `scaling` at rank r: PEFT computes alpha / r (rsLoRA: alpha / sqrt(r))."""
    return scaling * (math.sqrt(r) if rslora else r)


def _task_type(model: torch.nn.Module) -> str | None:
    from lmforge.models.registry import family_of

    cfg = getattr(model, "cfg", None)
    return _TASK_TYPES.get(family_of(cfg).name) if cfg is not None else None


def _saved_parameters(model: torch.nn.Module, settings: LoRASettings) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the parameters of settings.modules_to_save, under their plain-model names."""
    wanted = settings.save_list()
    out = []
    for pname, p in model.named_parameters():
        if ".adapters." in pname:
            continue
        plain = pname.replace(".base.", ".")
        module = plain.rpartition(".")[0]
        if any(module == m or module.endswith("." + m) or f".{m}." in f".{module}." for m in wanted):
            out.append((plain, p))
    return out


# ---- load ---------------------------------------------------------------------------------------------

def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter directory, checked."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise LMForgeError(f"{adapter_dir} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    cfg = read_json_file(path)
    if not isinstance(cfg, dict):
        raise LMForgeError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LMForgeError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise LMForgeError(f"{path}: DoRA adapters (use_dora) are not supported")
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise LMForgeError(f"{path}: 'r' must be a positive integer, got {r!r}")
    return cfg


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or a dotted suffix."""
    import re

    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, name: str = DEFAULT_ADAPTER,
                 trainable: bool = False) -> LoRASettings:
    """Add the adapter in `adapter_dir` (PEFT's format) to `model` as adapter `name`; every shape is
    checked against the model (an adapter for another base is an error naming the tensor)."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise LMForgeError(f"{adapter_dir}: adapter_model.bin is a pickle, which lmforge does not load; "
                               "convert it to adapter_model.safetensors (PEFT's default format)")
        raise LMForgeError(f"{adapter_dir}: {ADAPTER_WEIGHTS} is missing")
    tensors = load_tensors(weights_path)
    base = cfg.get("base_model_name_or_path")
    base = base if isinstance(base, str) and Path(base).is_dir() else None
    arch, parts = _module_parts(model, base)
    where: dict[str, tuple[str, int, int]] = {}  # adapter-file module -> (lmforge module, rows)
    for module, plist in parts.items():
        for hf_module, start, end in plist:
            where[hf_module] = (module, start, end)
    names = {v: k for k, v in _tensor_names(model, base).items()}

    by_module: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        for ab in ("lora_A", "lora_B"):
            if k.endswith(f".{ab}.weight"):
                by_module.setdefault(k[: -len(f".{ab}.weight")], {})[ab] = t
                break
        else:
            extra[k] = t
    if not by_module:
        raise LMForgeError(f"{weights_path} holds no LoRA weights (lora_A / lora_B)")

    rslora = bool(cfg.get("use_rslora", False))
    alpha0 = float(cfg.get("lora_alpha", cfg["r"]))
    roles = linear_roles(model)
    segments: dict[str, dict[str, tuple[tuple[int, int], torch.Tensor, torch.Tensor, float]]] = {}
    for hf_module, ab in sorted(by_module.items()):
        if hf_module not in where:
            raise LMForgeError(f"{adapter_dir}: the adapter targets '{hf_module}', which this model "
                               f"({arch or type(model).__name__}) does not have: an adapter for another base?")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LMForgeError(f"{weights_path}: '{hf_module}' has {', '.join(ab)} without its pair")
        module, start, end = where[hf_module]
        A, B = ab["lora_A"], ab["lora_B"]
        in_features = model.get_submodule(module).in_features
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features or B.shape != (end - start, A.shape[0]):
            raise LMForgeError(f"{weights_path}: '{hf_module}' has lora_A {tuple(A.shape)} and lora_B "
                               f"{tuple(B.shape)}, this model needs ({A.shape[0]}, {in_features}) and "
                               f"({end - start}, {A.shape[0]}): an adapter for another base?")
        r = A.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), hf_module, alpha0))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        seg = segment_name(roles[module], start, end, model.get_submodule(module).out_features)
        segments.setdefault(module, {})[seg] = ((start, end), A, B, scaling)

    # modules_to_save by lmforge's module names (the file names them as the HF architecture does)
    lm_module = {hf.rpartition(".")[0]: lm.rpartition(".")[0] for hf, lm in names.items()}
    saved_modules = sorted({lm_module.get(m, m) for m in cfg.get("modules_to_save") or []})
    settings = LoRASettings(r=int(cfg["r"]), alpha=alpha0, dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                            targets=",".join(sorted(segments)), use_rslora=rslora,
                            modules_to_save=",".join(saved_modules))
    _load_saved_modules(model, extra, names, weights_path)
    for module, segs in segments.items():
        parent_name, _, child_name = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, child_name)
        if not isinstance(child, LoRALinear):
            child = LoRALinear(child)
            setattr(parent, child_name, child)
        adapter = child.add_adapter(name, {s: v[0] for s, v in segs.items()}, {s: v[1].shape[0] for s, v in segs.items()},
                                    {s: v[3] for s, v in segs.items()}, settings.dropout)
        with torch.no_grad():
            for s, (_, A, B, _) in segs.items():
                adapter.lora_A[s].weight.copy_(A)
                adapter.lora_B[s].weight.copy_(B)
    configs = dict(getattr(model, "lora_settings", {}))
    configs[name] = settings
    model.lora_settings = configs
    if trainable:
        freeze_base(model, settings.save_list())
    return settings


def _load_saved_modules(model: torch.nn.Module, extra: dict[str, torch.Tensor], names: dict[str, str],
                        where: Path) -> None:
    """Copy the modules_to_save tensors of an adapter file into the model (by HF or lmforge name)."""
    if not extra:
        return
    params = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".adapters." not in n}
    with torch.no_grad():
        for key, t in extra.items():
            lm = names.get(key, key)
            p = params.get(lm)
            if p is None:
                raise LMForgeError(f"{where}: tensor '{key}' matches no parameter of this model")
            if tuple(p.shape) != tuple(t.shape):
                raise LMForgeError(f"{where}: '{key}' has shape {tuple(t.shape)}, this model's is {tuple(p.shape)}")
            p.copy_(t)
