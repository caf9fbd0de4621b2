"""A toy model family for the registry test: one attention layer (lmforge.nn's) on learned
positions, with the KV cache the generation engine uses. One model file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from lmforge.models.presets import describe_shape, preset_config
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.layers import Attention, causal_context


@dataclass
class ToyConfig:
    preset: Optional[str] = None
    vocab_size: int = 64
    block_size: int = 16
    n_embd: int = 8
    n_layer: int = 1
    n_head: int = 1

    def num_params(self) -> int:
        C = self.n_embd
        return (self.vocab_size + self.block_size) * C + 4 * C * C + C * self.vocab_size

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        return 6 * self.num_params()


PRESETS: dict[str, dict[str, Any]] = {"toy-tiny": dict(vocab_size=32, n_embd=4)}


def config_from_preset(name: Optional[str], **overrides: Any) -> ToyConfig:
    return preset_config(ToyConfig, PRESETS, name, overrides)


class Toy(nn.Module):
    family = "toy"

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C)
        self.attn = Attention(C, 1, 1, C, bias=False, qkv_bias=False)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(1, batch, 1, min(max_len, self.cfg.block_size), self.cfg.n_embd,
                       dtype=dtype or self.head.weight.dtype)

    def forward(self, idx_BT: torch.Tensor, *, pad_mask_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        B, T = idx_BT.shape
        ctx = causal_context(B, T, idx_BT.device, cache=cache, pad_mask_BT=pad_mask_BT)
        x_BTC = self.tok_emb(idx_BT) + self.pos_emb(ctx.pos_BT)
        x_BTC = x_BTC + self.attn(x_BTC, ctx, layer=0, rope=None)
        if cache is not None:
            cache.advance(T)
        return self.head(x_BTC[:, -1:] if last_only else x_BTC)


describe = describe_shape
