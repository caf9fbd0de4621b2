"""Transformer building blocks shared by every model family: norms, positional encodings, MLPs,
multi-head attention and the attention context (positions and masks) every attention layer of a
forward pass shares. Pure modules: no I/O, no config files.

Shape suffixes on tensor names: B batch, T query positions, S key positions (cache length),
H query heads, K key/value heads, D head dim, C model width, F MLP hidden width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.nn.kv_cache import KVCache
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


class InlineDropout:
    """Mixin for modules: `self.drop(x)` is dropout with probability `self.p_drop` in training and x
    itself otherwise, without a module call. At batch-1 decoding an nn.Dropout that does nothing
    still costs a module dispatch (~4 us, over a dozen per step). Same draws as nn.Dropout."""

    p_drop: float = 0.0
    training: bool

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p_drop, True) if self.training and self.p_drop > 0 else x


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
    'quick_gelu': fc_in -> x * sigmoid(1.702 x) -> fc_out (OpenAI CLIP); 'gelu_exact': the erf GELU.
    """

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool):
        super().__init__()
        self.kind = kind
        self.hidden = hidden
        n_in = 2 * hidden if kind == "swiglu" else hidden
        self.fc_in = Linear(dim, n_in, bias=bias)
        self.fc_out = Linear(hidden, dim, bias=bias)

    def linear_roles(self) -> dict[str, dict[str, tuple[int, int]]]:
        """The rows of each fused linear by role (LoRA targets, PEFT names): [gate; up] for swiglu."""
        h = self.hidden
        up = {"gate": (0, h), "up": (h, 2 * h)} if self.kind == "swiglu" else {"up": (0, h)}
        return {"fc_in": up, "fc_out": {"down": (0, self.fc_out.out_features)}}

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h_BTF = self.fc_in(x_BTC)
        if self.kind == "swiglu":
            gate, up = h_BTF.split(self.hidden, dim=-1)
            h_BTF = F.silu(gate) * up
        elif self.kind == "gelu":
            h_BTF = F.gelu(h_BTF, approximate="tanh")
        elif self.kind == "relu2":
            h_BTF = F.relu(h_BTF).square()
        elif self.kind == "quick_gelu":
            if h_BTF.requires_grad:
                h_BTF = h_BTF * torch.sigmoid(1.702 * h_BTF)
            else:  # inference: x * sigmoid(1.702 x) = silu(1.702 x) / 1.702 in place, no activation-sized temporaries
                h_BTF = F.silu(h_BTF.mul_(1.702), inplace=True).mul_(1 / 1.702)
        elif self.kind == "gelu_exact":
            h_BTF = F.gelu(h_BTF)
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


