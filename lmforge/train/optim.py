"""AdamW with decay / no-decay parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices decay; norms, biases and embeddings do not.

    Embedding tables (tok_emb, pos_emb, and through tying the LM head, which is the same tensor)
    are excluded because decay pulls rare tokens' rows towards zero for no benefit. Shared
    tensors appear once (named_parameters deduplicates them).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_group_names(model: nn.Module, weight_decay: float) -> tuple[list[str], list[str]]:
    """Names in the (decay, no_decay) groups, for tests and logs."""
    names = {id(p): n for n, p in model.named_parameters()}
    d, nd = param_groups(model, weight_decay)
    return [names[id(p)] for p in d["params"]], [names[id(p)] for p in nd["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    device_type: str, name: str = "adamw", **muon: float) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, or (name='muon') Muon for hidden matrices + AdamW for the rest;
    `muon` takes muon_lr, muon_momentum, muon_weight_decay."""
    if name == "muon":
        from lmforge.train.muon import build_muon_optimizer

        return build_muon_optimizer(model, lr, weight_decay, betas, eps, **muon)
    # fused AdamW is one kernel per step on CUDA; on CPU the default (foreach) path is used.
    fused = device_type == "cuda"
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (never 0, so step 0 learns).
    Decay: cosine from lr at step == warmup_steps to min_lr at step == total_steps; min_lr after.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
