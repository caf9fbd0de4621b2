"""`lmforge finetune seq2seq`: pair files (CSV/TSV/JSONL, column names, bad input), generation
metrics against sacrebleu / rouge-score, and short runs of an encoder-decoder and a decoder."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.errors import LMForgeError
from lmforge.eval.generation import generation_metrics
from lmforge.finetune.seq2seq import read_pairs

WORDS = "the king and queen of a far land rode out to see what night would bring".split()


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def test_metrics_equal_sacrebleu_and_rouge_score_on_fixed_strings():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "Long live the king!", "stand and unfold yourself", "nothing alike here"]
    refs = ["the cat sat on a mat", "Long live the king!", "Stand, and unfold yourself.", "completely different words"]
    m = generation_metrics(preds, refs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for k in ("rouge1", "rouge2", "rougeL"):
        assert m[k] == pytest.approx(100 * sum(sc.score(r, p)[k].fmeasure for p, r in zip(preds, refs)) / 4)
    assert m["exact_match"] == 25.0
    # anchors that need no library: "the cat sat on the mat" vs "... a mat": 5 of 6 unigrams shared
    assert sc.score(refs[0], preds[0])["rouge1"].fmeasure == pytest.approx(5 / 6)
    perfect = generation_metrics(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rougeL"] == pytest.approx(100.0) and perfect["exact_match"] == 100.0
    assert generation_metrics(["zzz qqq"], ["aaa bbb"])["rouge1"] == 0.0
    with pytest.raises(LMForgeError, match="2 predictions for 1 references"):
        generation_metrics(["a", "b"], ["a"])


def test_pair_files_and_bad_input(tmp_path):
    (tmp_path / "a.tsv").write_text("folio\tmodern\nLong liue the King\tLong live the king\n", encoding="utf-8")
    pairs = read_pairs(tmp_path / "a.tsv", "folio", "modern")
    assert [(p.source, p.target) for p in pairs] == [("Long liue the King", "Long live the king")]
    (tmp_path / "b.csv").write_text('source,target\n"a, b",c\n', encoding="utf-8")
    assert read_pairs(tmp_path / "b.csv")[0].source == "a, b"
    with pytest.raises(LMForgeError, match=r"a\.tsv: no column 'source'; columns present: folio, modern"):
        read_pairs(tmp_path / "a.tsv")
    (tmp_path / "c.jsonl").write_text('{"source": "x", "target": "y"}\n{"source": "x", "target": "  "}\n')
    with pytest.raises(LMForgeError, match=r"c\.jsonl:2: empty target in column 'target'"):
        read_pairs(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"source": "x", "target": "y"}\n[1]\n')
    with pytest.raises(LMForgeError, match=r"d\.jsonl:2: each line must be a JSON object"):
        read_pairs(tmp_path / "d.jsonl")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lmforge.checkpoint import write_model_dir
    from lmforge.models.decoder import Decoder
    from lmforge.models.decoder import config_from_preset as dec_preset
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset
    from lmforge.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)

    def pair(n_words=3):
        w = rng.sample(WORDS, n_words)
        return {"source": " ".join(w), "target": " ".join(reversed(w))}

    rows = [pair() for _ in range(120)] + [{"source": " ".join(WORDS * 4), "target": "far"}]  # one long source
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "val.jsonl").write_text("\n".join(json.dumps(pair()) for _ in range(8)))
    tok = Tokenizer.train_char([" ".join(WORDS)])
    tok.save(d / "tok.json")
    torch_seed = __import__("torch").manual_seed(0)
    assert torch_seed.initial_seed() == 0
    write_model_dir(d / "t5", Seq2Seq(config_from_preset("t5-tiny", vocab_size=tok.vocab_size)), tokenizer_path=d / "tok.json")
    write_model_dir(d / "gpt", Decoder(dec_preset("tiny", vocab_size=tok.vocab_size)), tokenizer_path=d / "tok.json")
    return d


def _args(files, base, out, *extra):
    return ["finetune", "seq2seq", "--base", str(files / base), "--data", str(files / "train.jsonl"), "--val-data",
            str(files / "val.jsonl"), "--out", str(out), "--train.max_steps", "12", "--train.eval_every", "6",
            "--train.micro_batch_size", "8", "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.progress",
            "false", "--generate.max_examples", "4", "--generate.max_new_tokens", "12", "--train.log_every", "1", *extra]


METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match")


def _scores_of_predictions(run) -> dict[str, float]:
    """chrF and exact match of the last evaluation's eval_predictions.jsonl, by sacrebleu and by hand."""
    import sacrebleu

    preds = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    ys, refs = [p["prediction"] for p in preds], [p["target"] for p in preds]
    return {"chrf": sacrebleu.corpus_chrf(ys, [refs]).score,
            "exact_match": 100.0 * sum(y.strip() == r.strip() for y, r in zip(ys, refs)) / len(preds)}


