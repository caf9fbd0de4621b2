"""Tiny fake emoji-datasource tarballs (four styles, the npm packages' layout) and the data set built
from them with the pins pointed at them: no network."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np

from lmforge.data import emoji
from lmforge.data.fetch import sha256_file

CATEGORIES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
              "Activities", "Objects", "Symbols", "Flags"]
N_EMOJI = 60
MISSING = {("facebook", 5), ("apple", 7)}  # (style, emoji) not drawn in that style


def entries() -> list[dict]:
    out = [{"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png",
            "short_names": ["skin-tone-2"], "category": "Component", "subcategory": "skin-tone", "sort_order": 0}]
    for i in range(N_EMOJI):
        code = f"{0x1F300 + i:X}"
        out.append({"name": f"THING NUMBER {i}", "unified": code, "image": f"{code.lower()}.png",
                    "short_names": [f"thing_{i}", f"t-{i}"], "category": CATEGORIES[i % 9],
                    "subcategory": f"group-{i % 9}", "sort_order": i + 1})
    return out


def png(i: int, style: int) -> bytes:
    """A 64x64 RGBA picture: a square whose colour says the category and whose size says the emoji."""
    from PIL import Image

    a = np.zeros((64, 64, 4), dtype=np.uint8)
    half = 8 + (i * 3) % 24
    colour = [(i % 9) * 28, 255 - (i % 9) * 28, (i * 37) % 256]
    a[32 - half:32 + half, 32 - half:32 + half, :3] = np.clip(np.array(colour) + style * 6, 0, 255)
    a[32 - half:32 + half, 32 - half:32 + half, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tarballs(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    es = entries()
    paths = {}
    for s, style in enumerate(emoji.STYLES):
        path = directory / emoji.PINS[style].filename
        with tarfile.open(path, "w:gz") as tar:
            add(tar, "package/package.json", b"{}")
            add(tar, "package/emoji.json", json.dumps(es).encode())
            for i, e in enumerate(es):
                if (style, i - 1) not in MISSING:
                    add(tar, f"package/img/{style}/64/{e['image']}", png(i, s))
            add(tar, f"package/img/{style}/32/{es[1]['image']}", png(1, s))  # other sizes are not read
        paths[style] = path
    return paths


def fake_pins(monkeypatch, tmp_path: Path) -> Path:
    """Fake tarballs in tmp_path/tarballs, the pins' sha256 set to theirs, the cache in tmp_path/cache."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    paths = write_tarballs(tmp_path / "tarballs")
    pins = {s: dataclasses.replace(emoji.PINS[s], sha256=sha256_file(p)) for s, p in paths.items()}
    monkeypatch.setattr(emoji, "PINS", pins)
    return tmp_path / "tarballs"
