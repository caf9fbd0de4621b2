from __future__ import annotations

import json
import random
import warnings

import pytest
import tokenizers

from lmforge.errors import LMForgeError
from lmforge.tokenizer import MIN_BPE_VOCAB, SPECIAL_TOKENS, Tokenizer

WORDS = ("the king queen lord lady sword crown castle night day love death speak hear thou thee "
         "thy art hath doth shall would could sweet fair foul good").split()


def corpus(n_lines=400, seed=0):
    rng = random.Random(seed)
    return ["".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", ",", "!", "?"]) + "\n")
            for _ in range(n_lines)]


@pytest.fixture(scope="module")
def bpe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough text for 350 tokens: no padding warning
        return Tokenizer.train_bpe(iter(corpus()), vocab_size=350)


TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\r\nCRLF\n\n\n\nmany blank lines\n",
    "unicode: naïve café Ωμέγα Привет 中文字符 日本語テキスト",
    "emoji 🎉🔥 and a ZWJ family 👨‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 and NBSP\u00a0and ideographic space\u3000end",
    "control \x00\x01\x1c chars and a literal <|endoftext|> and <|pad|> in text",
    "    \n  \t \n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_bpe_exact_vocab_size_and_special_ids(bpe):
    assert bpe.vocab_size == 350 == len(bpe.hf.get_vocab())
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (bpe.eos_id, bpe.pad_id) == (0, 1)
    # Common words became single tokens: BPE really learned merges.
    assert len(bpe.encode(" king queen lord")) == 3


def test_literal_special_text_is_not_a_special_token(bpe):
    ids = bpe.encode("a<|endoftext|>b")
    assert bpe.eos_id not in ids and bpe.decode(ids) == "a<|endoftext|>b"
    ids = bpe.encode("a<|endoftext|>b", allow_special=True)
    assert ids.count(bpe.eos_id) == 1 and bpe.decode(ids) == "a<|endoftext|>b"
    assert bpe.decode(ids, skip_special=True) == "ab"


def test_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]


def test_small_corpus_is_padded_to_exact_vocab_size():
    with pytest.warns(UserWarning, match=r"supports only \d+ BPE tokens; padding the vocabulary to 600"):
        tok = Tokenizer.train_bpe(["tiny text"], vocab_size=600)
    assert tok.vocab_size == 600
    # the trained vocabulary ends at id 267; reserved tokens fill ids 268..599, in order
    assert [tok.token_to_id(f"<|reserved_{i}|>") for i in range(600 - 268)] == list(range(268, 600))
    assert tok.decode(tok.encode("tiny text!")) == "tiny text!"


def test_vocab_size_too_small():
    with pytest.raises(LMForgeError) as e:
        Tokenizer.train_bpe(["x"], vocab_size=MIN_BPE_VOCAB - 1)
    assert str(e.value) == ("vocab_size 260 is too small for a byte-level BPE tokenizer; "
                            "the minimum is 261 (256 bytes + 5 special tokens)")
    assert Tokenizer.train_bpe(["x"], vocab_size=MIN_BPE_VOCAB).vocab_size == 261


def test_save_and_load(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == 350 and (loaded.eos_id, loaded.pad_id) == (0, 1)
    for t in TRICKY:
        assert loaded.encode(t) == bpe.encode(t)
    # HF-style tokenizers name their specials differently: absent tokens give None ids.
    other = Tokenizer.from_file(path, eos_token="</s>", pad_token=None)
    assert other.eos_id is None and other.pad_id is None


def test_from_file_errors(tmp_path):
    with pytest.raises(LMForgeError) as e:
        Tokenizer.from_file(tmp_path / "nope.json")
    assert str(e.value) == f"tokenizer file not found: {tmp_path / 'nope.json'}"
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(LMForgeError, match=r"bad\.json is not a valid tokenizer\.json \("):
        Tokenizer.from_file(bad)


def test_char_tokenizer(tmp_path):
    tok = Tokenizer.train_char(["hello ", "world\n"])
    chars = sorted(set("hello world\n"))
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + len(chars) == 15
    assert [tok.token_to_id(c) for c in chars] == list(range(6, 15))
    assert tok.encode("hold\n") == [tok.token_to_id(c) for c in "hold\n"]
    assert tok.decode(tok.encode("hello world\n")) == "hello world\n"
    assert tok.encode("hex") == [tok.token_to_id("h"), tok.token_to_id("e"), tok.token_to_id("<|unk|>")]
    # <|endoftext|> inside text stays characters, unless asked for.
    assert tok.eos_id not in tok.encode("<|endoftext|>")
    tok.save(tmp_path / "c.json")
    again = Tokenizer.from_file(tmp_path / "c.json")
    assert again.encode("world") == tok.encode("world") and again.decode(again.encode("dew")) == "dew"


def test_wraps_any_hf_tokenizer():
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    tok = Tokenizer(hf, eos_token="</s>", pad_token=None)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (1, None, 2)
    assert tok.hf is hf
