"""The training loop: golden loss, a hand-written reference, schedule, param groups, accumulation,
run-directory contents and every bad-input message."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from lmforge.errors import LMForgeError
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.data.windows import EvalWindows, TrainWindows, window_starts
from lmforge.train.pretrain import run_training
from lmforge.train.optim import lr_at, param_group_names
from train_fixtures import TINY, make_data_dir, read_metrics, train_rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("train") / "data")


def _train(data: Path, out: Path, *extra: str, **kw) -> dict:
    return run_training(str(data), str(out), overrides=TINY + list(extra), **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


# ---- golden loss and reference loop ---------------------------------------------------------

# Recorded after test_loop_matches_reference_implementation passed (the loop does what a
# hand-written AdamW loop does); guards against silent changes to init, sampling or the update.
GOLDEN_LOSS_STEP_10 = 3.0101640224456787


def test_golden_loss(data, tmp_path):
    summary = _train(data, tmp_path / "run", "--train.max_steps", "10", "--train.eval_every", "0")
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["loss"] == pytest.approx(GOLDEN_LOSS_STEP_10, abs=1e-4)
    assert summary["steps"] == 10 and summary["tokens"] == 10 * 4 * 32
    assert rows[0]["loss"] == pytest.approx(math.log(40), abs=0.1)  # vocab 40: starts near uniform


def test_loop_matches_reference_implementation(data, tmp_path):
    """3 steps with grad_accum 2 and clipping equal a plain AdamW loop written out here."""
    steps, mb, accum, seq, lr, clip = 3, 2, 2, 32, 3e-3, 0.5
    _train(data, tmp_path / "run", "--train.max_steps", str(steps), "--train.micro_batch_size", str(mb),
           "--train.grad_accum", str(accum), "--train.grad_clip", str(clip), "--train.eval_every", "0")
    rows = train_rows(tmp_path / "run")

    meta = json.loads((data / "meta.json").read_text())
    torch.manual_seed(1337)
    model = Decoder(config_from_preset("tiny", vocab_size=meta["vocab_size"]))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "emb" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    windows = TrainWindows(tokens, seq, mb, accum, seed=1337)
    for step in range(steps):
        step_lr = lr_at(step, lr, lr / 10, 2, steps)
        for g in opt.param_groups:
            g["lr"] = step_lr
        losses = []
        for a in range(accum):
            x, y = windows.micro_batch(step, a)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            (loss / accum).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        assert rows[step]["loss"] == pytest.approx(sum(losses) / accum, rel=1e-6)
        assert rows[step]["lr"] == pytest.approx(step_lr, rel=1e-12)
        assert rows[step]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    saved = _weights(tmp_path / "run")
    for name, p in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], p, rtol=1e-5, atol=1e-7)


def test_grad_accumulation_equivalence(data, tmp_path):
    """micro_batch 2 x grad_accum 2 trains exactly like micro_batch 4 x grad_accum 1."""
    common = ["--train.max_steps", "4", "--train.eval_every", "0"]
    _train(data, tmp_path / "a", *common, "--train.micro_batch_size", "2", "--train.grad_accum", "2")
    _train(data, tmp_path / "b", *common, "--train.micro_batch_size", "4", "--train.grad_accum", "1")
    ra, rb = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["tokens"] == y["tokens"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for name in wa:
        # Adam divides by sqrt(v): float-level gradient differences on near-zero gradients give
        # update differences of up to ~1e-3 of a step (lr 3e-3), hence the absolute tolerance.
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=2e-5)


# ---- schedule, parameter groups, sampling ------------------------------------------------------

def test_lr_schedule_values():
    lr, min_lr, warm, total = 1e-3, 1e-4, 10, 110
    assert lr_at(0, lr, min_lr, warm, total) == pytest.approx(1e-4)
    assert lr_at(4, lr, min_lr, warm, total) == pytest.approx(5e-4)
    assert lr_at(9, lr, min_lr, warm, total) == pytest.approx(1e-3)
    assert lr_at(10, lr, min_lr, warm, total) == pytest.approx(1e-3)
    assert lr_at(60, lr, min_lr, warm, total) == pytest.approx(5.5e-4)  # half way: the mean of lr and min_lr
    assert lr_at(35, lr, min_lr, warm, total) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, lr, min_lr, warm, total) == pytest.approx(1e-4)
    assert lr_at(500, lr, min_lr, warm, total) == pytest.approx(1e-4)
    assert lr_at(0, lr, min_lr, 0, total) == pytest.approx(1e-3)  # no warmup


def test_no_decay_param_groups():
    gpt = Decoder(config_from_preset("tiny"))  # learned positions, LayerNorm with bias, tied head
    decay, no_decay = param_group_names(gpt, 0.1)
    assert set(decay) == {f"blocks.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")}
    assert "tok_emb.weight" in no_decay and "pos_emb.weight" in no_decay
    assert "lm_head.weight" not in decay + no_decay  # tied: the same tensor as tok_emb, listed once
    assert "blocks.0.attn.qkv.bias" in no_decay and "norm_f.weight" in no_decay and "norm_f.bias" in no_decay
    n_params = sum(p.numel() for p in gpt.parameters())
    assert n_params == gpt.num_params()

    llama = Decoder(config_from_preset("tiny", pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                       tie_embeddings=False))
    decay, no_decay = param_group_names(llama, 0.1)
    assert "lm_head.weight" in decay  # an untied head is an ordinary projection
    assert set(no_decay) == {"tok_emb.weight", "norm_f.weight"} | {f"blocks.{i}.norm{j}.weight"
                                                                   for i in range(2) for j in (1, 2)}


def test_window_sampling_is_a_function_of_seed_and_step():
    a = window_starts(7, 3, 16, 10_000, 32)
    assert np.array_equal(a, window_starts(7, 3, 16, 10_000, 32))
    assert not np.array_equal(a, window_starts(7, 4, 16, 10_000, 32))
    assert not np.array_equal(a, window_starts(8, 3, 16, 10_000, 32))
    assert a.min() >= 0 and a.max() <= 10_000 - 33
    # Fixed forever (splitmix64): data positions of old runs stay valid across versions.
    assert window_starts(1337, 0, 4, 1000, 32).tolist() == WINDOW_STARTS_1337_0
    tokens = np.arange(100, dtype=np.uint16)
    x, y = TrainWindows(tokens, 8, 2, 2, seed=1).micro_batch(5, 1)
    assert x.dtype == torch.int64 and x.shape == (2, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    ev = EvalWindows(tokens, 8, batch_size=2, n_batches=3)
    assert ev.starts.tolist() == [0, 18, 36, 55, 73, 91]


WINDOW_STARTS_1337_0 = [403, 324, 757, 900]


# ---- run directory -----------------------------------------------------------------------------

def test_run_directory_contents(data, tmp_path):
    run = tmp_path / "run"
    summary = _train(data, run, "--train.max_steps", "6", "--train.eval_every", "3", "--train.ckpt_every", "2",
                     "--train.keep_checkpoints", "2", "--train.log_every", "4")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "data_meta.json", "loss.png",
                                                       "metrics.jsonl", "tokenizer.json"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    assert (run / "data_meta.json").read_bytes() == (data / "meta.json").read_bytes()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000004", "step_00000006"]  # keep_checkpoints 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    ck = run / "checkpoints" / "step_00000006"
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "model_config.json", "tokenizer.json",
                                                      "train_state.json", "train_state.safetensors"]
    state = json.loads((ck / "train_state.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * 4 * 32
    assert state["data_position"]["next_step"] == 6
    assert state["schedule"]["total_steps"] == 6
    tensors = load_file(str(ck / "train_state.safetensors"))
    assert tensors["rng.torch_cpu.r0"].dtype == torch.uint8
    assert any(k.startswith("opt.") and k.endswith("exp_avg") for k in tensors)

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["vocab_size"] == 40
    assert cfg["train"]["seq_len"] == 32 and cfg["train"]["min_lr"] == pytest.approx(3e-4)

    rows = read_metrics(run)
    assert [(r["step"], "val_loss" in r) for r in rows] == [(1, False), (3, True), (4, False), (6, False),
                                                            (6, True)]
    for r in rows:
        if "loss" in r:
            assert set(r) == {"step", "loss", "lr", "tokens", "grad_norm", "tok_per_s", "mfu", "elapsed",
                              "energy_kwh", "kg_co2e", "energy_method"}
            assert r["tok_per_s"] > 0 and 0 < r["mfu"] < 1
        else:
            assert set(r) == {"step", "val_loss", "val_ppl", "val_bpb", "val_partial", "val_tokens", "val_tokens_total",
                              "elapsed"}
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
            meta = json.loads((data / "meta.json").read_text())["splits"]["val"]
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * meta["tokens"] / meta["bytes"])
            # eval_iters 2 x 4 windows of 33 tokens read part of the val split: labelled as such
            assert (r["val_partial"], r["val_tokens"], r["val_tokens_total"]) == (True, 2 * 4 * 33, meta["tokens"])
    assert summary["val_loss"] == rows[-1]["val_loss"] and summary["val_bpb"] == rows[-1]["val_bpb"]
    assert {k: summary[k] for k in ("val_partial", "val_tokens", "val_tokens_total")} == \
        {k: rows[-1][k] for k in ("val_partial", "val_tokens", "val_tokens_total")}
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    assert summary["checkpoint"] == str(ck)


def test_model_keys_override_preset_and_vocab_comes_from_data(data, tmp_path):
    _train(data, tmp_path / "run", "--train.max_steps", "1", "--model.n_layer", "3", "--model.n_embd=32",
           "--model.vocab_size", "64")
    text = (tmp_path / "run" / "config.yaml").read_text()
    cfg = yaml.safe_load(text)["model"]
    assert (cfg["preset"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["block_size"]) == ("tiny", 3, 32, 4, 128)
    assert cfg["vocab_size"] == 64  # larger than the tokenizer's 40: kept (padding rows)
    # config.yaml says what was trained: model.preset is where the keys started, not the model
    assert text.startswith(
        "# What this run trains: a decoder of 44,320 parameters (0.04M): preset tiny (0.11M alone) is only\n"
        "# where its keys started; n_layer, n_embd, head_dim, mlp_hidden differ from it. `lmforge info RUN`\n"
        "# describes it.\nmodel:\n")


def test_config_yaml_names_an_unchanged_preset_and_resume_accepts_runs_without_the_note(data, tmp_path):
    run = tmp_path / "run"
    _train(data, run, "--train.max_steps", "1", "--train.eval_every", "0")
    assert (run / "config.yaml").read_text().startswith(
        "# What this run trains: a decoder of 110,848 parameters (0.11M): preset tiny as it is. `lmforge info\n"
        "# RUN` describes it.\nmodel:\n")
    # a run written before train.keep_best existed (its saved config lacks the key) still resumes
    ck = run / "checkpoints" / "step_00000001"
    state = json.loads((ck / "train_state.json").read_text())
    del state["config"]["train"]["keep_best"]
    (ck / "train_state.json").write_text(json.dumps(state))
    summary = _train(data, run, "--train.max_steps", "2", "--train.eval_every", "0", resume="auto")
    assert summary["steps"] == 2


def test_max_minutes_stops_cleanly_with_eval_and_checkpoint(data, tmp_path, monkeypatch):
    import lmforge.train.loop as loop

    ticks = iter(range(10**9))
    monkeypatch.setattr(loop, "_clock", lambda: 0.1 * next(ticks))  # every clock reading is 0.1 s later
    run = tmp_path / "run"
    summary = _train(data, run, "--train.max_steps", "100000", "--train.max_minutes", "0.1",
                     "--train.eval_every", "0", "--train.warmup_steps", "0")
    assert summary["stopped_by"] == "max_minutes"
    assert 8 < summary["steps"] < 60
    rows = read_metrics(run)
    assert rows[-2]["step"] == rows[-1]["step"] == summary["steps"] and "val_loss" in rows[-1]
    latest = run / "checkpoints" / f"step_{summary['steps']:08d}"
    assert (run / "checkpoints" / "latest").read_text().strip() == latest.name
    state = json.loads((latest / "train_state.json").read_text())
    assert state["schedule"]["total_steps"] == summary["steps"]
    # The cosine schedule was fitted to the budget: it decays through the run and ends near min_lr.
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs == sorted(lrs, reverse=True)
    assert lrs[-1] < 3e-4 * 1.5 and lrs[len(lrs) // 2] < 0.75 * 3e-3


class FakeClock:
    """The loop's clock: every reading is 0.1 s after the last; `advance` is work that takes time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _budgeted_job(data, clock, eval_seconds, *extra):
    """A pretraining job whose own evaluation (as a seq2seq run's generation) takes `eval_seconds`."""
    import dataclasses

    from lmforge.train.config import build_config
    from lmforge.train.pretrain import pretraining_job

    cfg = build_config(overrides=TINY + ["--train.max_steps", "100000", "--train.warmup_steps", "0", *extra])

    def evaluate(model):
        clock.advance(eval_seconds)
        return {"generated": 1.0}

    return dataclasses.replace(pretraining_job(cfg, data), evaluate=evaluate), cfg


