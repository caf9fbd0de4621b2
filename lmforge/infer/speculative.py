"""Speculative decoding: a cheap proposer guesses the next k tokens, the target model checks them all
in ONE forward pass, and a rejection rule keeps exactly what the target alone would produce.

    proposer (a draft model with its own KVCache, or prompt lookup) --> guesses d_1..d_k (+ their q)
    target forward on [pending, d_1..d_k] --> p_0..p_k (k+1 next-token distributions)
    accept guesses while the rule allows, then one token from the target: the correction at the
    first rejection, or a bonus token from p_k when every guess was accepted
    roll both caches back over the rejected guesses (`KVCache.truncate`)

Greedy: a guess is accepted when it is the target's argmax, so the output is token-identical to
decoding without a proposer. Sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_i with
probability min(1, p(d_i) / q(d_i)); at a rejection draw from norm(max(0, p - q)); the tokens then
follow the target's distribution exactly. The sampling settings (repetition penalty, temperature,
top-k, top-p) shape p and q alike, as transformers' assisted generation does. Prompt lookup
(transformers' `prompt_lookup_num_tokens`) guesses the tokens that followed the latest n-gram's
earlier occurrence in the prompt or the output; its q is a point mass on each guess.

Rows decode one at a time (batch 1 is what speculation speeds up): a batch of prompts runs row after
row, each with its own caches. The serving scheduler calls `speculative_step` on its cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.infer.generate import Generation, Settings, TextTracker, text_pieces
from lmforge.infer.sampling import SamplingParams, process_logits, sample_next
from lmforge.models.registry import CONTINUE, family_of
from lmforge.nn.kv_cache import KVCache


@dataclass
class SpeculativeStats:
    """What speculation achieved: guesses checked and accepted, target forward passes of the decode
    steps and the tokens they produced (the prompt's prefill and its token are not counted, so
    decoding without speculation makes 1.0 token per target forward)."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else 0.0

    def add(self, proposed: int, produced: int) -> None:
        """One target step that checked `proposed` guesses and produced `produced` tokens."""
        self.proposed += proposed
        self.accepted += produced - 1
        self.target_forwards += 1
        self.tokens += produced

    def as_dict(self) -> dict[str, float]:
        return {"proposed": self.proposed, "accepted": self.accepted, "target_forwards": self.target_forwards,
                "tokens": self.tokens, "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_forward": self.tokens_per_target_forward}

    def __str__(self) -> str:
        return (f"acceptance rate {self.acceptance_rate:.2f} ({self.accepted}/{self.proposed} guesses), "
                f"{self.tokens_per_target_forward:.2f} tokens per target forward ({self.tokens} tokens, "
                f"{self.target_forwards} forwards)")


def check_positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LMForgeError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_draft(target: torch.nn.Module, target_tok: Any, draft: torch.nn.Module, draft_tok: Any) -> None:
    """A draft must be a decoder over the target's vocabulary (the same token ids for the same text)."""
    family = family_of(draft)
    if CONTINUE not in family.can or not hasattr(draft, "new_cache"):
        raise LMForgeError(f"a draft must be a decoder-only language model; this one is '{family.name}'")
    tv, dv = int(target.cfg.vocab_size), int(draft.cfg.vocab_size)
    if tv != dv:
        raise LMForgeError(f"the draft's vocabulary has {dv} tokens but the target's has {tv}; a draft must "
                           "share the target's tokenizer")
    if target_tok is None or draft_tok is None:
        return
    for i in range(max(target_tok.vocab_size, draft_tok.vocab_size)):
        a, b = target_tok.id_to_token(i), draft_tok.id_to_token(i)
        if a != b:
            raise LMForgeError(f"the draft's tokenizer differs from the target's: token {i} is {a!r} for the "
                               f"target and {b!r} for the draft; a draft must share the target's tokenizer")


# ---- proposers -----------------------------------------------------------------------------------

