"""Contrastive image-text models (CLIP): config, presets, the two towers and their joint, in one file.

    image (B, 3, S, S) -> patch conv (P x P, stride P) -> [class token; patches] + positions -> pre_norm
                       -> n x pre-LN Block -> post_norm of the class token -> visual_proj -> image embedding
    text ids (B, T)    -> tokens + positions -> n x pre-LN causal Block -> norm_f -> the EOS token's state
                       -> text_proj -> text embedding
    logits_per_image = exp(logit_scale) * normalise(image) @ normalise(text).T      (B_img, B_txt)

Blocks are lmforge.nn's `Attention` (fused q|k|v, biases) and `MLP` (CLIP's quick_gelu, or the erf
GELU of later CLIP checkpoints) in the pre-LN order: x = x + Attn(LN(x)); x = x + MLP(LN(x)).

Which text position is pooled follows Hugging Face: the first position holding `eos_id`, except
that configs with eos_id == 2 (written before transformers PR #24773) pool the position of the
largest token id, as those checkpoints were trained with the EOS as the largest id. Rows are
right-padded, so causal attention never lets a real token see padding and no mask is needed.

`parts` says which towers a model has: "both" (CLIPModel), "vision" (CLIPVisionModel: no
projection, the embedding is the pooled class token) or "text" (CLIPTextModel: the pooled EOS
state). The image preprocessing each model expects (size, mean, std) is part of its config
(lmforge/data/images.py applies it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.models.presets import preset_config
from lmforge.nn.layers import MLP, Attention, AttentionContext
from lmforge.nn.linear import Linear

PARTS = ("both", "vision", "text")
ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact"}  # Hugging Face hidden_act -> nn.MLP kind
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LOGIT_SCALE_MAX = math.log(100.0)  # training clamps the temperature here, as CLIP does


@dataclass
class CLIPConfig:
    """Both towers of a CLIP model. Defaults: openai/clip-vit-base-patch32 ('clip-vit-base-patch32')."""

    preset: Optional[str] = config_field(None, "preset the other keys start from (see `lmforge info --list`)")
    parts: str = config_field("both", "both (CLIPModel) | vision (CLIPVisionModel) | text (CLIPTextModel)")
    vocab_size: int = config_field(49408, "text vocabulary size; `lmforge train` sets it from the data's tokenizer")
    block_size: int = config_field(77, "longest text in tokens (rows of the text position table)")
    n_layer: int = config_field(12, "text transformer blocks")
    n_head: int = config_field(8, "text attention heads")
    n_embd: int = config_field(512, "text width")
    mlp_hidden: Optional[int] = config_field(None, "text MLP hidden width; default 4*n_embd")
    image_size: int = config_field(224, "side of the square image the vision tower reads (after the centre crop)")
    patch_size: int = config_field(32, "side of a square patch (the patch conv's kernel and stride)")
    num_channels: int = config_field(3, "image channels")
    vision_n_layer: int = config_field(12, "vision transformer blocks")
    vision_n_head: int = config_field(12, "vision attention heads")
    vision_n_embd: int = config_field(768, "vision width")
    vision_mlp_hidden: Optional[int] = config_field(None, "vision MLP hidden width; default 4*vision_n_embd")
    projection_dim: int = config_field(512, "width of the shared image-text embedding space")
    hidden_act: str = config_field("quick_gelu", "MLP activation of both towers: quick_gelu (OpenAI CLIP) | gelu (erf)")
    norm_eps: float = config_field(1e-5, "epsilon of every LayerNorm")
    eos_id: int = config_field(49407, "the text token whose state is pooled (2: the largest id's, as HF's legacy configs)")
    pad_id: int = config_field(1, "text padding id")
    logit_scale_init: float = config_field(2.6592, "initial log temperature: log(1 / 0.07)")
    resize_size: Optional[int] = config_field(None, "preprocessing: shortest image side after the bicubic resize; "
                                             "default image_size")
    image_mean: Optional[list] = config_field(None, "preprocessing: per-channel mean; default OpenAI CLIP's")
    image_std: Optional[list] = config_field(None, "preprocessing: per-channel std; default OpenAI CLIP's")
    init_std: float = config_field(0.02, "std of the normal init of weights")

    def __post_init__(self) -> None:
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.n_embd
        if self.vision_mlp_hidden is None:
            self.vision_mlp_hidden = 4 * self.vision_n_embd
        if self.resize_size is None:
            self.resize_size = self.image_size
        self.image_mean = [float(x) for x in (self.image_mean or OPENAI_CLIP_MEAN)]
        self.image_std = [float(x) for x in (self.image_std or OPENAI_CLIP_STD)]
        self.validate()

    def validate(self) -> None:
        if self.parts not in PARTS:
            raise LMForgeError(f"model.parts must be one of {', '.join(PARTS)}, got '{self.parts}'")
        if self.hidden_act not in ACTS:
            raise LMForgeError(f"model.hidden_act must be one of {', '.join(ACTS)}, got '{self.hidden_act}'")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden", "image_size", "patch_size",
                    "num_channels", "vision_n_layer", "vision_n_head", "vision_n_embd", "vision_mlp_hidden",
                    "projection_dim", "resize_size"):
            if getattr(self, key) <= 0:
                raise LMForgeError(f"model.{key} must be positive, got {getattr(self, key)}")
        for width, heads in (("n_embd", "n_head"), ("vision_n_embd", "vision_n_head")):
            if getattr(self, width) % getattr(self, heads):
                raise LMForgeError(f"model.{width} ({getattr(self, width)}) must be a multiple of model.{heads} "
                                   f"({getattr(self, heads)})")
        if self.image_size % self.patch_size:
            raise LMForgeError(f"model.image_size ({self.image_size}) must be a multiple of model.patch_size "
                               f"({self.patch_size})")
        if self.resize_size < self.image_size:
            raise LMForgeError(f"model.resize_size ({self.resize_size}) must be at least model.image_size "
                               f"({self.image_size}): the centre crop is taken from the resized image")
        for key in ("image_mean", "image_std"):
            if len(getattr(self, key)) != self.num_channels:
                raise LMForgeError(f"model.{key} needs {self.num_channels} values, got {len(getattr(self, key))}")

    @property
    def has_vision(self) -> bool:
        return self.parts in ("both", "vision")

    @property
    def has_text(self) -> bool:
        return self.parts in ("both", "text")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def embedding_dim(self) -> int:
        """Width of the embeddings `embed_image` / `embed_text` return."""
        if self.parts == "both":
            return self.projection_dim
        return self.vision_n_embd if self.parts == "vision" else self.n_embd

    # ---- sizes -----------------------------------------------------------------------------

    @staticmethod
    def _block(C: int, Fh: int) -> int:
        return (3 * C * C + 3 * C) + (C * C + C) + (C * Fh + Fh) + (Fh * C + C) + 4 * C  # attn, MLP, two LNs

    def vision_params(self) -> int:
        C = self.vision_n_embd
        emb = self.num_channels * self.patch_size ** 2 * C + C + (self.n_patches + 1) * C
        return emb + 2 * C + self.vision_n_layer * self._block(C, self.vision_mlp_hidden) + 2 * C

    def text_params(self) -> int:
        C = self.n_embd
        return (self.vocab_size + self.block_size) * C + self.n_layer * self._block(C, self.mlp_hidden) + 2 * C

    def num_params(self) -> int:
        """Exact parameter count from the shape alone."""
        n = (self.vision_params() if self.has_vision else 0) + (self.text_params() if self.has_text else 0)
        if self.parts == "both":
            n += (self.vision_n_embd + self.n_embd) * self.projection_dim + 1  # projections + logit_scale
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per text token (6 x the text tower's non-embedding parameters + attention)."""
        T = seq_len or self.block_size
        non_emb = self.n_layer * self._block(self.n_embd, self.mlp_hidden)
        return 6 * non_emb + 12 * self.n_layer * self.n_embd * T

    def image_flops(self) -> int:
        """Training FLOPs per image of the vision tower (6 x its matmul parameters x positions + attention)."""
        N = self.n_patches + 1
        C = self.vision_n_embd
        per_pos = self.num_channels * self.patch_size ** 2 * C + self.vision_n_layer * self._block(C, self.vision_mlp_hidden)
        return 6 * per_pos * N + 12 * self.vision_n_layer * C * N * N


