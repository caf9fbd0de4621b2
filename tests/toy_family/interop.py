"""The toy family's interop module: a Hugging Face-style folder is config.json {"architectures":
["ToyForCausalLM"], ...} + model.safetensors with the same tensor names. The protocol of
lmforge/interop/__init__.py, nothing else."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmforge.checkpoint import MODEL_WEIGHTS, atomic_write_text, load_tensors, save_tensors, write_model_dir
from lmforge.interop.files import HF_CONFIG, SAFE_WEIGHTS, TempDir, check_out, load_hf_tokenizer
from lmforge.models.registry import build_model, get_family

ARCHITECTURES = ("ToyForCausalLM",)


def recognises(folder: Path, hf: dict | None) -> bool:
    return hf is not None and hf.get("architectures") == ["ToyForCausalLM"]


def _config(hf: dict) -> Any:
    fam = get_family("toy")
    return fam.config_cls(**{k: v for k, v in hf.items() if k != "architectures"})


def load_hf(folder: Path, hf: dict, device: Any = "cpu", dtype: Any = None):
    cfg = _config(hf)
    model = build_model(get_family("toy"), cfg, device, load_tensors(folder / SAFE_WEIGHTS), folder).eval()
    return model, cfg, load_hf_tokenizer(folder, hf)


def convert_from_hf(folder: Path, hf: dict, out: Path, overwrite: bool = False) -> Path:
    check_out(out, overwrite, folder)
    model, _, _ = load_hf(folder, hf)
    with TempDir(out) as tmp:
        write_model_dir(tmp, model)
    return out


def convert_to_hf(model_dir: Path, cfg: Any, out: Path, overwrite: bool = False, max_shard_size: int = 0) -> Path:
    check_out(out, overwrite, model_dir)
    with TempDir(out) as tmp:
        save_tensors(tmp / SAFE_WEIGHTS, load_tensors(model_dir / MODEL_WEIGHTS))
        atomic_write_text(tmp / HF_CONFIG, json.dumps({"architectures": list(ARCHITECTURES), **asdict(cfg)}))
    return out
