"""Checkpoint files: the only module that reads or writes them.

A *model directory* is self-contained and is what `LLM.load` reads:
    model_config.json    DecoderConfig as JSON ({"family": "decoder", "config": {...}}; a quantised
                         model adds "quantization": {scheme, group_size, embeddings, compute_dtype})
    model.safetensors    weights (tied weights stored once, under tok_emb.weight)
    tokenizer.json       optional; the tokenizer the model was trained with
A training *run directory* holds `config.yaml`, `metrics.jsonl` and `checkpoints/step_XXXXXXXX/`
(each a model directory plus the training-state sidecar) and `checkpoints/latest`; with
train.keep_best also `checkpoints/best/` (the best validation model, a model directory).

A checkpoint of a sharded (FSDP) run keeps its model and optimizer in `sharded/`, written by every
process through torch.distributed.checkpoint (DCP: one `__RANK_0.distcp` file per process plus
`.metadata`), beside model_config.json and the training-state sidecar; the run's last checkpoint
also holds the consolidated `model.safetensors` (the full weights gathered to rank 0), so it is a
model directory like any other. `consolidate_sharded` (`lmforge convert CKPT --out DIR`) turns any
sharded checkpoint into a model directory, in one process.

Every write goes to a temporary name, is fsynced, then renamed: a checkpoint exists only once it is
complete, so a run killed at any moment leaves its last complete checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LMForgeError

MODEL_CONFIG = "model_config.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
GENERATION_FORMAT = "generation_format.json"  # how a source-to-target fine-tune reads its prompts (infer/prompt.py)
CKPT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"  # checkpoints/best: the best validation model of a run with train.keep_best
BEST_EVAL = "best_eval.json"  # in checkpoints/best: the evaluation row that made it the best
SHARDED = "sharded"  # in a checkpoint of an FSDP run: the DCP shards of the model and the optimizer
LORA_BASE = "lora_base.json"  # in a LoRA run's model directory (adapter, no model.safetensors): its base's path


# ---- atomic file primitives ------------------------------------------------------------------

def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()

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


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path`; once the block has written it, it is fsynced and renamed
    over `path` (readers see the old file or the whole new one, never a part); on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; give them the usual umask mode
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tmp + fsync + rename)."""
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


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
    for key in (model.tied_state_keys() if hasattr(model, "tied_state_keys") else []):
        state.pop(key, None)
    return state


def model_config_json(model: torch.nn.Module) -> dict[str, Any]:
    from dataclasses import asdict

    meta = {"family": getattr(model, "family", "decoder"), "config": asdict(model.cfg)}
    if getattr(model, "quantization", None) is not None:  # nn/quant.py's QuantConfig of a quantised model
        meta["quantization"] = asdict(model.quantization)
    return meta