class DraftModel:
    """Guesses with a smaller decoder. Its cache (one row) holds a prefix of the tokens; each
    `propose` first feeds what it has not seen yet."""

    def __init__(self, model: torch.nn.Module, cache: KVCache):
        self.model = model
        self.cache = cache

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, generator: torch.Generator | None,
                seen_V: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None]:
        """k guesses after `tokens` and, when sampling, their distributions q (k, V)."""
        if k == 0:
            return [], None
        seen_1V = None if seen_V is None else seen_V[None].clone()
        feed = list(tokens[self.cache.length:])
        guesses: list[int] = []
        q_rows = []
        for _ in range(k):
            idx_1T = torch.tensor([feed], dtype=torch.long, device=self.cache.device)
            logits_1V = process_logits(self.model(idx_1T, cache=self.cache, last_only=True)[:, -1], params, seen_1V)
            if params.greedy:
                tok = int(logits_1V.argmax(dim=-1))
            else:
                q_1V = logits_1V.softmax(dim=-1)
                q_rows.append(q_1V)
                tok = int(torch.multinomial(q_1V, 1, generator=generator))
            guesses.append(tok)
            if seen_1V is not None:
                seen_1V[0, tok] = True
            feed = [tok]  # the last guess is fed next time, if it is accepted
        return guesses, torch.cat(q_rows) if q_rows else None

    def keep(self, n: int) -> None:
        """Only the first n tokens are right: forget any after them."""
        extra = self.cache.length - n
        if extra > 0:
            self.cache.truncate(extra)


class PromptLookup:
    """Guesses by copying (transformers' prompt lookup decoding): find the latest n-gram (n =
    max_ngram down to 1) earlier in the tokens, and propose the k tokens that followed its first
    occurrence."""

    def __init__(self, max_ngram: int = 2):
        self.max_ngram = max_ngram

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, generator: torch.Generator | None,
                seen_V: torch.Tensor | None) -> tuple[list[int], None]:
        toks, n_tok = list(tokens), len(tokens)
        if k == 0:
            return [], None
        for n in range(min(self.max_ngram, n_tok - 1), 0, -1):
            tail = toks[n_tok - n:]
            for start in range(n_tok - n):  # the first occurrence that has tokens after it
                if toks[start] == tail[0] and toks[start:start + n] == tail:
                    return toks[start + n:start + n + k], None
        return [], None

    def keep(self, n: int) -> None:
        pass


# ---- one target step -----------------------------------------------------------------------------

