"""Masked-language-model pretraining for encoders: `lmforge train --objective mlm`.

Batches are token windows of the prepared data (a [CLS] first when the vocabulary has one) with
dynamic masking: every micro-batch draws its own mask from a generator seeded by (seed, step,
index), so a resumed run masks exactly as the uninterrupted one. Each eligible token (never a
special token) is selected with probability `objective.mask_prob`; of the selected, 80% become
[MASK], 10% a random non-special token and 10% stay as they are (BERT). With
`objective.whole_word_mask` a word's sub-tokens are selected together (WordPiece `##` pieces, or
byte-level BPE pieces without a leading space). Only the selected positions go through the
vocabulary head. Validation uses fixed windows and a fixed mask seed, so runs compare; it reports
the masked-token loss, top-1 accuracy (`val_acc`) and the accuracy of always predicting the most
frequent training token (`val_baseline_acc`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.train.batches import EvalWindows, window_starts
from lmforge.train.objectives import PRETRAINING, PretrainContext, PretrainSpec

IGNORE = -100
EVAL_MASK_SEED = 20250519  # fixed: validation masks do not depend on the run's seed
_SEED_MIX = 0x9E3779B1


class Masker:
    """BERT masking of token batches: (input_ids, labels) with labels = -100 where nothing is predicted."""

    def __init__(self, vocab_size: int, mask_id: int, special_ids: list[int], mask_prob: float = 0.15,
                 word_start: Optional[torch.Tensor] = None):
        if not 0.0 < mask_prob < 1.0:
            raise LMForgeError(f"objective.mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_id, self.mask_prob, self.vocab_size = mask_id, mask_prob, vocab_size
        self.special_V = torch.zeros(vocab_size, dtype=torch.bool)
        self.special_V[[i for i in special_ids if i < vocab_size]] = True
        self.random_pool = (~self.special_V).nonzero().flatten()  # random replacements are never specials
        self.word_start_V = word_start  # bool per vocab id: starts a word (None = every token is a word)

    def __call__(self, x_BT: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        eligible_BT = ~self.special_V[x_BT]
        if self.word_start_V is None:
            chosen_BT = (torch.rand(x_BT.shape, generator=gen) < self.mask_prob) & eligible_BT
        else:
            # a word = a start token and the continuation pieces after it; specials start a word too
            start_BT = self.word_start_V[x_BT] | ~eligible_BT
            start_BT[:, 0] = True
            word_BT = start_BT.long().cumsum(1) - 1
            pick_BW = torch.rand(x_BT.shape, generator=gen) < self.mask_prob
            chosen_BT = pick_BW.gather(1, word_BT) & eligible_BT
        how_BT = torch.rand(x_BT.shape, generator=gen)  # < .8 [MASK], < .9 random, else unchanged
        rand_BT = self.random_pool[torch.randint(len(self.random_pool), x_BT.shape, generator=gen)]
        labels_BT = torch.where(chosen_BT, x_BT, torch.full_like(x_BT, IGNORE))
        inp_BT = torch.where(chosen_BT & (how_BT < 0.8), torch.full_like(x_BT, self.mask_id), x_BT)
        inp_BT = torch.where(chosen_BT & (how_BT >= 0.8) & (how_BT < 0.9), rand_BT, inp_BT)
        return inp_BT, labels_BT


def _generator(seed: int, step: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _SEED_MIX + step * 1_000_003 + index) % (2**63))


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
        x_BT = torch.from_numpy(w)
        if self.cls_id is not None:
            x_BT = torch.cat([torch.full((len(starts), 1), self.cls_id, dtype=torch.long), x_BT], 1)
        return x_BT

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        starts = window_starts(self.seed, step, self.mb * self.per_step, len(self.tokens), self.body)
        x_BT = self.windows(starts[index * self.mb:(index + 1) * self.mb])
        inp, labels = self.masker(x_BT, _generator(self.seed, step, index))
        return {"input_ids": inp, "labels": labels}


class MLMObjective:
    """Cross entropy over the masked positions only (the vocabulary head runs on those rows alone).
    Stats: acc (top-1 on masked tokens), baseline_acc (always the most frequent token), tokens."""

    name = "mlm"

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


def _special_ids(tok: Any) -> list[int]:
    hf = tok.hf
    ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>", "<|pad|>", "<|mask|>"):
        i = hf.token_to_id(name)
        if i is not None:
            ids.add(i)
    if tok.eos_id is not None:
        ids.add(tok.eos_id)
    return sorted(ids)


def _word_starts(tok: Any, vocab_size: int) -> torch.Tensor:
    """Per vocab id: True when the token begins a word (WordPiece: no '##'; byte-level BPE: 'Ġ' prefix)."""
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    wordpiece = any(t.startswith("##") for t in vocab)
    start = torch.ones(vocab_size, dtype=torch.bool)
    for t, i in vocab.items():
        if i < vocab_size:
            start[i] = not t.startswith("##") if wordpiece else t.startswith("Ġ") or not t[:1].isalnum()
    return start


def mask_token_id(tok: Any) -> int:
    for name in ("[MASK]", "<mask>", "<|mask|>"):
        i = tok.hf.token_to_id(name)
        if i is not None:
            return i
    raise LMForgeError("the data's tokenizer has no mask token ([MASK] or <|mask|>); prepare it with "
                       "`lmforge prepare --tokenizer wordpiece`")


def most_frequent_token(tokens: np.ndarray, special: list[int], vocab_size: int, sample: int = 10_000_000) -> int:
    """The most frequent non-special token of (an evenly strided sample of) the training split."""
    step = max(1, len(tokens) // sample)
    counts = np.bincount(np.asarray(tokens[::step]).astype(np.int64), minlength=vocab_size)
    counts[[s for s in special if s < len(counts)]] = 0
    return int(counts.argmax())


def make_mlm(ctx: PretrainContext):
    cfg = ctx.model_cfg
    if getattr(cfg, "head", None) != "mlm":
        raise LMForgeError(f"train.objective mlm needs an encoder with an MLM head; set --model.head mlm "
                           f"(model.head is '{getattr(cfg, 'head', None)}')")
    tok, opts = ctx.tokenizer, ctx.options
    special = _special_ids(tok)
    cls_id = tok.hf.token_to_id("[CLS]")
    vocab = cfg.vocab_size
    masker = Masker(vocab, mask_token_id(tok), special, opts.mask_prob,
                    _word_starts(tok, vocab) if getattr(opts, "whole_word_mask", False) else None)
    train = MaskedWindows(ctx.train_tokens, ctx.seq_len, ctx.micro_batch_size, ctx.micro_batches_per_step, ctx.seed,
                          masker, cls_id)
    body = ctx.seq_len - (cls_id is not None)
    ev = EvalWindows(ctx.val_tokens, body, ctx.micro_batch_size, ctx.eval_iters, name="val split")
    objective = MLMObjective(most_frequent_token(ctx.train_tokens, special, vocab))

    def eval_batches() -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(ev.n_batches):
            x_BT = ev.batch(i)[0]
            if cls_id is not None:
                x_BT = torch.cat([torch.full((x_BT.shape[0], 1), cls_id, dtype=torch.long), x_BT], 1)
            inp, labels = masker(x_BT, _generator(EVAL_MASK_SEED, 0, i))
            out.append({"input_ids": inp, "labels": labels})
        return out

    return objective, train, eval_batches


PRETRAINING["mlm"] = PretrainSpec(family="encoder", default_preset="encoder-small", make=make_mlm)


@torch.no_grad()
def evaluate_mlm(ckpt: str, data_dir: str, batch_size: int = 8, max_windows: int = 200, seq_len: int = 128) -> dict[str, Any]:
    """`lmforge eval` on an encoder with an MLM head: masked-token loss, top-1 accuracy and the
    most-frequent-token baseline on evenly spread windows of a prepared data directory's val split,
    masked with the fixed evaluation seed (15%, 80/10/10), so checkpoints compare."""
    from lmforge.data.dataset import TokenData
    from lmforge.infer.llm import LLM

    llm = LLM.load(ckpt)
    model = llm.model
    if getattr(model.cfg, "head", None) != "mlm":
        raise LMForgeError(f"{ckpt} is an encoder without an MLM head (head '{model.cfg.head}'); "
                           "evaluate classifiers with a labelled --data file")
    data = TokenData(data_dir)
    tok = data.tokenizer()
    special = _special_ids(tok)
    cls_id = tok.hf.token_to_id("[CLS]")
    seq_len = min(seq_len, model.cfg.block_size - model.cfg.position_offset)
    body = seq_len - (cls_id is not None)
    val = data.split("val")
    n = max(1, min(max_windows, (len(val) - 1) // body))
    ev = EvalWindows(val, body, batch_size, -(-n // batch_size), name="val split")
    masker = Masker(model.cfg.vocab_size, mask_token_id(tok), special, 0.15)
    frequent = most_frequent_token(data.split("train"), special, model.cfg.vocab_size)
    loss_sum, correct, base, count = 0.0, 0, 0, 0
    for i in range(ev.n_batches):
        x_BT = ev.batch(i)[0]
        if cls_id is not None:
            x_BT = torch.cat([torch.full((x_BT.shape[0], 1), cls_id, dtype=torch.long), x_BT], 1)
        inp, labels = masker(x_BT, _generator(EVAL_MASK_SEED, 0, i))
        sel = labels != IGNORE
        logits = model(inp, select_BT=sel).float()
        y = labels[sel]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        base += int((y == frequent).sum())
        count += int(y.numel())
    if count == 0:
        raise LMForgeError(f"the val split of {data_dir} is too short to evaluate")
    return {"mlm_loss": loss_sum / count, "mlm_acc": correct / count, "baseline_acc": base / count,
            "masked_tokens": count, "windows": ev.n_batches * batch_size, "seq_len": seq_len,
            "checkpoint": str(ckpt), "data": str(data_dir)}
