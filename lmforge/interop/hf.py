"""Hugging Face folders in and out, for every model family: which family a folder holds, then that
family's interop module does the work (lmforge/interop/__init__.py describes the protocol).

    load_hf_dir(dir)                       HF folder -> (model, config, Tokenizer or None), in memory
    convert_from_hf(dir, out)              HF folder -> lmforge model directory
    convert_to_hf(run_or_model_dir, out)   lmforge run / model directory -> HF folder transformers loads

The registry (lmforge/models/registry.py) names each family's interop module; a folder belongs to
the first family whose module `recognises` it (config.json's architectures, T5 / BART model types,
or a sentence-transformers modules.json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.checkpoint import MODEL_CONFIG, resolve_model_dir
from lmforge.errors import LMForgeError
from lmforge.interop.files import (HF_CONFIG, SENTENCE_TRANSFORMERS_MODULES, check_out, read_hf_config,
                                   read_json_file)
from lmforge.models.registry import FAMILIES, Family, read_model_config, read_quantization

DEFAULT_MAX_SHARD_SIZE = 5 * 2**30  # bytes per output shard, as transformers' save_pretrained


def _interop_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.interop is not None]


def supported_architectures() -> list[str]:
    """Every transformers architecture some family reads, in table order."""
    return [a for f in _interop_families() for a in f.interop_module().ARCHITECTURES]


def is_hf_dir(path: str | Path) -> bool:
    """A folder in Hugging Face's layout (config.json or a sentence-transformers modules.json) that is
    not an lmforge model directory. Whether a family reads it is `family_of_hf_dir`'s question."""
    path = Path(path)
    return (path.is_dir() and not (path / MODEL_CONFIG).is_file()
            and ((path / HF_CONFIG).is_file() or (path / SENTENCE_TRANSFORMERS_MODULES).is_file()))


def family_of_hf_dir(hf_dir: Path) -> tuple[Family, Optional[dict]]:
    """(the family that reads `hf_dir`, its config.json or None for a sentence-transformers folder
    without one at the top); one clear error when no family does."""
    hf = read_json_file(hf_dir / HF_CONFIG) if (hf_dir / HF_CONFIG).is_file() else None
    for fam in _interop_families():
        if fam.interop_module().recognises(hf_dir, hf if isinstance(hf, dict) else None):
            return fam, hf
    hf = read_hf_config(hf_dir)  # the error for a missing folder or config.json, bad JSON, not an object
    archs = hf.get("architectures")
    source = hf_dir / HF_CONFIG
    if not isinstance(archs, list) or not archs:
        raise LMForgeError(f"{source} names no 'architectures'; supported: {', '.join(supported_architectures())}")
    raise LMForgeError(f"{source}: architecture {', '.join(map(str, archs))} is not supported; "
                       f"supported: {', '.join(supported_architectures())}")


def load_hf_dir(path: str | Path, device: str | torch.device = "cpu",
                dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, Any, Any]:
    """(model in eval mode, its config, Tokenizer or None) from a Hugging Face model folder; weights
    keep their stored dtype unless `dtype` is given."""
    hf_dir = Path(path)
    fam, hf = family_of_hf_dir(hf_dir)
    return fam.interop_module().load_hf(hf_dir, hf, device=device, dtype=dtype)


def convert_from_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the HF folder `hf_dir` as an lmforge model directory `out` (atomic)."""
    src = Path(hf_dir)
    fam, hf = family_of_hf_dir(src)
    return fam.interop_module().convert_from_hf(src, hf, Path(out), overwrite=overwrite)


def convert_to_hf(src: str | Path, out: str | Path, overwrite: bool = False,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write an lmforge run or model directory as a Hugging Face folder that transformers loads."""
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise LMForgeError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    if is_hf_dir(src):
        raise LMForgeError(f"{src} is already a Hugging Face folder (it has a config.json); "
                           "import it with `lmforge convert --from-hf`")
    model_dir = resolve_model_dir(src)
    fam, cfg = read_model_config(model_dir)
    qc = read_quantization(model_dir)
    if qc is not None:
        raise LMForgeError(f"{src} holds {qc.scheme} weights, which Hugging Face folders cannot hold; "
                           "export the full-precision model it was quantised from")
    out_p = Path(out)
    check_out(out_p, overwrite, Path(src))
    return fam.interop_module().convert_to_hf(model_dir, cfg, out_p, overwrite=overwrite, max_shard_size=max_shard_size)
