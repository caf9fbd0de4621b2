"""BERT masking of token windows: what a masked language model sees and what it must predict.

Each eligible token (never a special token) is selected with probability `mask_prob`; of the
selected, 80% become the mask token, 10% a random non-special token and 10% stay as they are
(Devlin et al. 2019). With word starts given, a word's sub-tokens are selected together (whole-word
masking). Every draw comes from a generator seeded by (seed, step, index), so the masks of a
micro-batch are a pure function of its position: MLM pretraining (`lmforge.train.mlm`) and the
masked-LM evaluation (`lmforge.eval.mlm`) share this module, and validation masks use the fixed
EVAL_MASK_SEED so runs and checkpoints compare.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from lmforge.data.windows import EvalWindows
from lmforge.errors import LMForgeError

IGNORE = -100  # label of a position that is not predicted
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


def mask_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of micro-batch `index` of optimizer step `step` (a pure function of the three)."""
    return torch.Generator().manual_seed((seed * _SEED_MIX + step * 1_000_003 + index) % (2**63))


def with_cls(x_BT: torch.Tensor, cls_id: Optional[int]) -> torch.Tensor:
    """Windows with [CLS] in front (unchanged when the vocabulary has none)."""
    if cls_id is None:
        return x_BT
    return torch.cat([torch.full((x_BT.shape[0], 1), cls_id, dtype=torch.long), x_BT], 1)


def masked_eval_batches(windows: EvalWindows, masker: Masker, cls_id: Optional[int]) -> list[dict[str, torch.Tensor]]:
    """The fixed validation batches {input_ids, labels}: evenly spread windows, masked with EVAL_MASK_SEED."""
    out = []
    for i in range(windows.n_batches):
        inp, labels = masker(with_cls(windows.batch(i)[0], cls_id), mask_generator(EVAL_MASK_SEED, 0, i))
        out.append({"input_ids": inp, "labels": labels})
    return out


def special_token_ids(tok: Any) -> list[int]:
    """Ids never masked or drawn as random replacements: the tokenizer's specials and EOS."""
    hf = tok.hf
    ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<|endoftext|>", "<|pad|>", "<|mask|>"):
        i = hf.token_to_id(name)
        if i is not None:
            ids.add(i)
    if tok.eos_id is not None:
        ids.add(tok.eos_id)
    return sorted(ids)


def word_starts(tok: Any, vocab_size: int) -> torch.Tensor:
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
