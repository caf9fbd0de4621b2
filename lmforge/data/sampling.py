"""Which examples train, validate, and in what order: the fixed order of the built-in split files,
the seeded validation split, the endless stream of seeded epoch permutations, and the micro-batches
of the training loop read from it (and how much of a validation set an evaluation reads).

The split and the epochs draw from torch's generator, so a split or an order is a pure function of
the seed (and the epoch): a resumed run, or a process of a DDP run, reads exactly the examples it
would have read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from lmforge.errors import LMForgeError

T = TypeVar("T")

# Rearranges an epoch's permutation (e.g. groups examples of similar length), drawing from its generator.
Arrange = Callable[[list[int], torch.Generator], list[int]]


def fixed_shuffle(items: Sequence[T], key: Callable[[T], str], seed: str = "lmforge") -> list[T]:
    """The items in a fixed pseudo-random order: by sha256 of (seed, key(item)), ties in input order.
    The same on every machine and Python, and a subset keeps its relative order: the order of a
    built-in split file, so any first part of it is a fair sample of the whole."""
    def rank(i: int) -> tuple[bytes, int]:
        return hashlib.sha256(f"{seed}\0{key(items[i])}".encode()).digest(), i

    return [items[i] for i in sorted(range(len(items)), key=rank)]


@dataclass(frozen=True)
class EvalCoverage:
    """How much of its validation set one evaluation reads: metrics of a partial evaluation are
    labelled as such (`val_partial: true` with the counts), never passed off as the whole set's."""

    evaluated: int
    total: int
    unit: str  # what is counted: "examples", "tokens"

    @property
    def partial(self) -> bool:
        return self.evaluated < self.total

    def labels(self, prefix: str = "val") -> dict[str, Any]:
        """The keys a partial evaluation adds to its metrics (none for a full one)."""
        if not self.partial:
            return {}
        return {f"{prefix}_partial": True, f"{prefix}_{self.unit}": self.evaluated,
                f"{prefix}_{self.unit}_total": self.total}

    def describe(self) -> str:
        return f"{self.evaluated:,} of {self.total:,} {self.unit}"


def split_validation(examples: Sequence[T], val_examples: Sequence[T] | None, val_fraction: float | None,
                     seed: int) -> tuple[list[T], list[T]]:
    """(train, validation) examples: `val_examples` when given (--val-data), else round(val_fraction * n)
    whole examples (at least 1) held out by a permutation seeded by `seed`, else none. Both keep the
    order of the file."""
    if val_examples is not None:
        if val_fraction:
            raise LMForgeError("give either --val-data or --val-fraction, not both")
        return list(examples), list(val_examples)
    if not val_fraction:
        return list(examples), []
    if not 0.0 < val_fraction < 1.0:
        raise LMForgeError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise LMForgeError(f"--val-fraction {val_fraction} leaves no training examples out of {len(examples)}")
    held = set(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


class EpochOrder:
    """Example indices of an endless stream of epochs over n examples: epoch e is a permutation of
    range(n) seeded by (seed, e), or range(n) itself with shuffle=False, so the example at stream
    position g is a pure function of (seed, g). `arrange` may reorder each epoch's permutation
    with the same generator."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, arrange: Arrange | None = None):
        self.n, self.seed, self.shuffle, self.arrange = n, seed, shuffle, arrange
        self._cached: tuple[int, list[int]] | None = None  # the last epoch asked for

    def epoch(self, e: int) -> list[int]:
        if self._cached is None or self._cached[0] != e:
            if self.shuffle:
                # masked to 64 bits: seeds derived from several numbers (RL rollouts) are that wide
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + e) & 0xFFFF_FFFF_FFFF_FFFF)
                order = torch.randperm(self.n, generator=g).tolist()
                if self.arrange is not None:
                    order = self.arrange(order, g)
            else:
                order = list(range(self.n))
            self._cached = (e, order)
        return self._cached[1]

    def __getitem__(self, g: int) -> int:
        return self.epoch(g // self.n)[g % self.n]

    def take(self, start: int, count: int) -> list[int]:
        """The example indices at stream positions start .. start + count - 1."""
        return [self[g] for g in range(start, start + count)]


class ExampleBatches:
    """The training loop's batch source over n examples: micro-batch `index` of optimizer step `step`
    collates the examples at stream positions (step * per_step + index) * mb ... + mb of an EpochOrder
    (per_step = micro-batches per step over every process), so resume is exact."""

    def __init__(self, n: int, collate: Callable[[list[int]], Any], micro_batch_size: int,
                 micro_batches_per_step: int, seed: int, shuffle: bool = True, arrange: Arrange | None = None):
        if n == 0:
            raise LMForgeError("no training examples")
        self.n, self.collate, self.mb, self.per_step = n, collate, micro_batch_size, micro_batches_per_step
        self.order = EpochOrder(n, seed, shuffle, arrange)

    def micro_batch(self, step: int, index: int) -> Any:
        return self.collate(self.order.take((step * self.per_step + index) * self.mb, self.mb))

    def all_batches(self, limit: int | None = None) -> list[Any]:
        """Every example once, in file order, in micro-batches (at most `limit` of them): validation."""
        starts = range(0, self.n, self.mb)[:limit]
        return [self.collate(list(range(i, min(i + self.mb, self.n)))) for i in starts]

    def coverage(self, limit: int | None = None) -> EvalCoverage:
        """How many examples all_batches(limit) holds, of all."""
        return EvalCoverage(self.n if limit is None else min(self.n, limit * self.mb), self.n, "examples")
