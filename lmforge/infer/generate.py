"""Autoregressive generation with a preallocated KV cache.

    prompt ids --prefill (one forward, last position only)--> logits --sample--> token
    token --decode step (one position, appends to the cache)--> logits --sample--> token ...

Prompts of different lengths share one batch through LEFT padding: every row ends at the same
cache slot, so each decode step feeds one column of new tokens. `pad_mask_BT` tells the model which
slots are padding; it skips them in attention and counts positions over real tokens only, so a
batched row produces exactly what the same prompt produces alone.

Generation of a row ends at the EOS token (not included in the output), at a stop string (text
level: the output is cut just before it) or after `max_new_tokens`. Finished rows keep riding
along in the batch (their tokens are ignored) until every row is done.

A `Grammar` (infer/grammar.py: JSON Schema, regex, choice) gives every row its own matcher; the
tokens it forbids are masked out of the logits before the sampling settings apply, and a stop id is
allowed only once the row's output is complete.

Streaming decodes incrementally (the prefix/read-offset scheme of HF text-generation-inference):
a piece is released only once it decodes to complete characters, so a multi-byte character split
over several byte-level BPE tokens never shows up as a partial U+FFFD.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.infer.grammar import Grammar, TokenConstraint, accept_tokens, mask_logits
from lmforge.infer.sampling import SamplingParams, make_generator, sample_next
from lmforge.nn.kv_cache import kv_cache_dtype as cache_dtype_of


@dataclass
class Generation:
    """One row's result: new token ids (no EOS), their text (None without a tokenizer) and why it ended."""

    ids: list[int]
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length"


def context_length(model: torch.nn.Module) -> int:
    return int(model.cfg.block_size)


