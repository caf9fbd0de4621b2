"""Classification: metrics (vs scikit-learn), `lmforge finetune classify` on encoders and decoders,
`lmforge classify` / `lmforge eval` / LLM.classify, and every bad input."""

import json
import random

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.eval.classification import classification_metrics
from lmforge.tokenizer import Tokenizer
from reference_libs import reference_lib

POS, NEG = "great wonderful happy good loved".split(), "bad awful sad terrible hated".split()
FILLER = "the movie film was a and it plot actors story".split()


def make_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(["positive", "negative"])
        w = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))] + [rng.choice(POS if lab == "positive" else NEG)]
        rng.shuffle(w)
        rows.append({"text": " ".join(w), "label": lab})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def base_encoder(tmp_path_factory):
    from lmforge.checkpoint import write_model_dir
    from lmforge.models.encoder import Encoder, config_from_preset

    d = tmp_path_factory.mktemp("enc")
    tok = Tokenizer.train_wordpiece([r["text"] for r in make_rows(300, 9)], vocab_size=100)
    tok.save(d / "tokenizer.json")
    torch.manual_seed(0)
    model = Encoder(config_from_preset("encoder-tiny", vocab_size=tok.vocab_size, head="mlm"))
    write_model_dir(d / "base", model, d / "tokenizer.json")
    return d / "base"


def test_metrics_match_scikit_learn():
    sk = reference_lib("sklearn.metrics")
    rng = random.Random(0)
    y = [rng.randrange(4) for _ in range(200)]
    p = [rng.choice([0, 1, 1, 2]) for _ in range(200)]  # class 3 is never predicted
    m = classification_metrics(y, p, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, p, average="macro", labels=[0, 1, 2, 3], zero_division=0))
    prec = sk.precision_score(y, p, average=None, labels=[0, 1, 2, 3], zero_division=0)
    rec = sk.recall_score(y, p, average=None, labels=[0, 1, 2, 3], zero_division=0)
    for i, name in enumerate("abcd"):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[i])
    assert m["confusion_matrix"] == sk.confusion_matrix(y, p, labels=[0, 1, 2, 3]).tolist()


