"""`lmforge data emoji`: files, captions, the held-out style and held-out emoji splits, the caption
tokenizer, pinned and cached tarballs; on tiny fake tarballs built here (no network)."""

from __future__ import annotations

import json

import pytest

from emoji_fixtures import MISSING, N_EMOJI, fake_pins
from lmforge.data import emoji
from lmforge.errors import LMForgeError


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pins_are_the_four_16_0_0_tarballs():
    assert {s: (p.registry, p.spec, p.filename) for s, p in emoji.PINS.items()} == {
        s: ("npm", f"emoji-datasource-{s}@16.0.0", f"emoji-datasource-{s}-16.0.0.tgz") for s in emoji.STYLES}
    assert emoji.PINS["google"].sha256 == "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"
    assert all(len(p.sha256) == 64 for p in emoji.PINS.values())


def test_captions_and_the_emoji_split_are_fixed():
    e = {"name": "GRINNING FACE", "short_names": ["grinning", "big_smile"], "subcategory": "face-smiling"}
    assert emoji.caption(e) == "grinning face; grinning, big smile; face smiling"
    assert emoji.emoji_split("1F600") == emoji.emoji_split("1F600")
    splits = [emoji.emoji_split(f"{0x1F000 + i:X}") for i in range(4000)]
    assert abs(splits.count("test_emoji") / 4000 - 0.10) < 0.015 and abs(splits.count("val") / 4000 - 0.05) < 0.012


def test_build_writes_splits_by_whole_emoji_and_style(tmp_path, monkeypatch):
    tarballs = fake_pins(monkeypatch, tmp_path)
    meta = emoji.build_emoji(tmp_path / "out", from_file=tarballs, test_style="twitter", progress=False)
    out = tmp_path / "out"
    index = rows(out / "emoji.jsonl")
    assert len(index) == N_EMOJI and all(r["category"] != "Component" for r in index)  # swatches dropped
    assert meta["categories"] == sorted({r["category"] for r in index}, key=[r["category"] for r in index].index)
    assert len(meta["categories"]) == 9 and meta["train_styles"] == ["google", "apple", "facebook"]
    split_of = {r["code"]: r["split"] for r in index}
    tr, va, ts, te = (rows(out / f"{n}.jsonl") for n in ("train", "val", "test_style", "test_emoji"))
    assert meta["splits"] == {"train": len(tr), "val": len(va), "test_style": len(ts), "test_emoji": len(te)}
    # held-out style: never trained on; its rows are the training emoji in that style
    assert {r["style"] for r in tr} == {"google", "apple", "facebook"} and {r["style"] for r in ts} == {"twitter"}
    assert {r["code"] for r in ts} == {r["code"] for r in tr}
    # held-out emoji: in no training or validation row, in every style that draws them
    held = {c for c, s in split_of.items() if s == "test_emoji"}
    assert held and not held & {r["code"] for r in tr + va + ts}
    assert {r["code"] for r in te} == held and {r["style"] for r in te} == set(emoji.STYLES)
    assert {r["code"] for r in va} == {c for c, s in split_of.items() if s == "val"}
    from lmforge.data.sampling import fixed_shuffle

    for part in (tr, va, ts, te):  # each file in its fixed shuffle
        assert part == fixed_shuffle(part, key=lambda r: f"{r['code']}/{r['style']}")
    assert [r["code"] for r in tr[:6]] != sorted(r["code"] for r in tr[:6])
    # an emoji a style does not draw has no row in it
    code = {i: f"{0x1F300 + i:X}" for i in range(N_EMOJI)}
    for style, i in MISSING:
        assert not [r for r in tr + va + ts + te if r["code"] == code[i] and r["style"] == style]
    n_rows = sum(1 for s in emoji.STYLES for i in range(N_EMOJI) if (s, i) not in MISSING)
    assert len(tr) + len(va) + len(ts) + len(te) == n_rows - sum(1 for c, s in split_of.items() if s == "val")
    # image paths exist and are the packages' 64x64 PNGs; captions as caption() makes them
    from PIL import Image

    for r in tr[:5] + te[:5]:
        with Image.open(out / r["image"]) as im:
            assert im.size == (64, 64)
        assert r["caption"] == f"{r['name']}; thing {int(r['name'].split()[-1])}, t {int(r['name'].split()[-1])}; " \
                               f"group {int(r['name'].split()[-1]) % 9}"
    # the caption tokenizer ends every caption with <|endoftext|> (id 0) and pads with <|pad|> (id 1)
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(out / "tokenizer.json")
    b = tok.batch(["thing number 3; thing 3", "t"])
    assert tok.vocab_size == 1024 and tok.eos_id == 0 and tok.pad_id == 1
    ids = b["input_ids"].tolist()
    assert ids[0][-1] == 0 and ids[1][b["attention_mask"][1].sum() - 1] == 0 and ids[1][-1] == 1


def test_cached_tarballs_are_reused_and_out_is_protected(tmp_path, monkeypatch):
    tarballs = fake_pins(monkeypatch, tmp_path)
    emoji.build_emoji(tmp_path / "out", from_file=tarballs, progress=False)
    for p in tarballs.iterdir():
        p.unlink()  # the cache holds them now: no fetch, no --from-file needed
    with pytest.raises(LMForgeError, match=r"--out .*out exists and is not empty; pass --overwrite to replace it"):
        emoji.build_emoji(tmp_path / "out", progress=False)
    meta = emoji.build_emoji(tmp_path / "out", overwrite=True, test_style="apple", progress=False)
    assert meta["test_style"] == "apple"
    with pytest.raises(LMForgeError, match="--test-style must be one of google, apple, twitter, facebook, got 'x'"):
        emoji.build_emoji(tmp_path / "o2", test_style="x")


def test_a_tampered_tarball_is_refused(tmp_path, monkeypatch):
    tarballs = fake_pins(monkeypatch, tmp_path)
    (tarballs / emoji.PINS["apple"].filename).write_bytes(b"not a tarball")
    with pytest.raises(LMForgeError, match="--from-file .*emoji-datasource-apple-16.0.0.tgz has sha256 .*, expected"):
        emoji.build_emoji(tmp_path / "out", from_file=tarballs, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_data_emoji(tmp_path, monkeypatch, capsys):
    from lmforge.cli import main

    tarballs = fake_pins(monkeypatch, tmp_path)
    assert main(["data", "emoji", "--out", str(tmp_path / "out"), "--from-file", str(tarballs)]) == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {tmp_path / 'out'}: train {meta['splits']['train']:,} images (google, apple, facebook)")
