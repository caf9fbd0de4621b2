"""Contrastive image-text pretraining of CLIP models: `lmforge train DATA --train.objective clip`.

DATA is an image-text directory (`lmforge data emoji`, read by lmforge/data/image_text.py). Every
image is preprocessed once as the model reads it (lmforge/data/images.py: resize, centre crop,
normalise) and every caption tokenized once (cut to train.seq_len, ending with the EOS the text
tower pools).

A micro-batch is `micro_batch_size` pairs of DISTINCT captions (two styles of one emoji in a batch
would be false negatives): a permutation of the distinct captions and, for each, one of its images,
both drawn from a generator seeded by (seed, step, index), so a resumed run sees exactly the batches
of the uninterrupted one. With `objective.image_augment` > 0 each image is a random view drawn from the
same generator (lmforge.data.images.augment: resized crop, rotation, flip, mild colour jitter). The
loss is the symmetric InfoNCE over the micro-batch's pairs
(models/clip.contrastive_loss; no gathering across processes: each micro-batch is its own set of
negatives), with the temperature capped at 100 as CLIP does. Stats: acc (image -> text top-1 within
the batch) and its chance level 1 / batch.

Validation: fixed batches of distinct captions from the validation split, one style at a time.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from lmforge.data.image_text import ImageTextSplit
from lmforge.data.images import augment, preprocess
from lmforge.data.masking import mask_generator
from lmforge.errors import LMForgeError
from lmforge.models.clip import contrastive_loss
from lmforge.train.job import PretrainContext, PretrainParts


def pixels_of(split: ImageTextSplit, cfg: Any) -> torch.Tensor:
    """(N, 3, S, S) pixels of every image of the split, as the model `cfg` reads them."""
    return preprocess(split.image_paths(), cfg.resize_size, cfg.image_size, cfg.image_mean, cfg.image_std)


def caption_ids(tokenizer: Any, captions: list[str], seq_len: int) -> list[list[int]]:
    ids, _, _ = tokenizer.encode_pairs(captions, None, seq_len)
    return ids


def pad_ids(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-padded (B, longest row) ids."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class PairBatches:
    """Training micro-batches {"pixels", "input_ids"} of distinct captions (see the module docstring)."""

    def __init__(self, pixels: torch.Tensor, ids: list[list[int]], captions: list[str], micro_batch_size: int,
                 seed: int, pad_id: int, name: str = "train split", augment_strength: float = 0.0,
                 mean: Any = None, std: Any = None):
        by_caption: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(captions):
            by_caption[c].append(i)
        self.groups = list(by_caption.values())  # row indices of each distinct caption, in file order
        if len(self.groups) < micro_batch_size:
            raise LMForgeError(f"the {name} has {len(self.groups)} distinct captions, fewer than "
                               f"train.micro_batch_size ({micro_batch_size}); lower train.micro_batch_size")
        self.pixels, self.ids, self.mb, self.seed, self.pad_id = pixels, ids, micro_batch_size, seed, pad_id
        self.augment_strength, self.mean, self.std = augment_strength, mean, std

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        g = mask_generator(self.seed, step, index)
        chosen = torch.randperm(len(self.groups), generator=g)[:self.mb].tolist()
        picks = torch.randint(0, 1 << 30, (self.mb,), generator=g).tolist()
        rows = [self.groups[c][p % len(self.groups[c])] for c, p in zip(chosen, picks)]
        pixels = self.pixels[rows]
        if self.augment_strength > 0:  # drawn after the rows: the same (seed, step, index), the same views
            pixels = augment(pixels, g, self.mean, self.std, self.augment_strength)
        return {"pixels": pixels, "input_ids": pad_ids([self.ids[r] for r in rows], self.pad_id)}


def eval_batches(split: ImageTextSplit, pixels: torch.Tensor, ids: list[list[int]], micro_batch_size: int,
                 max_batches: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Fixed validation batches: each style's rows in file order, cut into batches of distinct captions."""
    by_style: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(split.rows):
        by_style[r.get("style")].append(i)
    out = []
    for rows in by_style.values():
        for i in range(0, len(rows) - 1, micro_batch_size):
            chunk, seen = [], set()
            for r in rows[i:i + micro_batch_size]:
                if split.rows[r]["caption"] not in seen:
                    seen.add(split.rows[r]["caption"])
                    chunk.append(r)
            if len(chunk) > 1:
                out.append({"pixels": pixels[chunk], "input_ids": pad_ids([ids[r] for r in chunk], pad_id)})
    return out[:max_batches]


class CLIPObjective:
    """Symmetric InfoNCE over a micro-batch's pairs; stats acc (image -> text top-1) and chance_acc."""

    name = "clip"
    loss_label = "symmetric InfoNCE (nats/pair)"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits_II = model(batch["pixels"], batch["input_ids"], clamp_scale=True).float()  # through forward, for DDP
        loss = contrastive_loss(logits_II)
        n = logits_II.shape[0]
        acc = (logits_II.argmax(-1) == torch.arange(n, device=logits_II.device)).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach(), "chance_acc": torch.tensor(1.0 / n),
                      "tokens": torch.tensor(n)}


def make_clip(ctx: PretrainContext) -> PretrainParts:
    cfg = ctx.model_cfg
    if cfg.parts != "both":
        raise LMForgeError(f"train.objective clip trains both towers; model.parts is '{cfg.parts}' (set it to both)")
    train, val = ctx.train_tokens, ctx.val_tokens  # ImageTextSplit rows (the objective's data kind)
    tok = ctx.tokenizer
    if tok.pad_id is None:
        raise LMForgeError(f"the tokenizer of {ctx.train_name} has no padding token")
    eos = tok.hf.token_to_id(tok.eos_token) if tok.eos_token else None
    if eos != cfg.eos_id:
        raise LMForgeError(f"model.eos_id ({cfg.eos_id}) is not the tokenizer's EOS ({eos}), which ends every caption; "
                           f"set --model.eos_id {eos}")
    strength = float(ctx.options.image_augment)
    if strength < 0:
        raise LMForgeError(f"objective.image_augment must be >= 0 (0 = no augmentation), got {strength}")
    train_ids = caption_ids(tok, train.captions(), ctx.seq_len)
    batches = PairBatches(pixels_of(train, cfg), train_ids, train.captions(), ctx.micro_batch_size, ctx.seed,
                          tok.pad_id, ctx.train_name, strength, cfg.image_mean, cfg.image_std)
    val_pixels, val_ids = pixels_of(val, cfg), caption_ids(tok, val.captions(), ctx.seq_len)
    fixed = eval_batches(val, val_pixels, val_ids, ctx.micro_batch_size, ctx.eval_iters, tok.pad_id)
    if not fixed:
        raise LMForgeError(f"the {ctx.val_name} has too few distinct captions for a validation batch")
    return PretrainParts(CLIPObjective(), batches, lambda: fixed,
                         tokens_per_step=ctx.micro_batch_size * ctx.micro_batches_per_step)
