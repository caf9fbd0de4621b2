"""`lmforge data sentiment`: labels from mean ratings, a split fixed by sentence id, files in a fixed
shuffle, out-of-domain files (built from a small stand-in of the vaderSentiment sdist's archive, given
with --from-file; the real one is fetched by pip)."""

import hashlib
import io
import json
import tarfile

import pytest
from data_fixtures import pinned_to

from lmforge.data import sentiment
from lmforge.data.sentiment import DOMAINS, FILES, build_sentiment, read_corpora
from lmforge.errors import LMForgeError


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def fake_sdist(tmp_path, n_movies=400, sorted_by_label=False):
    ratings = {i: (i % 9 - 4) / 2 for i in range(1, n_movies + 1)}
    if sorted_by_label:  # as the real file: every positive sentence first
        ratings = {i: (1.5 if i <= n_movies // 2 else -1.5) for i in ratings}
    movies = "".join(f"{i}\t{r}\tmovie sentence number {i}\r\n" for i, r in ratings.items())
    other = "".join(f"1_{i}\t{(-1) ** i * 0.5}\tother text {i}\r\n" for i in range(1, 21)) + "1_99\t0\tneutral\r\n"
    inner = _tar_bytes({DOMAINS["movies"]: movies.encode(), **{DOMAINS[d]: other.encode() for d in
                                                                 ("test_tweets", "test_products", "test_news")}})
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    return path


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    """build(out, **fake_sdist options): build_sentiment from a stand-in sdist given as --from-file."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))

    def build(out, **kw):
        path = fake_sdist(tmp_path, **kw)
        monkeypatch.setattr(sentiment, "VADER", pinned_to(sentiment.VADER, path))
        return build_sentiment(out, from_file=path, progress=False)
    return build


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sentiment_files_labels_and_fixed_split(tmp_path, sdist):
    meta = sdist(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([*FILES, "meta.json"])
    movies = {r["text"]: r for f in ("train", "val", "test") for r in read(tmp_path / "a" / f"{f}.jsonl")}
    # rating 0 (i % 9 == 4) is left out; > 0 positive, < 0 negative
    assert len(movies) == 400 - len([i for i in range(1, 401) if i % 9 == 4])
    for i in range(1, 401):
        r = movies.get(f"movie sentence number {i}")
        rating = (i % 9 - 4) / 2
        assert (r is None) == (rating == 0)
        if r is not None:
            assert r["label"] == ("positive" if rating > 0 else "negative") and r["rating"] == rating
    sizes = [meta["files"][f]["examples"] for f in ("train.jsonl", "val.jsonl", "test.jsonl")]
    assert 0.7 < sizes[0] / sum(sizes) < 0.9 and sizes[1] > 10 and sizes[2] > 10
    assert meta["files"]["test_news.jsonl"] == {"examples": 20, "positive": 10, "negative": 10}
    # a sentence's split depends on its id only: fewer sentences, same assignment for those left
    sdist(tmp_path / "b", n_movies=200)
    for f in ("train", "val", "test"):
        small = {r["text"] for r in read(tmp_path / "b" / f"{f}.jsonl")}
        big = {r["text"] for r in read(tmp_path / "a" / f"{f}.jsonl")}
        assert small <= big
    with pytest.raises(LMForgeError, match="exists and is not empty; pass --overwrite"):
        sdist(tmp_path / "a")


def test_broken_archive_is_a_one_line_error(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/README.rst": b"hi"}))
    with pytest.raises(LMForgeError, match="hutto_ICWSM_2014.tar.gz is missing from the archive"):
        read_corpora(bad)


def test_split_files_are_in_a_fixed_shuffle(tmp_path, sdist):
    """The source lists every positive sentence first; the files are shuffled by sentence id, so the
    first rows of val.jsonl (what a partial validation reads) hold both labels, and the members of
    each split are those of the id rule, whatever the order."""
    meta = sdist(tmp_path / "a", sorted_by_label=True)
    val = read(tmp_path / "a" / "val.jsonl")
    assert meta["files"]["val.jsonl"] == {"examples": 45, "positive": 20, "negative": 25}
    assert [r["label"] for r in val[:10]].count("positive") == 4  # in id order: all 10
    assert [int(r["text"].rsplit(" ", 1)[1]) for r in val] != sorted(int(r["text"].rsplit(" ", 1)[1]) for r in val)
    for f, (lo, hi) in {"train": (0, 80), "val": (80, 90), "test": (90, 100)}.items():
        ids = {int(r["text"].rsplit(" ", 1)[1]) for r in read(tmp_path / "a" / f"{f}.jsonl")}
        assert ids == {i for i in range(1, 401)
                       if lo <= int.from_bytes(hashlib.sha256(f"movie:{i}".encode()).digest()[:8], "big") % 100 < hi}
    # the same order on every build; a smaller corpus keeps the relative order of what is left
    sdist(tmp_path / "b", sorted_by_label=True)
    assert read(tmp_path / "b" / "val.jsonl") == val
    sdist(tmp_path / "c", n_movies=200)
    small = [r["text"] for r in read(tmp_path / "c" / "val.jsonl")]
    sdist(tmp_path / "d")
    assert small == [r["text"] for r in read(tmp_path / "d" / "val.jsonl") if r["text"] in set(small)]
