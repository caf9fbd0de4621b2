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
            assert set(r) == {"step", "loss", "lr", "tokens", "grad_norm", "tok_per_s", "mfu", "elapsed"}
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
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (cfg["preset"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["block_size"]) == ("tiny", 3, 32, 4, 128)
    assert cfg["vocab_size"] == 64  # larger than the tokenizer's 40: kept (padding rows)


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
        "span_corruption": ("seq2seq", "t5-cpu"), "text_infilling": ("seq2seq", "bart-cpu")}
    assert _error(data, tmp_path / "r", "--train.objective", "mlmm") == \
        "unknown objective 'mlmm' in train.objective; available: causal_lm, mlm, span_corruption, text_infilling"
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
