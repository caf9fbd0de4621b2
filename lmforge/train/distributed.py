"""Data parallelism across processes with torch.distributed (launched by torchrun).

    torchrun --standalone --nproc_per_node 2 -m lmforge.cli train --data DIR --out RUN ...
    ... --train.parallelism fsdp [--train.activation_checkpointing true]

train.parallelism ddp (default): every process holds a full model replica wrapped in
DistributedDataParallel (gloo on CPU, NCCL on GPU); gradients are averaged by DDP's all-reduce.
train.parallelism fsdp: FSDP2 (`fully_shard`) on every transformer block, then on the root
(torchtitan's pattern): each process holds 1/world of every parameter, gradient and AdamW moment;
a block's weights are all-gathered for its forward and backward, its gradients reduce-scattered
(in fp32), and with bf16 training the gathered weights are bf16 (`MixedPrecisionPolicy`). FSDP
applies whenever torchrun launched the run, one process included (to compare it with DDP on one
GPU); a plain single process ignores train.parallelism. Only rank 0 writes files and logs. Without
torchrun's environment (WORLD_SIZE unset or 1) the DDP helpers here are no-ops.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.runtime import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # FSDP2 (train.parallelism fsdp under torchrun)

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


def setup(device_pref: str, parallelism: str = "ddp") -> DistInfo:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = parallelism == "fsdp" and "RANK" in os.environ and "MASTER_ADDR" in os.environ  # under torchrun
    if world <= 1 and not sharded:
        return DistInfo(device=resolve_device(device_pref, "--train.device"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, "--train.device", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, sharded=sharded)


def teardown(info: DistInfo) -> None:
    if (info.enabled or info.sharded) and dist.is_initialized():
        # gloo's worker threads free finished collectives (their tensors' Python objects) under the GIL;
        # if the group is destroyed while one still waits for it, the joining main thread (holding the
        # GIL) and that worker wait for each other forever. A barrier and a GIL-free pause first.
        dist.barrier()
        time.sleep(0.05)
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP around the model (FSDP shards the model in place instead: `shard`)."""
    if not info.enabled or info.sharded:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, raw: torch.nn.Module, info: DistInfo, sync: bool) -> Any:
    """Context of one micro-batch's forward and backward: gradients are reduced across processes only
    when `sync` (the last micro-batch of an accumulation); the others accumulate locally."""
    if info.sharded:
        raw.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last micro-batch only
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync or not info.enabled else model.no_sync()


# ---- blocks: FSDP units and activation checkpointing ---------------------------------------------

def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the items of its ModuleLists. Every family keeps its blocks
    in lists (decoder / encoder `blocks`, seq2seq `encoder` and `decoder`) and uses lists for nothing
    else; the search does not look inside a list, so lists within blocks would not count."""
    blocks: list[nn.Module] = []
    for child in model.children():
        blocks.extend(child if isinstance(child, nn.ModuleList) else transformer_blocks(child))
    return blocks


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: nn.Module) -> None:
    """train.activation_checkpointing: every block keeps only its input for the backward pass and
    recomputes its activations there (torch.utils.checkpoint, with the dropout RNG replayed). The
    block's forward is replaced on the instance, so parameter names and checkpoints do not change;
    FSDP's hooks stay around it (its all-gather precedes the recomputation)."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def shard(model: nn.Module, info: DistInfo, param_dtype: torch.dtype) -> None:
    """FSDP2 in place: `fully_shard` each transformer block (its LoRA adapters, frozen base weights
    and all, as one group), then the root (embeddings, final norm, head). Gathered weights are
    `param_dtype` (bf16 training) and gradients are reduced in fp32. The last block stays gathered
    after its forward, since its backward comes next."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=torch.float32)
    # The root's output (the logits) is a view; FSDP warns in case an in-place op on it follows (none does).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _without_tied(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    for key in (model.tied_state_keys() if hasattr(model, "tied_state_keys") else []):
        state.pop(key, None)  # stored once, under the tensor it is tied to (as model.safetensors does)
    return state


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, trained_only: bool = False) -> dict[str, Any]:
    """This process's shards of the model and the optimizer, keyed by parameter name (for DCP).
    trained_only: the model's trained tensors alone (a LoRA run: its frozen base is not saved)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = _without_tied(model, get_model_state_dict(model))
    if trained_only:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    return {"model": state, "optim": get_optimizer_state_dict(model, optimizer)}


def full_trained_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: whole tensor} of every trained parameter, gathered from the FSDP shards; every rank
    must call it (the gathers are collectives), and every rank gets the tensors."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def parameters_replaced(model: nn.Module, values: dict[str, torch.Tensor] | None):
    """`values` in place of the named parameters for the duration (whole tensors over FSDP's
    shards, for code that reads the modules, such as the adapter writer); the same parameter
    objects are put back after. None: nothing replaced."""
    saved = []
    try:
        for name, value in (values or {}).items():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            saved.append((module, leaf, module._parameters[leaf]))
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        yield
    finally:
        for module, leaf, p in reversed(saved):
            module._parameters[leaf] = p


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put `sharded_state`'s dict, filled from a checkpoint, back into the model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))  # tied keys are stored once
    set_optimizer_state_dict(model, optimizer, state["optim"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered to rank 0's CPU memory (empty on the other ranks); every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _without_tied(model, state)


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
