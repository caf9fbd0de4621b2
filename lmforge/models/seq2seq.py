"""Encoder-decoder (sequence-to-sequence) transformer: config, presets and the model, in one file.

    source ids -> embedding -> n_encoder_layer x EncoderBlock -> memory (B, S, C)      (runs once)
    target ids -> embedding -> n_decoder_layer x DecoderBlock(self-attn causal, cross-attn on memory, MLP)
               -> LM head -> next-token logits

One module covers the two published families, chosen by `Seq2SeqConfig.arch`:
- T5 ('t5'): pre-norm RMSNorm without bias, no biases anywhere, no positions in the embeddings but a
  learned relative position bias (log-spaced buckets) owned by the first layer of each stack and
  added to every layer's attention scores (bidirectional buckets in the encoder, causal in the
  decoder); attention scores are NOT scaled by 1/sqrt(d) (the init absorbs it); ReLU feed-forward
  (v1.0) or gated GELU (v1.1); logits computed from d_model**-0.5 * h when the head is the
  (tied) embedding (`output_scale`).
- BART ('bart'): learned absolute positions with an offset of 2 (a fairseq legacy), post-norm
  LayerNorm blocks, a LayerNorm on the embeddings, biases everywhere, GELU, embeddings shared by
  encoder, decoder and head, a `final_logits_bias` added to the logits, optional sqrt(d_model)
  embedding scale.
Decoding with a cache: the decoder self-attention keys/values are appended step by step, the
cross-attention keys/values are projected from the encoder output once (`Seq2SeqCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.models.presets import preset_config
from lmforge.models.tied_head import TiedHeadHooks
from lmforge.nn.kv_cache import KVCache
from lmforge.nn.layers import InlineDropout, RMSNorm
from lmforge.nn.linear import Linear

ARCHS = ("t5", "bart")
FFNS = ("relu", "gelu", "gelu_tanh", "gated-gelu", "gated-relu")


@dataclass
class Seq2SeqConfig:
    """Shape and flavour of an encoder-decoder. Defaults are a CPU-sized T5 v1.1-style model."""

    preset: Optional[str] = field(default=None, metadata={"help": "preset the other keys start from (see `lmforge info --list`)"})
    arch: str = field(default="t5", metadata={"help": "t5 (pre-norm RMSNorm, relative position buckets) | bart (post-norm, learned positions)"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size; training sets it from the data's tokenizer"})
    block_size: int = field(default=512, metadata={"help": "longest source or target (BART: learned positions; T5: a limit only)"})
    n_encoder_layer: int = field(default=4, metadata={"help": "encoder blocks"})
    n_decoder_layer: int = field(default=4, metadata={"help": "decoder blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    d_model: int = field(default=256, metadata={"help": "model width"})
    head_dim: Optional[int] = field(default=None, metadata={"help": "per-head width (T5 d_kv); default d_model // n_head"})
    d_ff: Optional[int] = field(default=None, metadata={"help": "feed-forward hidden width; default 4*d_model"})
    ffn: str = field(default="gated-gelu", metadata={"help": "relu (T5 v1.0) | gated-gelu (T5 v1.1) | gelu (BART, exact erf) | gelu_tanh | gated-relu"})
    relative_buckets: int = field(default=32, metadata={"help": "T5 relative position buckets"})
    relative_max_distance: int = field(default=128, metadata={"help": "T5: distances beyond this share the last bucket"})
    norm_eps: Optional[float] = field(default=None, metadata={"help": "norm epsilon; default 1e-6 (t5) or 1e-5 (bart)"})
    tie_embeddings: bool = field(default=True, metadata={"help": "the LM head is the shared token embedding"})
    output_scale: Optional[bool] = field(default=None, metadata={"help": "T5: multiply the decoder output by d_model**-0.5 before the head; default = tie_embeddings"})
    scale_embedding: bool = field(default=False, metadata={"help": "BART: multiply token embeddings by sqrt(d_model)"})
    pad_id: int = field(default=0, metadata={"help": "padding token id (T5 0, BART 1)"})
    eos_id: int = field(default=1, metadata={"help": "end-of-sequence token id (T5 1, BART 2)"})
    decoder_start_id: Optional[int] = field(default=None, metadata={"help": "first decoder input; default pad_id (t5) or eos_id (bart)"})
    forced_bos_id: Optional[int] = field(default=None, metadata={"help": "generation: the first generated token is always this one (BART summarisers)"})
    forced_eos_id: Optional[int] = field(default=None, metadata={"help": "generation: the token generated at the length limit is always this one (BART)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, attention and residual branches"})
    init_std: float = field(default=0.02, metadata={"help": "BART: std of the normal init (T5 uses its own fan-in init)"})

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.d_model // max(self.n_head, 1)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.norm_eps is None:
            self.norm_eps = 1e-6 if self.arch == "t5" else 1e-5
        if self.output_scale is None:
            self.output_scale = self.arch == "t5" and self.tie_embeddings
        if self.decoder_start_id is None:
            self.decoder_start_id = self.pad_id if self.arch == "t5" else self.eos_id
        self.validate()

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise LMForgeError(f"model.arch must be one of {', '.join(ARCHS)}, got '{self.arch}'")
        if self.ffn not in FFNS:
            raise LMForgeError(f"model.ffn must be one of {', '.join(FFNS)}, got '{self.ffn}'")
        for key in ("vocab_size", "block_size", "n_encoder_layer", "n_decoder_layer", "n_head", "d_model", "head_dim",
                    "d_ff", "relative_buckets", "relative_max_distance"):
            if getattr(self, key) <= 0:
                raise LMForgeError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.arch == "bart" and self.n_head * self.head_dim != self.d_model:
            raise LMForgeError(f"bart needs n_head * head_dim == d_model, got {self.n_head} * {self.head_dim} != {self.d_model}")
        for key in ("pad_id", "eos_id", "decoder_start_id"):
            if not 0 <= getattr(self, key) < self.vocab_size:
                raise LMForgeError(f"model.{key} must be a token id in 0..{self.vocab_size - 1}, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LMForgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    # ---- sizes -----------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.n_encoder_layer + self.n_decoder_layer

    @property
    def n_embd(self) -> int:  # the name the other families use for the width
        return self.d_model

    def num_params(self, non_embedding: bool = False) -> int:
        """Exact parameter count from the shape alone (the shared embedding counted once)."""
        C, V, F_, H, D = self.d_model, self.vocab_size, self.d_ff, self.n_head, self.head_dim
        bias = self.arch == "bart"
        norm = 2 * C if bias else C
        attn = 4 * C * H * D + (3 * H * D + C) * bias
        n_in = 2 * F_ if self.ffn.startswith("gated") else F_
        mlp = C * n_in + F_ * C + (n_in + C) * bias
        enc = self.n_encoder_layer * (attn + mlp + 2 * norm)
        dec = self.n_decoder_layer * (2 * attn + mlp + 3 * norm)
        if self.arch == "t5":
            extra = 2 * self.relative_buckets * H + 2 * norm  # two bias tables, two final norms
            pos = 0
        else:
            extra = 2 * norm  # layernorm_embedding of each stack
            pos = 2 * (self.block_size + 2) * C
        emb = V * C
        head = 0 if self.tie_embeddings else V * C
        total = emb + pos + enc + dec + extra + head
        return total - emb - pos if non_embedding else total

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per (source + target) token pair, 6*N + attention, with N the non-embedding
        parameters plus the head; an estimate (source and target assumed the same length)."""
        T = seq_len or self.block_size
        n = self.num_params(non_embedding=True) + (self.vocab_size * self.d_model if self.tie_embeddings else 0)
        attn = 12 * self.n_head * self.head_dim * T * (self.n_encoder_layer + 2 * self.n_decoder_layer)
        return 6 * n + attn

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Decoder self-attention cache per generated token (the cross-attention cache is per source token)."""
        return 2 * self.n_decoder_layer * self.n_head * self.head_dim * bytes_per_value


# Published shapes: t5-small/base from Raffel et al. 2020 (tied head; T5ForConditionalGeneration
# counts 60,506,624 / 222,903,552), t5-v1_1-small (gated GELU, untied head), bart-base/large from
# Lewis et al. 2020 (139,420,416 / 406,291,456 as BartForConditionalGeneration).
_T5 = dict(arch="t5", vocab_size=32128, block_size=512, pad_id=0, eos_id=1, head_dim=64)
_BART = dict(arch="bart", vocab_size=50265, block_size=1024, ffn="gelu", pad_id=1, eos_id=2, tie_embeddings=True)
# CPU-sized presets use lmforge's tokenizer ids (EOS <|endoftext|> 0, pad <|pad|> 1), so they train on
# `lmforge prepare` data as they are.
_LMF_IDS = dict(pad_id=1, eos_id=0)
PRESETS: dict[str, dict[str, Any]] = {
    "t5-tiny": dict(arch="t5", vocab_size=512, block_size=128, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
                    d_model=64, d_ff=128, ffn="gated-gelu", **_LMF_IDS),
    "bart-tiny": dict(arch="bart", vocab_size=512, block_size=128, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
                      d_model=64, d_ff=256, ffn="gelu", **_LMF_IDS),
    "t5-cpu": dict(arch="t5", vocab_size=4096, block_size=256, n_encoder_layer=4, n_decoder_layer=4, n_head=4,
                   d_model=256, head_dim=64, d_ff=640, ffn="gated-gelu", **_LMF_IDS),
    "bart-cpu": dict(arch="bart", vocab_size=4096, block_size=256, n_encoder_layer=4, n_decoder_layer=4, n_head=4,
                     d_model=256, d_ff=1024, ffn="gelu", **_LMF_IDS),
    "t5-small": dict(_T5, n_encoder_layer=6, n_decoder_layer=6, n_head=8, d_model=512, d_ff=2048, ffn="relu"),
    "t5-base": dict(_T5, n_encoder_layer=12, n_decoder_layer=12, n_head=12, d_model=768, d_ff=3072, ffn="relu"),
    "t5-v1_1-small": dict(_T5, n_encoder_layer=8, n_decoder_layer=8, n_head=6, d_model=512, d_ff=1024,
                          ffn="gated-gelu", tie_embeddings=False),
    "bart-base": dict(_BART, n_encoder_layer=6, n_decoder_layer=6, n_head=12, d_model=768, d_ff=3072),
    "bart-large": dict(_BART, n_encoder_layer=12, n_decoder_layer=12, n_head=16, d_model=1024, d_ff=4096),
}


def config_from_preset(name: Optional[str], **overrides: Any) -> Seq2SeqConfig:
    """The preset's shape with `overrides` on top; checks the preset name."""
    return preset_config(Seq2SeqConfig, PRESETS, name, overrides, what="preset")