_OPENAI = dict(hidden_act="quick_gelu", vocab_size=49408, block_size=77, eos_id=49407, pad_id=1)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: 32x32 crops of the 64x64 emoji images (lmforge data emoji), a caption BPE vocabulary
    "clip-tiny": dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64, image_size=32, patch_size=8,
                      vision_n_layer=2, vision_n_head=2, vision_n_embd=64, projection_dim=64, eos_id=0, pad_id=1),
    # 8x8 patches (16 + class token): a quarter of the 4x4 patches' cost, 3.4x the steps in equal time on CPU
    "clip-emoji": dict(vocab_size=1024, block_size=32, n_layer=2, n_head=4, n_embd=128, image_size=32, patch_size=8,
                       vision_n_layer=4, vision_n_head=4, vision_n_embd=128, projection_dim=128, eos_id=0, pad_id=1),
    # published (openai/clip-vit-*): CLIPModel counts checked against transformers in the tests
    "clip-vit-base-patch32": dict(_OPENAI),
    "clip-vit-base-patch16": dict(_OPENAI, patch_size=16),
    "clip-vit-large-patch14": dict(_OPENAI, n_embd=768, n_head=12, vision_n_layer=24, vision_n_head=16,
                                   vision_n_embd=1024, patch_size=14, projection_dim=768),
}


