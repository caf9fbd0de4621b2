"""Data parallelism: 2 processes x grad_accum 1 (torchrun, gloo on CPU) train like 1 process x
grad_accum 2, since both see the same global batch."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import PYTHON, REPO, TINY, make_data_dir, read_metrics, run_python, training_code


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    data = make_data_dir(tmp_path / "data")
    common = TINY + ["--train.max_steps", "4", "--train.eval_every", "2", "--train.micro_batch_size", "2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"

    one = run_python(training_code(data, single, common + ["--train.grad_accum", "2"]))
    assert one.returncode == 0, one.stderr

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge.cli", "train", "--data", str(data), "--out", str(ddp), *common, "--train.grad_accum", "1"]
    two = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("lmforge train: done") == 1  # only rank 0 reports

    a, b = read_metrics(single), read_metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4]  # rank 0 alone writes
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
            assert (rb["lr"], rb["tokens"]) == (ra["lr"], ra["tokens"])
        else:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    wa = load_file(str(single / "checkpoints" / "step_00000004" / "model.safetensors"))
    wb = load_file(str(ddp / "checkpoints" / "step_00000004" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5)
    state = json.loads((ddp / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"]["global_batch"] == 4
    rng = load_file(str(ddp / "checkpoints" / "step_00000004" / "train_state.safetensors"))
    assert {"rng.torch_cpu.r0", "rng.torch_cpu.r1"} <= set(rng)
    assert not torch.equal(rng["rng.torch_cpu.r0"], rng["rng.torch_cpu.r1"])  # each rank's own dropout stream


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on one GPU: a message, not NCCL's "duplicate GPU" traceback. A
    launcher that gives each process its own CUDA_VISIBLE_DEVICES shows each one GPU: cuda:0."""
    from lmforge.errors import LMForgeError
    from lmforge.runtime import resolve_device

    def pick_device(pref, local_rank):  # as the training loop resolves train.device
        return resolve_device(pref, "--train.device", local_rank)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(LMForgeError) as e:
        pick_device("auto", local_rank=1)
    assert str(e.value) == ("2 processes on this machine but 1 CUDA device(s): one GPU per process; use torchrun "
                            "--nproc_per_node 1, or --train.device cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert pick_device("auto", local_rank=1) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert pick_device("cpu", local_rank=0) == torch.device("cpu")
