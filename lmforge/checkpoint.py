"""Checkpoint files: the only module that reads or writes them.

A *model directory* is self-contained and is what `LLM.load` reads:
    model_config.json    DecoderConfig as JSON ({"family": "decoder", "config": {...}})
    model.safetensors    weights (tied weights stored once, under tok_emb.weight)
    tokenizer.json       optional; the tokenizer the model was trained with
A training *run directory* holds `config.yaml`, `metrics.jsonl` and `checkpoints/step_XXXXXXXX/`
(each a model directory plus the training-state sidecar) and `checkpoints/latest`.

Every write goes to a temporary name, is fsynced, then renamed: a checkpoint exists only once it is
complete, so a run killed at any moment leaves its last complete checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LMForgeError

MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
CKPT_DIR = "checkpoints"
LATEST = "latest"


# ---- atomic file primitives ------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tmp + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LMForgeError(f"checkpoint file {path} is truncated or corrupt ({str(e).splitlines()[0]})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"checkpoint file missing: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path} is corrupt: {e}") from None


# ---- model directories -----------------------------------------------------------------------

def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with shared (tied) tensors stored once, as safetensors requires."""
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def write_model_dir(directory: str | Path, model: torch.nn.Module, tokenizer_path: str | Path | None = None) -> Path:
    """Write a model directory (in place; callers wanting atomicity write into a temp dir and rename)."""
    from dataclasses import asdict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / MODEL_WEIGHTS, model_state_for_saving(model), metadata={"format": "pt", "lmforge": "decoder"})
    atomic_write_text(directory / MODEL_CONFIG, json.dumps({"family": "decoder", "config": asdict(model.cfg)}, indent=2))
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        if Path(tokenizer_path).resolve() != (directory / TOKENIZER).resolve():
            atomic_write_bytes(directory / TOKENIZER, Path(tokenizer_path).read_bytes())
    return directory


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none yet."""
    run_dir = Path(run_dir)
    pointer = run_dir / CKPT_DIR / LATEST
    if pointer.is_file():
        candidate = run_dir / CKPT_DIR / pointer.read_text(encoding="utf-8").strip()
        if (candidate / MODEL_WEIGHTS).is_file():
            return candidate
    steps = sorted(p for p in (run_dir / CKPT_DIR).glob("step_*") if (p / MODEL_WEIGHTS).is_file())
    return steps[-1] if steps else None


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory resolves to its latest checkpoint; a model directory to itself."""
    path = Path(path)
    if not path.exists():
        raise LMForgeError(f"checkpoint not found: {path}")
    if path.is_file():
        raise LMForgeError(f"expected a run or model directory, got the file {path}")
    if (path / MODEL_CONFIG).is_file() or (path / MODEL_WEIGHTS).is_file():
        return path
    if (path / CKPT_DIR).is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise LMForgeError(f"run {path} has no complete checkpoint yet")
        return ckpt
    raise LMForgeError(f"{path} holds no lmforge checkpoint (no {MODEL_CONFIG}, {MODEL_WEIGHTS} or {CKPT_DIR}/)")


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, DecoderConfig, tokenizer.json path or None) from a run or model directory."""
    from lmforge.config import from_dict
    from lmforge.models.decoder import Decoder, DecoderConfig

    directory = resolve_model_dir(path)
    meta = read_json(directory / MODEL_CONFIG)
    if not isinstance(meta, dict) or meta.get("family") != "decoder" or not isinstance(meta.get("config"), dict):
        raise LMForgeError(f"{directory / MODEL_CONFIG} is not an lmforge model config")
    cfg = from_dict(DecoderConfig, meta["config"], prefix="model.")
    state = load_tensors(directory / MODEL_WEIGHTS)
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device=device)
    load_state_checked(model, state, directory / MODEL_WEIGHTS)
    model.eval()
    tok = directory / TOKENIZER
    return model, cfg, (tok if tok.is_file() else None)


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights, naming any missing/unexpected tensor or shape mismatch; re-ties and rebuilds buffers."""
    expected = model_state_for_saving(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise LMForgeError(f"{source} does not match the model config ({'; '.join(parts)})")
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LMForgeError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the config expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.cfg, "tie_embeddings", False):
        model.lm_head.weight = model.tok_emb.weight
    _rebuild_buffers(model)


def _rebuild_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (RoPE / sinusoidal tables) are not in the file; recompute them."""
    from lmforge.nn.layers import rope_cos_sin, rope_inv_freq, sinusoidal_table

    cfg = model.cfg
    device = model.tok_emb.weight.device
    if cfg.pos_encoding == "rope":
        inv, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.block_size)
        cos, sin = rope_cos_sin(inv, cfg.block_size, factor)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    elif cfg.pos_encoding == "sinusoidal":
        model.pos_table = sinusoidal_table(cfg.block_size, cfg.n_embd).to(device)


def replace_dir_atomically(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a fully written temp directory into place (old one removed only after)."""
    fsync_dir(tmp_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
