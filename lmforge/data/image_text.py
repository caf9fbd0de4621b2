"""Reading an image-text directory (`lmforge data emoji`'s output, or any directory in its layout) for
contrastive training: SPLIT.jsonl rows {"image": path relative to the directory, "caption", ...},
tokenizer.json and meta.json. `ImageTextData` answers what the pretraining job asks of its data
(`split`, `tokens`, `bytes`, `tokenizer`, `tokenizer_path`, `meta`), as `TokenData` does for token memmaps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LMForgeError


@dataclass
class ImageTextSplit:
    """The rows of one split and the directory their image paths are relative to."""

    name: str
    directory: Path
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def image_paths(self) -> list[Path]:
        return [self.directory / r["image"] for r in self.rows]

    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an image-text JSONL file; each must name an "image" and a "caption"."""
    if not path.is_file():
        raise LMForgeError(f"{path} is missing; build the data with `lmforge data emoji --out {path.parent}`")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{path}:{n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("caption"), str):
            raise LMForgeError(f"{path}:{n} needs string fields 'image' and 'caption'")
        rows.append(row)
    return rows


class ImageTextData:
    """SPLIT.jsonl files, tokenizer.json and meta.json of an image-text directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise LMForgeError(f"image-text data directory not found: {self.directory}")
        meta_path = self.directory / "meta.json"
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LMForgeError(f"{meta_path} is missing; {self.directory} is not an image-text directory "
                               "(`lmforge data emoji --out DIR` makes one)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LMForgeError(f"{meta_path} is corrupt: {e}") from None
        self.tokenizer_path = self.directory / "tokenizer.json"
        if not self.tokenizer_path.is_file():
            raise LMForgeError(f"{self.tokenizer_path} is missing; build the data again")
        self._splits: dict[str, ImageTextSplit] = {}

    def split(self, name: str) -> ImageTextSplit:
        if name not in self._splits:
            self._splits[name] = ImageTextSplit(name, self.directory, read_rows(self.directory / f"{name}.jsonl"))
        return self._splits[name]

    def tokens(self, name: str) -> int:
        return 0  # no token count: validation reports no bits per byte

    def bytes(self, name: str) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return self.tokenizer().vocab_size

    def tokenizer(self) -> Any:
        from lmforge.tokenizer import Tokenizer

        return Tokenizer.from_file(self.tokenizer_path)