def test_finetune_encoder_decoder_reports_generation_metrics_and_truncation(files, tmp_path, capsys):
    from lmforge.cli import main

    assert main(_args(files, "t5", tmp_path / "run", "--data.max_source_length", "64",
                      "--prefix", "reverse: ")) == 0
    captured = capsys.readouterr()
    assert "truncated 1 training and 0 validation sources longer than 64 tokens" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]  # eval_every 6 of 12 steps
    # the summary reports the last evaluation, whose scores are those of the predictions it wrote
    assert {k: summary[k] for k in (*METRICS, "val_loss")} == {k: evals[-1][k] for k in (*METRICS, "val_loss")}
    assert {k: evals[-1][k] for k in ("chrf", "exact_match")} == pytest.approx(_scores_of_predictions(tmp_path / "run"))
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    preds = [json.loads(x) for x in (tmp_path / "run" / "eval_predictions.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (files / "val.jsonl").read_text().splitlines()]
    assert [(p["source"], p["target"]) for p in preds] == [(v["source"], v["target"]) for v in val[:4]]
    from lmforge.infer.seq2seq import generate_seq2seq
    from lmforge.models.registry import load_model_dir

    model, _, tok = load_model_dir(tmp_path / "run")  # the fine-tuned run loads (tokenizer included)
    # the latest checkpoint holds a copy of the base's tokenizer, and that is what loads
    ckpt_tok = tmp_path / "run" / "checkpoints" / "step_00000012" / "tokenizer.json"
    assert ckpt_tok.read_text() == (files / "tok.json").read_text()
    assert tok.hf.to_str() == tok.hf.from_file(str(ckpt_tok)).to_str() and tok.vocab_size == model.cfg.vocab_size
    assert len(generate_seq2seq(model, [[5, 6, 0]], max_new_tokens=5, temperature=0)) == 1


def test_finetune_decoder_on_the_same_files(files, tmp_path, capsys):
    from lmforge.cli import main

    assert main(_args(files, "gpt", tmp_path / "dec")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12
    assert {k: summary[k] for k in ("chrf", "exact_match")} == pytest.approx(_scores_of_predictions(tmp_path / "dec"))


def test_finetune_bad_input_is_one_line_error(files, tmp_path, capsys):
    from lmforge.cli import main

    assert main(_args(files, "t5", tmp_path / "x", "--source-column", "folio")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.jsonl: no column 'folio'" in err and len(err.splitlines()) == 1


def test_length_grouped_batches_cover_every_pair_once_per_epoch_with_less_padding():
    from lmforge.finetune.seq2seq import pair_batches

    rng = random.Random(0)
    rows = [([1] * rng.randint(1, 100), [2] * rng.randint(1, 100)) for _ in range(640)]

    def epoch(group: bool) -> tuple[list[int], int]:
        src = pair_batches(rows, lambda rs: rs, 8, 2, seed=3, group_by_length=group)
        seen, pad = [], 0
        for step in range(40):  # 40 steps x 2 micro-batches x 8 = one epoch
            for index in range(2):
                b = src.micro_batch(step, index)
                lens = [len(s) + len(t) for s, t in b]
                pad += max(lens) * len(lens) - sum(lens)
                seen += [id(r) for r in b]
        return seen, pad

    plain, pad_plain = epoch(False)
    grouped, pad_grouped = epoch(True)
    assert sorted(grouped) == sorted(plain) == sorted(id(r) for r in rows)  # a permutation of the data
    assert pad_grouped * 10 < pad_plain
    again, _ = epoch(True)
    assert again == grouped  # a pure function of (seed, step, index): resume sees the same batches


@pytest.mark.parametrize("base,family", [("t5", "seq2seq"), ("gpt", "decoder")])
def test_predict_cuts_each_output_at_max_len_a_times_source_plus_b(files, base, family):
    """--generate.max_len_a/b (fairseq's loop guard): each output is the greedy output of a budget of
    floor(a * source tokens + b) tokens for that sequence alone, whatever the rest of the batch. Beam
    search, as fairseq's, searches up to the batch's longest budget, and each best beam is cut at its own."""
    import torch

    from lmforge.models.registry import load_model_dir
    from lmforge.finetune.seq2seq import Seq2SeqGenerateConfig, predict
    from lmforge.tokenizer import Tokenizer

    model, _, tok = load_model_dir(files / base)
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.tok_emb.weight
    with torch.no_grad():  # a random model whose greedy outputs are visible text that runs past the budget
        head[[i for i in range(tok.vocab_size) if tok.decode([i], skip_special=True) == ""]] = 0
    eos = model.cfg.eos_id if family == "seq2seq" else tok.eos_id
    pad = model.cfg.pad_id if family == "seq2seq" else tok.pad_id
    sources = [tok.encode("a b c"), tok.encode("a b c d e f g h i")]
    full = predict(model.eval(), tok, sources, eos, pad, Seq2SeqGenerateConfig(max_new_tokens=20))
    cut = predict(model, tok, sources, eos, pad,
                  Seq2SeqGenerateConfig(max_new_tokens=20, max_len_a=0.5, max_len_b=1))
    for src, f, c in zip(sources, full, cut):
        alone = predict(model, tok, [src], eos, pad, Seq2SeqGenerateConfig(max_new_tokens=int(0.5 * len(src) + 1)))
        assert [c] == alone and len(c) < len(f)
    longest = max(int(0.5 * len(s) + 1) for s in sources)
    beams = predict(model, tok, sources, eos, pad,
                    Seq2SeqGenerateConfig(max_new_tokens=20, num_beams=3, max_len_a=0.5, max_len_b=1))
    searched = predict(model, tok, sources, eos, pad, Seq2SeqGenerateConfig(max_new_tokens=longest, num_beams=3))
    # the longest source's budget bounds the search; the shorter one's best beam is cut at its own budget
    assert beams[1] == searched[1] and searched[0].startswith(beams[0])


def test_validation_is_whole_by_default_and_a_partial_one_is_labelled(files, tmp_path, capsys):
    """finetune seq2seq evaluates every validation pair by default (eval_iters 1000 batches); with
    fewer batches than the set, the loss rows, the summary and the last line say it was partial, and
    generation metrics of the first generate.max_examples pairs say so too."""
    from lmforge.cli import main

    rng = random.Random(1)
    val = tmp_path / "val200.jsonl"
    val.write_text("".join(json.dumps({"source": " ".join(w), "target": " ".join(reversed(w))}) + "\n"
                           for w in (rng.sample(WORDS, 3) for _ in range(200))))

    def run(out, *extra):
        args = _args(files, "t5", out, "--train.max_steps", "2", "--train.eval_every", "0", *extra)
        args[args.index("--val-data") + 1] = str(val)
        assert main(args) == 0
        captured = capsys.readouterr()
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return json.loads(captured.out.strip().splitlines()[-1]), [r for r in rows if "val_loss" in r], captured.err

    summary, [row], err = run(tmp_path / "full")
    assert not any(k.startswith("val_partial") or k.startswith("val_examples") for k in (*row, *summary))
    assert "partial validation" not in err
    generation = {"generation_partial": True, "generation_examples": 4, "generation_examples_total": 200}
    assert {k: row[k] for k in generation} == {k: summary[k] for k in generation} == generation
    summary, [row], err = run(tmp_path / "part", "--train.eval_iters", "2")
    partial = {"val_partial": True, "val_examples": 16, "val_examples_total": 200}
    assert {k: row[k] for k in partial} == {k: summary[k] for k in partial} == partial
    assert f"val loss {row['val_loss']:.4f} (partial validation: 16 of 200 examples), " in err