def config_from_preset(name: Optional[str], **overrides: Any) -> CLIPConfig:
    """The preset's shape with `overrides` on top; checks the preset name and keys."""
    return preset_config(CLIPConfig, PRESETS, name, overrides, what="clip preset")


# ----------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, C: int, n_head: int, hidden: int, act: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.attn = Attention(C, n_head, n_head, C // n_head, bias=True, qkv_bias=True)
        self.norm2 = nn.LayerNorm(C, eps=eps)
        self.mlp = MLP(C, hidden, ACTS[act], bias=True)

    def forward(self, x_BTC: torch.Tensor, ctx: AttentionContext, keep: Optional[int] = None) -> torch.Tensor:
        """keep: only the first `keep` positions leave the block (they still attend to every position);
        the MLP runs on those alone."""
        a_BTC = self.attn(self.norm1(x_BTC), ctx)
        x_BTC = x_BTC + a_BTC if keep is None else x_BTC[:, :keep] + a_BTC[:, :keep]
        return x_BTC + self.mlp(self.norm2(x_BTC))


class VisionTower(nn.Module):
    """ViT: patches + class token + learned positions -> pre_norm -> blocks -> post_norm(class token)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        C, P = cfg.vision_n_embd, cfg.patch_size
        self.patch_emb = nn.Conv2d(cfg.num_channels, C, kernel_size=P, stride=P, bias=False)
        self.cls_emb = nn.Parameter(torch.zeros(C))
        self.pos_emb = nn.Embedding(cfg.n_patches + 1, C)
        self.pre_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(C, cfg.vision_n_head, cfg.vision_mlp_hidden, cfg.hidden_act, cfg.norm_eps)
                                    for _ in range(cfg.vision_n_layer))
        self.post_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.image_size = cfg.image_size

    def forward(self, pixels_BCHW: torch.Tensor, pooled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (B, 1 + patches, C), pooled class token (B, C)). pooled_only: the last block
        computes the class token alone (its MLP and residual skip the patches), so the hidden states
        returned are (B, 1, C)."""
        B, _, H, W = pixels_BCHW.shape
        if H != self.image_size or W != self.image_size:
            raise LMForgeError(f"images must be {self.image_size}x{self.image_size} after preprocessing, got {H}x{W}")
        p_BCN = self.patch_emb(pixels_BCHW.to(self.patch_emb.weight.dtype)).flatten(2)
        x_BNC = torch.cat([self.cls_emb.expand(B, 1, -1), p_BCN.transpose(1, 2)], dim=1) + self.pos_emb.weight
        x_BNC = self.pre_norm(x_BNC)
        ctx = AttentionContext()
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x_BNC = block(x_BNC, ctx, keep=1 if pooled_only and i == last else None)
        return x_BNC, self.post_norm(x_BNC[:, 0])


class TextTower(nn.Module):
    """Causal transformer over tokens + learned positions -> norm_f; pooled at the EOS token."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        C = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C)
        self.blocks = nn.ModuleList(Block(C, cfg.n_head, cfg.mlp_hidden, cfg.hidden_act, cfg.norm_eps)
                                    for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.eos_id, self.block_size = cfg.eos_id, cfg.block_size

    def pool_index(self, idx_BT: torch.Tensor) -> torch.Tensor:
        """(B,) position pooled in each row: the first `eos_id`, or (legacy eos_id 2) the largest id."""
        if self.eos_id == 2:
            return idx_BT.argmax(-1)
        return (idx_BT == self.eos_id).int().argmax(-1)

    def forward(self, idx_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (B, T, C), pooled EOS states (B, C))."""
        B, T = idx_BT.shape
        if T > self.block_size:
            raise LMForgeError(f"text of {T} tokens is longer than the model's context ({self.block_size})")
        x_BTC = self.tok_emb(idx_BT) + self.pos_emb.weight[:T]
        ctx = AttentionContext(is_causal=True)
        for block in self.blocks:
            x_BTC = block(x_BTC, ctx)
        x_BTC = self.norm_f(x_BTC)
        return x_BTC, x_BTC[torch.arange(B, device=idx_BT.device), self.pool_index(idx_BT)]


