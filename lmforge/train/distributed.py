"""Data parallelism across processes with torch.distributed (launched by torchrun).

    torchrun --standalone --nproc_per_node 2 -m lmforge.cli train --data DIR --out RUN ...

Every process holds a full model replica wrapped in DistributedDataParallel (gloo on CPU, NCCL on
GPU); gradients are averaged across processes by DDP's all-reduce. Only rank 0 writes files and
logs. Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Processes in this run, known before the process group exists (torchrun's WORLD_SIZE)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def setup(device_pref: str) -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device_pref, "--train.device"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, "--train.device", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_main(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Rank 0's value on every rank (decisions that depend on wall-clock time must agree)."""
    if info.enabled:
        t = t.clone()
        dist.broadcast(t, src=0)
    return t


def all_gather_bytes(t: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped uint8 tensor (RNG states), on the CPU."""
    if not info.enabled:
        return [t]
    src = t.to(info.device)
    out = [torch.empty_like(src) for _ in range(info.world_size)]
    dist.all_gather(out, src)
    return [o.cpu() for o in out]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
