"""An adapter directory in lmforge's own tensor names: `write_adapter_dir` / `read_adapter_dir`.

A stand-in with the signatures of interop/peft.py's `save_adapter` / `load_adapter` (PEFT's on-disk
format and key names), which a LoRA run's checkpoints will write once that module lands: the files
are PEFT's (adapter_config.json + adapter_model.safetensors) but the keys are `adapter_state_dict`'s
(`MODULE.lora_A.SEGMENT.weight`, modules_to_save under their own names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from lmforge.checkpoint import atomic_write_text, load_tensors, read_json, save_tensors
from lmforge.errors import LMForgeError
from lmforge.nn.lora import DEFAULT_ADAPTER, LoRASettings, adapter_state_dict, add_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter_dir(model: nn.Module, out_dir: str | Path, *, base: str, name: str = DEFAULT_ADAPTER) -> Path:
    """Write adapter `name` of `model` (and its modules_to_save) into `out_dir`, `base` recorded."""
    out = Path(out_dir)
    s: LoRASettings = model.lora_settings[name]
    save_tensors(out / ADAPTER_WEIGHTS, adapter_state_dict(model, name), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "base_model_name_or_path": base, "r": s.r,
              "lora_alpha": s.alpha if s.alpha is not None else s.r, "lora_dropout": s.dropout,
              "target_modules": s.targets, "use_rslora": s.use_rslora,
              "modules_to_save": s.save_list() or None, "lmforge_keys": True}
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return out


def read_adapter_dir(model: nn.Module, adapter_dir: str | Path, name: str = DEFAULT_ADAPTER) -> LoRASettings:
    """Add the adapter of `adapter_dir` to `model` as `name`, checking every tensor's name and shape."""
    d = Path(adapter_dir)
    c = read_json(d / ADAPTER_CONFIG)
    settings = LoRASettings(int(c["r"]), float(c["lora_alpha"]), float(c.get("lora_dropout", 0.0)),
                            c["target_modules"], bool(c.get("use_rslora", False)),
                            ",".join(c.get("modules_to_save") or []))
    add_lora(model, settings, name, freeze=False)
    expected = adapter_state_dict(model, name)
    tensors = load_tensors(d / ADAPTER_WEIGHTS)
    if set(tensors) != set(expected):
        odd = sorted(set(tensors) ^ set(expected))
        raise LMForgeError(f"{d / ADAPTER_WEIGHTS} does not fit this model (tensors {', '.join(odd[:4])} differ)")
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise LMForgeError(f"{d / ADAPTER_WEIGHTS}: '{key}' has shape {tuple(t.shape)}, the model expects "
                               f"{tuple(expected[key].shape)} (an adapter of another base?)")
        expected[key].data.copy_(t)
    return settings
