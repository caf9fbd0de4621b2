"""Bidirectional (BERT-style) encoder: config, presets, the model and its task heads, in one file.

    tokens -> embeddings (+ learned positions, + token types) -> norm -> n_layer x Block -> [final norm]
           -> head: none (hidden states) | mlm (vocab logits) | sequence (class logits) | token (per-token logits)

Two block layouts, chosen by `EncoderConfig.prenorm`:
    post-LN (BERT, RoBERTa, DistilBERT):  x = norm1(x + Attn(x));  x = norm2(x + MLP(x))
    pre-LN  (ModernBERT, lmforge default): x = x + Attn(norm1(x)); x = x + MLP(norm2(x))
(pre-LN skips norm1 in the first block: the embedding norm just ran, as ModernBERT does.)

Attention is lmforge.nn's `Attention` run without a causal mask; a padding mask hides padded keys,
and with `local_window` every layer that is not a global one (layer i is global when
i % global_every == 0) sees only keys within local_window // 2 positions (ModernBERT).
`attention="longformer"` instead gives every layer Longformer's sliding window (attention_window // 2
positions each side) plus global tokens with their own projections (lmforge/nn/longformer.py), in
time and memory linear in length; `global_mask_BT` says which tokens are global ([CLS] by default
for a sequence head, as transformers' LongformerForSequenceClassification).

Heads: the MLM decoder is tied to the token embedding (logits = transform(h) @ E^T + bias).
Sequence classification pools [CLS] (or the mean over real tokens), then the BERT pooler (dense +
tanh) when the model has one, else an optional dense + activation (+ norm) of the head's own, then
a linear classifier; one label means regression. The flags that differ between BERT, RoBERTa,
DistilBERT and ModernBERT are config fields, so Hugging Face checkpoints map one to one
(lmforge/interop/encoder.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.models.presets import describe_shape, preset_config
from lmforge.nn.layers import Attention, AttentionContext, rope_cos_sin, rope_inv_freq
from lmforge.nn.linear import Linear
from lmforge.nn.longformer import GlobalTokens, LongformerAttention

HEADS = ("none", "mlm", "sequence", "token")
# A sentence-transformers model's pooling settings, kept in its lmforge model directory:
# {"pooling": "mean" | "cls", "normalize": bool, "max_seq_length": n}; `LLM.embed` follows them.
SENTENCE_POOLING_FILE = "sentence_pooling.json"
ACTIVATIONS = ("gelu", "tanh", "relu")
ATTENTIONS = ("standard", "longformer")
# Which tokens a longformer reads globally: cls = the first token (classification); question = every
# token before the first separator, i.e. [CLS] and the first text of a pair (transformers' QA heads).
GLOBAL_ATTENTION = ("cls", "question")
LONGFORMER_WINDOW = 512  # transformers' LongformerConfig default



@dataclass
class EncoderConfig:
    """Shape, flavour and head of an encoder. Defaults: lmforge's modern pre-LN encoder ('encoder-small')."""

    preset: Optional[str] = config_field(None, "preset the other keys start from (see `lmforge info --list`)")
    vocab_size: int = config_field(4096, "vocabulary size; `lmforge train` sets it from the data's tokenizer")
    block_size: int = config_field(512, "maximum sequence length (rows of the position table for learned positions)")
    n_layer: int = config_field(6, "number of transformer blocks")
    n_head: int = config_field(4, "attention heads")
    n_embd: int = config_field(256, "model width")
    mlp_hidden: Optional[int] = config_field(None, "MLP hidden width; default 4*n_embd (gelu) or 2*n_embd (geglu, per branch)")
    mlp: str = config_field("geglu", "gelu (exact erf GELU, BERT) | geglu (GELU-gated linear unit, ModernBERT)")
    pos_encoding: str = config_field("rope", "learned (BERT) | rope")
    position_offset: int = config_field(0, "RoBERTa: positions of real tokens start at pad_id + 1 and padding takes row pad_id")
    type_vocab_size: int = config_field(0, "token-type (segment) embeddings: 2 for BERT sentence pairs, 1 RoBERTa, 0 none")
    pad_id: int = config_field(0, "padding token id (RoBERTa positions, batching)")
    rope_theta: float = config_field(10000.0, "RoPE base (global layers)")
    local_window: Optional[int] = config_field(None, "local layers attend within +-local_window//2 positions (ModernBERT: 128); none = all global")
    local_rope_theta: float = config_field(10000.0, "RoPE base of local layers")
    global_every: int = config_field(3, "with local_window: layer i is global when i % global_every == 0")
    attention: str = config_field("standard", "standard (full; ModernBERT local layers with local_window) | longformer (sliding window + global tokens)")
    attention_window: Optional[list[int]] = config_field(None, f"longformer: window per layer, two-sided (attention_window // 2 keys each side, even); one value = every layer (default {LONGFORMER_WINDOW})")
    prenorm: bool = config_field(True, "pre-LN blocks + final norm (modern) or post-LN blocks (BERT)")
    bias: bool = config_field(False, "biases in attention and MLP linears")
    norm_bias: bool = config_field(False, "biases in LayerNorms")
    norm_eps: float = config_field(1e-5, "epsilon of every LayerNorm (BERT: 1e-12)")
    pooler: bool = config_field(False, "BERT pooler: dense + tanh on [CLS], part of the base model")
    head: str = config_field("mlm", "none | mlm | sequence (classification / regression) | token (per-token classification)")
    head_bias: bool = config_field(True, "bias of the dense layer in the MLM / classifier transform (ModernBERT: false)")
    mlm_bias: bool = config_field(True, "bias added to the tied MLM decoder")
    num_labels: int = config_field(2, "classes of the sequence / token head; 1 = regression")
    labels: Optional[list] = config_field(None, "label names, index = class id (id2label)")
    classifier_pooling: str = config_field("cls", "cls | mean (over real tokens): what the sequence head reads")
    classifier_dense: bool = config_field(True, "without a pooler: dense + activation (+ norm) before the classifier")
    classifier_act: str = config_field("gelu", "activation of that dense layer: gelu | tanh (RoBERTa) | relu (DistilBERT)")
    classifier_norm: bool = config_field(True, "LayerNorm after that activation (ModernBERT)")
    dropout: float = config_field(0.0, "dropout on embeddings, attention, residual branches and the classifier")
    init_std: float = config_field(0.02, "std of the normal init of weights")

    def __post_init__(self) -> None:
        if self.mlp_hidden is None:
            self.mlp_hidden = 2 * self.n_embd if self.mlp == "geglu" else 4 * self.n_embd
        if self.labels is not None:
            self.labels = [str(x) for x in self.labels]
            if self.head in ("sequence", "token"):
                self.num_labels = len(self.labels)
        if self.attention == "longformer":
            win = self.attention_window if self.attention_window is not None else LONGFORMER_WINDOW
            win = [int(w) for w in (win if isinstance(win, (list, tuple)) else [win])]
            self.attention_window = win * self.n_layer if len(win) == 1 else win
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        choices = {"pos_encoding": ("learned", "rope"), "mlp": ("gelu", "geglu"), "head": HEADS,
                   "classifier_pooling": ("cls", "mean"), "classifier_act": ACTIVATIONS, "attention": ATTENTIONS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LMForgeError(f"model.{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "num_labels", "global_every"):
            if getattr(self, key) <= 0:
                raise LMForgeError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise LMForgeError(f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head})")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise LMForgeError(f"rope needs an even head dim, got {self.head_dim}")
        if self.local_window is not None and self.local_window < 2:
            raise LMForgeError(f"model.local_window must be at least 2, got {self.local_window}")
        if self.attention == "longformer":
            if self.local_window is not None:
                raise LMForgeError("model.local_window and model.attention longformer exclude each other "
                                   "(longformer layers use model.attention_window)")
            if len(self.attention_window) != self.n_layer:
                raise LMForgeError(f"model.attention_window has {len(self.attention_window)} values; give one, "
                                   f"or one per layer ({self.n_layer})")
            bad = [w for w in self.attention_window if w <= 0 or w % 2]
            if bad:
                raise LMForgeError(f"model.attention_window values must be positive and even, got {bad[0]}")
        elif self.attention_window is not None:
            raise LMForgeError("model.attention_window is for model.attention longformer")
        if self.labels is not None and self.head in ("sequence", "token") and len(set(self.labels)) != len(self.labels):
            raise LMForgeError("model.labels holds a name twice")
        if not 0.0 <= self.dropout < 1.0:
            raise LMForgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def is_global(self, layer: int) -> bool:
        return self.local_window is None or layer % self.global_every == 0

    def label_names(self) -> list[str]:
        return list(self.labels) if self.labels else [f"LABEL_{i}" for i in range(self.num_labels)]

    # ---- sizes -----------------------------------------------------------------------------

    def num_params(self, head: Optional[str] = None) -> int:
        """Exact parameter count from the shape alone (tied MLM decoder counted once)."""
        head = self.head if head is None else head
        C, L, V, Fh = self.n_embd, self.n_layer, self.vocab_size, self.mlp_hidden
        ln = C * (1 + self.norm_bias)
        emb = V * C + (self.block_size * C if self.pos_encoding == "learned" else 0) + self.type_vocab_size * C + ln
        attn = 3 * C * C + C * C + 4 * C * self.bias
        if self.attention == "longformer":  # query_global, key_global, value_global
            attn += 3 * C * C + 3 * C * self.bias
        n_in = 2 * Fh if self.mlp == "geglu" else Fh
        mlp = C * n_in + Fh * C + (n_in + C) * self.bias
        block = attn + mlp + 2 * ln
        total = emb + L * block  # pre-LN: the first block has no norm1 but a final norm follows, same count
        if self.pooler:
            total += C * C + C
        dense = C * C + C * self.head_bias
        if head == "mlm":
            total += dense + ln + V * self.mlm_bias
        elif head in ("sequence", "token"):
            if self._has_classifier_transform(head):
                total += dense + ln * self.classifier_norm
            total += C * self.num_labels + self.num_labels
        return total

    def _has_classifier_transform(self, head: str) -> bool:
        return self.classifier_dense and not (head == "sequence" and self.pooler)

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token: 6 * (non-embedding params) + 12 * L * C * T (attention scores;
        a longformer layer's T is its window + 1)."""
        T = seq_len or self.block_size
        C = self.n_embd
        non_emb = self.num_params(head="none") - self.vocab_size * C - (self.block_size * C if self.pos_encoding == "learned" else 0)
        spans = [min(T, w + 1) for w in self.attention_window] if self.attention == "longformer" else [T] * self.n_layer
        return 6 * non_emb + 12 * C * sum(spans)


# Published shapes. bert-base BertModel (with pooler) = 109,482,240; ModernBERT-base from
# answerdotai/ModernBERT-base's config.json. Counts are checked against transformers in the tests.
_BERT = dict(vocab_size=30522, block_size=512, type_vocab_size=2, pos_encoding="learned", mlp="gelu", prenorm=False,
             bias=True, norm_bias=True, norm_eps=1e-12, pooler=True, head="none", classifier_dense=False,
             classifier_act="tanh", classifier_norm=False)
_ROBERTA = dict(_BERT, vocab_size=50265, block_size=514, type_vocab_size=1, position_offset=2, pad_id=1, norm_eps=1e-5,
                classifier_dense=True)
_MODERN = dict(pos_encoding="rope", mlp="geglu", prenorm=True, bias=False, norm_bias=False, norm_eps=1e-5, head_bias=False,
               classifier_act="gelu", classifier_norm=True, classifier_dense=True)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized
    "encoder-tiny": dict(_MODERN, vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64, head="mlm"),
    "encoder-small": dict(_MODERN, vocab_size=4096, block_size=256, n_layer=6, n_head=4, n_embd=256, head="mlm",
                          local_window=64, global_every=3),
    "bert-tiny": dict(_BERT, n_layer=2, n_head=2, n_embd=128, mlp_hidden=512),  # google/bert_uncased_L-2_H-128_A-2
    "bert-mini": dict(_BERT, n_layer=4, n_head=4, n_embd=256, mlp_hidden=1024),  # google/bert_uncased_L-4_H-256_A-4
    "minilm-l6": dict(_BERT, n_layer=6, n_head=12, n_embd=384, mlp_hidden=1536),  # all-MiniLM-L6-v2
    # published
    "bert-base": dict(_BERT, n_layer=12, n_head=12, n_embd=768, mlp_hidden=3072),
    "bert-large": dict(_BERT, n_layer=24, n_head=16, n_embd=1024, mlp_hidden=4096),
    "roberta-base": dict(_ROBERTA, n_layer=12, n_head=12, n_embd=768, mlp_hidden=3072),
    "roberta-large": dict(_ROBERTA, n_layer=24, n_head=16, n_embd=1024, mlp_hidden=4096),
    "distilbert-base": dict(_BERT, type_vocab_size=0, pooler=False, n_layer=6, n_head=12, n_embd=768, mlp_hidden=3072,
                            classifier_dense=True, classifier_act="relu"),
    "modernbert-base": dict(_MODERN, vocab_size=50368, block_size=8192, n_layer=22, n_head=12, n_embd=768,
                            mlp_hidden=1152, rope_theta=160000.0, local_window=128, local_rope_theta=10000.0,
                            global_every=3, pad_id=50283, head="none"),
    "modernbert-large": dict(_MODERN, vocab_size=50368, block_size=8192, n_layer=28, n_head=16, n_embd=1024,
                             mlp_hidden=2624, rope_theta=160000.0, local_window=128, local_rope_theta=10000.0,
                             global_every=3, pad_id=50283, head="none"),
}


def config_from_preset(name: Optional[str], **overrides: Any) -> EncoderConfig:
    """The preset's shape with `overrides` on top; checks the preset name and keys."""
    return preset_config(EncoderConfig, PRESETS, name, overrides, what="encoder preset")


# ----------------------------------------------------------------------------------------------


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return F.gelu(x)  # exact (erf) GELU, as BERT's "gelu"
    if kind == "tanh":
        return torch.tanh(x)
    return F.relu(x)


def _norm(cfg: EncoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.norm_bias)


class EncoderMLP(nn.Module):
    """gelu: fc_in -> GELU -> fc_out.  geglu: fc_in gives [a; g] -> GELU(a) * g -> fc_out (ModernBERT order)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.kind, self.hidden = cfg.mlp, cfg.mlp_hidden
        n_in = 2 * cfg.mlp_hidden if cfg.mlp == "geglu" else cfg.mlp_hidden
        self.fc_in = Linear(cfg.n_embd, n_in, bias=cfg.bias)
        self.fc_out = Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def linear_roles(self) -> dict[str, dict[str, tuple[int, int]]]:
        h = self.hidden
        up = {"gate": (0, h), "up": (h, 2 * h)} if self.kind == "geglu" else {"up": (0, h)}
        return {"fc_in": up, "fc_out": {"down": (0, self.fc_out.out_features)}}

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        h_BTF = self.fc_in(x_BTC)
        if self.kind == "geglu":
            a_BTF, g_BTF = h_BTF.split(self.hidden, dim=-1)
            h_BTF = F.gelu(a_BTF) * g_BTF
        else:
            h_BTF = F.gelu(h_BTF)
        return self.fc_out(h_BTF)


class Transform(nn.Module):
    """dense -> activation (-> LayerNorm): BERT's pooler (tanh, no norm), the MLM transform (gelu + norm)
    and the classifier heads of RoBERTa (tanh), DistilBERT (relu) and ModernBERT (gelu + norm)."""

    def __init__(self, cfg: EncoderConfig, act: str, norm: bool, bias: bool):
        super().__init__()
        self.act = act
        self.dense = Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.norm = _norm(cfg) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _act(self.act, self.dense(x))
        return self.norm(x) if self.norm is not None else x


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, layer: int):
        super().__init__()
        self.prenorm = cfg.prenorm
        # pre-LN: the first block reads the freshly normalised embeddings, so it has no norm1
        self.norm1 = None if cfg.prenorm and layer == 0 else _norm(cfg)
        if cfg.attention == "longformer":
            self.attn = LongformerAttention(cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.attention_window[layer],
                                            bias=cfg.bias, dropout=cfg.dropout)
        else:
            self.attn = Attention(cfg.n_embd, cfg.n_head, cfg.n_head, cfg.head_dim, bias=cfg.bias, qkv_bias=cfg.bias,
                                  dropout=cfg.dropout)
        self.norm2 = _norm(cfg)
        self.mlp = EncoderMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC: torch.Tensor, ctx: AttentionContext | GlobalTokens, rope: Any) -> torch.Tensor:
        """ctx: the padding (and local band) mask, or a longformer layer's real and global tokens."""
        if self.prenorm:
            h = self.norm1(x_BTC) if self.norm1 is not None else x_BTC
            x_BTC = x_BTC + self.drop(self.attn(h, ctx, rope=rope))
            return x_BTC + self.drop(self.mlp(self.norm2(x_BTC)))
        x_BTC = self.norm1(x_BTC + self.drop(self.attn(x_BTC, ctx, rope=rope)))
        return self.norm2(x_BTC + self.drop(self.mlp(x_BTC)))


class Encoder(nn.Module):
    """Bidirectional encoder with an optional task head (`cfg.head`).

    forward(idx_BT, pad_mask_BT=None, token_type_BT=None, global_mask_BT=None) returns, by head:
        none -> hidden states (B, T, C); mlm -> vocabulary logits (B, T, V);
        sequence -> (B, num_labels); token -> (B, T, num_labels).
    `encode` gives the hidden states whatever the head; `mlm_logits(h_NC)` runs the MLM head on
    selected positions only (pretraining computes it for the masked ones alone).
    """

    family = "encoder"

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C) if cfg.pos_encoding == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, C) if cfg.type_vocab_size > 0 else None
        self.emb_norm = _norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = _norm(cfg) if cfg.prenorm else None
        self.pooler = Transform(cfg, "tanh", norm=False, bias=True) if cfg.pooler else None
        self.mlm_transform = self.mlm_bias = self.cls_transform = self.classifier = None
        if cfg.head == "mlm":
            self.mlm_transform = Transform(cfg, "gelu", norm=True, bias=cfg.head_bias)
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.mlm_bias else None
        elif cfg.head in ("sequence", "token"):
            if cfg._has_classifier_transform(cfg.head):
                self.cls_transform = Transform(cfg, cfg.classifier_act, norm=cfg.classifier_norm, bias=cfg.head_bias)
            self.classifier = Linear(C, cfg.num_labels)
        if cfg.pos_encoding == "rope":
            self._make_rope()
        self.reset_parameters()

    # ---- setup -------------------------------------------------------------------------------

    def _make_rope(self) -> None:
        cfg, device = self.cfg, self.tok_emb.weight.device
        for name, theta in (("rope", cfg.rope_theta), ("local_rope", cfg.local_rope_theta)):
            if name == "local_rope" and cfg.local_window is None:
                continue
            inv, _ = rope_inv_freq(cfg.head_dim, theta, None, cfg.block_size)
            cos, sin = rope_cos_sin(inv, cfg.block_size)
            self.register_buffer(f"{name}_cos", cos.to(device), persistent=False)
            self.register_buffer(f"{name}_sin", sin.to(device), persistent=False)

    def rebuild_buffers(self) -> None:
        """RoPE tables are not saved; recompute them after loading onto a device."""
        if self.cfg.pos_encoding == "rope":
            self._make_rope()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights (residual output projections scaled by 1/sqrt(2*n_layer) in pre-LN
        models), zero biases, unit norms."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scaled = self.cfg.prenorm and name.endswith(("attn.proj.weight", "mlp.fc_out.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer) if scaled else std)
            elif name.endswith("bias") or name == "mlm_bias":
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward -----------------------------------------------------------------------------

    def _masks(self, T: int, valid_BT: torch.Tensor | None, device: torch.device):
        """(global mask, local mask): boolean (B or 1, 1, T or 1, T), True = may attend; None = attend to all."""
        glob = valid_BT[:, None, None, :] if valid_BT is not None else None
        local = None
        if self.cfg.local_window is not None:
            i = torch.arange(T, device=device)
            band_TT = (i[:, None] - i[None, :]).abs() <= self.cfg.local_window // 2
            local = band_TT[None, None] if glob is None else band_TT[None, None] & glob
        return glob, local

    def default_global_mask(self, idx_BT: torch.Tensor) -> torch.Tensor | None:
        """Longformer: which tokens are global when the caller does not say: [CLS] (the first token)
        under a sequence head, as transformers' LongformerForSequenceClassification; none otherwise."""
        if self.cfg.attention != "longformer" or self.cfg.head != "sequence":
            return None
        return global_attention_mask(idx_BT, "cls")

    def encode(self, idx_BT: torch.Tensor, pad_mask_BT: torch.Tensor | None = None,
               token_type_BT: torch.Tensor | None = None, global_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C). pad_mask_BT: True for real tokens (padding keys are hidden).
        global_mask_BT (longformer): True for global tokens; default `default_global_mask`."""
        cfg = self.cfg
        B, T = idx_BT.shape
        device = idx_BT.device
        limit = cfg.block_size - (cfg.position_offset if cfg.pos_encoding == "learned" else 0)
        if T > limit:
            raise LMForgeError(f"sequence of {T} tokens is longer than the model's context ({limit})")
        x_BTC = self.tok_emb(idx_BT)
        if self.pos_emb is not None:
            if cfg.position_offset:  # RoBERTa: count real tokens from pad_id + 1; padding sits at row pad_id
                real_BT = (idx_BT != cfg.pad_id).long()
                pos_BT = real_BT.cumsum(1) * real_BT + (cfg.position_offset - 1)
                x_BTC = x_BTC + self.pos_emb(pos_BT)
            else:
                x_BTC = x_BTC + self.pos_emb.weight[:T]
        if self.type_emb is not None:
            if token_type_BT is None:
                x_BTC = x_BTC + self.type_emb.weight[0]
            else:
                x_BTC = x_BTC + self.type_emb(token_type_BT)
        x_BTC = self.drop(self.emb_norm(x_BTC))

        if cfg.attention == "longformer":
            valid_BT = pad_mask_BT.bool() if pad_mask_BT is not None else torch.ones_like(idx_BT, dtype=torch.bool)
            if global_mask_BT is None:
                global_mask_BT = self.default_global_mask(idx_BT)
            glob = local = GlobalTokens.build(valid_BT, global_mask_BT if global_mask_BT is not None
                                              else torch.zeros_like(valid_BT))
        else:
            valid_BT = pad_mask_BT.bool() if pad_mask_BT is not None and not bool(pad_mask_BT.all()) else None
            masks = self._masks(T, valid_BT, device)
            glob, local = AttentionContext(mask=masks[0]), AttentionContext(mask=masks[1])
        rope = loc_rope = None
        if cfg.pos_encoding == "rope":
            rope = (self.rope_cos[:T][None], self.rope_sin[:T][None])
            if cfg.local_window is not None:
                loc_rope = (self.local_rope_cos[:T][None], self.local_rope_sin[:T][None])
        for i, block in enumerate(self.blocks):
            if cfg.is_global(i):
                x_BTC = block(x_BTC, glob, rope)
            else:
                x_BTC = block(x_BTC, local, loc_rope)
        if self.norm_f is not None:
            x_BTC = self.norm_f(x_BTC)
        return x_BTC

    def pooled(self, h_BTC: torch.Tensor, pad_mask_BT: torch.Tensor | None = None, pooling: str | None = None) -> torch.Tensor:
        """(B, C): [CLS] or the mean over real tokens, then the BERT pooler when the model has one."""
        pooling = pooling or self.cfg.classifier_pooling
        if pooling == "mean":
            if pad_mask_BT is None:
                x_BC = h_BTC.mean(1)
            else:
                m_BT1 = pad_mask_BT.to(h_BTC.dtype)[..., None]
                x_BC = (h_BTC * m_BT1).sum(1) / m_BT1.sum(1).clamp(min=1)
        else:
            x_BC = h_BTC[:, 0]
        return self.pooler(x_BC) if self.pooler is not None else x_BC

    def mlm_logits(self, h_NC: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) of hidden states: transform, then the tied decoder (+ bias)."""
        if self.mlm_transform is None:
            raise LMForgeError(f"this encoder has no MLM head (model.head is '{self.cfg.head}')")
        return F.linear(self.mlm_transform(h_NC), self.tok_emb.weight, self.mlm_bias)

    def classify_logits(self, h_BTC: torch.Tensor, pad_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        if self.classifier is None:
            raise LMForgeError(f"this encoder has no classification head (model.head is '{self.cfg.head}')")
        x = self.pooled(h_BTC, pad_mask_BT) if self.cfg.head == "sequence" else h_BTC
        if self.cls_transform is not None:
            x = self.cls_transform(x)
        return self.classifier(self.drop(x))

    def forward(self, idx_BT: torch.Tensor, pad_mask_BT: torch.Tensor | None = None,
                token_type_BT: torch.Tensor | None = None, select_BT: torch.Tensor | None = None,
                global_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """select_BT (mlm head): logits (N, V) of the True positions only, as MLM training needs.
        global_mask_BT: a longformer's global tokens (see `encode`)."""
        h_BTC = self.encode(idx_BT, pad_mask_BT, token_type_BT, global_mask_BT)
        head = self.cfg.head
        if head == "mlm":
            return self.mlm_logits(h_BTC if select_BT is None else h_BTC[select_BT])
        if head in ("sequence", "token"):
            return self.classify_logits(h_BTC, pad_mask_BT)
        return h_BTC

    # ---- heads -------------------------------------------------------------------------------

    def with_head(self, head: str, num_labels: int | None = None, labels: list[str] | None = None,
                  **cfg_overrides: Any) -> "Encoder":
        """A new Encoder with this one's body weights and a fresh `head` (e.g. an MLM-pretrained
        encoder -> a sequence classifier). Head weights that exist in both are kept."""
        over: dict[str, Any] = dict(cfg_overrides, head=head)
        if labels is not None:
            over["labels"], over["num_labels"] = list(labels), len(labels)
        elif num_labels is not None:
            over["num_labels"], over["labels"] = num_labels, None
        cfg = dataclasses.replace(self.cfg, **over)
        new = Encoder(cfg).to(self.tok_emb.weight.device)
        mine = self.state_dict()
        keep = {k: v for k, v in mine.items() if k in new.state_dict() and new.state_dict()[k].shape == v.shape
                and not k.startswith("classifier.")}
        new.load_state_dict(keep, strict=False)
        return new


def global_attention_mask(idx_BT: torch.Tensor, how: str, sep_id: Optional[int] = None) -> torch.Tensor:
    """(B, T) bool global-token mask of `how` (GLOBAL_ATTENTION); "question" needs the separator id."""
    if how not in GLOBAL_ATTENTION:
        raise LMForgeError(f"global attention must be one of {', '.join(GLOBAL_ATTENTION)}, got '{how}'")
    pos_BT = torch.arange(idx_BT.shape[1], device=idx_BT.device).expand_as(idx_BT)
    if how == "cls":
        return pos_BT == 0
    if sep_id is None:
        raise LMForgeError("global attention 'question' needs a tokenizer with a separator token")
    is_sep_BT = idx_BT == sep_id
    if not bool(is_sep_BT.any(1).all()):
        raise LMForgeError("global attention 'question': a row has no separator token to end its question")
    first_sep_B1 = is_sep_BT.int().argmax(1, keepdim=True)
    return pos_BT < first_sep_B1


def as_classifier(model: Encoder, labels: list[str], pooling: Optional[str] = None,
                  dropout: Optional[float] = None) -> Encoder:
    """`model` with a sequence-classification head for `labels` (itself when it has that head already
    and nothing changes); `pooling` "cls" | "mean" and `dropout` set the new head's reading."""
    over: dict[str, Any] = {}
    if pooling is not None and pooling != model.cfg.classifier_pooling:
        over["classifier_pooling"] = pooling
    if dropout is not None:
        over["dropout"] = dropout
    if model.cfg.head == "sequence" and model.cfg.label_names() == labels and not over:
        return model
    return model.with_head("sequence", labels=labels, **over)


def describe(cfg: EncoderConfig, seq_len: Optional[int] = None) -> tuple[dict[str, Any], list[str]]:
    """`lmforge info`: the shape's figures plus the parameters with each head."""
    by_head = {h: cfg.num_params(head=h) for h in HEADS}
    return describe_shape(cfg, seq_len, {"params_by_head": by_head},
                          [f"  with head {h:<10}   {n:,}" for h, n in by_head.items()])