def accept_guesses(p_BTV: torch.Tensor, guesses_BK: torch.Tensor, q_BKV: torch.Tensor | None,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule on a batch of rows: p_BTV the target's distributions at the K+1 positions,
    q_BKV the proposer's at the first K (None: a point mass on each guess). Returns (accepted
    guesses per row (B,), the token drawn after them (B,))."""
    B, K = guesses_BK.shape
    rows_B = torch.arange(B, device=p_BTV.device)
    p_BV = p_BTV[:, 0]
    n_B = torch.zeros(B, dtype=torch.long, device=p_BTV.device)
    if K > 0:
        p_guess_BK = p_BTV[:, :K].gather(2, guesses_BK[..., None])[..., 0]
        q_guess_BK = torch.ones_like(p_guess_BK) if q_BKV is None else q_BKV.gather(2, guesses_BK[..., None])[..., 0]
        u_BK = torch.rand(B, K, generator=generator, device=p_BTV.device)
        ok_BK = u_BK * q_guess_BK < p_guess_BK  # u < p / q: accepted with probability min(1, p / q)
        n_B = ok_BK.long().cumprod(1).sum(1)
        at_B = n_B.clamp(max=K - 1)
        p_BV = p_BTV[rows_B, n_B]
        if q_BKV is None:
            q_BV = torch.nn.functional.one_hot(guesses_BK[rows_B, at_B], p_BTV.shape[-1]).to(p_BV.dtype)
        else:
            q_BV = q_BKV[rows_B, at_B]
        residual_BV = (p_BV - q_BV).clamp(min=0)
        use_B1 = ((n_B < K) & (residual_BV.sum(-1) > 0))[:, None]  # p == q leaves no residual (and no rejection)
        p_BV = torch.where(use_B1, residual_BV, p_BV)
    return n_B, torch.multinomial(p_BV, 1, generator=generator)[:, 0]


def speculative_step(target: torch.nn.Module, cache: KVCache, pending: int, guesses: list[int],
                     q_KV: torch.Tensor | None, params: SamplingParams, generator: torch.Generator | None,
                     seen_V: torch.Tensor | None) -> list[int]:
    """Feed `pending` and the guesses to the target (one forward on its one-row cache); returns the
    accepted guesses plus the target's next token. The cache keeps pending and the accepted guesses."""
    K = len(guesses)
    idx_1T = torch.tensor([[pending, *guesses]], dtype=torch.long, device=cache.device)
    logits_TV = target(idx_1T, cache=cache)[0]
    seen_TV = None
    if seen_V is not None:  # position i has also seen guesses 1..i
        V = seen_V.shape[0]
        guessed_KV = torch.nn.functional.one_hot(idx_1T[0, 1:], V).cumsum(0) > 0
        seen_TV = seen_V[None] | torch.cat([torch.zeros(1, V, dtype=torch.bool, device=seen_V.device), guessed_KV])
    logits_TV = process_logits(logits_TV, params, seen_TV)
    if params.greedy:
        best_T = logits_TV.argmax(dim=-1).tolist()
        n = next((i for i in range(K) if guesses[i] != best_T[i]), K)
        tok = best_T[n]
    else:
        guesses_1K = idx_1T[:, 1:]
        n_1, tok_1 = accept_guesses(logits_TV.softmax(dim=-1)[None], guesses_1K,
                                    None if q_KV is None else q_KV[None], generator)
        n, tok = int(n_1[0]), int(tok_1[0])
    cache.truncate(K - n)
    return guesses[:n] + [tok]


@torch.inference_mode()
def speculative_tokens(target: torch.nn.Module, prompt: Sequence[int], n_new: int, params: SamplingParams,
                       generator: torch.Generator | None, proposer: Any, k: int, stats: SpeculativeStats,
                       cache_dtype: torch.dtype | None = None) -> Iterator[int]:
    """Yield one prompt's next `n_new` tokens: the first from the prompt's prefill (as without
    speculation), then several per target forward. The target's cache holds every token but the
    last one, which the next step feeds."""
    if n_new <= 0:
        return
    was_training = target.training
    target.eval()
    try:
        yield from _tokens(target, prompt, n_new, params, generator, proposer, k, stats, cache_dtype)
    finally:
        target.train(was_training)


def _tokens(target: torch.nn.Module, prompt: Sequence[int], n_new: int, params: SamplingParams,
            generator: torch.Generator | None, proposer: Any, k: int, stats: SpeculativeStats,
            cache_dtype: torch.dtype | None) -> Iterator[int]:
    cache = target.new_cache(1, len(prompt) + n_new - 1, dtype=cache_dtype)
    device = cache.device
    tokens = list(prompt)
    seen_V = None
    if params.repetition_penalty != 1.0:
        seen_V = torch.zeros(int(target.cfg.vocab_size), dtype=torch.bool, device=device)
        seen_V[torch.tensor(tokens, device=device)] = True
    logits_1V = target(torch.tensor([tokens], dtype=torch.long, device=device), cache=cache, last_only=True)[:, -1]
    first = int(sample_next(logits_1V, params, generator, None if seen_V is None else seen_V[None]))
    tokens.append(first)
    if seen_V is not None:
        seen_V[first] = True
    yield first
    produced = 1
    while produced < n_new:
        guesses, q_KV = proposer.propose(tokens, min(k, n_new - produced - 1), params, generator, seen_V)
        new = speculative_step(target, cache, tokens[-1], guesses, q_KV, params, generator, seen_V)
        proposer.keep(len(tokens) + len(new) - 1)
        stats.add(len(guesses), len(new))
        tokens += new
        produced += len(new)
        if seen_V is not None:
            seen_V[torch.tensor(new, device=device)] = True
        yield from new


