"""Next-token selection: repetition penalty, temperature, top-k, top-p (nucleus) and greedy.

The processors follow Hugging Face's `generate` semantics so the same settings mean the same thing:
repetition penalty first, then temperature, top-k, top-p, then a draw from the softmax
(or argmax when temperature is 0). All functions work on a batch of logits `logits_BV`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import LMForgeError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token. Defaults: plain sampling from the model's distribution."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep only the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or the output

    def __post_init__(self) -> None:
        if self.temperature is None or self.temperature < 0:
            raise LMForgeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 1):
            raise LMForgeError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LMForgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            raise LMForgeError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / HF penalty on every token seen so far: positive logits divided by `penalty`,
    negative ones multiplied (so the token always becomes less likely for penalty > 1)."""
    penalized_BV = torch.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return torch.where(seen_BV, penalized_BV, logits_BV)


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    k = min(int(k), logits_BV.shape[-1])
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019) as HF does it: drop the least likely tokens whose
    cumulative probability stays within 1 - p; the most likely token always survives."""
    if p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=False)
    cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted_BV = cum_BV <= (1.0 - p)
    drop_sorted_BV[:, -1] = False
    drop_BV = drop_sorted_BV.scatter(1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def process_logits(logits_BV: torch.Tensor, params: SamplingParams, seen_BV: torch.Tensor | None = None) -> torch.Tensor:
    """The logits a token is drawn from (fp32), after penalty, temperature, top-k and top-p."""
    logits_BV = logits_BV.float()
    if params.repetition_penalty != 1.0 and seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
    if params.greedy:
        return logits_BV
    if params.temperature != 1.0:
        logits_BV = logits_BV / params.temperature
    if params.top_k is not None:
        logits_BV = top_k_filter(logits_BV, params.top_k)
    if params.top_p is not None:
        logits_BV = top_p_filter(logits_BV, params.top_p)
    return logits_BV


def sample_next(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen_BV: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row, shape (B,)."""
    logits_BV = process_logits(logits_BV, params, seen_BV)
    if params.greedy:
        return logits_BV.argmax(dim=-1)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A private RNG for one generate call: a seed makes sampling reproducible and leaves torch's
    global RNG untouched; None draws a fresh nondeterministic seed."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
