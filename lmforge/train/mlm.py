"""Masked-language-model pretraining for encoders: `lmforge train --train.objective mlm`.

Batches are token windows of the prepared data (a [CLS] first when the vocabulary has one) with
dynamic BERT masking (`lmforge.data.masking`): every micro-batch draws its own mask from a
generator seeded by (seed, step, index), so a resumed run masks exactly as the uninterrupted one.
With `objective.whole_word_mask` a word's sub-tokens are selected together (WordPiece `##` pieces,
or byte-level BPE pieces without a leading space). Only the selected positions go through the
vocabulary head. Validation uses fixed windows and a fixed mask seed, so runs compare; it reports
the masked-token loss, top-1 accuracy (`val_acc`) and the accuracy of always predicting the most
frequent training token (`val_baseline_acc`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.masking import (IGNORE, Masker, mask_generator, mask_token_id, masked_eval_batches,
                                   most_frequent_token, special_token_ids, with_cls, word_starts)
from lmforge.data.windows import EvalWindows, window_starts
from lmforge.errors import LMForgeError
from lmforge.train.job import PretrainContext, PretrainParts


class MaskedWindows:
    """Training micro-batches: windows at hashed offsets (as causal-LM training), then masked."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, micro_batches_per_step: int, seed: int,
                 masker: Masker, cls_id: Optional[int], name: str = "train split"):
        self.body = seq_len - (cls_id is not None)  # [CLS] takes the first position
        if len(tokens) < self.body + 1:
            raise LMForgeError(f"the {name} has {len(tokens)} tokens, fewer than train.seq_len ({seq_len}); "
                               "lower train.seq_len or prepare more data")
        self.tokens, self.seed, self.mb, self.per_step = tokens, seed, micro_batch_size, micro_batches_per_step
        self.masker, self.cls_id = masker, cls_id

    def windows(self, starts: np.ndarray) -> torch.Tensor:
        w = np.stack([np.asarray(self.tokens[s:s + self.body]) for s in starts]).astype(np.int64)
        return with_cls(torch.from_numpy(w), self.cls_id)

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        starts = window_starts(self.seed, step, self.mb * self.per_step, len(self.tokens), self.body)
        x_BT = self.windows(starts[index * self.mb:(index + 1) * self.mb])
        inp, labels = self.masker(x_BT, mask_generator(self.seed, step, index))
        return {"input_ids": inp, "labels": labels}


class MLMObjective:
    """Cross entropy over the masked positions only (the vocabulary head runs on those rows alone).
    Stats: acc (top-1 on masked tokens), baseline_acc (always the most frequent token), tokens."""

    name = "mlm"
    loss_label = "masked-token cross entropy (nats/token)"

    def __init__(self, most_frequent: int = -1):
        self.most_frequent = most_frequent

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        x_BT, y_BT = batch["input_ids"], batch["labels"]
        sel_BT = y_BT != IGNORE
        y_N = y_BT[sel_BT]
        logits_NV = model(x_BT, select_BT=sel_BT).float()  # through forward, so DDP sees the call
        if y_N.numel() == 0:  # nothing masked in this micro-batch: a zero loss that keeps the graph
            zero = logits_NV.sum() * 0.0
            return zero, {"loss": zero.detach(), "acc": zero.detach(), "baseline_acc": zero.detach(),
                          "tokens": torch.tensor(x_BT.numel())}
        loss = F.cross_entropy(logits_NV, y_N)
        acc = (logits_NV.argmax(-1) == y_N).float().mean()
        base = (y_N == self.most_frequent).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach(), "baseline_acc": base.detach(),
                      "tokens": torch.tensor(x_BT.numel())}


def make_mlm(ctx: PretrainContext) -> PretrainParts:
    cfg = ctx.model_cfg
    if getattr(cfg, "head", None) != "mlm":
        raise LMForgeError(f"train.objective mlm needs an encoder with an MLM head; set --model.head mlm "
                           f"(model.head is '{getattr(cfg, 'head', None)}')")
    tok, opts = ctx.tokenizer, ctx.options
    special = special_token_ids(tok)
    cls_id = tok.hf.token_to_id("[CLS]")
    vocab = cfg.vocab_size
    masker = Masker(vocab, mask_token_id(tok), special, opts.mask_prob,
                    word_starts(tok, vocab) if getattr(opts, "whole_word_mask", False) else None)
    train = MaskedWindows(ctx.train_tokens, ctx.seq_len, ctx.micro_batch_size, ctx.micro_batches_per_step, ctx.seed,
                          masker, cls_id)
    body = ctx.seq_len - (cls_id is not None)
    val = EvalWindows(ctx.val_tokens, body, ctx.micro_batch_size, ctx.eval_iters, name="val split")
    objective = MLMObjective(most_frequent_token(ctx.train_tokens, special, vocab))
    return PretrainParts(objective, train, lambda: masked_eval_batches(val, masker, cls_id), eval_coverage=val.coverage())
