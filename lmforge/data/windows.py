"""Token windows for causal-LM training and evaluation, sampled deterministically.

Training: step s draws `global_batch` random windows of seq_len+1 tokens (nanoGPT-style) whose
start offsets are a pure function of (seed, s, row) through a splitmix64 hash. So the data
position is just the step counter, a resumed run sees exactly the windows it would have seen, and
the rows split evenly over micro-batches and processes: process r, micro-step a of a step takes
micro-batch number r * grad_accum + a. One process with grad_accum=2 and two processes with
grad_accum=1 therefore train on the same global batch, and micro_batch_size 2 x grad_accum 2
sees the same windows as micro_batch_size 4 x grad_accum 1.

Evaluation: a fixed set of windows spread evenly over the validation split; `window_coverage` says
how much of the split they read (a partial evaluation is labelled as such).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.sampling import EvalCoverage
from lmforge.errors import LMForgeError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 output function: a fixed, well-mixed 64-bit hash (stable across versions)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def window_starts(seed: int, step: int, count: int, n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets (int64) of the `count` windows of one step; each window spans seq_len+1 tokens."""
    span = n_tokens - seq_len  # valid starts: 0 .. n_tokens - seq_len - 1
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0] ^ np.uint64(step)
        h = _splitmix64(_splitmix64(np.full(count, key, dtype=np.uint64)) + np.arange(count, dtype=np.uint64))
    return (h % np.uint64(span)).astype(np.int64)


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    w_BT1 = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
    w_BT1 = torch.from_numpy(w_BT1)
    return w_BT1[:, :-1].contiguous(), w_BT1[:, 1:].contiguous()


class TrainWindows:
    """Random training windows; `micro_batch(step, index)` gives (x_BT, y_BT) on the CPU."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, micro_batches_per_step: int,
                 seed: int, name: str = "train split"):
        if len(tokens) < seq_len + 1:
            raise LMForgeError(f"the {name} has {len(tokens)} tokens, fewer than train.seq_len + 1 ({seq_len + 1}); "
                               "lower train.seq_len or prepare more data")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.mb, self.per_step = micro_batch_size, micro_batches_per_step
        self._cache: tuple[int, np.ndarray] | None = None

    def micro_batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != step:
            starts = window_starts(self.seed, step, self.mb * self.per_step, len(self.tokens), self.seq_len)
            self._cache = (step, starts)
        starts = self._cache[1][index * self.mb:(index + 1) * self.mb]
        return _gather(self.tokens, starts, self.seq_len)


def eval_starts(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """Start offsets of `count` evaluation windows of seq_len+1 tokens spread evenly over a split."""
    return np.linspace(0, n_tokens - seq_len - 1, num=count).round().astype(np.int64)


def window_coverage(starts: np.ndarray, window: int, n_tokens: int) -> EvalCoverage:
    """How many tokens of a split of n_tokens the windows of `window` tokens at `starts` read (overlaps once)."""
    s = np.unique(starts)
    read = int(np.minimum(np.diff(s), window).sum()) + window if len(s) else 0
    return EvalCoverage(min(read, n_tokens), n_tokens, "tokens")


class EvalWindows:
    """`n_batches` fixed batches of windows spread evenly over a split (the same every evaluation)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, name: str = "val split"):
        if len(tokens) < seq_len + 1:
            raise LMForgeError(f"the {name} has {len(tokens)} tokens, fewer than train.seq_len + 1 ({seq_len + 1}); "
                               "lower train.seq_len or prepare more data")
        self.tokens, self.seq_len, self.bs, self.n_batches = tokens, seq_len, batch_size, n_batches
        self.starts = eval_starts(len(tokens), seq_len, batch_size * n_batches)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _gather(self.tokens, self.starts[i * self.bs:(i + 1) * self.bs], self.seq_len)

    def coverage(self) -> EvalCoverage:
        return window_coverage(self.starts, self.seq_len + 1, len(self.tokens))

