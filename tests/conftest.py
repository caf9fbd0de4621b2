"""Fixtures shared by several test modules.

The suite is the CPU reference: its golden values are fp32 CPU figures, and on a CUDA machine the
loop would pick the GPU and bf16 autocast (train.device / train.dtype auto). So CUDA stays hidden
unless LMFORGE_TEST_CUDA=1 (`make test-cuda`: tests/test_cuda.py, each method on CUDA vs the CPU;
it also sets LMFORGE_REQUIRE_GPU=1, with which test_cuda.py fails rather than skips without CUDA).
"""

from __future__ import annotations

import os

if os.environ.get("LMFORGE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA; subprocesses inherit it

import pytest
import torch


@pytest.fixture(autouse=True)
def cli_threads(monkeypatch):
    """In-process CLI calls compute on 1 thread, as the killed/resumed subprocesses of the resume tests
    do (OMP_NUM_THREADS=1) and as a 2-core CI machine's default (half the cores) does: bit-exact resume
    checks compare runs whose float reductions must split the same way, whatever the caller exported."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
