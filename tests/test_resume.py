"""Exact resume after a SIGKILL, and what resume refuses (corrupt files, a changed config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.errors import LMForgeError
from lmforge.train.pretrain import run_training
from train_fixtures import TINY, make_data_dir, read_metrics, run_python, train_rows, training_code

DETERMINISTIC = ("step", "loss", "lr", "tokens", "grad_norm")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("resume") / "data")


MUON = ["--train.optimizer", "muon", "--model.pos_encoding", "rope", "--model.norm", "rmsnorm",
        "--model.tie_embeddings", "false"]


@pytest.mark.parametrize("optimizer_args", [[], MUON], ids=["adamw", "muon"])
def test_resume_after_sigkill_is_exact(data, tmp_path, optimizer_args):
    args = TINY + ["--train.max_steps", "8", "--train.ckpt_every", "4", "--train.eval_every", "4",
                   "--train.keep_checkpoints", "0", "--model.dropout", "0.1"] + optimizer_args  # dropout: RNG state matters
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    done = run_python(training_code(data, whole, args))
    assert done.returncode == 0, done.stderr

    # Dies at the end of step 6: rows 5 and 6 were written after the step-4 checkpoint.
    crash = run_python(training_code(data, killed, args, killed_after_step=6))
    assert crash.returncode == -9, crash.stderr
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert [r["step"] for r in train_rows(killed)] == [1, 2, 3, 4, 5, 6]

    resumed = run_python(training_code(data, killed, args, resume="auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {killed / 'checkpoints' / 'step_00000004'} at step 4" in resumed.stderr

    a, b = read_metrics(whole), read_metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert {k: ra[k] for k in DETERMINISTIC} == {k: rb[k] for k in DETERMINISTIC}  # bit for bit
        else:
            assert ra["val_loss"] == rb["val_loss"] and ra["val_bpb"] == rb["val_bpb"]
    for name in ("model.safetensors", "train_state.safetensors"):
        wa = load_file(str(whole / "checkpoints" / "step_00000008" / name))
        wb = load_file(str(killed / "checkpoints" / "step_00000008" / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    sa = json.loads((whole / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    sb = json.loads((killed / "checkpoints" / "step_00000008" / "train_state.json").read_text())
    for key in ("step", "tokens", "data_position", "schedule", "config_hash", "optimizer", "best_val_loss"):
        assert sa[key] == sb[key], key


@pytest.fixture()
def short_run(data, tmp_path) -> Path:
    run = tmp_path / "run"
    run_training(str(data), str(run), overrides=TINY + ["--train.max_steps", "2", "--train.ckpt_every", "1",
                                                        "--train.eval_every", "0"])
    return run


def _resume_error(data, run, *extra, resume="auto") -> str:
    with pytest.raises(LMForgeError) as e:
        run_training(str(data), str(run), overrides=TINY + ["--train.max_steps", "4", *extra], resume=resume)
    return str(e.value)


def test_resume_continues_with_more_steps_and_from_a_path(data, short_run, tmp_path, capsys):
    # A resumed run starts from the checkpoint's config: only what is passed again may differ.
    summary = run_training(str(data), str(short_run), overrides=["--train.max_steps", "3", "--train.progress=false"],
                           resume="auto")
    assert summary["steps"] == 3
    assert [r["step"] for r in train_rows(short_run)] == [1, 2, 3]
    # --resume PATH into a new directory starts from that checkpoint.
    other = tmp_path / "other"
    summary = run_training(str(data), str(other), overrides=["--train.max_steps", "4", "--train.progress=false"],
                           resume=str(short_run / "checkpoints" / "step_00000002"))
    assert summary["steps"] == 4 and [r["step"] for r in train_rows(other)] == [3, 4]


def test_resume_auto_without_checkpoint_starts_fresh(data, tmp_path, capsys):
    out = tmp_path / "fresh"
    summary = run_training(str(data), str(out), overrides=TINY + ["--train.max_steps", "1"], resume="auto")
    assert summary["steps"] == 1
    assert f"no checkpoint in {out}; starting a new run" in capsys.readouterr().err


def test_saved_config_is_the_checkpoint_config(data, short_run, tmp_path):
    from lmforge.train.run_dir import saved_config

    written = yaml.safe_load((short_run / "config.yaml").read_text())
    assert saved_config("auto", short_run) == written
    assert saved_config(str(short_run / "checkpoints" / "step_00000001"), tmp_path / "elsewhere") == written
    assert written["train"]["max_steps"] == 2 and written["model"]["preset"] == "tiny"
    assert saved_config("auto", tmp_path / "no_run") is None


def test_resume_refuses_a_changed_config(data, short_run):
    msg = _resume_error(data, short_run, "--train.lr", "1e-3", "--model.n_layer", "3")
    ck = short_run / "checkpoints" / "step_00000002"
    assert msg == (f"the config differs from the one checkpoint {ck} was trained with: model.n_layer (2 -> 3); "
                   "train.lr (0.003 -> 0.001); only the train keys max_steps, max_minutes, eval_every, eval_iters, "
                   "log_every, ckpt_every, keep_checkpoints, keep_best, progress, compile, device, peak_flops and "
                   "carbon_region may change")


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.safetensors"])
def test_resume_names_a_truncated_checkpoint_file(data, short_run, name):
    path = short_run / "checkpoints" / "step_00000002" / name
    path.write_bytes(path.read_bytes()[:100])
    msg = _resume_error(data, short_run)
    assert msg.startswith(f"checkpoint file {path} is truncated or corrupt ("), msg


def test_resume_names_a_corrupt_state_json(data, short_run):
    path = short_run / "checkpoints" / "step_00000002" / "train_state.json"
    path.write_text('{"step": 2, "tok')
    assert _resume_error(data, short_run).startswith(f"{path} is corrupt: ")


def test_resume_from_a_model_dir_without_training_state(data, short_run):
    ck = short_run / "checkpoints" / "step_00000002"
    (ck / "train_state.json").unlink()
    assert _resume_error(data, short_run, resume=str(ck)) == \
        f"{ck} holds no training state (train_state.json); it is a model directory that can be loaded but not resumed"


def test_resume_from_a_missing_path(data, tmp_path):
    assert _resume_error(data, tmp_path / "r", resume=str(tmp_path / "nope")) == \
        f"checkpoint to resume from not found: {tmp_path / 'nope'}"
