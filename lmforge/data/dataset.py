"""Reading a prepared data directory (the output of `lmforge prepare`) for training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.errors import LMForgeError

SPLITS = ("train", "val")
_DTYPES = ("uint16", "uint32")


class TokenData:
    """meta.json plus read-only memmaps of train.bin / val.bin, checked against each other on open."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise LMForgeError(f"prepared data directory not found: {self.directory}")
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise LMForgeError(f"{meta_path} is missing; {self.directory} is not a complete `lmforge prepare` output")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LMForgeError(f"{meta_path} is corrupt: {e}") from None
        try:
            self.dtype = np.dtype(meta["dtype"]) if meta["dtype"] in _DTYPES else None
            self.vocab_size = int(meta["vocab_size"])
            self.eos_id = int(meta["eos_id"])
            self.pad_id = None if meta.get("pad_id") is None else int(meta["pad_id"])
            counts = {name: int(meta["splits"][name]["tokens"]) for name in SPLITS}
        except (KeyError, TypeError, ValueError) as e:
            raise LMForgeError(f"{meta_path} lacks or has a malformed field ({e})") from None
        if self.dtype is None:
            raise LMForgeError(f"{meta_path}: dtype must be one of {', '.join(_DTYPES)}, got {meta['dtype']!r}")
        self.meta: dict = meta
        self.tokenizer_path = self.directory / "tokenizer.json"
        if not self.tokenizer_path.is_file():
            raise LMForgeError(f"{self.tokenizer_path} is missing; prepare the data again")
        self._arrays: dict[str, np.ndarray] = {}
        for name in SPLITS:
            path = self.directory / f"{name}.bin"
            if not path.is_file():
                raise LMForgeError(f"{path} is missing; prepare the data again")
            expected = counts[name] * self.dtype.itemsize
            size = path.stat().st_size
            if size != expected:
                raise LMForgeError(
                    f"{path} holds {size} bytes but meta.json says {counts[name]} {self.dtype.name} tokens "
                    f"({expected} bytes); the directory is incomplete or corrupt, prepare it again"
                )
            # np.memmap cannot map an empty file (an empty val split when val_fraction was 0).
            self._arrays[name] = (np.memmap(path, dtype=self.dtype, mode="r", shape=(counts[name],))
                                  if counts[name] else np.empty(0, dtype=self.dtype))

    def _check(self, name: str) -> None:
        if name not in SPLITS:
            raise LMForgeError(f"unknown split '{name}'; splits are: {', '.join(SPLITS)}")

    def split(self, name: str) -> np.ndarray:
        """The split's token ids as a read-only memmap (an empty array for an empty split)."""
        self._check(name)
        return self._arrays[name]

    def tokens(self, name: str) -> int:
        self._check(name)
        return int(self.meta["splits"][name]["tokens"])

    def bytes(self, name: str) -> int:
        """UTF-8 bytes of the split's documents (for bits per byte)."""
        self._check(name)
        return int(self.meta["splits"][name]["bytes"])

    def documents(self, name: str) -> int:
        self._check(name)
        return int(self.meta["splits"][name].get("documents", 0))

    def tokenizer(self):
        from lmforge.tokenizer import Tokenizer

        return Tokenizer.from_file(self.tokenizer_path)

    def __repr__(self) -> str:
        return f"TokenData({str(self.directory)!r}, train={self.tokens('train')}, val={self.tokens('val')}, vocab_size={self.vocab_size})"
