"""Transformer building blocks shared by every model family: norms, positional encodings, MLPs,
multi-head attention and the key/value cache. Pure modules: no I/O, no config files.

Shape suffixes on tensor names: B batch, T query positions, S key positions (cache length),
H query heads, K key/value heads, D head dim, C model width, F MLP hidden width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.nn.linear import Linear

# ----------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 (as Llama does) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            # one call: the same products in the same order, one op fewer per norm (decode is op-bound)
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight if self.weight is not None else y


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'")


# ----------------------------------------------------------------------------------------------
# Positional encodings


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of 'Attention Is All You Need' (even dims sin, odd dims cos)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for rotary embeddings and the attention factor applied to cos/sin.

    `scaling` follows Hugging Face's `rope_scaling` dict: types 'linear', 'dynamic' (NTK, applied
    at the trained length), 'llama3' and 'yarn'. None (or type 'default') is plain RoPE.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling["factor"]) if scaling.get("factor") is not None else 1.0
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        # NTK-aware scaling; lmforge applies it for the configured context length.
        orig = int(scaling.get("original_max_position_embeddings", max_pos))
        if max_pos > orig:
            base = theta * ((factor * max_pos / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
            inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        orig = int(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = int(scaling.get("original_max_position_embeddings") or max_pos)
        if scaling.get("factor") is None:  # HF: the factor is implied by the two context lengths
            factor = max_pos / orig
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

        mscale = scaling.get("attention_factor")
        if mscale is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            # DeepSeek-style ratio when both are given, as HF does.
            mscale = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)

        def corr_dim(n_rot: float) -> float:
            return (head_dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):  # HF default: round the ramp ends to whole dims
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp
        pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        return inv, float(mscale)
    raise ValueError(f"unsupported rope scaling type '{kind}' (supported: default, linear, dynamic, llama3, yarn)")


def rope_cos_sin(inv_freq: torch.Tensor, n_pos: int, attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (n_pos, head_dim), in the 'rotate half' layout that HF Llama uses."""
    t = torch.arange(n_pos, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    half = x_BHTD.shape[-1] // 2
    x1, x2 = x_BHTD[..., :half], x_BHTD[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos_BTD[:, None].to(x_BHTD.dtype), sin_BTD[:, None].to(x_BHTD.dtype)
    return x_BHTD * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Feed-forward


class MLP(nn.Module):
    """Position-wise feed-forward block.

    'gelu': fc_in -> GELU (tanh approximation, as GPT-2) -> fc_out.
    'swiglu': fc_in produces [gate; up] in one matmul -> silu(gate) * up -> fc_out (Llama).
    'relu2': fc_in -> relu(x)^2 -> fc_out (Primer / modded-nanoGPT).
    """

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind
        self.hidden = hidden
        n_in = 2 * hidden if kind == "swiglu" else hidden
        self.fc_in = Linear(dim, n_in, bias=bias)
        self.fc_out = Linear(hidden, dim, bias=bias)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h_BTF = self.fc_in(x_BTC)
        if self.kind == "swiglu":
            gate, up = h_BTF.split(self.hidden, dim=-1)
            h_BTF = F.silu(gate) * up
        elif self.kind == "gelu":
            h_BTF = F.gelu(h_BTF, approximate="tanh")
        elif self.kind == "relu2":
            h_BTF = F.relu(h_BTF).square()
        else:
            raise ValueError(f"unknown mlp '{self.kind}'")
        return self.fc_out(h_BTF)


# ----------------------------------------------------------------------------------------------
# Attention


_compiled_flex: Any = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: Any, enable_gqa: bool) -> torch.Tensor:
    """Flex attention over a BlockMask: compiled (fused, skips fully masked blocks) on GPU, the eager
    reference implementation elsewhere (used by the CPU equivalence test)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()" on CPU
        return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real tokens.

    Rows of a batch may start with left padding; `valid_BS` marks the slots that hold tokens,
    so attention skips padding and positions count only real tokens.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.k_LBKSD = torch.zeros(n_layer, batch, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v_LBKSD = torch.zeros_like(self.k_LBKSD)
        self.valid_BS = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (the same for every row)
        self.max_len = max_len
        self.has_padding = False

    def nbytes(self) -> int:
        return 2 * self.k_LBKSD.numel() * self.k_LBKSD.element_size()


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads, optional RoPE, QK-norm and a KV cache.

    q, k and v come from one fused projection (one matmul instead of three).
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, *, bias: bool, qkv_bias: bool,
                 qk_norm: bool = False, norm_eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.qkv = Linear(dim, (n_head + 2 * n_kv_head) * head_dim, bias=bias or qkv_bias)
        self.proj = Linear(n_head * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.dropout = dropout

    def forward(self, x_BTC: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = True,
                cache: KVCache | None = None, layer: int = 0, block_mask: Any = None) -> torch.Tensor:
        """block_mask: a flex-attention BlockMask (packed rows on GPU) used instead of `mask`."""
        B, T, _ = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q_BTX, k_BTX, v_BTX = self.qkv(x_BTC).split([H * D, K * D, K * D], dim=-1)
        q_BHTD = q_BTX.view(B, T, H, D).transpose(1, 2)
        k_BKTD = k_BTX.view(B, T, K, D).transpose(1, 2)
        v_BKTD = v_BTX.view(B, T, K, D).transpose(1, 2)
        if self.q_norm is not None:
            q_BHTD, k_BKTD = self.q_norm(q_BHTD), self.k_norm(k_BKTD)
        if rope is not None:
            q_BHTD = apply_rope(q_BHTD, *rope)
            k_BKTD = apply_rope(k_BKTD, *rope)
        if cache is not None:
            start = cache.length
            cache.k_LBKSD[layer, :, :, start:start + T] = k_BKTD
            cache.v_LBKSD[layer, :, :, start:start + T] = v_BKTD
            k_BKTD = cache.k_LBKSD[layer, :, :, :start + T]
            v_BKTD = cache.v_LBKSD[layer, :, :, :start + T]
        if block_mask is not None:
            y_BHTD = flex_attention(q_BHTD, k_BKTD, v_BKTD, block_mask=block_mask, enable_gqa=K != H)
            return self.proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D))
        y_BHTD = F.scaled_dot_product_attention(
            q_BHTD, k_BKTD, v_BKTD, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)
        return self.proj(y_BHTD.transpose(1, 2).reshape(B, T, H * D))
