"""`lmforge data emoji --out DIR`: captioned emoji images in four styles, for contrastive image-text training.

Source: the npm packages emoji-datasource-{google,apple,twitter,facebook} 16.0.0 (MIT; iamcal/emoji-data),
fetched as registry tarballs pinned by version and sha256 and kept in the lmforge cache (lmforge/data/fetch.py).
Each holds the same `package/emoji.json` (name, short names, category, subcategory of every emoji) and
64x64 PNGs of its style under `package/img/<style>/64/`. Base emoji only (no skin-tone variants), the
nine categories without "Component" (skin-tone and hair swatches).

Captions: "<name>; <short names>; <subcategory>", lower case, underscores and hyphens as spaces,
e.g. "grinning face; grinning; face smiling".

Splits, by whole emoji (a hash of its code point sequence, so they never change with the data order):
  - held-out emoji: 10% of the base emoji, in no style of any training or validation row (test_emoji.jsonl,
    all styles);
  - validation: another 5% of the emoji, in the training styles (val.jsonl);
  - held-out style: `test_style` (default twitter) is never trained on; test_style.jsonl holds the training
    emoji drawn in it (train.jsonl: the training emoji in the other three styles).

DIR/
  images/<style>/<image>.png      the 64x64 PNGs, as in the packages
  emoji.jsonl                     one row per emoji: code, name, short_names, category, subcategory, caption, split
  train.jsonl val.jsonl test_style.jsonl test_emoji.jsonl
                                  in a fixed shuffle (lmforge.data.sampling.fixed_shuffle), rows {"image": "images/<style>/<file>", "caption", "code", "name", "category",
                                        "subcategory", "style"}
  tokenizer.json                  byte-level BPE trained on the training captions; every text ends with <|endoftext|>
  meta.json                       sources (pins), styles, splits, categories, counts
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any, Optional

from lmforge.data.fetch import PinnedFile, Purpose, fetch_pinned
from lmforge.data.sampling import fixed_shuffle
from lmforge.errors import LMForgeError

VERSION = "16.0.0"
STYLES = ("google", "apple", "twitter", "facebook")
SHA256 = {
    "google": "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    "apple": "b34d1665e136f163b0d4433318df151895b785186e8c729b2211b43017945075",
    "twitter": "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    "facebook": "017038cf5a4e7fcf03dd9133cbed43d4c281c4b3ce7b927c7160261b92b8821e",
}
PINS = {s: PinnedFile("npm", f"emoji-datasource-{s}", VERSION, f"emoji-datasource-{s}-{VERSION}.tgz", SHA256[s])
        for s in STYLES}
EMOJI = Purpose("the emoji image sets", "lmforge data emoji")
SKIPPED_CATEGORIES = ("Component",)  # skin-tone and hair swatches: not pictures of things
HELD_OUT_EMOJI, VAL_EMOJI = 0.10, 0.05
DEFAULT_TEST_STYLE = "twitter"
TOKENIZER_VOCAB = 1024
SPLIT_FILES = ("train", "val", "test_style", "test_emoji")


def caption(entry: dict[str, Any]) -> str:
    """"<name>; <short names>; <subcategory>" in lower case, '_' and '-' as spaces."""
    def words(s: str) -> str:
        return s.replace("_", " ").replace("-", " ").lower().strip()
    shorts = ", ".join(words(s) for s in entry.get("short_names") or [])
    return f"{words(entry['name'])}; {shorts}; {words(entry['subcategory'])}"


def emoji_split(code: str) -> str:
    """'test_emoji' (10%), 'val' (5%) or 'train' for an emoji, from a hash of its code point sequence."""
    u = int.from_bytes(hashlib.sha256(f"lmforge-emoji:{code}".encode()).digest()[:8], "big") / 2**64
    return "test_emoji" if u < HELD_OUT_EMOJI else "val" if u < HELD_OUT_EMOJI + VAL_EMOJI else "train"


def read_tarball(path: Path, style: str) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """(emoji.json entries, {image file name: PNG bytes} of package/img/<style>/64/) of one package tarball."""
    prefix = f"package/img/{style}/64/"
    entries: Optional[list[dict[str, Any]]] = None
    images: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name == "package/emoji.json":
                    entries = json.loads(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
                elif member.name.startswith(prefix) and member.name.endswith(".png") and "/" not in member.name[len(prefix):]:
                    images[member.name[len(prefix):]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LMForgeError(f"{path} is not a readable emoji-datasource tarball ({e})") from None
    if not isinstance(entries, list):
        raise LMForgeError(f"{path} holds no package/emoji.json list")
    return entries, images


def _tarballs(from_dir: str | Path | None, progress: bool) -> dict[str, Path]:
    """The four verified tarballs: from the cache / the registry, or (offline) from `from_dir`."""
    if from_dir is not None and not Path(from_dir).is_dir():
        raise LMForgeError(f"--from-file {from_dir}: for emoji, give the directory holding the four tarballs "
                           f"({', '.join(p.filename for p in PINS.values())})")
    return {s: fetch_pinned(pin, EMOJI, Path(from_dir) / pin.filename if from_dir else None, progress)
            for s, pin in PINS.items()}


def build_emoji(out: str | Path, overwrite: bool = False, from_file: str | Path | None = None,
                test_style: str = DEFAULT_TEST_STYLE, progress: bool = True) -> dict[str, Any]:
    """Write the emoji data set into `out` (atomically: a temp dir renamed into place); returns meta.json."""
    from lmforge.checkpoint import atomic_write_text, replace_dir_atomically

    if test_style not in STYLES:
        raise LMForgeError(f"--test-style must be one of {', '.join(STYLES)}, got '{test_style}'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LMForgeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    tarballs = _tarballs(from_file, progress)
    entries, images = None, {}
    for style, path in tarballs.items():
        e, images[style] = read_tarball(path, style)
        entries = entries or e
    assert entries is not None
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLIT_FILES}
    index, categories = [], []
    for e in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        if e.get("category") in SKIPPED_CATEGORIES or not e.get("name") or not e.get("image"):
            continue
        code, split = e["unified"], emoji_split(e["unified"])
        text = caption(e)
        if e["category"] not in categories:
            categories.append(e["category"])
        index.append({"code": code, "name": e["name"].lower(), "short_names": e.get("short_names") or [],
                      "category": e["category"], "subcategory": e["subcategory"], "caption": text, "split": split})
        for style in STYLES:
            if e["image"] not in images[style]:
                continue  # not drawn in this style (has_img_<style> false)
            row = {"image": f"images/{style}/{e['image']}", "caption": text, "code": code, "name": e["name"].lower(),
                   "category": e["category"], "subcategory": e["subcategory"], "style": style}
            if split == "test_emoji":
                rows["test_emoji"].append(row)
            elif style == test_style:
                if split == "train":
                    rows["test_style"].append(row)
            else:
                rows[split].append(row)
    if not rows["train"]:
        raise LMForgeError("the emoji tarballs hold no training images")
    tokenizer = caption_tokenizer([r["caption"] for r in index if r["split"] == "train"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for style in STYLES:
            (tmp / "images" / style).mkdir(parents=True)
        for name in SPLIT_FILES:
            for r in rows[name]:
                style, file = r["image"].split("/")[1:]
                target = tmp / r["image"]
                if not target.exists():
                    target.write_bytes(images[style][file])
            shuffled = fixed_shuffle(rows[name], key=lambda r: f"{r['code']}/{r['style']}")  # any first part: a fair sample
            atomic_write_text(tmp / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shuffled))
        atomic_write_text(tmp / "emoji.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index))
        tokenizer.save(tmp / "tokenizer.json")
        meta = {"source": {s: {"package": p.spec, "sha256": p.sha256, "license": "MIT"} for s, p in PINS.items()},
                "styles": list(STYLES), "test_style": test_style,
                "train_styles": [s for s in STYLES if s != test_style], "categories": categories,
                "emoji": {k: sum(1 for r in index if r["split"] == k) for k in ("train", "val", "test_emoji")},
                "splits": {name: len(rows[name]) for name in SPLIT_FILES}, "image_size": 64,
                "caption": "<name>; <short names>; <subcategory>", "tokenizer_vocab": tokenizer.vocab_size}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
        replace_dir_atomically(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def caption_tokenizer(captions: list[str], vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """Byte-level BPE on the captions whose post-processor ends every text with <|endoftext|>
    (the token a CLIP text tower pools); padding is <|pad|>."""
    import warnings

    from tokenizers import processors

    from lmforge.tokenizer import EOS_TOKEN, Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small caption set pads the vocabulary with reserved tokens
        tok = Tokenizer.train_bpe(captions, vocab_size)
    eos = tok.hf.token_to_id(EOS_TOKEN)
    tok.hf.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos)])
    return tok
