"""Built-in sentiment data: the human-rated corpora of the VADER paper (Hutto & Gilbert, ICWSM 2014).

The `vaderSentiment==3.3.2` source distribution on PyPI (MIT) ships them in
`additional_resources/hutto_ICWSM_2014.tar.gz`: 10,605 movie-review sentences (Pang & Lee) rated by
about 20 people each on -4..+4, plus tweets, Amazon product-review snippets and New York Times
editorial snippets. `lmforge data sentiment --out DIR` fetches the sdist with
`pip download --no-deps --no-binary :all:`, checks its sha256, and writes

    train.jsonl, val.jsonl, test.jsonl      movie sentences, a fixed 80/10/10 split by sentence id
    test_tweets.jsonl, test_products.jsonl, test_news.jsonl   the other domains (out-of-domain tests)
    meta.json                               counts per file and label, source and its sha256

Each line is {"text": ..., "label": "positive" | "negative", "rating": mean}: mean rating > 0 is
positive, < 0 negative; sentences rated exactly 0 are left out. The split of a sentence depends
only on its id (sha256 of "movie:<id>"), so it never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import LMForgeError

VADER_PIN = "vaderSentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DOMAINS = {  # output file -> ground-truth file inside hutto_ICWSM_2014.tar.gz
    "movies": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "test_tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
    "test_products": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "test_news": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
}
SPLIT = (80, 90)  # sha256 bucket < 80: train, < 90: val, else test
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_tweets.jsonl", "test_products.jsonl", "test_news.jsonl")


def vader_sdist(progress: bool = True) -> Path:
    """The cached, verified vaderSentiment sdist (downloaded with pip on first use)."""
    from lmforge.data.corpus import cache_root, sha256_file

    root = cache_root()
    final = root / VADER_SDIST
    if final.is_file() and sha256_file(final) == VADER_SHA256:
        return final
    if progress:
        print(f"downloading {VADER_PIN} (source distribution, 2.5 MB) from PyPI into {root}", file=sys.stderr)
    try:
        root.mkdir(parents=True, exist_ok=True)
        dl = Path(tempfile.mkdtemp(prefix=".download.", dir=root))
    except OSError as e:
        raise LMForgeError(f"cannot create the cache directory {root}: {e.strerror}") from None
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", VADER_PIN, "-d", str(dl),
               "-q", "--disable-pip-version-check"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise LMForgeError(f"{VADER_PIN} could not be downloaded ({type(e).__name__}: {e})") from None
        got = dl / VADER_SDIST
        if proc.returncode != 0 or not got.is_file():
            lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip() and not ln.startswith("WARNING")]
            reason = lines[-1].strip() if lines else f"pip exited with status {proc.returncode}"
            raise LMForgeError(f"{VADER_PIN} could not be downloaded ({reason}); check the connection to PyPI")
        digest = sha256_file(got)
        if digest != VADER_SHA256:
            raise LMForgeError(f"{VADER_SDIST} has sha256 {digest}, expected {VADER_SHA256}; refusing to use it")
        os.replace(got, final)
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    return final


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        f = tar.extractfile(name)
    except KeyError:
        f = None
    if f is None:
        raise LMForgeError(f"{name} is missing from the archive")
    return f.read()


def read_corpora(sdist: Path) -> dict[str, list[dict[str, Any]]]:
    """{domain: [{"id", "rating", "text"}]} from the sdist's hutto_ICWSM_2014.tar.gz."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = _member(outer, _INNER)
    out: dict[str, list[dict[str, Any]]] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for domain, name in DOMAINS.items():
            raw = _member(inner, name)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t", 2)
                if len(parts) != 3:
                    raise LMForgeError(f"{name}:{n}: expected 'id<TAB>rating<TAB>text'")
                rows.append({"id": parts[0].strip(), "rating": float(parts[1]), "text": parts[2].strip()})
            out[domain] = rows
    return out


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


def _row(r: dict[str, Any]) -> Optional[dict[str, Any]]:
    if r["rating"] == 0 or not r["text"]:
        return None
    return {"text": r["text"], "label": "positive" if r["rating"] > 0 else "negative", "rating": r["rating"]}


def build_sentiment(out: str | Path, overwrite: bool = False, sdist: Optional[Path] = None,
                    progress: bool = True) -> dict[str, Any]:
    """Write the sentiment files into `out` (atomically: a temp dir renamed into place); returns meta."""
    from lmforge.checkpoint import atomic_write_text, replace_dir_atomically

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LMForgeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    sdist = sdist or vader_sdist(progress)
    corpora = read_corpora(sdist)
    files: dict[str, list[dict[str, Any]]] = {name: [] for name in FILES}
    for r in corpora["movies"]:
        row = _row(r)
        if row is None:
            continue
        b = _bucket(f"movie:{r['id']}")
        files["train.jsonl" if b < SPLIT[0] else "val.jsonl" if b < SPLIT[1] else "test.jsonl"].append(row)
    for domain in ("test_tweets", "test_products", "test_news"):
        files[f"{domain}.jsonl"] = [row for row in map(_row, corpora[domain]) if row is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta: dict[str, Any] = {"source": VADER_PIN, "sha256": VADER_SHA256, "archive": _INNER,
                                "labels": ["negative", "positive"], "rule": "mean rating > 0 positive, < 0 negative",
                                "split": "movie sentences by sha256('movie:<id>') % 100: <80 train, <90 val, else test",
                                "files": {}}
        for name, rows in files.items():
            atomic_write_text(tmp / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            meta["files"][name] = {"examples": len(rows),
                                   "positive": sum(r["label"] == "positive" for r in rows),
                                   "negative": sum(r["label"] == "negative" for r in rows)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
        replace_dir_atomically(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def vader_analyzer(sdist: Optional[Path] = None) -> Any:
    """VADER's own SentimentIntensityAnalyzer, loaded from the verified sdist (no install needed)."""
    import importlib.util

    from lmforge.data.corpus import cache_root

    sdist = sdist or vader_sdist()
    target = cache_root() / "vaderSentiment-3.3.2-code"
    if not (target / "vaderSentiment.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist, "r:gz") as tar:
            for name in ("vaderSentiment.py", "vader_lexicon.txt", "emoji_utf8_lexicon.txt"):
                (target / name).write_bytes(_member(tar, f"vaderSentiment-3.3.2/vaderSentiment/{name}"))
    spec = importlib.util.spec_from_file_location("_lmforge_vader", target / "vaderSentiment.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.SentimentIntensityAnalyzer()
