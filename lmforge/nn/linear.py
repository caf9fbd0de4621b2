"""`Linear`: nn.Linear whose matmuls run on oneDNN on the CPU.

On x86 CPUs that are not Intel's, MKL (PyTorch's BLAS behind torch.mm / F.linear) runs its AVX2
code path while oneDNN (bundled with PyTorch too) uses AVX-512: about 2x the fp32 matmul
throughput on the AMD EPYC build machine (docs/benchmarks.md). `Linear` sends its forward and both
backward matmuls to oneDNN's linear primitive; off the CPU, under autocast, for other dtypes, when
PyTorch has no oneDNN, or with LMFORGE_ONEDNN=0 it is exactly nn.Linear. Same parameters and
state dict as nn.Linear.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

def onednn_available() -> bool:
    if os.environ.get("LMFORGE_ONEDNN", "1") == "0":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available()) and torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):
        return False


def onednn_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) with oneDNN; any strides (transposed views are read in place)."""
    return torch.ops.mkldnn._linear_pointwise(x_MK, w_NK, b_N, "none", [], "")


def use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T goes to oneDNN: fp32 / bf16 CPU tensors of one dtype, eager mode. Under
    torch.compile the graph keeps plain matmuls (inductor cannot lower this op on unpacked weights,
    and picks its own CPU kernels)."""
    return (_ENABLED and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and w.dtype == x.dtype
            and not torch.compiler.is_compiling())


def frozen_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) outside autograd: oneDNN where `Linear` would use it, else F.linear (any strides)."""
    return onednn_linear(x_MK, w_NK, b_N) if use_onednn(x_MK, w_NK) else F.linear(x_MK, w_NK, b_N)


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        # a frozen weight needs no dW, so its input need not outlive the forward on this linear's account
        ctx.save_for_backward(x_MK if w_NK.requires_grad else None, w_NK)
        ctx.x_shape, ctx.has_bias = x.shape, b_N is not None
        return onednn_linear(x_MK, w_NK, b_N).view(*x.shape[:-1], w_NK.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_MK, w_NK = ctx.saved_tensors
        g_MN = g.reshape(-1, g.shape[-1])
        gx = onednn_linear(g_MN, w_NK.t()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None  # g @ w
        gw = onednn_linear(g_MN.t(), x_MK.t()) if ctx.needs_input_grad[1] else None  # g.T @ x
        gb = g_MN.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class Linear(nn.Linear):
    """nn.Linear whose matmuls run on oneDNN for fp32/bf16 CPU tensors (else plain F.linear).

    Same parameters and state dict as nn.Linear; `use_onednn_linears` swaps a model's Linears in place.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not use_onednn(x, w) or torch.is_autocast_enabled("cpu"):
            return F.linear(x, w, self.bias)
        if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
            # inference: no autograd node, one oneDNN call (this is the decode hot path)
            return onednn_linear(x.reshape(-1, x.shape[-1]), w, self.bias).view(*x.shape[:-1], w.shape[0])
        return _OneDNNLinearFn.apply(x, w, self.bias)


_ENABLED = onednn_available()  # decided once, at import (LMFORGE_ONEDNN=0 turns it off)


def use_onednn_linears(model: nn.Module) -> int:
    """Make every nn.Linear of `model` a lmforge Linear (in place; weights untouched). Returns the count."""
    if not onednn_available():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
            n += 1
    return n


OneDNNLinear = Linear  # the name the benchmarks use