def write_model_dir(directory: str | Path, model: torch.nn.Module, tokenizer_path: str | Path | None = None,
                    extra_files: dict[str, bytes] | None = None,
                    weights: Callable[[Path], None] | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model directory (in place; callers wanting atomicity write into a temp dir and rename).
    `extra_files` (name -> bytes) travel with the model: tokenizer_config.json, chat_template.jinja, ...
    `weights(directory)` writes the weights instead of model.safetensors (a sharded checkpoint's are
    already in sharded/; a LoRA run's adapter and LORA_BASE); `state` replaces the model's own state in
    model.safetensors (a sharded model's weights gathered to rank 0)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = model_config_json(model)
    if weights is not None:
        weights(directory)
    else:
        save_tensors(directory / MODEL_WEIGHTS, model_state_for_saving(model) if state is None else state,
                     metadata={"format": "pt", "lmforge": meta["family"]})
    atomic_write_text(directory / MODEL_CONFIG, json.dumps(meta, indent=2))
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        if Path(tokenizer_path).resolve() != (directory / TOKENIZER).resolve():
            atomic_write_bytes(directory / TOKENIZER, Path(tokenizer_path).read_bytes())
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(directory / name, data)
    return directory


def is_sharded(ckpt_dir: str | Path) -> bool:
    """Whether a checkpoint keeps its model and optimizer as DCP shards (an FSDP run's)."""
    return (Path(ckpt_dir) / SHARDED / ".metadata").is_file()


def holds_weights(directory: Path) -> bool:
    """Whether a model directory has its weights: model.safetensors, (FSDP) its shards, or (LoRA) an
    adapter and its base."""
    return (directory / MODEL_WEIGHTS).is_file() or is_sharded(directory) or (directory / LORA_BASE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none yet."""
    run_dir = Path(run_dir)
    pointer = run_dir / CKPT_DIR / LATEST
    if pointer.is_file():
        candidate = run_dir / CKPT_DIR / pointer.read_text(encoding="utf-8").strip()
        if holds_weights(candidate):
            return candidate
    steps = sorted(p for p in (run_dir / CKPT_DIR).glob("step_*") if holds_weights(p))
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its latest checkpoint; a model or checkpoint directory to itself."""
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


def resolve_model_dir(path: str | Path) -> Path:
    """`resolve_checkpoint`, for loading the model: a sharded checkpoint without consolidated weights
    (not the run's last) is named with the command that consolidates it."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / MODEL_WEIGHTS).is_file() and not (ckpt / LORA_BASE).is_file() and is_sharded(ckpt):
        raise LMForgeError(f"{ckpt} is a sharded (FSDP) checkpoint without consolidated weights; "
                           f"`lmforge convert {ckpt} --out DIR` writes them as a model directory")
    return ckpt


def _check_names(expected: dict[str, torch.Tensor], names: set[str], source: Path) -> None:
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise LMForgeError(f"{source} does not match the model config ({'; '.join(parts)})")


def _check_shape(name: str, t: torch.Tensor, expected: dict[str, torch.Tensor], source: Path) -> None:
    if tuple(t.shape) != tuple(expected[name].shape):
        raise LMForgeError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the config expects {tuple(expected[name].shape)}")


def _after_loading(model: torch.nn.Module) -> None:
    if hasattr(model, "retie"):
        model.retie()
    if hasattr(model, "rebuild_buffers"):
        model.rebuild_buffers()


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights, naming any missing/unexpected tensor or shape mismatch; re-ties and rebuilds buffers."""
    expected = model_state_for_saving(model)
    _check_names(expected, set(state), source)
    for name, t in state.items():
        _check_shape(name, t, expected, source)
    model.load_state_dict(state, strict=False, assign=True)
    _after_loading(model)


# safetensors dtype names of the tensors lmforge writes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def load_state_streamed(model: torch.nn.Module, path: Path) -> None:
    """`load_state_checked` from a weights file, read tensor by tensor straight into the model's own
    (allocated) tensors: no second copy of the weights is ever in memory, not even the file's pages
    mapped (safetensors' loaders map the file, and mapped pages count as resident)."""
    expected = model_state_for_saving(model)
    if not path.is_file():
        raise LMForgeError(f"checkpoint file missing: {path}")

    def corrupt(why: str) -> LMForgeError:
        return LMForgeError(f"checkpoint file {path} is truncated or corrupt ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt("no header")
        try:
            header = json.loads(f.read(int.from_bytes(head, "little")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"header: {e}") from None
        data_start = 8 + int.from_bytes(head, "little")
        header.pop("__metadata__", None)
        _check_names(expected, set(header), path)
        for name, info in header.items():
            dst = expected[name]
            _check_shape(name, torch.empty(info["shape"], device="meta"), expected, path)
            if SAFETENSORS_DTYPES.get(info["dtype"]) != dst.dtype:
                raise LMForgeError(f"{path}: tensor '{name}' is {info['dtype']}, the config expects {dst.dtype}")
            begin, end = info["data_offsets"]
            buf = dst if dst.device.type == "cpu" and dst.is_contiguous() else torch.empty_like(dst, device="cpu")
            f.seek(data_start + begin)
            if end - begin != buf.nbytes or f.readinto(memoryview(buf.view(-1).view(torch.uint8).numpy())) != buf.nbytes:
                raise corrupt(f"tensor '{name}' is short")
            if buf is not dst:
                with torch.no_grad():
                    dst.copy_(buf)
    _after_loading(model)


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


# ---- training state (resume) -------------------------------------------------------------------
# A training checkpoint is a model directory plus two sidecar files:
#   train_state.safetensors  optimizer / grad-scaler tensors and RNG states (uint8), no pickle
#   train_state.json         step, tokens, schedule, data position, config, and the structure that
#                            puts the tensors back into the optimizer's state_dict

TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
RUN_CONFIG = "config.yaml"
RUN_METRICS = "metrics.jsonl"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """A JSON-able copy of a nested state (dicts, lists, tuples, scalars, tensors) plus its tensors.

    Each tensor becomes {"__tensor__": name}; dicts whose keys are not all strings (an optimizer's
    per-parameter state is keyed by int) and tuples are tagged so `unflatten_state` rebuilds them.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        name = prefix
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: flatten_state(v, tensors, f"{prefix}.{k}")[0] for k, v in obj.items()}, tensors
        items = [[k, flatten_state(v, tensors, f"{prefix}.{k}")[0]] for k, v in obj.items()]
        return {"__items__": items}, tensors
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)]}, tensors
    if isinstance(obj, list):
        return [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor], source: Path | None = None) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            name = obj["__tensor__"]
            if name not in tensors:
                raise LMForgeError(f"{source or TRAIN_STATE_TENSORS} lacks the tensor '{name}' that {TRAIN_STATE_JSON} names")
            return tensors[name]
        if "__items__" in obj:
            return {k: unflatten_state(v, tensors, source) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors, source) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors, source) for v in obj]
    return obj


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_dirs(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """The hidden directory checkpoint `step` is written into before it is renamed into place."""
    return Path(run_dir) / CKPT_DIR / f".tmp_{checkpoint_name(step)}"


def start_staging(run_dir: str | Path, step: int) -> Path:
    """An empty `staging_dir` (rank 0 makes it before every process writes its shards into it)."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_sharded(ckpt_dir: str | Path, state: dict[str, Any]) -> None:
    """This process's shards of `state` into CKPT/sharded (DCP; every process calls it, each file
    fsynced; the checkpoint becomes visible only when its staging directory is renamed)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=dcp.FileSystemWriter(Path(ckpt_dir) / SHARDED, sync_files=True))


def load_sharded(ckpt_dir: str | Path, state: dict[str, Any]) -> None:
    """Fill `state` (shaped as it was saved, for this process's shards) from CKPT/sharded, in place."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(Path(ckpt_dir) / SHARDED))
    except (RuntimeError, ValueError, KeyError, OSError) as e:  # DCP wraps per-rank failures in CheckpointException
        raise LMForgeError(f"{Path(ckpt_dir) / SHARDED} does not fit this model and optimizer "
                           f"({str(e).strip().splitlines()[0]})") from None


def consolidate_sharded(ckpt_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """A model directory at `out_dir` from a sharded checkpoint, in this one process: every model
    tensor of CKPT/sharded read whole (DCP reassembles the shards), plus the checkpoint's
    model_config.json, tokenizer and other model files. Atomic (temp directory, then rename)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not is_sharded(ckpt_dir):
        raise LMForgeError(f"{ckpt_dir} is not a sharded checkpoint (no {SHARDED}/.metadata)")
    if (ckpt_dir / LORA_BASE).is_file():  # a sharded LoRA run's: the shards hold only the adapter
        raise LMForgeError(f"{ckpt_dir} is a LoRA checkpoint whose adapter is already a model directory: load it "
                           f"as it is, or merge it into its base ({LORA_BASE}) with `lmforge merge BASE {ckpt_dir} "
                           "--out DIR`")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise LMForgeError(f"--out {out_dir} is not empty; pass --overwrite to replace it")
    reader = dcp.FileSystemReader(ckpt_dir / SHARDED)
    weights = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in reader.read_metadata().state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = read_json(ckpt_dir / MODEL_CONFIG)
    save_tensors(tmp / MODEL_WEIGHTS, weights, metadata={"format": "pt", "lmforge": meta["family"]})
    for f in ckpt_dir.iterdir():  # model_config.json, tokenizer.json, chat template, ...: not the training state
        if f.is_file() and f.name not in (MODEL_WEIGHTS, TRAIN_STATE_JSON, TRAIN_STATE_TENSORS):
            atomic_write_bytes(tmp / f.name, f.read_bytes())
    replace_dir_atomically(tmp, out_dir)
    return out_dir


def write_train_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                           tensors: dict[str, torch.Tensor], tokenizer_path: str | Path | None = None,
                           keep: int = 0, extra_files: dict[str, bytes] | None = None,
                           weights: Callable[[Path], None] | None = None,
                           model_state: dict[str, torch.Tensor] | None = None, staged: bool = False) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX atomically, point `latest` at it, keep the newest `keep`.

    Everything goes into a hidden temp directory first, which is renamed into place only once
    complete; `latest` is updated after that. A crash at any point leaves the previous checkpoint
    as the latest complete one. `weights` and `model_state` (its `state`) as in `write_model_dir`;
    `staged`: the temp directory already holds the processes' shards (`start_staging`, `save_sharded`).
    """
    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = staging_dir(run_dir, step)
    if not staged:
        shutil.rmtree(tmp, ignore_errors=True)
    write_model_dir(tmp, model, tokenizer_path, extra_files, weights=weights, state=model_state)
    save_tensors(tmp / TRAIN_STATE_TENSORS, tensors, metadata={"format": "pt", "lmforge": "train_state"})
    atomic_write_text(tmp / TRAIN_STATE_JSON, json.dumps(state, indent=1))
    final = root / name
    replace_dir_atomically(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    if keep > 0:
        for old in _step_dirs(root)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def write_best_checkpoint(run_dir: str | Path, model: torch.nn.Module, eval_row: dict[str, Any],
                          extra_files: dict[str, bytes] | None = None,
                          weights: Callable[[Path], None] | None = None,
                          model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Replace RUN/checkpoints/best atomically with `model` (a model directory, not resumable) and the
    evaluation row that made it the best. `latest` never points at it, so a run still loads its last
    checkpoint; `LLM.load(RUN/checkpoints/best)` loads this one."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_dir(tmp, model, extra_files=extra_files, weights=weights, state=model_state)
    atomic_write_text(tmp / BEST_EVAL, json.dumps(eval_row, indent=1))
    final = root / BEST
    replace_dir_atomically(tmp, final)
    return final


def load_train_state(ckpt_dir: str | Path, with_tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(train_state.json contents, train_state.safetensors tensors) of a training checkpoint
    (tensors {} when with_tensors is False: reading the config and counters only)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / TRAIN_STATE_JSON).is_file():
        raise LMForgeError(f"{ckpt_dir} holds no training state ({TRAIN_STATE_JSON}); it is a model directory "
                           "that can be loaded but not resumed")
    state = read_json(ckpt_dir / TRAIN_STATE_JSON)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise LMForgeError(f"{ckpt_dir / TRAIN_STATE_JSON} is corrupt: no step number")
    tensors = load_tensors(ckpt_dir / TRAIN_STATE_TENSORS) if with_tensors else {}
    return state, tensors


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` holds an lmforge training run (its config.yaml plus metrics or checkpoints)."""
    path = Path(path)
    return (path / RUN_CONFIG).is_file() and ((path / RUN_METRICS).is_file() or (path / CKPT_DIR).is_dir())
