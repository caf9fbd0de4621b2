"""Longformer self-attention (Beltagy et al. 2020): a sliding window plus global tokens, in time and
memory linear in the sequence length. The semantics are those of transformers' LongformerSelfAttention:

    an ordinary token attends to the real tokens within `one_sided` positions on either side and to
        every global token (its window and the global columns share one softmax), through q, k, v;
    a global token attends to every real token through its own projections q_global, k_global, v_global;
    a padding token's output is zero.

The n x n score matrix is never built. Queries go in chunks of `chunk` rows; each chunk attends to
its key span (the chunk plus `one_sided` keys either side, gathered as a strided copy) and to the
global keys through fused scaled_dot_product_attention calls, each over a group of chunks (about
_GROUP_TOKENS queries, so the gathered spans stay a few MB whatever the length); the additive mask
(B * T * (chunk + 2 * one_sided + G) entries) is built once per forward pass and shared by the
layers. The few global query rows take one more call over all T keys (B * H * G * T) and overwrite
their rows. Time and memory are linear in T.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.nn.layers import apply_rope
from lmforge.nn.linear import Linear

_GROUP_TOKENS = 1024  # queries per attention call


@dataclass
class GlobalTokens:
    """Which tokens are real and which are global, built once per forward pass for every layer."""

    valid_BT: torch.Tensor  # bool: real tokens (padding is never attended to)
    global_BT: torch.Tensor  # bool: global tokens (always real)
    pos_BG: torch.Tensor  # long: each row's global positions, left-aligned (0 where a row has fewer)
    real_BG: torch.Tensor  # bool: which of pos_BG are global tokens
    all_valid: bool  # no padding: padded rows need no zeroing
    _bias: dict = field(default_factory=dict)  # (one_sided, chunk, dtype) -> additive mask, shared by layers

    @classmethod
    def build(cls, valid_BT: torch.Tensor, global_BT: torch.Tensor) -> "GlobalTokens":
        global_BT = global_BT.bool() & valid_BT
        n_B = global_BT.sum(1)
        G = int(n_B.max()) if global_BT.numel() else 0
        # a stable sort puts each row's global positions first, in order
        order_BT = torch.sort((~global_BT).to(torch.int8), dim=1, stable=True).indices
        pos_BG = order_BT[:, :G]
        real_BG = torch.arange(G, device=valid_BT.device)[None, :] < n_B[:, None]
        return cls(valid_BT, global_BT, pos_BG.masked_fill(~real_BG, 0), real_BG, bool(valid_BT.all()))

    @property
    def n_global(self) -> int:
        return self.pos_BG.shape[1]

    def window_bias(self, one_sided: int, c: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, n, 1, c, G + c + 2w) additive mask of the chunks (0 = may attend, -inf = not): the global
        columns, then the chunk's key span. Built once per window and dtype, shared by the layers."""
        key = (one_sided, c, dtype)
        if key not in self._bias:
            B, T = self.valid_BT.shape
            w, n = one_sided, -(-T // c)
            S, pad = c + 2 * w, n * c - T
            keyok_BP = F.pad(self.valid_BT & ~self.global_BT, (w, w + pad))  # global keys come in as columns
            a = torch.arange(c, device=self.valid_BT.device)
            j = torch.arange(S, device=self.valid_BT.device)
            band_cS = (j[None, :] >= a[:, None]) & (j[None, :] <= a[:, None] + 2 * w)  # |key - query| <= w
            ok_BncS = band_cS & keyok_BP.unfold(1, S, c)[:, :, None, :]
            ok_BncS = torch.cat([self.real_BG[:, None, None, :].expand(B, n, c, self.n_global), ok_BncS], 3)
            # a padding query sees its whole span (a finite softmax, no NaN backward); its row is zeroed
            ok_BncS |= ~F.pad(self.valid_BT, (0, pad)).view(B, n, c, 1)
            bias = torch.zeros(ok_BncS.shape, dtype=dtype, device=ok_BncS.device)
            self._bias[key] = bias.masked_fill_(~ok_BncS, float("-inf"))[:, :, None]
        return self._bias[key]


def _gather_BHGD(x_BHTD: torch.Tensor, pos_BG: torch.Tensor) -> torch.Tensor:
    B, H, _, D = x_BHTD.shape
    return x_BHTD.gather(2, pos_BG[:, None, :, None].expand(B, H, pos_BG.shape[1], D))


def window_attention(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, one_sided: int,
                     tokens: GlobalTokens, chunk: int | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """(B, T, H, D): every query over the keys within `one_sided` positions (real, not global) and over
    the global keys. Rows of padding come out zero; rows of global tokens are left for `global_rows`
    to overwrite (in place: the result is a fresh buffer)."""
    B, H, T, D = q_BHTD.shape
    w = one_sided
    c = chunk or max(w, 64)  # chunk = w measured fastest on CPU at w = 128 (vs 32, 64, 256)
    n = -(-T // c)
    S, G, pad = c + 2 * w, tokens.n_global, n * c - T
    bias_Bn1cK = tokens.window_bias(w, c, q_BHTD.dtype)
    # keys and values with w slots in front and w + pad behind: chunk i's span starts at i * c
    k_BHnSD = F.pad(k_BHTD, (0, 0, w, w + pad)).unfold(2, S, c).transpose(-1, -2)
    v_BHnSD = F.pad(v_BHTD, (0, 0, w, w + pad)).unfold(2, S, c).transpose(-1, -2)
    q_BHncD = (F.pad(q_BHTD, (0, 0, 0, pad)) if pad else q_BHTD).view(B, H, n, c, D)
    kg_BHGD, vg_BHGD = _gather_BHGD(k_BHTD, tokens.pos_BG), _gather_BHGD(v_BHTD, tokens.pos_BG)
    y_BncHD = q_BHTD.new_empty(B, n, c, H, D)  # (B, T, H, D) once flattened: what the output projection reads
    step = max(1, _GROUP_TOKENS // c)  # chunks per call: the gathered key spans stay a few MB
    for i in range(0, n, step):
        m = min(step, n - i)
        kw_BmHKD = torch.cat([kg_BHGD[:, None].expand(B, m, H, G, D), k_BHnSD[:, :, i:i + m].transpose(1, 2)], 3)
        vw_BmHKD = torch.cat([vg_BHGD[:, None].expand(B, m, H, G, D), v_BHnSD[:, :, i:i + m].transpose(1, 2)], 3)
        q_BmHcD = q_BHncD[:, :, i:i + m].transpose(1, 2).reshape(B * m, H, c, D)
        y_BncHD[:, i:i + m] = F.scaled_dot_product_attention(
            q_BmHcD, kw_BmHKD.reshape(B * m, H, G + S, D), vw_BmHKD.reshape(B * m, H, G + S, D),
            attn_mask=bias_Bn1cK[:, i:i + m].reshape(B * m, 1, c, G + S),
            dropout_p=dropout_p).view(B, m, H, c, D).transpose(2, 3)
    y_BTHD = y_BncHD.view(B, n * c, H, D)[:, :T]
    return y_BTHD if tokens.all_valid else y_BTHD.masked_fill_(~tokens.valid_BT[:, :, None, None], 0.0)


def global_rows(qg_BHGD: torch.Tensor, kg_BHTD: torch.Tensor, vg_BHTD: torch.Tensor, tokens: GlobalTokens,
                dropout_p: float = 0.0) -> torch.Tensor:
    """The global tokens' rows: each over every real token (B * H * G * T scores)."""
    mask_B11T = tokens.valid_BT[:, None, None, :]
    return F.scaled_dot_product_attention(qg_BHGD, kg_BHTD, vg_BHTD, attn_mask=mask_B11T, dropout_p=dropout_p)


class LongformerAttention(nn.Module):
    """Sliding-window + global self-attention with Longformer's two sets of projections: the fused
    `qkv` (every token) and `q_global`, `kv_global` (global tokens' queries; the keys and values
    they read)."""

    def __init__(self, dim: int, n_head: int, head_dim: int, window: int, *, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim = n_head, head_dim
        self.one_sided = window // 2
        self.qkv = Linear(dim, 3 * n_head * head_dim, bias=bias)
        self.q_global = Linear(dim, n_head * head_dim, bias=bias)
        self.kv_global = Linear(dim, 2 * n_head * head_dim, bias=bias)
        self.proj = Linear(n_head * head_dim, dim, bias=bias)
        self.dropout = dropout

    def linear_roles(self) -> dict[str, dict[str, tuple[int, int]]]:
        X = self.n_head * self.head_dim
        return {"qkv": {"q": (0, X), "k": (X, 2 * X), "v": (2 * X, 3 * X)}, "q_global": {"q_global": (0, X)},
                "kv_global": {"k_global": (0, X), "v_global": (X, 2 * X)}, "proj": {"o": (0, self.proj.out_features)}}

    def _heads(self, x_BTX: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTX.shape
        return x_BTX.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x_BTC: torch.Tensor, tokens: GlobalTokens,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x_BTC.shape
        X = self.n_head * self.head_dim
        p = self.dropout if self.training else 0.0
        q_BHTD, k_BHTD, v_BHTD = (self._heads(t) for t in self.qkv(x_BTC).split(X, dim=-1))
        if rope is not None:
            q_BHTD, k_BHTD = apply_rope(q_BHTD, *rope), apply_rope(k_BHTD, *rope)
        y_BTHD = window_attention(q_BHTD, k_BHTD, v_BHTD, self.one_sided, tokens, dropout_p=p)
        del q_BHTD, k_BHTD, v_BHTD  # the qkv activations are free again before the global projections (no grad)
        if tokens.n_global:
            pos_BG = tokens.pos_BG
            xg_BGC = x_BTC.gather(1, pos_BG[..., None].expand(B, pos_BG.shape[1], C))
            qg_BHGD = self._heads(self.q_global(xg_BGC))
            kg_BHTD, vg_BHTD = (self._heads(t) for t in self.kv_global(x_BTC).split(X, dim=-1))
            if rope is not None:
                idx_BGD = pos_BG[..., None].expand(B, pos_BG.shape[1], rope[0].shape[-1])
                qg_BHGD = apply_rope(qg_BHGD, *(r.expand(B, -1, -1).gather(1, idx_BGD) for r in rope))
                kg_BHTD = apply_rope(kg_BHTD, *rope)
            yg_BHGD = global_rows(qg_BHGD, kg_BHTD, vg_BHTD, tokens, p)
            b_N, g_N = tokens.real_BG.nonzero(as_tuple=True)
            y_BTHD[b_N, pos_BG[b_N, g_N]] = yg_BHGD.transpose(1, 2)[b_N, g_N]
        return self.proj(y_BTHD.reshape(B, T, X))