@pytest.mark.parametrize("eval_every", [0, 4])
def test_max_minutes_budget_covers_a_measured_costly_evaluation(data, tmp_path, monkeypatch, eval_every):
    """An evaluation of 2 s (generation, say) in a 15 s budget: the trainer times one early and reserves
    that for the final one (and the periodic ones), so the run ends within its budget, having used it."""
    import lmforge.train.loop as loop

    clock = FakeClock()
    monkeypatch.setattr(loop, "_clock", clock)
    job, cfg = _budgeted_job(data, clock, 2.0, "--train.max_minutes", "0.25", "--train.eval_every", str(eval_every))
    summary = loop.train_job(job, cfg.train, tmp_path / "run")
    assert summary["stopped_by"] == "max_minutes"
    # within budget, and less unused than a step and the evaluation due at the last step (when it stops
    # there rather than pay for two evaluations)
    unused = 15.0 - summary["seconds"]
    assert 0 <= unused < (1.0 if eval_every == 0 else 1.0 + 2.1)
    evals = [r["step"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    if eval_every == 0:
        assert evals == [4, summary["steps"]]  # the timing evaluation once 3 steps after the first are timed
    else:
        assert evals == list(range(4, summary["steps"], 4)) + [summary["steps"]]
    # the timing checkpoint at step 4 and the final one (train.ckpt_every 500)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == \
        ["step_00000004", f"step_{summary['steps']:08d}"]
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{summary['steps']:08d}" / "train_state.json").read_text())
    assert state["schedule"]["total_steps"] == summary["steps"]  # the schedule ended where the run did


def test_time_budget_plans_with_measured_costs():
    from lmforge.train.loop import TimeBudget

    b = TimeBudget(1.0, eval_every=10, ckpt_every=0, has_eval=True)
    b.step_done(5.0)  # the first step (with its warm-up) is not timed
    b.step_done(6.0)
    b.checkpointed(2.0)  # checkpoint time does not count as step time
    b.step_done(9.0)
    assert b.step_s is None and not b.wants_timing()
    b.step_done(10.0)
    assert b.step_times == [1.0, 1.0, 1.0] and b.step_s == 1.0 and b.wants_timing()
    b.checkpointed(2.0)
    assert b.wants_timing() and b.plan(4, 30.0, 1000, 1000) == (1000, False)  # no evaluation measured: the clock alone
    b.evaluated(5.0)
    assert not b.wants_timing()
    # 60 s - 30 elapsed - 7 final = 23 s at 1.5 s a step (a 5 s evaluation every 10 steps)
    assert b.plan(4, 30.0, 1000, 1000) == (4 + 15, False)
    assert b.plan(10, 30.0, 1000, 1000) == (10 + 12, False)  # the evaluation due at step 10 comes first
    assert b.plan(4, 52.0, 1000, 1000) == (4, False)  # 1 s left after the final ones: one more step fits
    assert b.plan(4, 52.5, 1000, 1000) == (4, True)
    assert b.plan(4, 30.0, 6, 1000) == (6, False)  # never beyond max_steps
    no_eval = TimeBudget(1.0, 0, 0, has_eval=False)
    for now in (1.0, 2.0, 3.0, 4.0):
        no_eval.step_done(now)
    assert no_eval.wants_timing()  # the checkpoint cost
    no_eval.checkpointed(0.5)
    assert not no_eval.wants_timing() and no_eval.plan(4, 50.0, 100, 100) == (4 + 9, False)


class ScriptedValidation:
    """A job's objective whose validation losses follow a script, one value per evaluation."""

    name = "scripted"
    loss_label = "cross entropy (nats/token)"

    def __init__(self, inner, script, batches_per_eval):
        self.inner, self.script, self.per_eval, self.calls = inner, list(script), batches_per_eval, 0

    def __call__(self, model, batch):
        if model.training:
            return self.inner(model, batch)
        value = torch.tensor(self.script[self.calls // self.per_eval])
        self.calls += 1
        return value, {"loss": value}


def _keep_best_run(data, run, max_steps, script, resume=None):
    import dataclasses

    from lmforge.train.config import build_config
    from lmforge.train.loop import train_job
    from lmforge.train.pretrain import pretraining_job

    cfg = build_config(overrides=TINY + ["--train.max_steps", str(max_steps), "--train.eval_every", "2",
                                         "--train.ckpt_every", "2", "--train.keep_checkpoints", "0",
                                         "--train.keep_best", "true"])
    job = pretraining_job(cfg, data)
    job = dataclasses.replace(job, objective=ScriptedValidation(job.objective, script, batches_per_eval=2))
    return train_job(job, cfg.train, run, resume=resume)


def test_keep_best_keeps_the_best_validation_checkpoint_beside_the_last(data, tmp_path):
    from lmforge.checkpoint import load_tensors
    from lmforge.infer.llm import LLM

    run = tmp_path / "run"
    best = run / "checkpoints" / "best"
    summary = _keep_best_run(data, run, 6, [3.0, 2.0, 2.5])  # evaluations at steps 2, 4, 6
    assert summary["best_val_loss"] == 2.0 and summary["best_checkpoint"] == str(best)
    assert json.loads((best / "best_eval.json").read_text())["step"] == 4
    weights = load_tensors(best / "model.safetensors")
    step4 = load_tensors(run / "checkpoints" / "step_00000004" / "model.safetensors")
    assert weights.keys() == step4.keys() and all(torch.equal(weights[k], step4[k]) for k in weights)
    assert sorted(p.name for p in best.iterdir()) == ["best_eval.json", "model.safetensors", "model_config.json",
                                                        "tokenizer.json"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    step6 = load_tensors(run / "checkpoints" / "step_00000006" / "model.safetensors")
    loaded = LLM.load(run).model.state_dict()  # a run loads its last checkpoint, not the best
    assert torch.equal(loaded["tok_emb.weight"], step6["tok_emb.weight"])
    assert not torch.equal(loaded["tok_emb.weight"], weights["tok_emb.weight"])
    assert torch.equal(LLM.load(best).model.state_dict()["tok_emb.weight"], weights["tok_emb.weight"])

    # Resumed, the best so far is remembered: a worse evaluation keeps step 4, a better one replaces it.
    assert _keep_best_run(data, run, 8, [2.2], resume="auto")["best_val_loss"] == 2.0
    assert json.loads((best / "best_eval.json").read_text())["step"] == 4
    assert _keep_best_run(data, run, 10, [1.5], resume="auto")["best_val_loss"] == 1.5
    assert json.loads((best / "best_eval.json").read_text())["step"] == 10
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"


def test_keep_best_needs_validation_and_is_documented(data, tmp_path):
    import dataclasses

    from lmforge.train.config import build_config, config_help
    from lmforge.train.loop import train_job
    from lmforge.train.pretrain import pretraining_job

    cfg = build_config(overrides=TINY + ["--train.keep_best", "true"])
    job = dataclasses.replace(pretraining_job(cfg, data), eval_batches=None)
    with pytest.raises(LMForgeError) as e:
        train_job(job, cfg.train, tmp_path / "run")
    assert str(e.value) == ("train.keep_best keeps the checkpoint of the lowest validation loss, but this run has no "
                            "validation batches")
    assert not (tmp_path / "run").exists()
    row = next(line for line in config_help().splitlines() if line.strip().startswith("train.keep_best "))
    assert "RUN/checkpoints/best" in row and "load RUN/checkpoints/best" in row


def test_loss_plot_names_the_objectives_loss(data, tmp_path, monkeypatch):
    import lmforge.train.loop as loop
    from lmforge.finetune.classify import ClassifyObjective
    from lmforge.finetune.preference import DPOObjective, RewardObjective
    from lmforge.train.metrics import loss_figure

    drawn = []
    monkeypatch.setattr(loop, "plot_loss", lambda rows, path, **kw: drawn.append(kw))
    _train(data, tmp_path / "run", "--train.max_steps", "2", "--train.eval_every", "2")
    assert [kw["loss_label"] for kw in drawn] == ["cross entropy (nats/token)"] and drawn[0]["panels"] == {}

    rows = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"step": 2, "val_loss": 0.65}]
    for objective, label in [(ClassifyObjective(), "cross entropy (nats/example)"),
                             (DPOObjective(0.1, "sigmoid"), "DPO loss (sigmoid, per pair)"),
                             (DPOObjective(0.1, "ipo", rpo_alpha=1.0), "DPO loss (ipo, per pair) + rpo_alpha x NLL"),
                             (RewardObjective(), "Bradley-Terry loss (per pair)")]:
        assert objective.loss_label == label
        fig = loss_figure(rows, objective.loss_label)
        assert [ax.get_ylabel() for ax in fig.axes] == [label]
        assert fig.axes[0].get_xlabel() == "step"
        assert [line.get_label() for line in fig.axes[0].get_lines()] == ["train", "validation"]


def test_a_long_evaluation_shows_a_progress_bar(data, tmp_path, capsys):
    import dataclasses
    import time

    from lmforge.train.config import build_config
    from lmforge.train.loop import EVAL_BAR_DELAY, train_job
    from lmforge.train.pretrain import pretraining_job

    class SlowValidation(ScriptedValidation):
        def __call__(self, model, batch):
            if not model.training:
                time.sleep(EVAL_BAR_DELAY / 2)
            return self.inner(model, batch)

    cfg = build_config(overrides=TINY + ["--train.max_steps", "1", "--train.eval_iters", "4", "--train.progress", "true"])
    job = pretraining_job(cfg, data)
    train_job(dataclasses.replace(job, objective=SlowValidation(job.objective, [], 1)), cfg.train, tmp_path / "run")
    err = capsys.readouterr().err
    assert re.search(r"\reval: +[0-9]+%\|[^|]*\| [2-4]/4 \[", err), err  # shown once it ran 1 s, then cleared
    capsys.readouterr()
    _train(data, tmp_path / "quick", "--train.max_steps", "1", "--train.progress", "true")
    assert "eval:" not in capsys.readouterr().err  # a quick evaluation shows no bar


# ---- bad input ---------------------------------------------------------------------------------

def _error(data, out, *extra, **kw) -> str:
    with pytest.raises(LMForgeError) as e:
        _train(data, out, *extra, **kw)
    return str(e.value)


def test_error_unknown_key(data, tmp_path):
    msg = _error(data, tmp_path / "r", "--train.lrr", "1e-3")
    assert msg.startswith("unknown config key 'train.lrr' (did you mean 'lr'?); valid keys in train: ")
    assert "max_steps" in msg


def test_error_wrong_type(data, tmp_path):
    assert _error(data, tmp_path / "r", "--train.max_steps", "ten") == \
        "config key 'train.max_steps' must be an integer, got 'ten'"
    assert _error(data, tmp_path / "r", "--train.dtype", "fp8") == \
        "config key 'train.dtype' must be one of auto, float32, bfloat16, float16, got 'fp8'"


def test_error_missing_data_dir(tmp_path):
    assert _error(tmp_path / "nope", tmp_path / "r") == f"prepared data directory not found: {tmp_path / 'nope'}"


def test_error_data_dir_without_meta(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.bin").write_bytes(b"\0\0")
    assert _error(tmp_path / "d", tmp_path / "r") == \
        f"{tmp_path / 'd' / 'meta.json'} is missing; {tmp_path / 'd'} is not a complete `lmforge prepare` output"


def test_error_seq_len_longer_than_block_size(data, tmp_path):
    assert _error(data, tmp_path / "r", "--train.seq_len", "256") == \
        "train.seq_len (256) is longer than model.block_size (128); raise model.block_size or lower train.seq_len"


def test_error_vocab_smaller_than_tokenizer(data, tmp_path):
    assert _error(data, tmp_path / "r", "--model.vocab_size", "16") == \
        "model.vocab_size (16) is smaller than the data's tokenizer vocabulary (40); remove model.vocab_size " \
        "to use the tokenizer's"


def test_objective_table_lists_every_objective_and_refuses_others(data, tmp_path):
    from lmforge.train.objectives import PRETRAINING

    assert {name: (s.family, s.default_preset) for name, s in PRETRAINING.items()} == {
        "causal_lm": (None, None), "mlm": ("encoder", "encoder-small"),
        "span_corruption": ("seq2seq", "t5-cpu"), "text_infilling": ("seq2seq", "bart-cpu"), "clip": ("clip", "clip-emoji")}
    assert _error(data, tmp_path / "r", "--train.objective", "mlmm") == \
        "unknown objective 'mlmm' in train.objective; available: causal_lm, mlm, span_corruption, text_infilling, clip"
    assert _error(data, tmp_path / "r", "--train.objective", "span_corruption", "--model.preset", "tiny") == \
        "train.objective span_corruption trains a seq2seq model, but model.preset tiny is a decoder; choose a seq2seq preset"
    assert not (tmp_path / "r").exists()


def test_error_unknown_recipe(data, tmp_path):
    msg = _error(data, tmp_path / "r", recipe="dmeo")
    assert msg.startswith("unknown recipe 'dmeo' (did you mean 'demo'?); recipes: ") and "demo" in msg


def test_error_out_holds_another_run_and_overwrite(data, tmp_path):
    run = tmp_path / "run"
    _train(data, run, "--train.max_steps", "2")
    (run / "notes.txt").write_text("mine")
    first = (run / "metrics.jsonl").read_text()
    assert _error(data, run, "--train.max_steps", "2") == \
        f"{run} already holds a training run; pass --resume auto to continue it or --overwrite to start over"
    assert (run / "metrics.jsonl").read_text() == first  # untouched
    _train(data, run, "--train.max_steps", "3", overwrite=True)
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3]
    assert (run / "notes.txt").read_text() == "mine"  # not lmforge's: left alone
    assert not (run / ".previous_run").exists()  # old run deleted once the new one had a checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_error_out_is_a_foreign_directory(data, tmp_path):
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for kw in ({}, {"overwrite": True}):
        assert _error(data, foreign, **kw) == \
            f"{foreign} is not empty and holds no lmforge run; choose a new or empty --out directory"
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_error_resume_and_overwrite_together(data, tmp_path):
    assert _error(data, tmp_path / "r", resume="auto", overwrite=True) == \
        "pass either --resume or --overwrite, not both"


def test_error_bad_config_file(data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(LMForgeError) as e:
        run_training(str(data), str(tmp_path / "r"), config_file=str(bad))
    assert str(e.value).startswith(f"config file {bad} is not valid YAML: ")
    with pytest.raises(LMForgeError) as e:
        run_training(str(data), str(tmp_path / "r"), config_file=str(tmp_path / "missing.yaml"))
    assert str(e.value) == f"config file not found: {tmp_path / 'missing.yaml'}"


def test_error_val_split_too_short(tmp_path):
    d = make_data_dir(tmp_path / "d", train_chars=3000)
    np.arange(20, dtype=np.uint16).tofile(d / "val.bin")
    meta = json.loads((d / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] = 20
    (d / "meta.json").write_text(json.dumps(meta))
    msg = _error(d, tmp_path / "r")
    assert re.fullmatch(rf"the val split of {re.escape(str(d))} has 20 tokens, fewer than train.seq_len \+ 1 "
                        r"\(33\); lower train.seq_len or prepare more data", msg), msg


# ---- Muon through the loop -------------------------------------------------------------------



def test_muon_optimizer_trains(data, tmp_path):
    _train(data, tmp_path / "run", "--train.max_steps", "8", "--train.optimizer", "muon", "--train.eval_every", "0",
           "--model.tie_embeddings", "false")
    rows = train_rows(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    assert json.dumps(state).count("momentum_buffer") > 0  # Muon's state is what was saved


def test_unknown_optimizer_is_refused(data, tmp_path):
    with pytest.raises(LMForgeError, match="config key 'train.optimizer' must be one of adamw, muon, got 'sgd'"):
        _train(data, tmp_path / "run", "--train.optimizer", "sgd")