@dataclass(frozen=True)
class Speculation:
    """How to guess ahead: with a draft model (`draft`, a decoder sharing the target's tokenizer) or,
    without one, by prompt lookup (n-grams up to `max_ngram`); `num_tokens` guesses per step."""

    draft: torch.nn.Module | None
    num_tokens: int
    max_ngram: int = 2

    def proposer(self, max_len: int, cache_dtype: torch.dtype | None) -> DraftModel | PromptLookup:
        if self.draft is None:
            return PromptLookup(self.max_ngram)
        ctx = int(self.draft.cfg.block_size)
        if max_len > ctx:
            raise LMForgeError(f"the draft's context ({ctx} tokens) is shorter than the prompt plus the new tokens "
                               f"({max_len}); use a draft with a longer context or generate fewer tokens")
        return DraftModel(self.draft, self.draft.new_cache(1, max_len, dtype=cache_dtype))

    def tokens(self, model: torch.nn.Module, prompt: Sequence[int], settings: Settings,
               stats: SpeculativeStats) -> Iterator[int]:
        """One prompt's new tokens by speculative decoding under a generate call's `settings`."""
        proposer = self.proposer(len(prompt) + settings.n_new - 1, settings.cache_dtype)
        return speculative_tokens(model, prompt, settings.n_new, settings.params, settings.generator, proposer,
                                  self.num_tokens, stats, settings.cache_dtype)


@torch.inference_mode()
def generate_speculative(model: torch.nn.Module, prompts: Sequence[Sequence[int]], speculation: Speculation, *,
                         max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, repetition_penalty: float = 1.0,
                         eos_id: int | Iterable[int] | None = None, stop: str | Sequence[str] | None = None,
                         tokenizer: Any = None, seed: int | None = None, decode_text: bool = True,
                         kv_cache_dtype: str | None = None) -> tuple[list[Generation], SpeculativeStats]:
    """`generate` with speculative decoding, one prompt after another; the same results for greedy
    decoding, the same distribution when sampling. Also returns what the speculation achieved."""
    settings = Settings.check(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                              stop, tokenizer, seed, kv_cache_dtype)
    stats = SpeculativeStats()
    results = []
    for prompt in prompts:
        steps = speculation.tokens(model, prompt, settings, stats)
        tracker = TextTracker(tokenizer, settings.stops) if settings.stops else None
        results.append(_finish_row(steps, settings.stop_ids, tracker, tokenizer if decode_text else None))
    return results, stats


def stream_speculative(model: torch.nn.Module, tokenizer: Any, prompt: Sequence[int], speculation: Speculation,
                       stats: SpeculativeStats, *, max_new_tokens: int = 64, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                       eos_id: int | Iterable[int] | None = None, stop: str | Sequence[str] | None = None,
                       seed: int | None = None, kv_cache_dtype: str | None = None) -> Iterator[str]:
    """`stream_text` with speculative decoding; `stats` fills in as the pieces are taken."""
    settings = Settings.check(model, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                              stop, tokenizer, seed, kv_cache_dtype)
    return text_pieces(tokenizer, speculation.tokens(model, prompt, settings, stats), settings.stop_ids,
                       settings.stops)


def _finish_row(steps: Iterator[int], stop_ids: set[int], tracker: TextTracker | None,
                tokenizer: Any) -> Generation:
    """One row's Generation by `generate`'s rules: EOS (not kept), stop strings (the ids run through
    the token that completed one, the text stops before it) or the token budget."""
    ids: list[int] = []
    reason = "length"
    for tok in steps:
        if tok in stop_ids:
            reason = "eos"
            break
        ids.append(tok)
        if tracker is not None and tracker.push(tok):
            reason = "stop"
            ids = ids[:tracker.n_tokens]
            break
    steps.close()
    text = None
    if tracker is not None:
        tracker.finish()
        text = tracker.text if tokenizer is not None else None
    elif tokenizer is not None:
        text = tokenizer.decode(ids)
    return Generation(ids, text, reason)