def check_prompts(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Validate prompts and return how many new tokens fit in the context (a warning says when that
    is fewer than asked)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise LMForgeError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise LMForgeError("no prompts given")
    vocab = int(model.cfg.vocab_size)
    for p in prompts:
        if len(p) == 0:
            raise LMForgeError("prompt is empty; give at least one token")
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise LMForgeError(f"prompt token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
    n_prompt = max(len(p) for p in prompts)
    ctx = context_length(model)
    if n_prompt > ctx:
        raise LMForgeError(f"prompt has {n_prompt} tokens but the model's context is {ctx}")
    if n_prompt + max_new_tokens > ctx:
        fits = ctx - n_prompt
        warnings.warn(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                      f"({ctx}); generating at most {fits} new tokens", stacklevel=_caller_stacklevel())
        return fits
    return max_new_tokens


def _caller_stacklevel() -> int:
    """Stack level of the first frame outside lmforge and torch, so a warning names the user's line."""
    lmforge_dir = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(lmforge_dir)
                                 or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(idx_BT, pad_mask_BT or None when every prompt has the same length)."""
    T = max(len(p) for p in prompts)
    if all(len(p) == T for p in prompts):
        return torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device), None
    rows = [[pad_id] * (T - len(p)) + list(p) for p in prompts]
    mask = [[False] * (T - len(p)) + [True] * len(p) for p in prompts]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.bool, device=device))


@torch.inference_mode()
def token_stream(model: torch.nn.Module, idx_BT: torch.Tensor, pad_mask_BT: torch.Tensor | None, n_new: int,
                 params: SamplingParams, generator: torch.Generator | None,
                 cache_dtype: torch.dtype | None = None,
                 constraints: Sequence[TokenConstraint | None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, shape (B,), `n_new` times (stop iterating to stop early).
    The KV cache stores keys and values in `cache_dtype` (None: the model's dtype); `constraints`
    (one per row, or None) mask each row's logits before sampling.

    The hot loop: one model call on one position per step, sampling on (B, V) logits; no work
    that grows with the sequence besides the attention itself.
    """
    if n_new <= 0:
        return
    B, T = idx_BT.shape
    was_training = model.training
    model.eval()
    try:
        # The last sampled token is never fed back, so the cache needs T + n_new - 1 slots.
        cache = model.new_cache(B, T + n_new - 1, dtype=cache_dtype)
        seen_BV = None
        if params.repetition_penalty != 1.0:
            V = int(model.cfg.vocab_size)
            # One spare column takes the padding slots, so padding never counts as "seen".
            seen_BW = torch.zeros(B, V + 1, dtype=torch.bool, device=idx_BT.device)
            src_BT = idx_BT if pad_mask_BT is None else idx_BT.masked_fill(~pad_mask_BT, V)
            seen_BW.scatter_(1, src_BT, True)
            seen_BV = seen_BW[:, :V]
        logits_BV = model(idx_BT, pad_mask_BT=pad_mask_BT, cache=cache, last_only=True)[:, -1]
        for step in range(n_new):
            if constraints is not None:
                logits_BV = mask_logits(logits_BV, constraints)
            tok_B = sample_next(logits_BV, params, generator, seen_BV)
            if constraints is not None:
                accept_tokens(constraints, tok_B)
            yield tok_B
            if step + 1 == n_new:
                break
            if seen_BV is not None:
                seen_BV.scatter_(1, tok_B[:, None], True)
            logits_BV = model(tok_B[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)


class TextTracker:
    """Incremental detokenizer for one row, with stop strings.

    `push(token)` decodes only a short window of recent tokens; text becomes "committed" once it
    holds complete characters and cannot be the start of a stop string. `take()` returns the text
    committed since the last call (the streamed pieces).
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded last time, kept as context for the next decode
        self.read = 0
        self.prefix_text = ""
        self.parts: list[str] = []  # committed text
        self.tail = ""  # decoded but held back: it could be the start of a stop string
        self.taken = 0
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self.n_tokens = 0  # tokens consumed up to the one that completed a stop string

    def push(self, token: int) -> bool:
        """Add one generated token; True once a stop string has appeared."""
        if self.stopped:
            return True
        self.ids.append(token)
        new_text = self.tok.decode(self.ids[self.prefix:])
        # A trailing U+FFFD means a multi-byte character is still incomplete: wait for more tokens.
        if len(new_text) > len(self.prefix_text) and not new_text.endswith("\ufffd"):
            self._add(new_text[len(self.prefix_text):])
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        return self.stopped

    def _add(self, delta: str) -> None:
        s = self.tail + delta
        if self.stops:
            hits = [(i, stop) for stop in self.stops if (i := s.find(stop)) >= 0]
            if hits:
                at, self.matched = min(hits, key=lambda hit: hit[0])  # the earliest; a tie: the first listed
                self.parts.append(s[:at])
                self.tail = ""
                self.stopped = True
                self.n_tokens = len(self.ids)
                return
        hold = 0
        for k in range(min(self.max_stop - 1, len(s)), 0, -1):
            suffix = s[-k:]
            if any(stop.startswith(suffix) for stop in self.stops):
                hold = k
                break
        self.parts.append(s[:len(s) - hold])
        self.tail = s[len(s) - hold:]

    def finish(self) -> None:
        """End of generation: release what is left (an incomplete character decodes as U+FFFD)."""
        if not self.stopped:
            new_text = self.tok.decode(self.ids[self.prefix:])
            if len(new_text) > len(self.prefix_text):
                self._add(new_text[len(self.prefix_text):])
                self.prefix = self.read = len(self.ids)
                self.prefix_text = ""
        if not self.stopped:
            self.parts.append(self.tail)
            self.tail = ""
            self.n_tokens = len(self.ids)

    def take(self) -> str:
        piece = "".join(self.parts[self.taken:])
        self.taken = len(self.parts)
        return piece

    @property
    def text(self) -> str:
        return "".join(self.parts) + self.tail


def normalize_stop(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stops = list(stop)
    for s in stops:
        if not isinstance(s, str):
            raise LMForgeError(f"stop strings must be strings, got {s!r}")
    return [s for s in stops if s]


def _model_device(model: torch.nn.Module) -> torch.device:
    return model.tok_emb.weight.device


def stop_id_set(eos_id: int | Iterable[int] | None) -> set[int]:
    """eos_id as given to generate: one id, several (EOS and a chat template's end-of-turn), or None."""
    if eos_id is None:
        return set()
    if isinstance(eos_id, int):
        return {eos_id}
    return {int(i) for i in eos_id}


@dataclass
class Settings:
    """A generate call's arguments, checked: what to sample with, where to stop, how many tokens."""

    params: SamplingParams
    stops: list[str]
    stop_ids: set[int]
    n_new: int
    cache_dtype: torch.dtype | None
    generator: torch.Generator | None

    @classmethod
    def check(cls, model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, repetition_penalty: float, eos_id: int | Iterable[int] | None,
              stop: str | Sequence[str] | None, tokenizer: Any, seed: int | None,
              kv_cache_dtype: str | None) -> "Settings":
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        cache_dtype = cache_dtype_of(kv_cache_dtype)
        stops = normalize_stop(stop)
        if stops and tokenizer is None:
            raise LMForgeError("stop strings need a tokenizer, and this model has none")
        n_new = check_prompts(model, prompts, max_new_tokens)
        generator = None if params.greedy else make_generator(_model_device(model), seed)
        return cls(params, stops, stop_id_set(eos_id), n_new, cache_dtype, generator)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_id: int | Iterable[int] | None = None, pad_id: int | None = None,
             stop: str | Sequence[str] | None = None, tokenizer: Any = None, seed: int | None = None,
             decode_text: bool = True, kv_cache_dtype: str | None = None,
             grammar: Grammar | None = None) -> list[Generation]:
    """Generate for a batch of token-id prompts (any lengths). Returns one `Generation` per prompt.

    temperature 0 = greedy. `stop` strings need `tokenizer`; with a tokenizer and `decode_text`
    each result carries its text (cut before the first stop string). The ids of a row that hit a
    stop string run up to and including the token that completed it. `kv_cache_dtype`: "auto"
    (None, the model's dtype), "fp32" or "bf16". `grammar` constrains every row (its own matcher
    each); a row cut by `max_new_tokens` before the grammar completes ends with "length".
    """
    settings = Settings.check(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                              stop, tokenizer, seed, kv_cache_dtype)
    stops, stop_ids, n_new = settings.stops, settings.stop_ids, settings.n_new
    device = _model_device(model)
    B = len(prompts)
    idx_BT, pad_mask_BT = left_pad(prompts, pad_id if pad_id is not None else 0, device)

    out_BN = torch.empty(B, max(n_new, 0), dtype=torch.long, device=device)
    trackers = [TextTracker(tokenizer, stops) for _ in range(B)] if stops else None
    finished = [False] * B  # only maintained with stop strings (Python-side per-row state)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    constraints = None if grammar is None else [grammar.matcher(stop_ids) for _ in range(B)]
    n = 0
    for tok_B in token_stream(model, idx_BT, pad_mask_BT, n_new, settings.params, settings.generator,
                              settings.cache_dtype, constraints):
        out_BN[:, n] = tok_B
        n += 1
        if trackers is not None:
            toks = tok_B.tolist()
            for b, tr in enumerate(trackers):
                if finished[b]:
                    continue
                if toks[b] in stop_ids:
                    finished[b] = True
                elif tr.push(toks[b]):
                    finished[b] = True
            if all(finished):
                break
        elif stop_ids:
            for i in stop_ids:
                done_B |= tok_B == i
            if bool(done_B.all()):
                break

    results = []
    for b, row in enumerate(out_BN[:, :n].tolist()):
        reason = "length"
        first = next((i for i, tok in enumerate(row) if tok in stop_ids), None)
        if first is not None:
            row = row[:first]
            reason = "eos"
        text = None
        if trackers is not None:
            tr = trackers[b]
            if tr.stopped:
                row, reason = row[:tr.n_tokens], "stop"
            tr.finish()
            text = tr.text if decode_text else None
        elif tokenizer is not None and decode_text:
            text = tokenizer.decode(row)
        results.append(Generation(row, text, reason))
    return results


def generate_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], **kwargs: Any) -> list[list[int]]:
    """Only the new token ids of each prompt (same keywords as `generate`)."""
    return [g.ids for g in generate(model, prompts, decode_text=False, **kwargs)]


def stream_text(model: torch.nn.Module, tokenizer: Any, prompt: Sequence[int], *, max_new_tokens: int = 64,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float = 1.0, eos_id: int | Iterable[int] | None = None,
                stop: str | Sequence[str] | None = None, seed: int | None = None,
                kv_cache_dtype: str | None = None, grammar: Grammar | None = None) -> Iterator[str]:
    """Yield text pieces of one prompt's continuation as tokens are produced. The pieces join to the
    text `generate` returns for the same settings; none ends inside a multi-byte character.
    Arguments are checked here, before the first piece is asked for."""
    settings = Settings.check(model, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_id,
                              stop, tokenizer, seed, kv_cache_dtype)
    idx_1T = torch.tensor([list(prompt)], dtype=torch.long, device=_model_device(model))
    constraints = None if grammar is None else [grammar.matcher(settings.stop_ids)]
    steps = token_stream(model, idx_1T, None, settings.n_new, settings.params, settings.generator,
                         settings.cache_dtype, constraints)
    return text_pieces(tokenizer, _first_row(steps), settings.stop_ids, settings.stops)


def _first_row(steps: Iterator[torch.Tensor]) -> Iterator[int]:
    try:
        for tok_B in steps:
            yield int(tok_B[0])
    finally:
        steps.close()


def text_pieces(tokenizer: Any, tokens: Iterator[int], stop_ids: set[int], stops: list[str]) -> Iterator[str]:
    """The text of one row's `tokens` in pieces as they come, until a stop id, a stop string or the
    end (then `tokens` is closed)."""
    tracker = TextTracker(tokenizer, stops)
    try:
        for tok in tokens:
            if tok in stop_ids:
                break
            stopped = tracker.push(tok)
            piece = tracker.take()
            if piece:
                yield piece
            if stopped:
                break
    finally:
        tokens.close()
    tracker.finish()
    piece = tracker.take()
    if piece:
        yield piece
