"""Decoder-only (GPT-style, autoregressive) transformer: config, presets and the model, in one file.

    tokens -> embedding (+ learned or sinusoidal positions) -> n_layer x Block -> final norm -> LM head
    Block: x + Attention(norm(x)) then x + MLP(norm(x))        (pre-norm residual)

The same module covers GPT-2 (learned positions, LayerNorm, GELU, tied head, biases) and the Llama
family (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head), chosen by `DecoderConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.models.presets import preset_config
from lmforge.models.tied_head import TiedHeadHooks
from lmforge.nn.linear import Linear
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.losses import linear_cross_entropy
from lmforge.nn.layers import (MLP, Attention, AttentionContext, InlineDropout, causal_context, make_norm,
                                packed_attention, packed_context, rope_cos_sin, rope_inv_freq, sinusoidal_table)


@dataclass
class DecoderConfig:
    """Shape and flavour of a decoder. Defaults are the CPU-sized 'small' preset (nanoGPT's baby GPT)."""

    preset: Optional[str] = field(default=None, metadata={"help": "preset the other keys start from (see `lmforge info --list`)"})
    vocab_size: int = field(default=50257, metadata={"help": "vocabulary size; `lmforge train` sets it from the data's tokenizer"})
    block_size: int = field(default=256, metadata={"help": "context length (positions)"})
    n_layer: int = field(default=6, metadata={"help": "number of transformer blocks"})
    n_head: int = field(default=6, metadata={"help": "query heads"})
    n_kv_head: Optional[int] = field(default=None, metadata={"help": "key/value heads (grouped-query attention); default n_head"})
    n_embd: int = field(default=384, metadata={"help": "model width"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width; default n_embd // n_head"})
    mlp_hidden: Optional[int] = field(default=None, metadata={"help": "MLP hidden width; default 4*n_embd (gelu/relu2) or Llama's 8/3*n_embd rounded to 256 (swiglu)"})
    pos_encoding: str = field(default="learned", metadata={"help": "learned | sinusoidal | rope"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    rope_scaling: Optional[dict] = field(default=None, metadata={"help": "HF-style rope_scaling dict (linear, dynamic, llama3, yarn)"})
    mlp: str = field(default="gelu", metadata={"help": "gelu | swiglu | relu2"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon of every norm"})
    bias: bool = field(default=True, metadata={"help": "biases in linear layers and LayerNorms (GPT-2: true)"})
    qkv_bias: bool = field(default=False, metadata={"help": "biases on q/k/v only (Qwen2)"})
    qk_norm: bool = field(default=False, metadata={"help": "RMS-normalise queries and keys per head"})
    tie_embeddings: bool = field(default=True, metadata={"help": "share the token embedding with the LM head"})
    sliding_window: Optional[int] = field(default=None, metadata={"help": "attend only to the last N positions (Mistral / Longformer-style local attention)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, attention and residual branches"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of weights"})
    zero_init_proj: bool = field(default=False, metadata={"help": "start residual output projections at zero"})
    logit_softcap: Optional[float] = field(default=None, metadata={"help": "cap logits with c*tanh(x/c) (Gemma-2 / modded-nanoGPT)"})

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            if self.mlp == "swiglu":
                self.mlp_hidden = 256 * math.ceil(int(8 * self.n_embd / 3) / 256)
            else:
                self.mlp_hidden = 4 * self.n_embd
        self.validate()

    def validate(self) -> None:
        choices = {"pos_encoding": ("learned", "sinusoidal", "rope"), "mlp": ("gelu", "swiglu", "relu2"),
                   "norm": ("layernorm", "rmsnorm")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LMForgeError(f"model.{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "mlp_hidden"):
            if getattr(self, key) <= 0:
                raise LMForgeError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.n_head % self.n_kv_head:
            raise LMForgeError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise LMForgeError(self.odd_head_dim_message())
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise LMForgeError(f"model.sliding_window must be positive, got {self.sliding_window}")
        if not 0.0 <= self.dropout < 1.0:
            raise LMForgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def odd_head_dim_message(self) -> str:
        """What to change when RoPE meets an odd head_dim (it rotates pairs of dimensions)."""
        C, H, D = self.n_embd, self.n_head, self.head_dim
        if D != C // H:  # head_dim was set on its own
            return f"rope needs an even model.head_dim, got {D}; set --model.head_dim to an even number"
        kv = self.n_kv_head if self.n_kv_head != H else 1  # n_kv_head follows n_head unless set apart
        fits = [h for h in range(1, C + 1) if C % h == 0 and (C // h) % 2 == 0 and h % kv == 0]
        near = min(fits, key=lambda h: (abs(h - H), -h), default=None)
        hint = f" (e.g. --model.n_head {near})" if near is not None else ""
        return (f"rope needs an even head_dim, got {D} = model.n_embd {C} // model.n_head {H}; change --model.n_head "
                f"or --model.n_embd so that n_embd / n_head is even{hint}, or set --model.head_dim to an even number")

    # ---- sizes -----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Exact parameter count, from the shape alone (so 175B-parameter presets need no memory)."""
        C, L, V, F = self.n_embd, self.n_layer, self.vocab_size, self.mlp_hidden
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        norm = C * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = C * (H + 2 * K) * D + (H + 2 * K) * D * (self.bias or self.qkv_bias) + H * D * C + C * self.bias
        attn += 2 * D * self.qk_norm
        n_in = 2 * F if self.mlp == "swiglu" else F
        mlp = C * n_in + F * C + (n_in + C) * self.bias
        block = 2 * norm + attn + mlp
        emb = V * C
        pos = self.block_size * C if self.pos_encoding == "learned" else 0
        head = 0 if self.tie_embeddings else V * C
        total = emb + pos + L * block + norm + head
        return total - (emb + pos) if non_embedding else total

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward): 6*N + 12*L*H*D*T (PaLM appendix B),
        with N the non-embedding parameters plus the LM head matmul."""
        T = seq_len or self.block_size
        n = self.num_params(non_embedding=True) + (self.vocab_size * self.n_embd if self.tie_embeddings else 0)
        return 6 * n + 12 * self.n_layer * self.n_head * self.head_dim * T

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * bytes_per_value


# Published shapes. GPT-2 sizes from OpenAI's release (124M with tied head = 124,439,808);
# GPT-3 175B from Brown et al. 2020, table 2.1 (dense attention here; shape only).
_GPT2 = dict(vocab_size=50257, block_size=1024, pos_encoding="learned", mlp="gelu", norm="layernorm",
             bias=True, tie_embeddings=True, dropout=0.0)
_LLAMA = dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, bias=False, tie_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "small": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    "gpt3-175b": dict(_GPT2, block_size=2048, n_layer=96, n_head=96, n_embd=12288),
    "llama-small": dict(_LLAMA, vocab_size=32000, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
                        mlp_hidden=2048),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096, mlp_hidden=11008),
}


def config_from_preset(name: Optional[str], **overrides: Any) -> DecoderConfig:
    """The preset's shape with `overrides` on top; checks the preset name."""
    return preset_config(DecoderConfig, PRESETS, name, overrides, what="preset")


# ----------------------------------------------------------------------------------------------


class Block(InlineDropout, nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, bias=cfg.bias, qkv_bias=cfg.qkv_bias,
                              qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, dropout=cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.mlp_hidden, cfg.mlp, cfg.bias)
        self.p_drop = cfg.dropout

    def forward(self, x_BTC: torch.Tensor, ctx: AttentionContext, *, layer: int,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x_BTC = x_BTC + self.drop(self.attn(self.norm1(x_BTC), ctx, layer=layer, rope=rope))
        return x_BTC + self.drop(self.mlp(self.norm2(x_BTC)))


class Decoder(TiedHeadHooks, InlineDropout, nn.Module):
    """GPT-style language model. `forward(idx_BT)` returns next-token logits (B, T, vocab)."""

    family = "decoder"

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        else:
            inv_freq, attn_factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.block_size)
            cos, sin = rope_cos_sin(inv_freq, cfg.block_size, attn_factor)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.p_drop = cfg.dropout
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg.norm, cfg.n_embd, cfg.norm_eps, cfg.bias)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std); residual output projections scaled by 1/sqrt(2*n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")):
                    if self.cfg.zero_init_proj:
                        nn.init.zeros_(p)
                    else:
                        nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
                else:
                    nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    # ---- hooks for checkpoint loading (see models/registry.py; the tied head's in TiedHeadHooks) ---

    def rebuild_buffers(self) -> None:
        """Non-persistent buffers (RoPE / sinusoidal tables) are not in the file; recompute them."""
        cfg, device = self.cfg, self.tok_emb.weight.device
        if cfg.pos_encoding == "rope":
            inv, factor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.block_size)
            cos, sin = rope_cos_sin(inv, cfg.block_size, factor)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        elif cfg.pos_encoding == "sinusoidal":
            self.pos_table = sinusoidal_table(cfg.block_size, cfg.n_embd).to(device)

    def resize_token_embeddings(self, new_vocab: int) -> None:
        """Grow the vocabulary to `new_vocab` rows; new rows start at the mean embedding (and mean
        head row when untied), so new tokens begin as an "average" token instead of noise."""
        old_vocab = self.cfg.vocab_size
        if new_vocab <= old_vocab:
            return
        def grow(weight: torch.Tensor) -> nn.Parameter:
            extra = weight.detach().mean(0, keepdim=True).expand(new_vocab - old_vocab, -1)
            return nn.Parameter(torch.cat([weight.detach(), extra.clone()], 0))
        self.tok_emb.weight = grow(self.tok_emb.weight)
        self.tok_emb.num_embeddings = new_vocab
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head.weight = grow(self.lm_head.weight)
        self.lm_head.out_features = new_vocab
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_vocab)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of `batch` rows holding up to `max_len` positions (at most the context),
        in `dtype` (default: the model's)."""
        p = self.tok_emb.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_kv_head, min(max_len, self.cfg.block_size),
                       self.cfg.head_dim, dtype=dtype or p.dtype, device=p.device)

    def forward(self, idx_BT: torch.Tensor, *, pad_mask_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                segment_BT: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """Logits for every position (or only the last with `last_only`).

        pad_mask_BT: True where idx is a real token, False for padding (left padding with a cache).
        cache: a `KVCache` (`new_cache`): the new tokens go after what each row holds, and the cache
        advances; rows may hold different lengths (the serving scheduler's slots).
        segment_BT: packed training rows (no cache): integer ids of the example each token belongs
        to; positions restart at every example and attention never crosses examples.
        hidden: return the final hidden states (B, T, C) after the last norm instead of logits
        (for score / value heads).
        """
        B, T = idx_BT.shape
        cfg = self.cfg
        if segment_BT is not None:
            flex = packed_attention(idx_BT.device) == "flex" and not (self.training and cfg.dropout > 0)
            ctx = packed_context(segment_BT, cfg.sliding_window, flex)
        else:
            ctx = causal_context(B, T, idx_BT.device, cache=cache, pad_mask_BT=pad_mask_BT, window=cfg.sliding_window)
        if ctx.length > cfg.block_size:
            raise LMForgeError(f"sequence of {ctx.length} tokens is longer than the context ({cfg.block_size})")

        x_BTC = self.tok_emb(idx_BT)
        rope = None
        if cfg.pos_encoding == "learned":
            x_BTC = x_BTC + self.pos_emb(ctx.pos_BT)
        elif cfg.pos_encoding == "sinusoidal":
            x_BTC = x_BTC + self.pos_table[ctx.pos_BT].to(x_BTC.dtype)
        else:
            rope = (self.rope_cos[ctx.pos_BT], self.rope_sin[ctx.pos_BT])
        x_BTC = self.drop(x_BTC)
        for i, block in enumerate(self.blocks):
            x_BTC = block(x_BTC, ctx, layer=i, rope=rope)
        if ctx.cache is not None:
            ctx.cache.advance(T)

        x_BTC = self.norm_f(x_BTC)
        if last_only:
            x_BTC = x_BTC[:, -1:]
        if hidden:
            return x_BTC
        return self.head(x_BTC)

    def head_loss(self, h_NC: torch.Tensor, y_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross entropy of the head's logits for final hidden states `h_NC` against `y_N`.

        A plain head runs fused with the loss in row blocks (nn/losses.py), so the (N, vocab) logits
        never exist whole: at GPT-2's vocabulary they outweigh the model. Adapted or quantised heads,
        and autocast, take the plain path."""
        w_VC = self.lm_head.weight if type(self.lm_head) in (Linear, nn.Linear) and self.lm_head.bias is None else None
        if w_VC is not None and w_VC.dtype == h_NC.dtype and not torch.is_autocast_enabled(h_NC.device.type):
            return linear_cross_entropy(h_NC, w_VC, y_N, ignore_index=ignore_index, softcap=self.cfg.logit_softcap)
        loss_sum = F.cross_entropy(self.head(h_NC).float(), y_N, ignore_index=ignore_index, reduction="sum")
        return loss_sum / (y_N != ignore_index).sum().clamp(min=1)  # 0, not nan, when nothing is counted

    def head(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> logits (the LM head, with the soft-cap when configured)."""
        logits_BTV = self.lm_head(x_BTC)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits_BTV = c * torch.tanh(logits_BTV / c)
        return logits_BTV


# ---- `lmforge info` ------------------------------------------------------------------------------

def describe(cfg: DecoderConfig, seq_len: Optional[int] = None) -> tuple[dict[str, Any], list[str]]:
    """(info JSON, text lines): parameters, FLOPs per token, KV-cache bytes per token, shape."""
    seq = seq_len or cfg.block_size
    info = {
        "params": cfg.num_params(),
        "params_non_embedding": cfg.num_params(non_embedding=True),
        "flops_per_token_train": cfg.flops_per_token(seq),
        "flops_per_token_forward": cfg.flops_per_token(seq) // 3,
        "seq_len": seq,
        "kv_cache_bytes_per_token": {"fp32": cfg.kv_cache_bytes_per_token(4), "bf16": cfg.kv_cache_bytes_per_token(2)},
    }
    lines = [
        f"parameters             {info['params']:,}  ({info['params'] / 1e6:,.2f}M; non-embedding {info['params_non_embedding']:,})",
        f"FLOPs / token (train)  {info['flops_per_token_train']:,}  (6N + 12·L·H·D·T at T={seq})",
        f"FLOPs / token (fwd)    {info['flops_per_token_forward']:,}",
        f"KV cache / token       {info['kv_cache_bytes_per_token']['bf16']:,} bytes bf16, "
        f"{info['kv_cache_bytes_per_token']['fp32']:,} bytes fp32",
        f"shape                  {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} kv), width {cfg.n_embd}, "
        f"mlp {cfg.mlp_hidden}, vocab {cfg.vocab_size}, context {cfg.block_size}",
        f"flavour                {cfg.pos_encoding} positions, {cfg.norm}, {cfg.mlp}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'} head",
    ]
    return info, lines


def list_row(name: str, c: DecoderConfig) -> str:
    flavour = f"{c.pos_encoding}/{c.norm}/{c.mlp}{'/tied' if c.tie_embeddings else ''}"
    return f"{name:<12} {c.num_params():>18,} {c.n_layer:>6} {c.n_head:>5} {c.n_kv_head:>3} {c.n_embd:>6} {c.block_size:>6}  {flavour}"
