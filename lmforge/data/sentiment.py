"""Built-in sentiment data: the human-rated corpora of the VADER paper (Hutto & Gilbert, ICWSM 2014).

The `vaderSentiment==3.3.2` source distribution on PyPI (MIT) ships them in
`additional_resources/hutto_ICWSM_2014.tar.gz`: 10,605 movie-review sentences (Pang & Lee) rated by
about 20 people each on -4..+4, plus tweets, Amazon product-review snippets and New York Times
editorial snippets. `lmforge data sentiment --out DIR` fetches the sdist into the lmforge cache
(`lmforge.data.fetch`: pip, or `--from-file PATH` offline), checks its sha256, and writes

    train.jsonl, val.jsonl, test.jsonl      movie sentences, a fixed 80/10/10 split by sentence id
    test_tweets.jsonl, test_products.jsonl, test_news.jsonl   the other domains (out-of-domain tests)
    meta.json                               counts per file and label, source and its sha256

Each line is {"text": ..., "label": "positive" | "negative", "rating": mean}: mean rating > 0 is
positive, < 0 negative; sentences rated exactly 0 are left out. The split of a sentence depends
only on its id (sha256 of "movie:<id>"), so it never changes between runs or machines; each file is
in a fixed shuffle (by the sentence's key), so its first rows are a fair sample of the whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

from lmforge.data.fetch import PinnedFile, Purpose, fetch_pinned, unpacked
from lmforge.data.sampling import fixed_shuffle
from lmforge.errors import LMForgeError

VADER = PinnedFile("pypi", "vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                   "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
SENTIMENT = Purpose("the VADER sentiment corpora", "lmforge data sentiment")
_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
DOMAINS = {  # output file -> ground-truth file inside hutto_ICWSM_2014.tar.gz
    "movies": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "test_tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
    "test_products": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "test_news": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
}
SPLIT = (80, 90)  # sha256 bucket < 80: train, < 90: val, else test
FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "test_tweets.jsonl", "test_products.jsonl", "test_news.jsonl")


def vader_sdist(progress: bool = True, from_file: str | Path | None = None) -> Path:
    """The cached, verified vaderSentiment sdist (fetched with pip on first use, or from `from_file`)."""
    return fetch_pinned(VADER, SENTIMENT, from_file, progress)


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


def build_sentiment(out: str | Path, overwrite: bool = False, from_file: str | Path | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Write the sentiment files into `out` (atomically: a temp dir renamed into place); returns meta.
    `from_file`: the vaderSentiment sdist, fetched elsewhere (used instead of downloading it)."""
    from lmforge.checkpoint import atomic_write_text, replace_dir_atomically

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LMForgeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    corpora = read_corpora(vader_sdist(progress, from_file))
    keyed: dict[str, list[tuple[str, dict[str, Any]]]] = {name: [] for name in FILES}  # (sentence key, row)
    for domain, rows in corpora.items():
        for r in rows:
            row = _row(r)
            if row is None:
                continue
            key = f"{'movie' if domain == 'movies' else domain}:{r['id']}"
            if domain == "movies":
                b = _bucket(key)
                name = "train.jsonl" if b < SPLIT[0] else "val.jsonl" if b < SPLIT[1] else "test.jsonl"
            else:
                name = f"{domain}.jsonl"
            keyed[name].append((key, row))
    # The source files are sorted (the movie sentences start with hundreds of positives): each file is
    # written in a fixed shuffle, so its first rows are a fair sample (a partial validation reads them).
    files = {name: [row for _, row in fixed_shuffle(pairs, lambda kr: kr[0])] for name, pairs in keyed.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta: dict[str, Any] = {"source": VADER.spec, "sha256": VADER.sha256, "archive": _INNER,
                                "labels": ["negative", "positive"], "rule": "mean rating > 0 positive, < 0 negative",
                                "split": "movie sentences by sha256('movie:<id>') % 100: <80 train, <90 val, else test",
                                "order": "each file shuffled by sha256 of the sentence's '<domain>:<id>' key",
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


def vader_analyzer(progress: bool = True) -> Any:
    """VADER's own SentimentIntensityAnalyzer, loaded from the verified sdist (no install needed)."""
    import importlib.util

    code = ("vaderSentiment.py", "vader_lexicon.txt", "emoji_utf8_lexicon.txt")
    members = {f"vaderSentiment-3.3.2/vaderSentiment/{name}": name for name in code}
    target = unpacked(VADER, "vaderSentiment-3.3.2-code", members.get, len(code), "VADER code files", SENTIMENT,
                      progress=progress)
    spec = importlib.util.spec_from_file_location("_lmforge_vader", target / "vaderSentiment.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.SentimentIntensityAnalyzer()