# ----------------------------------------------------------------------------------------------


def relative_position_bucket(rel_TS: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact buckets for short distances,
    log-spaced ones up to max_distance, one bucket beyond. Causal buckets cover only the past."""
    buckets = torch.zeros_like(rel_TS)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (rel_TS > 0).long() * n_buckets
        dist = rel_TS.abs()
    else:
        dist = (-rel_TS).clamp(min=0)
    max_exact = n_buckets // 2
    is_small = dist < max_exact
    large = max_exact + (torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact)
                         * (n_buckets - max_exact)).long()
    large = large.clamp(max=n_buckets - 1)
    return buckets + torch.where(is_small, dist, large)


class MultiHeadAttention(nn.Module):
    """Self-attention (fused q/k/v) or cross-attention (q from the decoder, fused k/v from the
    encoder output). `scale` multiplies q.k (T5: 1, BART: 1/sqrt(head_dim))."""

    def __init__(self, dim: int, n_head: int, head_dim: int, *, bias: bool, scale: float, cross: bool, dropout: float):
        super().__init__()
        self.n_head, self.head_dim, self.scale, self.cross, self.dropout = n_head, head_dim, scale, cross, dropout
        inner = n_head * head_dim
        if cross:
            self.q = Linear(dim, inner, bias=bias)
            self.kv = Linear(dim, 2 * inner, bias=bias)
        else:
            self.qkv = Linear(dim, 3 * inner, bias=bias)
        self.proj = Linear(inner, dim, bias=bias)

    def linear_roles(self) -> dict[str, dict[str, tuple[int, int]]]:
        """The rows of each fused projection by role (LoRA targets, PEFT names)."""
        n = self.n_head * self.head_dim
        fused = {"q": {"q": (0, n)}, "kv": {"k": (0, n), "v": (n, 2 * n)}} if self.cross else \
            {"qkv": {"q": (0, n), "k": (n, 2 * n), "v": (2 * n, 3 * n)}}
        return {**fused, "proj": {"o": (0, self.proj.out_features)}}

    def heads(self, x_BTX: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTX.shape
        return x_BTX.view(B, T, -1, self.head_dim).transpose(1, 2)

    def memory_kv(self, mem_BSC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the encoder output (computed once per source)."""
        k_BSX, v_BSX = self.kv(mem_BSC).chunk(2, dim=-1)
        return self.heads(k_BSX), self.heads(v_BSX)

    def scores(self, x_BTC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Pre-softmax attention scores q.k * scale, (B, H, T, S), without the mask (no cache): what
        explanations read; the fused attention kernel never materialises them. `kv`: cross-attention's
        keys and values (`memory_kv`)."""
        if self.cross:
            q_BHTD, k_BHSD = self.heads(self.q(x_BTC)), kv[0]
        else:
            q_BTX, k_BTX, _ = self.qkv(x_BTC).chunk(3, dim=-1)
            q_BHTD, k_BHSD = self.heads(q_BTX), self.heads(k_BTX)
        return q_BHTD @ k_BHSD.transpose(-1, -2) * self.scale

    def forward(self, x_BTC: torch.Tensor, *, mask: torch.Tensor | None, is_causal: bool = False,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        if self.cross:
            q_BHTD = self.heads(self.q(x_BTC))
            k_BHSD, v_BHSD = kv
        else:
            q_BTX, k_BTX, v_BTX = self.qkv(x_BTC).chunk(3, dim=-1)
            q_BHTD, k_BHSD, v_BHSD = self.heads(q_BTX), self.heads(k_BTX), self.heads(v_BTX)
            if cache is not None:  # in the model's dtype: a float mask carries T5's position bias
                k_BHSD, v_BHSD = (t.to(q_BHTD.dtype) for t in cache.write(layer, k_BHSD, v_BHSD))
        y_BHTD = F.scaled_dot_product_attention(
            q_BHTD, k_BHSD, v_BHSD, attn_mask=mask, is_causal=is_causal and mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.proj(y_BHTD.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """fc_in -> activation -> fc_out; gated variants compute [gate; up] in one matmul (T5 v1.1 wi_0; wi_1)."""

    def __init__(self, dim: int, hidden: int, kind: str, bias: bool):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        self.gated = kind.startswith("gated")
        self.fc_in = Linear(dim, 2 * hidden if self.gated else hidden, bias=bias)
        self.fc_out = Linear(hidden, dim, bias=bias)

    def linear_roles(self) -> dict[str, dict[str, tuple[int, int]]]:
        h = self.hidden
        up = {"gate": (0, h), "up": (h, 2 * h)} if self.gated else {"up": (0, h)}
        return {"fc_in": up, "fc_out": {"down": (0, self.fc_out.out_features)}}

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind in ("relu", "gated-relu"):
            return F.relu(x)
        if self.kind == "gelu":
            return F.gelu(x)
        return F.gelu(x, approximate="tanh")  # gated-gelu (HF gelu_new) and gelu_tanh

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h_BTF = self.fc_in(x_BTC)
        if self.gated:
            gate, up = h_BTF.split(self.hidden, dim=-1)
            h_BTF = self.act(gate) * up
        else:
            h_BTF = self.act(h_BTF)
        return self.fc_out(h_BTF)


def _norm(cfg: Seq2SeqConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "t5" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class EncoderBlock(InlineDropout, nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        bias = cfg.arch == "bart"
        scale = 1.0 if cfg.arch == "t5" else cfg.head_dim ** -0.5
        self.pre_norm = cfg.arch == "t5"
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.head_dim, bias=bias, scale=scale, cross=False,
                                       dropout=cfg.dropout)
        self.norm1 = _norm(cfg)
        self.mlp = FeedForward(cfg.d_model, cfg.d_ff, cfg.ffn, bias)
        self.norm2 = _norm(cfg)
        self.p_drop = cfg.dropout

    def forward(self, x_BSC: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x_BSC = x_BSC + self.drop(self.attn(self.norm1(x_BSC), mask=mask))
            return x_BSC + self.drop(self.mlp(self.norm2(x_BSC)))
        x_BSC = self.norm1(x_BSC + self.drop(self.attn(x_BSC, mask=mask)))
        return self.norm2(x_BSC + self.drop(self.mlp(x_BSC)))


class DecoderBlock(InlineDropout, nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        bias = cfg.arch == "bart"
        scale = 1.0 if cfg.arch == "t5" else cfg.head_dim ** -0.5
        self.pre_norm = cfg.arch == "t5"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.head_dim, bias=bias, scale=scale, cross=False,
                                            dropout=cfg.dropout)
        self.norm1 = _norm(cfg)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.head_dim, bias=bias, scale=scale, cross=True,
                                             dropout=cfg.dropout)
        self.norm2 = _norm(cfg)
        self.mlp = FeedForward(cfg.d_model, cfg.d_ff, cfg.ffn, bias)
        self.norm3 = _norm(cfg)
        self.p_drop = cfg.dropout

    def forward(self, x_BTC: torch.Tensor, *, self_mask: torch.Tensor | None, cross_mask: torch.Tensor | None,
                memory: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        if kv is None:
            kv = self.cross_attn.memory_kv(memory)
        if self.pre_norm:
            x_BTC = x_BTC + self.drop(self.self_attn(self.norm1(x_BTC), mask=self_mask, is_causal=True, cache=cache, layer=layer))
            x_BTC = x_BTC + self.drop(self.cross_attn(self.norm2(x_BTC), mask=cross_mask, kv=kv))
            return x_BTC + self.drop(self.mlp(self.norm3(x_BTC)))
        x_BTC = self.norm1(x_BTC + self.drop(self.self_attn(x_BTC, mask=self_mask, is_causal=True, cache=cache, layer=layer)))
        x_BTC = self.norm2(x_BTC + self.drop(self.cross_attn(x_BTC, mask=cross_mask, kv=kv)))
        return self.norm3(x_BTC + self.drop(self.mlp(x_BTC)))


class Seq2SeqCache:
    """Decoder state for incremental decoding: the self-attention KV cache (grows one slot per
    step) and the cross-attention keys/values of the encoder output (computed once)."""

    def __init__(self, self_kv: KVCache, cross_kv: list[tuple[torch.Tensor, torch.Tensor]], src_mask_BS: torch.Tensor | None):
        self.self_kv = self_kv
        self.cross_kv = cross_kv
        # an all-real source needs no cross-attention mask; decided once, not at every step
        self.src_mask_BS = None if src_mask_BS is not None and bool(src_mask_BS.all()) else src_mask_BS
        self.cross_mask: torch.Tensor | None = None  # additive form (T5), built on first use
        self.self_bias_HLL: torch.Tensor | None = None  # T5: the decoder's relative bias for every slot pair

    @property
    def length(self) -> int:
        return self.self_kv.length

    def reorder(self, idx_B: torch.Tensor) -> None:
        """Keep rows `idx_B` (beam search: each surviving beam takes its parent's cache)."""
        self.self_kv.reorder(idx_B)
        self.cross_kv = [(k.index_select(0, idx_B), v.index_select(0, idx_B)) for k, v in self.cross_kv]
        if self.src_mask_BS is not None:
            self.src_mask_BS = self.src_mask_BS.index_select(0, idx_B)
        if self.cross_mask is not None:
            self.cross_mask = self.cross_mask.index_select(0, idx_B)


class Seq2Seq(TiedHeadHooks, InlineDropout, nn.Module):
    """Encoder-decoder LM. `forward(src_BS, tgt_BT)` returns next-token logits of the target (B, T, vocab),
    where tgt starts with `cfg.decoder_start_id` (teacher forcing: the labels shifted right)."""

    family = "seq2seq"

    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)  # shared by encoder, decoder (and head when tied)
        self.p_drop = cfg.dropout
        if cfg.arch == "t5":
            self.enc_rel_bias = nn.Embedding(cfg.relative_buckets, cfg.n_head)
            self.dec_rel_bias = nn.Embedding(cfg.relative_buckets, cfg.n_head)
        else:
            self.enc_pos = nn.Embedding(cfg.block_size + 2, C)  # BART: position p is row p + 2
            self.dec_pos = nn.Embedding(cfg.block_size + 2, C)
            self.enc_emb_norm = _norm(cfg)
            self.dec_emb_norm = _norm(cfg)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layer))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_layer))
        if cfg.arch == "t5":
            self.enc_norm_f = _norm(cfg)
            self.dec_norm_f = _norm(cfg)
        self.lm_head = Linear(C, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "bart":
            self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """T5: the fan-in init of Mesh TensorFlow (so unscaled q.k stays O(1)); BART: N(0, init_std)."""
        cfg = self.cfg
        C, F_, HD = cfg.d_model, cfg.d_ff, cfg.n_head * cfg.head_dim
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
                continue
            if cfg.arch == "bart":
                nn.init.normal_(p, 0.0, cfg.init_std)
                continue
            if name in ("tok_emb.weight", "lm_head.weight"):
                std = 1.0
            elif name.endswith("rel_bias.weight"):
                std = C ** -0.5
            elif name.endswith(("qkv.weight", "attn.q.weight")):
                std = C ** -0.5
                if name.endswith("qkv.weight"):
                    with torch.no_grad():
                        nn.init.normal_(p, 0.0, std)
                        p[:HD].normal_(0.0, (C * cfg.head_dim) ** -0.5)  # the query rows
                    continue
                std = (C * cfg.head_dim) ** -0.5
            elif name.endswith("proj.weight"):
                std = HD ** -0.5
            elif name.endswith("fc_out.weight"):
                std = F_ ** -0.5
            else:  # kv, fc_in
                std = C ** -0.5
            nn.init.normal_(p, 0.0, std)
        if cfg.arch == "bart":
            self.final_logits_bias.zero_()

    # ---- masks and positions -----------------------------------------------------------------

    def _rel_bias(self, table: nn.Embedding, T: int, S: int, start: int, bidirectional: bool) -> torch.Tensor:
        """(1, H, T, S) relative position bias for queries start..start+T over keys 0..S."""
        device = table.weight.device
        q = torch.arange(start, start + T, device=device)[:, None]
        k = torch.arange(S, device=device)[None, :]
        bucket_TS = relative_position_bucket(k - q, bidirectional, self.cfg.relative_buckets, self.cfg.relative_max_distance)
        return table(bucket_TS).permute(2, 0, 1)[None]

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    # ---- the two halves ----------------------------------------------------------------------

    def encode(self, src_BS: torch.Tensor, src_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, S, C). src_mask_BS: True for real tokens, False for padding."""
        B, S = src_BS.shape
        if S > self.cfg.block_size:
            raise LMForgeError(f"source of {S} tokens is longer than the model's limit ({self.cfg.block_size})")
        x_BSC = self.tok_emb(src_BS)
        if src_mask_BS is not None and bool(src_mask_BS.all()):
            src_mask_BS = None
        key_ok = src_mask_BS[:, None, None, :] if src_mask_BS is not None else None
        if self.cfg.arch == "t5":
            mask = self._rel_bias(self.enc_rel_bias, S, S, 0, True).to(x_BSC.dtype)
            if key_ok is not None:
                mask = mask + self._additive(key_ok, x_BSC.dtype)
        else:
            if self.cfg.scale_embedding:
                x_BSC = x_BSC * math.sqrt(self.cfg.d_model)
            x_BSC = self.enc_emb_norm(x_BSC + self.enc_pos(torch.arange(S, device=src_BS.device) + 2))
            mask = key_ok
        x_BSC = self.drop(x_BSC)
        for block in self.encoder:
            x_BSC = block(x_BSC, mask)
        if self.cfg.arch == "t5":
            x_BSC = self.drop(self.enc_norm_f(x_BSC))
        return x_BSC

    def decode(self, tgt_BT: torch.Tensor, memory_BSC: torch.Tensor | None, src_mask_BS: torch.Tensor | None = None, *,
               tgt_mask_BT: torch.Tensor | None = None, cache: Seq2SeqCache | None = None,
               last_only: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, V) of decoder inputs `tgt_BT` attending to the encoder output.
        With a cache, tgt_BT are the new tokens after `cache.length` (memory may then be None)."""
        cfg = self.cfg
        B, T = tgt_BT.shape
        start = cache.length if cache is not None else 0
        S = start + T
        limit = cache.self_kv.max_len if cache is not None else cfg.block_size
        if S > min(limit, cfg.block_size):
            raise LMForgeError(f"target of {S} tokens is longer than the model's limit ({min(limit, cfg.block_size)})")
        if cache is not None:
            src_mask_BS = cache.src_mask_BS  # None when the source has no padding
        elif src_mask_BS is not None and bool(src_mask_BS.all()):
            src_mask_BS = None
        x_BTC = self.tok_emb(tgt_BT)
        dtype = x_BTC.dtype
        device = tgt_BT.device

        # Self-attention mask: causal (implicit when nothing else is needed), padding keys off.
        self_allowed = None
        if tgt_mask_BT is not None and not bool(tgt_mask_BT.all()):
            if cache is not None:
                raise LMForgeError("a decoder padding mask is not supported with a cache")
            causal_TS = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)
            self_allowed = causal_TS[None, None] & tgt_mask_BT[:, None, None, :]
        elif T > 1 and start > 0:
            self_allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)[None, None]
        cross_allowed = src_mask_BS[:, None, None, :] if src_mask_BS is not None else None

        if cfg.arch == "t5" and cache is not None and T == 1 and self_allowed is None:
            # one new token per step: its bias row over the cache, sliced from a table built once
            if cache.self_bias_HLL is None:
                L = cache.self_kv.max_len
                cache.self_bias_HLL = self._rel_bias(self.dec_rel_bias, L, L, 0, False)[0].to(dtype)
            self_mask = cache.self_bias_HLL[None, :, start:S, :S]
            if cross_allowed is not None and cache.cross_mask is None:
                cache.cross_mask = self._additive(cross_allowed, dtype)
            cross_mask = cache.cross_mask
        elif cfg.arch == "t5":
            self_mask = self._rel_bias(self.dec_rel_bias, T, S, start, False).to(dtype)
            if self_allowed is None and T > 1:
                self_allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)[None, None]
            if self_allowed is not None:
                self_mask = self_mask + self._additive(self_allowed, dtype)
            cross_mask = self._additive(cross_allowed, dtype) if cross_allowed is not None else None
        else:
            if cfg.scale_embedding:
                x_BTC = x_BTC * math.sqrt(cfg.d_model)
            x_BTC = self.dec_emb_norm(x_BTC + self.dec_pos(torch.arange(start, S, device=device) + 2))
            self_mask = self_allowed
            cross_mask = cross_allowed
        x_BTC = self.drop(x_BTC)

        if cache is not None:
            if not cache.cross_kv:
                cache.cross_kv = [blk.cross_attn.memory_kv(memory_BSC) for blk in self.decoder]
            cache.self_kv.begin(T)
        for i, block in enumerate(self.decoder):
            kv = cache.cross_kv[i] if cache is not None else None
            x_BTC = block(x_BTC, self_mask=self_mask, cross_mask=cross_mask, memory=memory_BSC, kv=kv,
                          cache=cache.self_kv if cache is not None else None, layer=i)
        if cache is not None:
            cache.self_kv.advance(T)
        if cfg.arch == "t5":
            x_BTC = self.drop(self.dec_norm_f(x_BTC))
        if last_only:
            x_BTC = x_BTC[:, -1:]
        if cfg.output_scale:
            x_BTC = x_BTC * cfg.d_model ** -0.5
        logits_BTV = self.lm_head(x_BTC)
        if cfg.arch == "bart":
            logits_BTV = logits_BTV + self.final_logits_bias.to(logits_BTV.dtype)
        return logits_BTV

    def forward(self, src_BS: torch.Tensor, tgt_BT: torch.Tensor, *, src_mask_BS: torch.Tensor | None = None,
                tgt_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        memory_BSC = self.encode(src_BS, src_mask_BS)
        return self.decode(tgt_BT, memory_BSC, src_mask_BS, tgt_mask_BT=tgt_mask_BT)

    def shift_right(self, labels_BT: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for teacher forcing: decoder_start_id then the labels (ignored -100 -> pad)."""
        dec_BT = torch.full_like(labels_BT, self.cfg.decoder_start_id)
        dec_BT[:, 1:] = labels_BT[:, :-1].masked_fill(labels_BT[:, :-1] < 0, self.cfg.pad_id)
        return dec_BT

    def new_cache(self, batch: int, max_len: int, src_mask_BS: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> Seq2SeqCache:
        p = self.tok_emb.weight
        kv = KVCache(self.cfg.n_decoder_layer, batch, self.cfg.n_head, max_len, self.cfg.head_dim,
                     dtype=dtype or p.dtype, device=p.device)
        return Seq2SeqCache(kv, [], src_mask_BS)

