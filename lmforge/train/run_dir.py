"""The run directory (`--out RUN`): which checkpoint a resume starts from, what may be written where.

    resolve_resume(resume, out)        'auto' -> RUN's latest checkpoint, a path -> that checkpoint
    saved_config(resume, out)          the config the checkpoint to resume was trained with
    check_out_dir(out, resuming, ...)  refuse to write into a directory holding something else
    check_resume_matches(ckpt, ...)    refuse to resume with another config or other data
    park_previous_run(out, entries)    --overwrite: move the old run aside until the new one has a checkpoint
    restore_previous_run(out, entries) the new run stopped before its first checkpoint: the old run comes back
    write_run_files(out, config, ...)  config.yaml (headed by what the run trains) and the job's files

Layout: docs/architecture.md, "Run directory". Only lmforge's own entries are ever moved or replaced.
A run that stops before its first checkpoint holds nothing to resume: its directory is reused by
the next run without --overwrite (and an old run it had parked is put back).
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any, Sequence

import yaml

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.train.config import RESUMABLE_TRAIN_KEYS, config_differences

PREVIOUS_RUN = ".previous_run"  # where --overwrite parks the old run until the new one has a checkpoint
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "loss.png", "tokenizer.json", "data_meta.json", "checkpoints")


def resolve_resume(resume: str, out: Path) -> Path | None:
    """'auto' -> latest checkpoint of `out` (None if it has none); a path -> that checkpoint."""
    if resume == "auto":
        return ckpt_io.latest_checkpoint(out) if out.is_dir() else None
    path = Path(resume)
    if not path.exists():
        raise LMForgeError(f"checkpoint to resume from not found: {path}")
    return ckpt_io.resolve_checkpoint(path)


def saved_config(resume: str, out: Path) -> dict[str, Any] | None:
    """The resolved config stored with the checkpoint `resume` names (None: no checkpoint yet)."""
    found = resolve_resume(resume, out)
    if found is None:
        return None
    state, _ = ckpt_io.load_train_state(found, with_tensors=False)
    return state.get("config") if isinstance(state.get("config"), dict) else None


def holds_run(out: Path) -> bool:
    """`out` holds a run worth keeping: one with a checkpoint, or the run an --overwrite parked that
    its replacement has not yet succeeded (the replacement was killed before its first checkpoint)."""
    return ckpt_io.latest_checkpoint(out) is not None or ckpt_io.is_run_dir(out / PREVIOUS_RUN)


def check_out_dir(out: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse to write into a directory holding something else (read-only; every rank runs it)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if holds_run(out):
        if not (resuming or overwrite):
            raise LMForgeError(f"{out} already holds a training run; pass --resume auto to continue it "
                               "or --overwrite to start over")
        return
    if ckpt_io.is_run_dir(out):  # a run that stopped before its first checkpoint: nothing to keep
        return
    if any(out.iterdir()):
        raise LMForgeError(f"{out} is not empty and holds no lmforge run; choose a new or empty --out directory")


def check_resume_matches(ckpt: Path, state: dict[str, Any], config: dict[str, Any], data_fingerprint: Any) -> None:
    """The run resumed from `ckpt` (its train state `state`) must have the same config, but for the
    keys that may change on resume, and the same data."""
    diffs = config_differences(state.get("config", {}), config)
    if diffs:
        keys = ", ".join(RESUMABLE_TRAIN_KEYS[:-1]) + f" and {RESUMABLE_TRAIN_KEYS[-1]}"
        raise LMForgeError(f"the config differs from the one checkpoint {ckpt} was trained with: {'; '.join(diffs)}; "
                           f"only the train keys {keys} may change")
    saved = state.get("data") or {}
    now = data_fingerprint or {}
    if isinstance(saved, dict) and isinstance(now, dict):
        differ = sorted(k for k in set(saved) | set(now) if k != "dir" and k in saved and saved.get(k) != now.get(k))
        if differ:
            what = "meta.json splits" if differ == ["splits"] else ", ".join(differ)
            raise LMForgeError(f"the data in {now.get('dir', '?')} is not the data checkpoint {ckpt} was trained on "
                               f"({what} differ)")


def park_previous_run(out: Path, entries: Sequence[str] = RUN_ENTRIES) -> Path:
    """--overwrite: move the old run's files to RUN/.previous_run (deleted after the new run's first
    checkpoint). Only lmforge's own entries move; anything else in RUN is left alone."""
    prev = out / PREVIOUS_RUN
    has_ckpt = ckpt_io.latest_checkpoint(out) is not None
    if prev.exists() and not has_ckpt:
        # An earlier --overwrite stopped before its first checkpoint: keep the parked run, drop the stub.
        for name in entries:
            _remove(out / name)
        return prev
    shutil.rmtree(prev, ignore_errors=True)
    prev.mkdir()
    for name in entries:
        if (out / name).exists():
            (out / name).rename(prev / name)
    return prev


def restore_previous_run(out: Path, entries: Sequence[str] = RUN_ENTRIES) -> None:
    """Undo `park_previous_run` when the new run stops before its first checkpoint: its files go,
    the parked run's files come back, RUN/.previous_run goes."""
    prev = out / PREVIOUS_RUN
    if not prev.is_dir():
        return
    for name in entries:
        _remove(out / name)
    for item in prev.iterdir():
        item.rename(out / item.name)
    prev.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_run_files(out: Path, config: dict[str, Any], files: dict[str, bytes], model_note: str = "") -> None:
    """RUN/config.yaml (the resolved config, headed by `model_note`: what the run trains, as YAML
    comments that reading the file ignores) and the job's files, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in textwrap.wrap(model_note, 98)) if model_note else ""
    ckpt_io.atomic_write_text(out / "config.yaml", header + yaml.safe_dump(config, sort_keys=False))
    for name, data in files.items():
        ckpt_io.atomic_write_bytes(out / name, data)
