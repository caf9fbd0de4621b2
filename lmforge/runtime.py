"""Where a command computes: the device it runs on and the CPU threads torch may use.

    resolve_device(name, what)   'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device, checked
                                 against this machine and this torch build (one clear error otherwise)
    default_threads()            how many CPU threads a command uses unless told (--threads)
    set_threads(n)               torch's intra-op threads (None: the default); returns the previous count

Every verb of the CLI, the server and the training loop (`train.device`) resolve devices here.
torch is imported where it is used, so a parser can take THREADS_HELP without loading it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from lmforge.errors import LMForgeError

if TYPE_CHECKING:
    import torch

DEVICE_KINDS = "auto, cpu, cuda, cuda:N, mps"
THREADS_HELP = ("CPU threads torch computes with (default: OMP_NUM_THREADS if set, else half the cores this process "
                "may use, so a shared machine is not oversubscribed)")


def available_devices() -> str:
    """The devices this process can use, e.g. 'cpu' or 'cpu, cuda:0, cuda:1'."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "no CUDA device is visible" + (f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else
                                          " (driver not loaded?)")


def resolve_device(name: str | torch.device, what: str = "--device", local_rank: int = 0) -> torch.device:
    """The torch device `name` stands for. 'auto' is CUDA when available, else the CPU; plain 'cuda'
    is GPU `local_rank` (one GPU per process under torchrun). Raises LMForgeError naming `what` (the
    flag or config key it came from), the device and the devices available here."""
    import torch

    text = str(name).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if text == "cpu":
        return torch.device("cpu")
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise LMForgeError(f"{what} {name}: {_no_cuda_reason()}; available here: {available_devices()}")
        n = torch.cuda.device_count()
        if index:
            if int(index) >= n:
                raise LMForgeError(f"{what} {name}: this machine has {n} CUDA device(s); "
                                   f"available here: {available_devices()}")
            return torch.device("cuda", int(index))
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # Processes that all see the same GPUs (torchrun) need one each: NCCL refuses two on one GPU
        # with a "duplicate GPU" traceback. A launcher that gives each process its own
        # CUDA_VISIBLE_DEVICES (srun --gpus-per-task) shows each one GPU, cuda:0.
        if procs > n and "CUDA_VISIBLE_DEVICES" not in os.environ:
            raise LMForgeError(f"{procs} processes on this machine but {n} CUDA device(s): one GPU per process; "
                               f"use torchrun --nproc_per_node {n}, or {what} cpu")
        return torch.device("cuda", local_rank % n)
    if text == "mps":
        if not torch.backends.mps.is_available():
            raise LMForgeError(f"{what} mps: no Apple GPU (MPS) is available; available here: {available_devices()}")
        return torch.device("mps")
    raise LMForgeError(f"{what} {name}: not a device lmforge runs on ({DEVICE_KINDS}); "
                       f"available here: {available_devices()}")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the user's choice; torchrun sets 1 per process), else half the CPUs
    this process may use, at least 1.

    Why not PyTorch's default of one thread per core: its OpenMP threads spin while they wait for
    each other, so when another process holds one of the cores every parallel region waits for a
    descheduled thread. On a busy 2-core machine that made GRPO 20x slower (7 steps a minute
    against 136 with one thread). Half the cores leaves room for another job (and for the server's
    HTTP side) and costs at most about 2x on a machine that is idle; `--threads N` takes them all."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return max(1, usable_cpus() // 2)


def set_threads(n: int | None = None) -> int:
    """Let torch's intra-op parallelism use `n` threads, or `default_threads()` when None; returns
    the previous count. OpenMP keeps the count per thread: a thread that computes on its own, like
    the server's scheduler, sets it there. Inter-op threads are left alone: eager models do not use
    them, and torch allows setting them only once per process."""
    import torch

    if n is None:
        n = default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LMForgeError(f"--threads must be a positive integer, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before
