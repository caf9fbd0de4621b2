"""Muon: momentum, then Newton-Schulz orthogonalisation of each hidden weight matrix's update.

After Keller Jordan's modded-nanoGPT (https://kellerjordan.github.io/posts/muon/): for a 2D
weight W (out x in) with gradient G, Muon keeps a momentum buffer M <- mu*M + G, takes the Nesterov
update U = G + mu*M (default) and replaces it by the nearest semi-orthogonal matrix, approximately
U V^T of its SVD, computed with five iterations of a quintic Newton-Schulz polynomial. Every
direction of the update then moves at the same rate, whatever the gradient's conditioning.

Only the hidden matrices of the transformer blocks use Muon. Embeddings, the LM head, norms,
biases and other vectors use AdamW, in the same optimizer object (so checkpoints and resume see one
state dict). A fused projection is orthogonalised per part: lmforge's `attn.qkv` as q | k | v and a
SwiGLU `mlp.fc_in` as gate | up, as separate matrices would be.

Learning rates: `lmforge.train.loop` sets every group's `lr` to the scheduled value of `train.lr`
each step. Each group also carries `lr_scale` (Muon groups: muon_lr / lr; AdamW groups: 1), and the
step uses lr * lr_scale, so the Muon groups follow the same warmup/cosine shape at their own peak.

Cost: per matrix (m <= n) each iteration is 4*m^2*n + 2*m^3 FLOPs; at the baby-GPT shape about
100 GFLOP per step in fp32, so the iteration runs in bfloat16 (as modded-nanoGPT does) where the
hardware has bf16 matmul, which also halves it on recent x86 CPUs (AVX512-BF16 / AMX).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from lmforge.errors import LMForgeError

# Quintic coefficients from modded-nanoGPT: chosen to push singular values quickly into
# roughly [0.7, 1.2] rather than converge exactly to 1 (exactness does not help training).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of G (U S V^T -> U S' V^T, S' near 1).

    dtype: the dtype the iteration runs in (None = G's dtype); the result has G's dtype.
    """
    if G.ndim < 2:
        raise ValueError("newton_schulz needs a matrix (or a batch of matrices)")
    a, b, c = NS_COEFFS
    X = G.to(dtype) if dtype is not None else G.clone()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix X X^T is the smaller one
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def _default_ns_dtype() -> torch.dtype:
    # bf16 matmuls are fast on CUDA and on CPUs with AVX512-BF16/AMX; elsewhere fp32 is faster.
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW for the others (one optimizer, one state dict).

    Muon group keys: lr, lr_scale, momentum, nesterov, ns_steps, weight_decay.
    AdamW group keys: lr, lr_scale, betas, eps, weight_decay (decoupled, as torch's AdamW).
    `splits` maps a parameter to the row sizes of its parts (e.g. q|k|v), each orthogonalised alone.
    """

    def __init__(self, param_groups: list[dict[str, Any]], splits: dict[torch.Tensor, list[int]] | None = None,
                 ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=0.02, lr_scale=1.0, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5,
                        betas=(0.9, 0.95), eps=1e-8, use_muon=False)
        for g in param_groups:
            if g.get("use_muon"):
                for p in g["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon groups take matrices only, got a parameter of shape {tuple(p.shape)}")
        super().__init__(param_groups, defaults)
        self._splits = {id(p): list(s) for p, s in (splits or {}).items()}
        self.ns_dtype = ns_dtype if ns_dtype is not None else _default_ns_dtype()

    def _orthogonal_update(self, p: torch.Tensor, U: torch.Tensor, steps: int) -> torch.Tensor:
        parts = self._splits.get(id(p))
        if not parts:
            O = newton_schulz(U, steps, dtype=self.ns_dtype)
            return O * math.sqrt(max(1.0, U.size(0) / U.size(1)))
        outs = []
        for U_part in U.split(parts, dim=0):
            O = newton_schulz(U_part, steps, dtype=self.ns_dtype)
            outs.append(O * math.sqrt(max(1.0, U_part.size(0) / U_part.size(1))))
        return torch.cat(outs, dim=0)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            wd = group["weight_decay"]
            if group["use_muon"]:
                mu = group["momentum"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(mu).add_(g)
                    U = g.add(buf, alpha=mu) if group["nesterov"] else buf
                    update = self._orthogonal_update(p, U, group["ns_steps"])
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    p.add_(update, alpha=-lr)
            else:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    g = p.grad
                    state = self.state[p]
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = float(state["step"])
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.lerp_(g, 1.0 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    bias1 = 1.0 - beta1 ** t
                    bias2 = 1.0 - beta2 ** t
                    denom = (v / bias2).sqrt_().add_(group["eps"])
                    p.addcdiv_(m, denom, value=-lr / bias1)
        return loss


def muon_param_split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(hidden matrices -> Muon, everything else -> AdamW), as (name, parameter) lists.

    Hidden matrices: 2D parameters inside the transformer blocks (`blocks.*`). Embeddings, the LM
    head (tied or not), norms, biases and QK-norm weights go to AdamW.
    """
    muon, adam = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim == 2 and name.startswith("blocks.") else adam).append((name, p))
    return muon, adam


def fused_splits(model: nn.Module, named: Iterable[tuple[str, nn.Parameter]]) -> dict[torch.Tensor, list[int]]:
    """Row sizes of the parts of lmforge's fused projections: qkv -> [q, k, v], swiglu fc_in -> [gate, up]."""
    cfg = getattr(model, "cfg", None)
    out: dict[torch.Tensor, list[int]] = {}
    if cfg is None:
        return out
    for name, p in named:
        if name.endswith("attn.qkv.weight"):
            out[p] = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
        elif name.endswith("mlp.fc_in.weight") and cfg.mlp == "swiglu":
            out[p] = [cfg.mlp_hidden, cfg.mlp_hidden]
    return out


def build_muon_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                         muon_lr: float = 0.02, muon_momentum: float = 0.95, muon_weight_decay: float = 0.0,
                         ns_steps: int = 5, ns_dtype: torch.dtype | None = None) -> Muon:
    """Muon for the blocks' matrices (peak lr `muon_lr`), AdamW (peak lr `lr`) for the rest.

    AdamW groups follow lmforge.train.optim.param_groups: an untied LM head decays with
    `weight_decay`; embeddings, norms and biases do not. Muon matrices decay with `muon_weight_decay`.
    """
    if lr <= 0 or muon_lr <= 0:
        raise LMForgeError(f"learning rates must be positive, got train.lr={lr} and train.muon_lr={muon_lr}")
    if not 0.0 <= muon_momentum < 1.0:
        raise LMForgeError(f"train.muon_momentum must be in [0, 1), got {muon_momentum}")
    muon, adam = muon_param_split(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for _, p in adam if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for _, p in adam if not (p.ndim >= 2 and id(p) not in embeddings)]
    groups: list[dict[str, Any]] = []
    if muon:
        groups.append(dict(params=[p for _, p in muon], use_muon=True, lr=lr, lr_scale=muon_lr / lr,
                           momentum=muon_momentum, nesterov=True, ns_steps=ns_steps, weight_decay=muon_weight_decay))
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append(dict(params=params, use_muon=False, lr=lr, lr_scale=1.0, betas=tuple(betas), eps=eps,
                               weight_decay=wd))
    return Muon(groups, splits=fused_splits(model, muon), ns_dtype=ns_dtype)
