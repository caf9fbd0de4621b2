"""evaluate(): loss / perplexity / bits per byte against a hand computation, data forms and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import write_model_dir
from lmforge.errors import LMForgeError
from lmforge.eval import evaluate
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.tokenizer import Tokenizer

DOCS = ["First Citizen: we are accounted poor citizens, the patricians good.",
        "héllo wörld — 日本語 text with multi-byte characters.",
        "What authority surfeits on would relieve us: if they would yield us but the superfluity.",
        "The quick brown fox jumps over the lazy dog, again and again and again."]
BLOCK = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer.train_bpe(DOCS * 3, vocab_size=300)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=BLOCK, init_std=0.1))
    model_dir = write_model_dir(root / "model", model, root / "tokenizer.json")

    # A prepared data directory in the documented format (docs/architecture.md).
    stream = []
    for doc in DOCS:
        stream += tok.encode(doc) + [tok.eos_id]
    data = root / "data"
    data.mkdir()
    np.asarray(stream[:20], dtype=np.uint16).tofile(data / "train.bin")
    np.asarray(stream, dtype=np.uint16).tofile(data / "val.bin")
    tok.save(data / "tokenizer.json")
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "tokenizer": {"kind": "bpe", "vocab_size": tok.vocab_size},
            "splits": {"train": {"tokens": 20, "bytes": 10, "documents": 1},
                       "val": {"tokens": len(stream), "bytes": n_bytes, "documents": len(DOCS)}}, "sources": []}
    (data / "meta.json").write_text(json.dumps(meta))
    return dict(root=root, tok=tok, model=model, model_dir=model_dir, data=data, stream=stream, n_bytes=n_bytes)


def manual_nats(model, stream: list[int], block: int) -> tuple[float, int]:
    """Reference: non-overlapping windows, one forward per window, each predicting from its own prefix."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, block):
            x = stream[s:s + block]
            y = stream[s + 1:s + block + 1]
            x = x[:len(y)]
            logits = model(torch.tensor([x]))[0]
            total += F.cross_entropy(logits, torch.tensor(y), reduction="sum").item()
            count += len(y)
    return total, count


def test_prepared_dir_matches_hand_computation(setup):
    stream = setup["stream"]
    assert (len(stream) - 1) % BLOCK != 0  # the last window is a partial one
    nats, count = manual_nats(setup["model"], stream, BLOCK)
    res = evaluate(str(setup["model_dir"]), [str(setup["data"])], batch_size=2)
    assert res["tokens"] == count == len(stream) - 1
    assert res["windows"] == math.ceil((len(stream) - 1) / BLOCK)
    assert res["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert res["bytes"] == setup["n_bytes"]
    assert res["bits_per_byte"] == pytest.approx(nats / math.log(2) / setup["n_bytes"], rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["tokens"] / (res["bytes"] * math.log(2)), rel=1e-9)
    assert res["split"] == "val" and res["source"] == str(setup["data"])
    json.dumps(res)  # the CLI prints it as one JSON object
    # The batch size does not change the numbers.
    assert evaluate(setup["model_dir"], setup["data"], batch_size=7)["loss"] == pytest.approx(res["loss"], rel=1e-5)


def test_max_tokens_counts_only_the_scored_text(setup):
    stream = setup["stream"]
    res = evaluate(setup["model_dir"], [str(setup["data"])], max_tokens=20)
    nats, count = manual_nats(setup["model"], stream[:21], BLOCK)
    assert res["tokens"] == count == 20
    assert res["loss"] == pytest.approx(nats / 20, rel=1e-5)
    n_bytes = len(setup["tok"].decode(stream[:21], skip_special=True).encode("utf-8"))
    assert res["bytes"] == n_bytes
    assert res["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_text_files(setup, tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS[1:]:
            f.write(json.dumps({"text": d}) + "\n")
    res = evaluate(setup["model_dir"], [str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl")])
    nats, count = manual_nats(setup["model"], setup["stream"], BLOCK)  # the same documents, each + EOS
    assert res["tokens"] == count
    assert res["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert res["bytes"] == setup["n_bytes"]
    assert res["source"] == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]


def test_mismatched_tokenizer_is_an_error(setup, tmp_path):
    data = tmp_path / "other"
    data.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (data / name).write_bytes((setup["data"] / name).read_bytes())
    Tokenizer.train_bpe(["completely different text, another vocabulary"] * 5, vocab_size=280).save(data / "tokenizer.json")
    with pytest.raises(LMForgeError) as e:
        evaluate(setup["model_dir"], [str(data)])
    msg = str(e.value)
    assert msg.startswith(f"data {data} was tokenized with a different tokenizer than the model {setup['model_dir']}")
    # The same tokenizer saved with other formatting is not a mismatch.
    data2 = tmp_path / "same"
    data2.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (data2 / name).write_bytes((setup["data"] / name).read_bytes())
    compact = json.dumps(json.loads((setup["data"] / "tokenizer.json").read_text(encoding="utf-8")))
    (data2 / "tokenizer.json").write_text(compact, encoding="utf-8")
    assert evaluate(setup["model_dir"], [str(data2)])["tokens"] == len(setup["stream"]) - 1


def test_missing_inputs(setup, tmp_path):
    with pytest.raises(LMForgeError) as e:
        evaluate(str(tmp_path / "no_such_run"), [str(setup["data"])])
    assert str(e.value) == f"checkpoint not found: {tmp_path / 'no_such_run'}"
    with pytest.raises(LMForgeError, match="no such file or directory"):
        evaluate(setup["model_dir"], [str(tmp_path / "missing.txt")])
    incomplete = tmp_path / "prepared"
    incomplete.mkdir()
    for name in ("train.bin", "meta.json", "tokenizer.json"):
        (incomplete / name).write_bytes((setup["data"] / name).read_bytes())
    with pytest.raises(LMForgeError) as e:
        evaluate(setup["model_dir"], [str(incomplete)])
    assert str(e.value) == f"{incomplete / 'val.bin'} is missing; prepare the data again"


def test_on_real_prepare_output_with_char_tokenizer(tmp_path):
    from lmforge.data import TokenData, prepare

    src = tmp_path / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for d in DOCS * 4:
            f.write(json.dumps({"text": d}) + "\n")
    meta = prepare([str(src)], str(tmp_path / "data"), tokenizer="char", val_fraction=0.3, progress=False)
    td = TokenData(tmp_path / "data")
    tok = td.tokenizer()
    torch.manual_seed(1)
    model = Decoder(config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=BLOCK, init_std=0.1))
    model_dir = write_model_dir(tmp_path / "model", model, td.tokenizer_path)
    res = evaluate(model_dir, [str(tmp_path / "data")], max_tokens=None)
    val = [int(t) for t in td.split("val")]
    nats, count = manual_nats(model, val, BLOCK)
    assert res["tokens"] == count == meta["splits"]["val"]["tokens"] - 1
    assert res["bytes"] == meta["splits"]["val"]["bytes"]
    assert res["bits_per_byte"] == pytest.approx(nats / math.log(2) / res["bytes"], rel=1e-5)
    # Char tokens decode to exactly the document text, so a prefix's byte count is exact too.
    part = evaluate(model_dir, [str(tmp_path / "data")], max_tokens=30)
    assert part["bytes"] == len(tok.decode(val[:31], skip_special=True).encode("utf-8"))