def test_finetune_classify_encoder_end_to_end(base_encoder, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(200, 1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(60, 2))
    out = tmp_path / "run"
    rc = main(["finetune", "classify", "--base", str(base_encoder), "--data", train, "--val-data", val, "--out", str(out),
               "--train.max_steps", "60", "--train.lr", "3e-3", "--train.eval_every", "30", "--train.progress", "false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy"] > 0.75  # keyword sentiment is learnable by a tiny encoder in 60 steps
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    full = json.loads((out / "eval_metrics.json").read_text())
    assert full["labels"] == ["negative", "positive"] and sum(map(sum, full["confusion_matrix"])) == 60
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "macro_f1", "precision/positive", "recall/negative"} <= set(rows[-1])
    meta = json.loads((out / "checkpoints/step_00000060/model_config.json").read_text())
    assert meta["family"] == "encoder" and meta["config"]["labels"] == ["negative", "positive"]

    from lmforge import LLM

    llm = LLM.load(out)
    res = llm.classify(["the movie was great", "awful film"])
    assert [r["label"] for r in res] == ["positive", "negative"]
    assert set(res[0]["probs"]) == {"negative", "positive"} and res[0]["score"] == max(res[0]["probs"].values())
    assert sum(res[1]["probs"].values()) == pytest.approx(1.0)

    # evaluation of a classifier: same numbers as the run's last eval; a CSV with other column names
    from lmforge.eval.classification import evaluate_classifier

    csv_path = tmp_path / "val.csv"
    csv_path.write_text("sentence,sentiment\n" + "".join(f"\"{r['text']}\",{r['label']}\n" for r in make_rows(60, 2)))
    ev = evaluate_classifier(out, [str(csv_path)], columns={"text": "sentence", "pair": None, "label": "sentiment"})
    assert ev["accuracy"] == pytest.approx(full["accuracy"]) and ev["confusion_matrix"] == full["confusion_matrix"]
    assert {"macro_f1", "per_class", "labels"} <= set(ev)


def test_max_minutes_reserves_the_real_validation_set_not_eval_iters(base_encoder, tmp_path, capsys, one_thread):
    """65 validation examples (5 batches) under the method's eval_iters of 1000: the budget reserves an
    evaluation of those, measured, so a 12-second budget trains; reserving 1000 batches left 4 steps."""
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(200, 1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(65, 2))
    rc = main(["finetune", "classify", "--base", str(base_encoder), "--data", train, "--val-data", val,
               "--out", str(tmp_path / "run"), "--train.max_steps", "100000", "--train.max_minutes", "0.2",
               "--train.lr", "3e-3", "--train.progress", "false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stopped_by"] == "max_minutes" and summary["steps"] > 10
    assert summary["seconds"] <= 12.0 * 1.2  # the budget holds (a loaded machine's timing noise aside)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    # the timing evaluation, the periodic ones (train.eval_every 100), the final one
    assert [r["step"] for r in evals] == [4, *range(100, summary["steps"], 100), summary["steps"]]
    assert summary["accuracy"] == evals[-1]["accuracy"]


def test_bad_inputs_are_one_line_errors(base_encoder, tmp_path, capsys):
    good = make_rows(30, 3)
    train = write_jsonl(tmp_path / "t.jsonl", good)

    def run(data, val=None, *extra):
        argv = ["finetune", "classify", "--base", str(base_encoder), "--data", data, "--out", str(tmp_path / "o"),
                "--train.max_steps", "1", "--train.progress", "false", "--overwrite", *extra]
        if val:
            argv += ["--val-data", val]
        return main(argv), capsys.readouterr().err

    rc, err = run(write_jsonl(tmp_path / "m.jsonl", [{"sentence": "x", "label": "a"}]))
    assert rc == 2 and "no column 'text'; columns present: sentence, label" in err
    rc, err = run(train, write_jsonl(tmp_path / "v.jsonl", good[:3] + [{"text": "fine", "label": "neutral"}]))
    assert rc == 2 and "v.jsonl:4: label 'neutral' is not one of the model's labels (negative, positive)" in err
    rc, err = run(write_jsonl(tmp_path / "e.jsonl", good[:3] + [{"text": "  ", "label": "positive"}]))
    assert rc == 2 and "e.jsonl:4: empty text in column 'text'" in err
    rc, err = run(write_jsonl(tmp_path / "one.jsonl", [{"text": "a b", "label": "x"}] * 3))
    assert rc == 2 and "has 1 label(s) (x); classification needs at least 2" in err
    rc, err = run(write_jsonl(tmp_path / "once.jsonl", good + [{"text": "meh", "label": "neutral"}]), None,
                  "--data.max_length", "6")
    assert rc == 0 and "label 'neutral' appears only once" in err
    assert "truncated" in err and "longer than 6 tokens" in err
    rc, err = run(train, None, "--label-column", "stars")
    assert rc == 2 and "no column 'stars'" in err


def test_finetune_classify_decoder_reads_last_real_token(tmp_path, capsys):
    from lmforge.checkpoint import write_model_dir
    from lmforge.models.decoder import Decoder, config_from_preset
    from lmforge.tokenizer import Tokenizer

    rows = make_rows(120, 4)
    tok = Tokenizer.train_bpe([r["text"] for r in rows], 300)
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    write_model_dir(tmp_path / "dec", Decoder(config_from_preset("tiny", vocab_size=300)), tmp_path / "tokenizer.json")
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--base", str(tmp_path / "dec"), "--data", write_jsonl(tmp_path / "t.jsonl", rows),
                 "--val-fraction", "0.2", "--out", str(out), "--train.max_steps", "4", "--train.progress", "false"]) == 0
    meta = json.loads((out / "checkpoints/step_00000004/model_config.json").read_text())
    assert meta["family"] == "decoder_classifier"
    from lmforge import LLM

    llm = LLM.load(out)
    one = llm.classify(["the film was good"])[0]
    both = llm.classify(["the film was good", "a much longer text about the plot and the actors of the film"])
    assert one["probs"] == pytest.approx(both[0]["probs"], abs=1e-5)  # padding in the batch changes nothing


def test_hf_classifier_folder_classifies_like_transformers(tmp_path):
    tf = reference_lib("transformers")
    from lmforge import LLM

    tok = Tokenizer.train_wordpiece([r["text"] for r in make_rows(200, 5)], vocab_size=100)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(0)
    ref = tf.BertForSequenceClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok.tokenizer_config(64)))
    hf_tok = tf.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    texts = ["the movie was great", "awful", "a film about actors and the plot"]
    with torch.no_grad():
        probs = ref(**hf_tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    res = LLM.load(tmp_path).classify(texts)
    for r, p in zip(res, probs):
        assert list(r["probs"]) == ["neg", "neu", "pos"]
        assert list(r["probs"].values()) == pytest.approx(p.tolist(), abs=1e-5)


def test_fresh_head_follows_train_seed_not_the_process_rng(base_encoder, tmp_path, capsys):
    """Two runs in one process with one seed are identical; another seed draws another head."""
    train = write_jsonl(tmp_path / "t.jsonl", make_rows(32, 1))

    def first_loss(out, seed):
        torch.manual_seed(len(out.name))  # whatever the caller's global RNG holds must not matter
        assert main(["finetune", "classify", "--base", str(base_encoder), "--data", train, "--out", str(out),
                     "--train.max_steps", "1", "--train.progress", "false", "--train.log_every", "1",
                     "--train.seed", str(seed)]) == 0
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    a, b, c = first_loss(tmp_path / "a", 1), first_loss(tmp_path / "bb", 1), first_loss(tmp_path / "c", 2)
    assert a == b and a != c
