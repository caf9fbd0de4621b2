"""`lmforge data sentiment`: labels from mean ratings, a split fixed by sentence id, out-of-domain files
(built from a small stand-in of the vaderSentiment sdist's archive; the real one is fetched by pip)."""

import io
import json
import tarfile

import pytest

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


def fake_sdist(tmp_path, n_movies=400):
    movies = "".join(f"{i}\t{(i % 9 - 4) / 2}\tmovie sentence number {i}\r\n" for i in range(1, n_movies + 1))
    other = "".join(f"1_{i}\t{(-1) ** i * 0.5}\tother text {i}\r\n" for i in range(1, 21)) + "1_99\t0\tneutral\r\n"
    inner = _tar_bytes({DOMAINS["movies"]: movies.encode(), **{DOMAINS[d]: other.encode() for d in
                                                                 ("test_tweets", "test_products", "test_news")}})
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sentiment_files_labels_and_fixed_split(tmp_path):
    meta = build_sentiment(tmp_path / "a", sdist=fake_sdist(tmp_path), progress=False)
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
    build_sentiment(tmp_path / "b", sdist=fake_sdist(tmp_path, 200), progress=False)
    for f in ("train", "val", "test"):
        small = {r["text"] for r in read(tmp_path / "b" / f"{f}.jsonl")}
        big = {r["text"] for r in read(tmp_path / "a" / f"{f}.jsonl")}
        assert small <= big
    with pytest.raises(LMForgeError, match="exists and is not empty; pass --overwrite"):
        build_sentiment(tmp_path / "a", sdist=fake_sdist(tmp_path), progress=False)


def test_broken_archive_is_a_one_line_error(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/README.rst": b"hi"}))
    with pytest.raises(LMForgeError, match="hutto_ICWSM_2014.tar.gz is missing from the archive"):
        read_corpora(bad)
