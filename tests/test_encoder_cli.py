"""Encoder verbs of the CLI: info, prepare --tokenizer wordpiece, embed, classify, eval on a classifier, convert."""

import json
import re

import pytest
import torch

from lmforge.cli import main
from lmforge.tokenizer import Tokenizer
from reference_libs import reference_lib

TEXTS = ["the cat sat on the mat", "a dog ran to the house", "green happy movie plot", "awful sad film"]


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    tf = reference_lib("transformers")
    d = tmp_path_factory.mktemp("hfcls")
    tok = Tokenizer.train_wordpiece(TEXTS * 20, vocab_size=80)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, id2label={0: "neg", 1: "pos"},
                        label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    tf.BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(tok.tokenizer_config(64)))
    return d


def test_info_reports_encoder_presets(capsys):
    assert main(["info", "--preset", "bert-base", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "encoder" and info["params"] == 109_482_240
    assert info["params_by_head"]["none"] == 109_482_240
    assert main(["info", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "modernbert-base" in listing and "149,014,272" in listing
    assert main(["info", "--preset", "bert-bas"]) == 2
    assert "did you mean 'bert-base'" in capsys.readouterr().err


def test_classify_eval_convert_embed(hf_classifier, tmp_path, capsys):
    from lmforge import LLM

    assert main(["classify", "--ckpt", str(hf_classifier), "--json", *TEXTS[:2]]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = LLM.load(hf_classifier).classify(TEXTS[:2])
    assert [x["label"] for x in lines] == [w["label"] for w in want] and set(lines[0]["probs"]) == {"neg", "pos"}
    # eval on a classifier: one JSON object with the metrics; other column names by flag
    data = tmp_path / "d.csv"
    data.write_text("sentence,y\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(TEXTS)))
    assert main(["eval", "--ckpt", str(hf_classifier), "--data", str(data), "--text-column", "sentence",
                 "--label-column", "y", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    ev = json.loads(captured.out)
    assert re.search(r"\reval: 100%\|[^|]*\| 2/2 \[", captured.err), captured.err  # progress: 4 texts, 2 a batch
    assert set(ev) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix"} and ev["n"] == 4
    # convert to lmforge and back: same predictions, transformers loads it without missing keys
    assert main(["convert", "--from-hf", str(hf_classifier), "--out", str(tmp_path / "lm")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "lm"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    again = LLM.load(tmp_path / "hf").classify(TEXTS[:2])
    assert [a["probs"] for a in again] == [pytest.approx(w["probs"], abs=1e-6) for w in want]
    # embed: one JSON line per text, unit length
    assert main(["embed", "--ckpt", str(tmp_path / "lm"), *TEXTS[:3]]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and len(rows[0]["embedding"]) == 32
    assert abs(sum(v * v for v in rows[0]["embedding"]) - 1) < 1e-4
    assert main(["embed", "--ckpt", str(tmp_path / "lm")]) == 2
    assert "needs TEXT arguments or --file FILE" in capsys.readouterr().err


def test_prepare_wordpiece(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n\n".join(TEXTS * 30))
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "wordpiece",
                 "--vocab-size", "80", "--quiet"]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "wordpiece" and meta["eos_id"] == 3
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer.json", encoder=True)
    assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.pad_id) == (2, 3, 4, 0)