class CLIP(nn.Module):
    """Image and text towers joined by projections and a learned temperature.

    forward(pixels_BCHW, idx_BT) -> logits_per_image (B_img, B_txt): exp(logit_scale) times the
    cosine similarity of every image with every text (CLIPModel's logits_per_image).
    `embed_image` / `embed_text` give the unnormalised embeddings (B, embedding_dim).
    """

    family = "clip"

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg) if cfg.has_vision else None
        self.text = TextTower(cfg) if cfg.has_text else None
        self.visual_proj = self.text_proj = self.logit_scale = None
        if cfg.parts == "both":
            self.visual_proj = Linear(cfg.vision_n_embd, cfg.projection_dim, bias=False)
            self.text_proj = Linear(cfg.n_embd, cfg.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights (residual output projections scaled by 1/sqrt(2 n_layer)), the class
        token N(0, 1/sqrt(width)), zero biases, unit norms, logit_scale = logit_scale_init."""
        cfg, std = self.cfg, self.cfg.init_std
        for name, p in self.named_parameters():
            if name == "logit_scale":
                nn.init.constant_(p, cfg.logit_scale_init)
            elif name == "vision.cls_emb":
                nn.init.normal_(p, 0.0, cfg.vision_n_embd ** -0.5)
            elif p.dim() >= 2:
                layers = cfg.vision_n_layer if name.startswith("vision.") else cfg.n_layer
                scaled = name.endswith(("attn.proj.weight", "mlp.fc_out.weight"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * layers) if scaled else std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _need(self, tower: Optional[nn.Module], what: str) -> nn.Module:
        if tower is None:
            raise LMForgeError(f"this CLIP model has no {what} tower (model.parts is '{self.cfg.parts}')")
        return tower

    def embed_image(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, embedding_dim): the projected class token (a vision-only model: the pooled class token)."""
        _, pooled_BC = self._need(self.vision, "vision")(pixels_BCHW, pooled_only=True)
        return self.visual_proj(pooled_BC) if self.visual_proj is not None else pooled_BC

    def embed_text(self, idx_BT: torch.Tensor) -> torch.Tensor:
        """(B, embedding_dim): the projected EOS state (a text-only model: the pooled EOS state)."""
        _, pooled_BC = self._need(self.text, "text")(idx_BT)
        return self.text_proj(pooled_BC) if self.text_proj is not None else pooled_BC

    def forward(self, pixels_BCHW: torch.Tensor, idx_BT: torch.Tensor, clamp_scale: bool = False) -> torch.Tensor:
        """logits_per_image (B_img, B_txt); clamp_scale caps the temperature at 100 (training, as CLIP)."""
        if self.cfg.parts != "both":
            raise LMForgeError(f"image-text logits need both towers (model.parts is '{self.cfg.parts}')")
        img_BP = F.normalize(self.embed_image(pixels_BCHW), dim=-1)
        txt_BP = F.normalize(self.embed_text(idx_BT), dim=-1)
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX) if clamp_scale else self.logit_scale
        return scale.exp() * img_BP @ txt_BP.t()


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of the cross entropies of each image over the texts and of each
    text over the images, the matching pair on the diagonal."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target)) / 2


def describe(cfg: CLIPConfig, seq_len: Optional[int] = None) -> tuple[dict[str, Any], list[str]]:
    """`lmforge info`: exact parameters by tower and the shape of each."""
    info: dict[str, Any] = {"params": cfg.num_params(), "parts": cfg.parts}
    lines = [f"parameters             {info['params']:,}  ({info['params'] / 1e6:,.2f}M)"]
    if cfg.has_vision:
        info["vision_params"] = cfg.vision_params()
        info["image_flops_train"] = cfg.image_flops()
        lines += [f"  vision tower         {info['vision_params']:,}",
                  f"vision                 {cfg.vision_n_layer} layers, {cfg.vision_n_head} heads, width "
                  f"{cfg.vision_n_embd}, {cfg.image_size}x{cfg.image_size} images in {cfg.patch_size}x{cfg.patch_size} "
                  f"patches ({cfg.n_patches} + class token)",
                  f"FLOPs / image (train)  {info['image_flops_train']:,}"]
    if cfg.has_text:
        info["text_params"] = cfg.text_params()
        lines += [f"  text tower           {info['text_params']:,}",
                  f"text                   {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, vocab "
                  f"{cfg.vocab_size}, context {cfg.block_size}, pooled at token {cfg.eos_id}"]
    if cfg.parts == "both":
        lines.append(f"embedding              {cfg.projection_dim} (projections of both towers), learned temperature")
    return info, lines


def list_row(name: str, cfg: CLIPConfig) -> str:
    """One line of `lmforge info --list` (text layers / heads / width / context; the vision tower after)."""
    return (f"{name:<16} {cfg.num_params():>14,} {cfg.n_layer:>6} {cfg.n_head:>5} {'':>3} {cfg.n_embd:>6} "
            f"{cfg.block_size:>6}  clip (vision {cfg.vision_n_layer}x{cfg.vision_n_embd}, {cfg.image_size}px/"
            f"{cfg.patch_size})")