def packed_attention(device: torch.device) -> str:
    """How packed rows attend: 'flex' (flex attention with a block mask; the default on GPU, where it
    skips the masked blocks) or 'sdpa' (scaled_dot_product_attention with a boolean mask; CPU).
    LMFORGE_PACKED_ATTENTION=flex|sdpa overrides."""
    import os

    choice = os.environ.get("LMFORGE_PACKED_ATTENTION", "auto")
    if choice in ("flex", "sdpa"):
        return choice
    return "flex" if device.type == "cuda" else "sdpa"


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares, built once per pass: which keys each
    new token may attend to, the cache the keys and values go through, and the new tokens' positions.

    Decoders build it with `causal_context` (plain, padded or cached rows) or `packed_context`
    (packed training rows) and turn `pos_BT` into position embeddings or RoPE angles; a
    bidirectional encoder passes just its padding mask, `AttentionContext(mask=...)`.
    """

    mask: torch.Tensor | None = None  # bool (B or 1, 1, T, S), True = may attend; None: see is_causal
    is_causal: bool = False  # without a mask: causal (T == S), or every key when False
    block_mask: Any = None  # flex attention's BlockMask, used instead of `mask` (packed rows on GPU)
    cache: KVCache | None = None
    pos_BT: torch.Tensor | None = None  # position of every new token (counts real tokens of its row / segment)
    length: int | None = None  # key slots attended over (S)


def causal_context(B: int, T: int, device: torch.device, *, cache: KVCache | None = None,
                   pad_mask_BT: torch.Tensor | None = None, window: int | None = None) -> AttentionContext:
    """Causal attention for T new tokens per row, after what `cache` holds for that row (rows may
    have different lengths) or alone without a cache.

    pad_mask_BT: False marks padding; padding is never attended to and positions count only real
    tokens, so a padded row computes what the same tokens compute alone. window: a token sees only
    the last `window` positions (sliding-window attention).
    """
    if cache is not None:
        w = cache.begin(T, pad_mask_BT)
        start, start_B, S, valid_BS = w.start, w.start_B, w.end, w.valid_BS
    else:
        start, start_B, S = 0, None, T
        valid_BS = pad_mask_BT if pad_mask_BT is not None and not bool(pad_mask_BT.all()) else None
    needs_window = window is not None and S > window
    if start is not None and valid_BS is None and not needs_window and (start == 0 or T == 1):
        # plain causal attention (T == S), or one new token per row that sees the whole cache
        pos_BT = torch.arange(start, S, device=device)[None].expand(B, T)
        return AttentionContext(None, T > 1, cache=cache, pos_BT=pos_BT, length=S)
    t_T = torch.arange(T, device=device)
    q_slot_BT = (start + t_T)[None] if start is not None else start_B[:, None] + t_T[None]
    k_slot_S = torch.arange(S, device=device)
    allowed_BTS = k_slot_S[None, None] <= q_slot_BT[:, :, None]
    if valid_BS is None:
        pos_BT = q_slot_BT.expand(B, T)
        if needs_window:
            allowed_BTS = allowed_BTS & (q_slot_BT[:, :, None] - k_slot_S[None, None] < window)
    else:
        pos_BS = (valid_BS.long().cumsum(-1) - 1).clamp(min=0)
        pos_BT = pos_BS.gather(1, q_slot_BT.expand(B, T))
        allowed_BTS = allowed_BTS & valid_BS[:, None, :]
        if needs_window:
            allowed_BTS = allowed_BTS & (pos_BT[:, :, None] - pos_BS[:, None, :] < window)
        # A padding query sees at least itself, so its softmax has no empty row (no NaNs).
        allowed_BTS = allowed_BTS | (k_slot_S[None, None] == q_slot_BT[:, :, None])
    return AttentionContext(allowed_BTS[:, None], cache=cache, pos_BT=pos_BT, length=S)


def packed_context(segment_BT: torch.Tensor, window: int | None = None, flex: bool = False) -> AttentionContext:
    """Attention for packed training rows: `segment_BT` holds the id of the example each token
    belongs to; positions restart at every example and attention never crosses examples.
    flex: build a flex-attention BlockMask instead of a dense mask (see `packed_attention`)."""
    B, T = segment_BT.shape
    device = segment_BT.device
    t_T = torch.arange(T, device=device)
    starts_BT = torch.ones_like(segment_BT, dtype=torch.bool)
    starts_BT[:, 1:] = segment_BT[:, 1:] != segment_BT[:, :-1]
    first_BT = torch.where(starts_BT, t_T[None], torch.zeros_like(t_T)[None]).cummax(-1).values
    pos_BT = t_T[None] - first_BT
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_example(b, h, q, k):  # noqa: ANN001 (flex mask_mod signature)
            ok = (segment_BT[b, q] == segment_BT[b, k]) & (k <= q)
            return ok & (q - k < window) if window is not None else ok

        block_mask = create_block_mask(same_example, B, None, T, T, device=device)
        return AttentionContext(block_mask=block_mask, pos_BT=pos_BT, length=T)
    allowed_TT = t_T[None, :] <= t_T[:, None]
    if window is not None:
        allowed_TT = allowed_TT & (t_T[:, None] - t_T[None, :] < window)
    same_BTT = segment_BT[:, :, None] == segment_BT[:, None, :]
    return AttentionContext((same_BTT & allowed_TT[None])[:, None], pos_BT=pos_BT, length=T)


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

    def linear_roles(self) -> dict[str, dict[str, tuple[int, int]]]:
        """The rows of the fused q|k|v projection by role (LoRA targets, PEFT names)."""
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        return {"qkv": {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}, "proj": {"o": (0, self.proj.out_features)}}

    def _project(self, x_BTC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, K, T, D) of the new tokens, normed and rotated."""
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
        return q_BHTD, k_BKTD, v_BKTD

    def scores(self, x_BTC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Pre-softmax attention scores q.k / sqrt(D), (B, H, T, T), unmasked (no cache): what
        TinyBERT's attention loss compares. The fused attention kernel never materialises them."""
        q_BHTD, k_BKTD, _ = self._project(x_BTC, rope)
        k_BHTD = k_BKTD.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return q_BHTD @ k_BHTD.transpose(-1, -2) / math.sqrt(self.head_dim)

    def forward(self, x_BTC: torch.Tensor, ctx: AttentionContext, *, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`layer`: which of the cache's layers this is; `rope`: (cos, sin) of the new tokens' positions."""
        B, T, _ = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q_BHTD, k_BKTD, v_BKTD = self._project(x_BTC, rope)
        k_BKSD, v_BKSD = k_BKTD, v_BKTD
        if ctx.cache is not None:  # the new keys and values join the cached ones
            k_BKSD, v_BKSD = ctx.cache.write(layer, k_BKTD, v_BKTD)
        # a bf16 cache is attended over in bf16: no upcast copy of the whole cache per step, and bf16
        # matrix units (CPU AMX, GPU tensor cores) do the products
        out_dtype = q_BHTD.dtype
        q_BHTD = q_BHTD.to(k_BKSD.dtype)
        if ctx.block_mask is not None:
            y_BHTD = flex_attention(q_BHTD, k_BKSD, v_BKSD, block_mask=ctx.block_mask, enable_gqa=K != H)
        else:
            y_BHTD = F.scaled_dot_product_attention(
                q_BHTD, k_BKSD, v_BKSD, attn_mask=ctx.mask, is_causal=ctx.is_causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=K != H)
        return self.proj(y_BHTD.to(out_dtype).transpose(1, 2).reshape(B, T, H * D))
