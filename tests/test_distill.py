"""Knowledge distillation: the losses against hand-computed values and TRL, the student's
initialisation, and `lmforge distill` end to end on tiny models (classify and lm tasks, exact
resume, one teacher forward per micro-batch, the cached teacher, the tokenizer-mismatch error)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.train import distill as D
from reference_libs import reference_lib
from train_fixtures import MEASURED


# ---- losses on tiny tensors --------------------------------------------------------------------

def test_soft_target_loss_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    # softmax([0.5, 0]) and softmax([0, 0.5])
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert D.soft_target_loss(s, t, T).item() == pytest.approx(kl * T * T, abs=1e-6)
    assert D.soft_target_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_mixes_soft_and_hard_by_alpha():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    soft = D.soft_target_loss(s, t, 3.0)
    hard = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(math.e / (math.e + 2))) / 2
    loss, stats = D.kd_loss(s, t, y, alpha=0.25, temperature=3.0)
    assert stats["hard_loss"].item() == pytest.approx(hard, abs=1e-6)
    assert loss.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard, abs=1e-6)


def test_cosine_hidden_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    real = torch.tensor([[True, True, False]])  # the padding token does not count
    # cos = 0 and 1: mean of (1 - 0, 1 - 1)
    assert D.cosine_hidden_loss(s, t, real).item() == pytest.approx(0.5, abs=1e-7)


def test_hidden_mse_through_projection_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # (a, b) -> (a, b, a + b)
    real = torch.tensor([[True, False]])
    # (1, 2, 3) against (1, 0, 2): squared errors 0, 4, 1 -> mean 5 / 3
    assert D.hidden_mse(s, t, real, proj).item() == pytest.approx(5 / 3, abs=1e-6)


def test_attention_mse_over_attended_pairs_and_head_mean():
    s = torch.zeros(1, 2, 2, 2)
    t = torch.zeros(1, 2, 2, 2)
    t[0, 0] = torch.tensor([[1.0, 9.0], [9.0, 9.0]])
    t[0, 1] = torch.tensor([[3.0, 9.0], [9.0, 9.0]])
    pairs = torch.tensor([[[True, False], [False, False]]])
    assert D.attention_mse(s, t, pairs).item() == pytest.approx((1 + 9) / 2)
    # one student head against two teacher heads: the head means, (1 + 3) / 2 = 2 -> 4
    assert D.attention_mse(s[:, :1], t, pairs).item() == pytest.approx(4.0)


def test_layer_maps():
    assert D.layer_map(2, 6) == [2, 5]  # TinyBERT: 3rd and last teacher blocks
    assert D.layer_map(3, 6) == [1, 3, 5]
    assert D.init_layer_map(3, 6) == [0, 2, 4]  # DistilBERT: every other block from the first
    assert D.init_layer_map(4, 4) == [0, 1, 2, 3]


def test_generalized_jsd_by_hand():
    s = torch.tensor([[[0.0, 0.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0]]])  # teacher (3/4, 1/4), student (1/2, 1/2)
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert D.generalized_jsd(s, t, beta=0.0).item() == pytest.approx(fwd, abs=1e-7)
    assert D.generalized_jsd(s, t, beta=1.0).item() == pytest.approx(rev, abs=1e-7)
    m = [0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert D.generalized_jsd(s, t, beta=0.5).item() == pytest.approx(jsd, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_generalized_jsd_matches_trl(beta, temperature):
    reference_lib("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    s = torch.randn(3, 5, 11, generator=g) * 2
    t = torch.randn(3, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    for lab in (labels, None):
        ours = D.generalized_jsd(s, t, lab, beta=beta, temperature=temperature)
        ref = GKDTrainer.generalized_jsd_loss(s, t, labels=lab, beta=beta, temperature=temperature)
        assert abs(ours.item() - ref.item()) < 1e-6, (lab is None, ours.item(), ref.item())


# ---- lmforge distill end to end on tiny models ---------------------------------------------------

POS, NEG = "great wonderful happy good loved".split(), "bad awful sad terrible hated".split()
FILLER = "the movie film was a and it plot actors story".split()
LABELS = ["negative", "positive"]


def sentiment_rows(n, seed):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(LABELS)
        w = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))] + [rng.choice(POS if lab == "positive" else NEG)]
        rng.shuffle(w)
        rows.append({"text": " ".join(w), "label": lab})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def classify_teacher(tmp_path_factory):
    """A 4-block encoder classifier (negative / positive) with a WordPiece tokenizer."""
    from lmforge.checkpoint import write_model_dir
    from lmforge.models.encoder import Encoder, config_from_preset
    from lmforge.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("teacher")
    tok = Tokenizer.train_wordpiece([r["text"] for r in sentiment_rows(300, 9)], vocab_size=100)
    tok.save(d / "tokenizer.json")
    torch.manual_seed(0)
    cfg = config_from_preset("encoder-tiny", vocab_size=tok.vocab_size, n_layer=4, head="sequence", labels=LABELS,
                             num_labels=2)
    write_model_dir(d / "model", Encoder(cfg), d / "tokenizer.json")
    data = d / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(96, 1))
    write_jsonl(data / "val.jsonl", sentiment_rows(32, 2))
    return d / "model", data


def distill(teacher, student, data, out, *extra, task="classify"):
    from lmforge.cli import main

    val = ["--val-data", str(data / "val.jsonl")] if (data / "val.jsonl").is_file() else []
    return main(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data / "train.jsonl"),
                 *val, "--out", str(out), "--task", task, "--train.progress", "false", "--train.micro_batch_size", "8",
                 "--train.lr", "3e-3", "--train.warmup_steps", "0", "--train.seed", "3", *extra])


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_teacher_layers_init_copies_every_other_block(classify_teacher):
    from lmforge.finetune.distill import StudentConfig, build_student
    from lmforge.infer.llm import LLM

    teacher = LLM.load(classify_teacher[0])
    student, built = build_student("teacher", teacher, StudentConfig(), "teacher-layers", seed=0)
    assert built and student.model.cfg.n_layer == 2 and student.model.cfg.n_embd == teacher.model.cfg.n_embd
    t, s = teacher.model.state_dict(), student.model.state_dict()
    for name, value in s.items():
        src = name.replace("blocks.1.", "blocks.2.") if name.startswith("blocks.1.") else name
        assert torch.equal(value, t[src]), name
    assert student.tokenizer is teacher.tokenizer


def test_distill_classify_end_to_end_cosine(classify_teacher, tmp_path, capsys):
    from lmforge import LLM

    teacher, data = classify_teacher
    out = tmp_path / "run"
    rc = distill(teacher, "teacher", data, out, "--student-init", "teacher-layers", "--distill.loss", "cosine",
                 "--train.max_steps", "24", "--train.eval_every", "12", "--train.log_every", "1")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 24 and "accuracy" in summary
    rows = [r for r in metric_rows(out) if "loss" in r]
    first, last = sum(r["loss"] for r in rows[:4]) / 4, sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.9 * first, (first, last)
    assert {"soft_loss", "hard_loss", "cosine_loss", "teacher_agreement"} <= set(rows[-1])
    cfg = json.loads((out / "checkpoints/step_00000024/model_config.json").read_text())["config"]
    assert cfg["n_layer"] == 2 and cfg["labels"] == LABELS
    llm = LLM.load(out)
    assert llm.model.cfg.n_layer == 2
    assert [r["label"] for r in llm.classify(["the movie was great"])][0] in LABELS


def test_distill_tinybert_projection_resumes_exactly(classify_teacher, tmp_path, capsys):
    """A narrower preset student (TinyBERT through a learned projection): a run killed after step 4
    and resumed from its step-3 checkpoint equals the run never stopped, weights, projection, its
    AdamW moments and logged losses alike."""
    import os
    import subprocess

    from lmforge.checkpoint import load_tensors
    from train_fixtures import REPO, killed_cli

    teacher, data = classify_teacher
    args = ["distill", "--teacher", str(teacher), "--student", "encoder-tiny", "--data", str(data / "train.jsonl"),
            "--task", "classify", "--distill.loss", "tinybert", "--student.n_embd", "32", "--student.n_head", "2",
            "--train.eval_every", "0", "--train.log_every", "1", "--train.ckpt_every", "3", "--train.max_steps", "6",
            "--train.progress", "false", "--train.micro_batch_size", "8", "--train.lr", "3e-3", "--train.seed", "3"]
    from lmforge.cli import main

    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    crash = subprocess.run(killed_cli(4, [*args, "--out", str(tmp_path / "b")]), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=240)
    assert crash.returncode == -9, crash.stderr[-2000:]
    assert main([*args, "--out", str(tmp_path / "b"), "--resume", "auto"]) == 0
    capsys.readouterr()
    a, b = (metric_rows(tmp_path / run) for run in "ab")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]  # noqa: E731
    assert len(a) == 6 and strip(a) == strip(b)
    assert {"embedding_mse", "hidden_mse", "attention_mse"} <= set(a[-1])
    for name in ("model.safetensors", "train_state.safetensors"):
        ta = load_tensors(tmp_path / "a/checkpoints/step_00000006" / name)
        tb = load_tensors(tmp_path / "b/checkpoints/step_00000006" / name)
        assert set(ta) == set(tb)
        for k in ta:
            if not k.startswith("rng."):
                assert torch.equal(ta[k], tb[k]), k
    state = load_tensors(tmp_path / "a/checkpoints/step_00000006/train_state.safetensors")
    assert state["extra.weight"].shape == (64, 32)  # the projection: student width -> teacher width
    cfg = json.loads((tmp_path / "a/checkpoints/step_00000006/model_config.json").read_text())["config"]
    assert cfg["n_embd"] == 32 and cfg["vocab_size"] == json.loads(
        (teacher / "model_config.json").read_text())["config"]["vocab_size"]


def test_cached_teacher_gives_the_live_teacher_loss(classify_teacher, tmp_path, capsys):
    teacher, data = classify_teacher
    common = ["--train.max_steps", "3", "--train.eval_every", "3", "--train.log_every", "1"]
    assert distill(teacher, "teacher", data, tmp_path / "live", *common) == 0
    assert distill(teacher, "teacher", data, tmp_path / "cached", "--distill.cache_teacher", "true", *common) == 0
    capsys.readouterr()
    live, cached = metric_rows(tmp_path / "live"), metric_rows(tmp_path / "cached")
    assert len(live) == len(cached) == 4  # 3 steps and the validation row
    for r1, r2 in zip(live, cached):
        for key in ("loss", "val_loss", "soft_loss"):
            if key in r1:
                assert r1[key] == pytest.approx(r2[key], abs=1e-6), key


def test_teacher_runs_once_per_micro_batch(classify_teacher, tmp_path):
    import argparse

    from lmforge.finetune.scaffold import prepare
    from lmforge.train.loop import train_job

    teacher, data = classify_teacher
    args = argparse.Namespace(base="teacher", data=str(data / "train.jsonl"), out=str(tmp_path / "run"), val_data=None,
                              val_fraction=None, config=None, recipe=None, resume=None, overwrite=False,
                              teacher=str(teacher), task="classify", student_init=None)
    job, cfg = prepare("distill", args, ["--train.max_steps", "3", "--train.grad_accum", "2", "--train.progress",
                                         "false", "--train.micro_batch_size", "4"])
    calls = []
    job.objective.teacher.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    train_job(job, cfg.train, args.out)
    assert calls == [4] * 6  # 3 steps x 2 micro-batches, once each


def test_tokenizer_mismatch_is_one_error_and_writes_nothing(classify_teacher, tmp_path, capsys):
    from lmforge.checkpoint import write_model_dir
    from lmforge.models.encoder import Encoder, config_from_preset
    from lmforge.tokenizer import Tokenizer

    teacher, data = classify_teacher
    tok = Tokenizer.train_wordpiece(["completely other words here"] * 20, vocab_size=64)
    tok.save(tmp_path / "tokenizer.json")
    cfg = config_from_preset("encoder-tiny", vocab_size=tok.vocab_size, head="sequence", labels=LABELS, num_labels=2)
    student = write_model_dir(tmp_path / "student", Encoder(cfg), tmp_path / "tokenizer.json")
    out = tmp_path / "run"
    capsys.readouterr()
    assert distill(teacher, student, data, out, "--train.max_steps", "2") == 2
    err = capsys.readouterr().err.strip()
    from lmforge.tokenizer import Tokenizer as Tok

    n_teacher = Tok.from_file(teacher / "tokenizer.json").vocab_size
    assert err.startswith("error: teacher and student must share the tokenizer") and len(err.splitlines()) == 1
    assert f"the teacher --teacher {teacher} has {n_teacher} tokens" in err
    assert f"the student --student {student} has {tok.vocab_size} tokens" in err
    assert not out.exists()


# ---- lm task: decoders, kd and on-policy GKD ----------------------------------------------------

@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    import random

    from sft_fixtures import conversation, make_base

    d = tmp_path_factory.mktemp("lm")
    base = make_base(d, n_layer=2)
    data = d / "data"
    data.mkdir()
    r = random.Random(1)
    rows = [conversation(r.randint(0, 99), r.randint(0, 99)) for _ in range(40)]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return base, data


@pytest.mark.parametrize("loss,extra", [("kd", []), ("gkd", ["--distill.lmbda", "0.5", "--distill.beta", "0.5",
                                                             "--distill.max_new_tokens", "6"])])
def test_distill_lm_end_to_end(lm_teacher, tmp_path, capsys, loss, extra):
    from lmforge import LLM

    teacher, data = lm_teacher
    out = tmp_path / "run"
    rc = distill(teacher, "tiny", data, out, "--task", "lm", "--distill.loss", loss, "--data.template", "none",
                 "--student.n_embd", "32", "--student.n_layer", "1", "--train.max_steps", "16",
                 "--train.seq_len", "64", "--train.log_every", "1", "--train.eval_every", "0", *extra, task="lm")
    assert rc == 0
    capsys.readouterr()
    rows = metric_rows(out)
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first, (first, last)
    llm = LLM.load(out)
    assert llm.model.cfg.n_embd == 32 and llm.model.cfg.vocab_size == LLM.load(teacher).model.cfg.vocab_size
    assert isinstance(llm.generate("What is 1 + 2?", max_new_tokens=3, temperature=0), str)


def test_on_policy_batches_hold_the_students_completions(lm_teacher):
    """lmbda 1: every micro-batch is the prompts of the data's examples completed by the student;
    the loss reads the completion tokens only."""
    from lmforge.finetune.distill import TeacherBatches
    from lmforge.infer.llm import LLM
    from lmforge.train.distill import DistillConfig

    teacher, _ = lm_teacher
    llm = LLM.load(teacher)
    tok = llm.tokenizer
    prompt = tok.encode("Q: 1 + 2 =")
    answer = tok.encode(" 3")
    ids = prompt + answer
    labels = [-100] * (len(prompt) - 1) + answer + [-100]
    inner_batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                   "segment_ids": torch.zeros(1, len(ids), dtype=torch.long)}

    class One:
        def micro_batch(self, step, index):
            return inner_batch

    src = TeacherBatches(One(), llm.model, DistillConfig(loss="gkd", lmbda=1.0, max_new_tokens=5, temperature=1.0),
                         seed=0, tokenizer=tok, pad_id=0)
    src.bind(llm.model)
    b = src.micro_batch(0, 0)
    assert b["input_ids"][0, :len(prompt)].tolist() == prompt
    n = int((b["segment_ids"] >= 0).sum())
    assert n > len(prompt)  # the student's completion follows the prompt
    y = b["labels"][0]
    assert (y[:len(prompt) - 1] == -100).all() and y[len(prompt) - 1:n - 1].tolist() == b["input_ids"][0, len(prompt):n].tolist()
    assert torch.equal(src.micro_batch(0, 0)["input_ids"], b["input_ids"])  # seeded by (seed, step, index): resumable


def test_benchmark_quick_reports_every_row(tmp_path, capsys):
    import importlib.util

    from train_fixtures import REPO

    spec = importlib.util.spec_from_file_location("distill_bench", REPO / "benchmarks/distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    runs = {p.parent.parent.name + "/" + p.parent.name for p in tmp_path.glob("*/*/checkpoints")}
    assert runs == {"encoder/distilled", "encoder/control", "decoder/distilled", "decoder/control"}
    enc, dec = res["encoder"], res["decoder"]
    assert enc["param_share"] == pytest.approx(enc["student_params"] / enc["teacher_params"], abs=1e-4)
    assert enc["param_share"] <= 0.4 and dec["param_share"] < 0.5
    assert set(enc["test_accuracy"]) == {"teacher", "distilled", "control"} == set(dec["test_accuracy"])
    assert enc["speedup"] == pytest.approx(enc["classify_seconds"]["teacher"] / enc["classify_seconds"]["student"],
                                           rel=0.05)
