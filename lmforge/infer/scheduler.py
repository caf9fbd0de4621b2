"""Continuous batching: one scheduler thread owns the model and serves many requests at once.

    submit(request, callback) --> waiting queue (bounded) --admit between decode steps--> running batch
    each iteration:  drop cancelled sequences  ->  prefill waiting prompts (chunked, a token budget
                     per iteration so a long prompt cannot stall running streams)  ->  one decode step
                     for every running sequence  ->  per-sequence sampling, stop rules, callbacks

KV cache: one `KVCache` row ("slot") per running sequence, each with its own length; nothing is
re-padded per step. Running sequences occupy rows 0..n-1 (a finished sequence's row is refilled by
moving the last row into it, one copy per finished sequence) and the sequence being prefilled
the row after them, so a decode step is the model's forward pass on the cache's rows 0..n-1
(`KVCache.rows`), each row attending to its own length.

Results do not depend on the company a request keeps: every sequence has its own sampling settings,
its own `torch.Generator` (seeded from the request), stop strings, stop ids and token budget, and it
is sampled with the same functions `LLM.generate` uses, one row at a time.

With a draft model each running sequence takes its own speculative step per iteration
(infer/speculative.py: one target forward on its row for several tokens; the draft keeps a cache of
its own, rows mirrored with the target's); greedy output stays the same, sampled output keeps its
distribution. Sequences asking for logprobs or OpenAI penalties decode without guesses.

LoRA (serving several adapters on one base, `lmforge serve BASE --lora NAME=DIR`): each sequence keeps
the adapter it asked for (`GenerationRequest.adapter`; None: the model as loaded, i.e. the adapter
active then, if any: a LoRA run served alone keeps its adapter), and every forward pass of the
model, prefill, decode or speculative, runs under `adapter_rows` with the adapters of the rows it
computes, so sequences of different adapters share one batch and one KV cache.

Structured output: a request's `grammar` (infer/grammar.py) gives its sequence a matcher of its own;
at the sampling point the tokens it forbids are masked out of that sequence's logits, and each
sampled token advances it. Constrained sequences decode without guesses too.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.models.registry import CONTINUE, family_of
from lmforge.infer.generate import TextTracker, normalize_stop
from lmforge.infer.grammar import Grammar, mask_logits
from lmforge.infer.sampling import SamplingParams, make_generator, process_logits, sample_next
from lmforge.infer.speculative import DraftModel, SpeculativeStats, check_draft, check_positive, speculative_step
from lmforge.nn.kv_cache import kv_cache_dtype as cache_dtype_of
from lmforge.nn.lora import adapter_rows, has_lora, lora_modules

log = logging.getLogger("lmforge.scheduler")


class QueueFull(LMForgeError):
    """The waiting queue is at its bound (the server answers 429)."""


class InvalidRequest(LMForgeError):
    """A `GenerationRequest` the scheduler cannot run; `field` names the field at fault (the server
    reports it as the OpenAI error's `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass
class GenerationRequest:
    """One sequence to generate. Token budget, sampling settings and stop rules belong to it alone."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top token's
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] | None = None  # OpenAI: added to these tokens' logits before sampling
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # do not stop at the tokenizer's stop ids (EOS, end of turn)
    logprobs: int | None = None  # per generated token: its logprob and the top-N alternatives
    prompt_logprobs: int | None = None  # the same for the prompt tokens (completions `echo`)
    skip_special_tokens: bool = True  # decoded text never shows control tokens
    adapter: str | None = None  # the LoRA adapter of the model this sequence uses (None: the model as loaded)
    grammar: Grammar | None = None  # structured output: only tokens this grammar allows are sampled


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before sampling settings) and the
    `top` most likely tokens at that position as (id, logprob), best first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class StepOutput:
    """What a callback receives: the tokens a sequence gained since the last call and their text."""

    seq_id: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # only with the first output
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    # what ended a "stop", as vLLM reports it: the stop string, or a stop token id other than the
    # tokenizer's EOS (a request's stop_token_ids, an end-of-turn id); None at EOS and otherwise
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def check_servable(model: torch.nn.Module) -> None:
    """The scheduler batches models whose text continues a prompt through one KV cache (decoders)."""
    family = family_of(model)
    if CONTINUE not in family.can or not hasattr(model, "new_cache"):
        raise LMForgeError(f"lmforge serve generates with decoder-only language models; this model is "
                           f"'{family.name}' ({type(model).__name__})")


class _SkipSpecial:
    """Tokenizer view whose decode drops special tokens (for TextTracker)."""

    def __init__(self, tok: Any):
        self.tok = tok

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special=True)


class _Seq:
    """A sequence's state inside the scheduler."""

    def __init__(self, seq_id: int, req: GenerationRequest, callback: Callable[[StepOutput], None], tokenizer: Any,
                 stop_ids: set[int], device: torch.device, vocab: int):
        self.id = seq_id
        self.req = req
        self.callback = callback
        self.prompt = list(req.prompt_ids)
        self.params = SamplingParams(req.temperature, req.top_k, req.top_p, req.repetition_penalty)
        self.extras = bool(req.min_p or req.presence_penalty or req.frequency_penalty or req.logit_bias)
        self.bias_V = None
        if req.logit_bias:
            self.bias_V = torch.zeros(vocab, device=device)
            self.bias_V[torch.tensor(list(req.logit_bias), device=device)] = torch.tensor(
                [float(v) for v in req.logit_bias.values()], device=device)
        self.stop_ids = stop_ids
        self.generator = None if self.params.greedy else make_generator(device, req.seed)
        stops = normalize_stop(list(req.stop))
        tok = tokenizer
        if tokenizer is not None and req.skip_special_tokens:
            tok = _SkipSpecial(tokenizer)
        self.tracker = TextTracker(tok, stops) if tokenizer is not None else None
        self.generated: list[int] = []
        self.row: int | None = None
        self.n_cached = 0  # prompt/generated tokens whose keys and values are in the cache
        self.pending: int | None = None  # last sampled token, fed at the next decode step
        self.finished = False
        self.max_new = req.max_tokens
        self.seen_V = None
        if self.params.repetition_penalty != 1.0:
            self.seen_V = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen_V[torch.tensor(self.prompt, device=device)] = True
        self.counts_V = torch.zeros(vocab, device=device) if (req.presence_penalty or req.frequency_penalty) else None
        self.prompt_logprobs: list[TokenLogprob] | None = [] if req.prompt_logprobs is not None else None
        self.constraint = None if req.grammar is None else req.grammar.matcher(stop_ids)


class Scheduler:
    """Owns a decoder-only model in one thread and generates for many requests at once.

        sched = Scheduler(model, tokenizer, max_batch=32).start()
        handle = sched.submit(GenerationRequest(ids, max_tokens=20, temperature=0), on_output)
        sched.cancel(handle)      # frees the slot before the next decode step
        sched.stop()

    `on_output(StepOutput)` is called from the scheduler thread (keep it quick; hand off to your
    own thread or event loop). The last output of a sequence has `finish_reason` set.
    `kv_cache_dtype`: "auto" (the model's), "fp32" or "bf16"; `draft`: a smaller decoder over the
    same vocabulary for speculative decoding with `num_draft_tokens` guesses per step.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_batch: int = 32, max_queue: int = 256,
                 max_model_len: int | None = None, prefill_chunk: int = 256, stop_ids: set[int] | None = None,
                 num_threads: int | None = None, kv_cache_dtype: str = "auto", draft: torch.nn.Module | None = None,
                 num_draft_tokens: int = 4):
        check_servable(model)
        if max_batch < 1 or max_queue < 1 or prefill_chunk < 1:
            raise LMForgeError("max_batch, max_queue and prefill_chunk must be positive")
        ctx = int(model.cfg.block_size)
        if max_model_len is None:
            max_model_len = ctx
        if not 1 <= max_model_len <= ctx:
            raise LMForgeError(f"max_model_len must be between 1 and the model's context ({ctx}), got {max_model_len}")
        self.model = model.eval()
        self.adapters = sorted(getattr(model, "lora_settings", {})) if has_lora(model) else []
        # what a request naming no adapter gets: the adapter active when the model came (None: the base)
        self.default_adapter = next((m.active for m in lora_modules(model).values() if m.active), None)
        self.tokenizer = tokenizer
        self.device = model.tok_emb.weight.device
        self.vocab = int(model.cfg.vocab_size)
        self.max_batch, self.max_queue, self.max_model_len = max_batch, max_queue, max_model_len
        self.prefill_chunk = prefill_chunk
        if stop_ids is None:
            stop_ids = set(getattr(tokenizer, "stop_ids", None) or ())
            eos = getattr(tokenizer, "eos_id", None)
            if eos is not None:
                stop_ids.add(eos)
        self.stop_ids = set(stop_ids)
        self.eos_id = getattr(tokenizer, "eos_id", None)  # ending here is no stop_reason (vLLM's rule)
        cache_dtype = cache_dtype_of(kv_cache_dtype)
        self.cache = model.new_cache(max_batch, max_model_len, dtype=cache_dtype)
        self.draft, self.draft_cache, self.num_draft_tokens = draft, None, num_draft_tokens
        self.spec_stats = SpeculativeStats()
        if draft is not None:
            check_positive(num_draft_tokens, "num_draft_tokens")
            check_draft(model, None, draft, None)
            if int(draft.cfg.block_size) < max_model_len:
                raise LMForgeError(f"the draft's context ({draft.cfg.block_size} tokens) is shorter than the "
                                   f"served length ({max_model_len}); set --max-model-len to at most the draft's")
            self.draft = draft.eval()
            self.draft_cache = draft.new_cache(max_batch, max_model_len, dtype=cache_dtype)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # rows 0..len-1, decoding
        self._prefilling: _Seq | None = None  # at row len(_running), prompt partly in the cache
        self._cancel: set[int] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and metrics)
        self.num_threads = num_threads  # torch threads for the model (None: leave torch's setting)

    # ---- public API (any thread) ----------------------------------------------------------------

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest, naming the field, for a request the scheduler cannot run (checked
        again at submit)."""
        if not req.prompt_ids:
            raise InvalidRequest("prompt is empty; give at least one token", "prompt_ids")
        lo, hi = min(req.prompt_ids), max(req.prompt_ids)
        if lo < 0 or hi >= self.vocab:
            bad = lo if lo < 0 else hi
            raise InvalidRequest(f"prompt token id {bad} is outside the model's vocabulary (0..{self.vocab - 1})",
                                 "prompt_ids")
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be a non-negative integer, got {req.max_tokens!r}", "max_tokens")
        if len(req.prompt_ids) + req.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(req.prompt_ids) + req.max_tokens} tokens ({len(req.prompt_ids)} in the messages, "
                f"{req.max_tokens} in the completion). Please reduce the length of the messages or completion.",
                "prompt_ids")
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):  # one at a time: the error names it
            try:
                SamplingParams(**{name: getattr(req, name)})
            except LMForgeError as e:
                raise InvalidRequest(str(e), name) from None
        if not 0.0 <= req.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {req.min_p}", "min_p")
        for t in req.stop_token_ids:
            if not 0 <= t < self.vocab:
                raise InvalidRequest(f"stop token id {t} is outside the model's vocabulary (0..{self.vocab - 1})",
                                     "stop_token_ids")
        for t, v in (req.logit_bias or {}).items():
            if not 0 <= t < self.vocab:
                raise InvalidRequest(
                    f"logit_bias token id {t} is outside the model's vocabulary (0..{self.vocab - 1})", "logit_bias")
            if not -100.0 <= v <= 100.0:
                raise InvalidRequest(f"logit_bias values must be between -100 and 100, got {v} for token {t}",
                                     "logit_bias")
        if req.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer, and this model has none", "stop")
        if req.adapter is not None and req.adapter not in self.adapters:
            raise InvalidRequest(f"no LoRA adapter named '{req.adapter}'; this model has "
                                 f"{', '.join(self.adapters) or 'none'}", "adapter")
        if req.grammar is not None and req.ignore_eos and not req.stop_token_ids:
            raise InvalidRequest(f"{req.grammar.field} needs a stop token to end the output; ignore_eos leaves none",
                                 "ignore_eos")

    def submit(self, req: GenerationRequest, callback: Callable[[StepOutput], None]) -> int:
        """Queue a request; returns its handle (for `cancel`). Raises QueueFull at the queue bound."""
        self.validate(req)
        stop_ids = set() if req.ignore_eos else set(self.stop_ids)
        stop_ids |= set(req.stop_token_ids)
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting (limit {self.max_queue})")
            seq = _Seq(next(self._ids), req, callback, self.tokenizer, stop_ids, self.device, self.vocab)
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq.id

    def cancel(self, handle: int) -> None:
        with self._cond:
            self._cancel.add(handle)
            self._cond.notify_all()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + (self._prefilling is not None)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ---- the scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not (self._waiting or self._running or self._prefilling
                                                      or self._cancel):
                        self._cond.wait()
                    if self._stopping:
                        break
                    cancelled, self._cancel = self._cancel, set()
                try:
                    self._step(cancelled)
                except Exception as e:  # a bug must not take the server down: fail what is in flight
                    log.error("scheduler step failed: %s", traceback.format_exc())
                    self._fail_all(f"internal error in the scheduler: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", reason="cancelled")

    def _step(self, cancelled: set[int]) -> None:
        if cancelled:
            self._drop_cancelled(cancelled)
        budget = self.prefill_chunk
        while budget > 0:
            seq = self._prefilling
            if seq is None:
                if len(self._running) >= self.max_batch:
                    break
                with self._cond:
                    if not self._waiting:
                        break
                    seq = self._waiting.popleft()
                seq.row = len(self._running)
                self._prefilling = seq
            budget -= self._prefill_chunk(seq, budget)
        if self._running:
            self._decode()

    def _drop_cancelled(self, cancelled: set[int]) -> None:
        with self._cond:
            kept = deque()
            for seq in self._waiting:
                if seq.id in cancelled:
                    self._finish(seq, "cancelled")
                else:
                    kept.append(seq)
            self._waiting = kept
        p = self._prefilling
        if p is not None and p.id in cancelled:
            self._prefilling = None
            self._release_row(p.row)
            self._finish(p, "cancelled")
        for seq in [s for s in self._running if s.id in cancelled]:
            self._finish(seq, "cancelled")
            self._release(seq)

    def _release(self, seq: _Seq) -> None:
        """Free a running sequence's row: the last running row moves into it (and the prefilling
        sequence, which sits right after the running rows, moves down by one)."""
        r = self._running.index(seq)
        last = self._running.pop()
        if last is seq:
            self._release_row(r)
        else:
            self._move_row(last.row, r)
            last.row = r
            self._running[r] = last
        p = self._prefilling
        if p is not None:
            self._move_row(p.row, len(self._running))
            p.row = len(self._running)

    def _release_row(self, row: int) -> None:
        for cache in (self.cache, self.draft_cache):
            if cache is not None:
                cache.release(row)

    def _move_row(self, src: int, dst: int) -> None:
        for cache in (self.cache, self.draft_cache):
            if cache is not None:
                cache.move(src, dst)

    def _prefill_chunk(self, seq: _Seq, budget: int) -> int:
        """Feed the next chunk of seq's prompt; after the last chunk sample its first token."""
        n = min(budget, len(seq.prompt) - seq.n_cached)
        start = seq.n_cached
        idx_1T = torch.tensor([seq.prompt[start:start + n]], dtype=torch.long, device=self.device)
        want_prompt_lp = seq.prompt_logprobs is not None
        with self._adapters([seq]):
            logits_1TV = self.model(idx_1T, cache=self.cache.rows(seq.row, seq.row + 1), last_only=not want_prompt_lp)
        seq.n_cached += n
        if want_prompt_lp:
            self._collect_prompt_logprobs(seq, logits_1TV[0], start, n)
        if seq.n_cached < len(seq.prompt):
            return n
        self._prefilling = None
        self._running.append(seq)
        if seq.max_new == 0:
            self._finish(seq, "length")
            self._release(seq)
            return n
        self._sample_rows([seq], logits_1TV[:, -1])
        return n

    def _collect_prompt_logprobs(self, seq: _Seq, logits_TV: torch.Tensor, start: int, n: int) -> None:
        if start == 0:
            seq.prompt_logprobs.append(TokenLogprob(seq.prompt[0], None, []))
        # logits at position t predict prompt token t + 1
        targets = seq.prompt[start + 1:start + n + 1]
        if targets:
            lp_TV = torch.log_softmax(logits_TV[:len(targets)].float(), dim=-1)
            seq.prompt_logprobs.extend(_logprob_entries(lp_TV, targets, seq.req.prompt_logprobs))

    def _decode(self) -> None:
        if self.draft is not None:
            self._decode_speculative()
            return
        idx_B1 = torch.tensor([[s.pending] for s in self._running], dtype=torch.long, device=self.device)
        with self._adapters(self._running):
            logits_BV = self.model(idx_B1, cache=self.cache.rows(0, len(self._running)))[:, -1]
        for s in self._running:
            s.n_cached += 1
        self.steps += 1
        self._sample_rows(list(self._running), logits_BV)

    def _decode_speculative(self) -> None:
        """One speculative step per running sequence, each on its own cache row."""
        self.steps += 1
        for s in list(self._running):
            with self._adapters([s]):  # the draft has no adapters: it guesses for the base, the model checks
                self._speculative_step(s)

    def _speculative_step(self, s: _Seq) -> None:
        """One speculative step of one sequence on its own cache row (plain decoding when it asks for
        logprobs or penalties)."""
        cache = self.cache.rows(s.row, s.row + 1)
        if s.extras or s.req.logprobs is not None or s.constraint is not None:
            idx_11 = torch.tensor([[s.pending]], dtype=torch.long, device=self.device)
            logits_1V = self.model(idx_11, cache=cache)[:, -1]
            s.n_cached += 1
            self._sample_rows([s], logits_1V)
            return
        # guesses stop where the sequence must: its token budget and the last slot of its row
        k = max(0, min(self.num_draft_tokens, s.max_new - len(s.generated) - 1, cache.max_len - s.n_cached - 2))
        tokens = s.prompt + s.generated
        draft = DraftModel(self.draft, self.draft_cache.rows(s.row, s.row + 1))
        guesses, q_KV = draft.propose(tokens, k, s.params, s.generator, s.seen_V)
        new = speculative_step(self.model, cache, s.pending, guesses, q_KV, s.params, s.generator, s.seen_V)
        draft.keep(len(tokens) + len(new) - 1)
        self.spec_stats.add(len(guesses), len(new))
        fed = s.n_cached
        for j, tok in enumerate(new):
            s.n_cached = fed + 1 + j  # what the cache holds once this token is the pending one
            if self._emit(s, tok, None):
                self._release(s)
                break

    def _adapters(self, seqs: Sequence[_Seq]) -> contextlib.AbstractContextManager:
        """The forward passes inside run row b with the adapter of seqs[b] (a no-op without LoRA)."""
        if not self.adapters:
            return contextlib.nullcontext()
        return adapter_rows(self.model, [s.req.adapter or self.default_adapter for s in seqs])

    def _sample_rows(self, seqs: list[_Seq], logits_BV: torch.Tensor) -> None:
        """Pick each sequence's next token (greedy rows together, sampled rows one by one with their
        own generator) and hand it to `_emit`."""
        toks: list[int | None] = [None] * len(seqs)
        plain_greedy = [i for i, s in enumerate(seqs)
                        if s.params.greedy and s.seen_V is None and not s.extras and s.constraint is None]
        if plain_greedy:
            idx = torch.tensor(plain_greedy, device=logits_BV.device)
            picked = logits_BV[idx].float().argmax(dim=-1).tolist()
            for i, t in zip(plain_greedy, picked):
                toks[i] = t
        for i, s in enumerate(seqs):
            if toks[i] is None:
                toks[i] = self._pick(s, logits_BV[i:i + 1])
        lp_rows = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        lps: dict[int, TokenLogprob] = {}
        if lp_rows:
            idx = torch.tensor(lp_rows, device=logits_BV.device)
            lp_RV = torch.log_softmax(logits_BV[idx].float(), dim=-1)
            tops = [seqs[i].req.logprobs for i in lp_rows]
            entries = _logprob_entries(lp_RV, [toks[i] for i in lp_rows], max(tops))
            for i, e, top in zip(lp_rows, entries, tops):
                e.top = e.top[:top]
                lps[i] = e
        finished = []
        for i, s in enumerate(seqs):
            if self._emit(s, toks[i], lps.get(i)):
                finished.append(s)
        for s in finished:
            self._release(s)

    def _pick(self, seq: _Seq, logits_1V: torch.Tensor) -> int:
        seen = seq.seen_V[None] if seq.seen_V is not None else None
        if seq.constraint is not None:
            logits_1V = mask_logits(logits_1V, [seq.constraint])
        if not seq.extras:
            return int(sample_next(logits_1V, seq.params, seq.generator, seen)[0])
        logits_1V = logits_1V.float()
        if seq.bias_V is not None:
            logits_1V = logits_1V + seq.bias_V
        if seq.counts_V is not None:
            r = seq.req
            logits_1V = logits_1V - r.frequency_penalty * seq.counts_V - r.presence_penalty * (seq.counts_V > 0).float()
        logits_1V = process_logits(logits_1V, seq.params, seen)
        if seq.params.greedy:
            return int(logits_1V.argmax(dim=-1)[0])
        probs_1V = logits_1V.softmax(dim=-1)
        if seq.req.min_p:
            probs_1V = probs_1V.masked_fill(probs_1V < seq.req.min_p * probs_1V.max(dim=-1, keepdim=True).values, 0.0)
        return int(torch.multinomial(probs_1V, 1, generator=seq.generator)[0, 0])

    def _emit(self, seq: _Seq, tok: int, lp: TokenLogprob | None) -> bool:
        """Record a sampled token, apply the stop rules and call back. True when the sequence ended."""
        reason = stop_reason = None
        new_ids: list[int] = []
        if seq.constraint is not None:
            seq.constraint.accept(tok)
        if tok in seq.stop_ids:
            reason = "stop"
            stop_reason = None if tok == self.eos_id and not seq.req.ignore_eos else tok
        else:
            seq.generated.append(tok)
            new_ids.append(tok)
            if seq.seen_V is not None:
                seq.seen_V[tok] = True
            if seq.counts_V is not None:
                seq.counts_V[tok] += 1
            if seq.tracker is not None and seq.tracker.push(tok):
                reason, stop_reason = "stop", seq.tracker.matched
            elif len(seq.generated) >= seq.max_new or seq.n_cached + 1 >= self.cache.max_len:
                reason = "length"
        text = ""
        if seq.tracker is not None:
            if reason is not None:
                seq.tracker.finish()
            text = seq.tracker.take()
        logprobs = ([lp] if new_ids else []) if lp is not None else None
        out = StepOutput(seq.id, new_ids, text, logprobs, finish_reason=reason, stop_reason=stop_reason,
                         prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated))
        if seq.prompt_logprobs is not None:
            out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        seq.pending = tok
        if reason is not None:
            seq.finished = True
        self._call(seq, out)
        return reason is not None

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        text = ""
        if seq.tracker is not None and reason != "error":
            seq.tracker.finish()
            text = seq.tracker.take()
        out = StepOutput(seq.id, [], text, finish_reason=reason, prompt_tokens=len(seq.prompt),
                         completion_tokens=len(seq.generated), error=error)
        if seq.prompt_logprobs is not None:
            out.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        self._call(seq, out)

    def _call(self, seq: _Seq, out: StepOutput) -> None:
        try:
            seq.callback(out)
        except Exception:  # a broken consumer cancels its own request, nothing else
            log.error("callback of request %d failed: %s", seq.id, traceback.format_exc())
            self._cancel.add(seq.id)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self._cond:
            seqs = list(self._waiting) + ([self._prefilling] if self._prefilling else []) + list(self._running)
            self._waiting.clear()
        self._prefilling = None
        self._running = []
        for row in range(self.cache.batch):
            self._release_row(row)
        for s in seqs:
            self._finish(s, reason, error=message)


def _logprob_entries(lp_TV: torch.Tensor, targets: Sequence[int], top: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of lp_TV: the target's logprob and the `top` best tokens."""
    tgt = torch.tensor(list(targets), device=lp_TV.device)
    chosen = lp_TV.gather(1, tgt[:, None])[:, 0].tolist()
    out = []
    if top and top > 0:
        vals, ids = lp_TV.topk(min(top, lp_TV.shape[-1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
    for t in range(len(targets)):
        alts = list(zip(ids[t], vals[t])) if top and top > 0 else []
        out.append(TokenLogprob(int(targets[t]), _finite(chosen[t]), [(i, _finite(v)) for i, v in alts]))
    return out


def _finite(x: float) -> float:
    """JSON has no -inf: a token with zero probability gets the lowest float instead."""
    return x if math.isfinite(x) else -9999.0


@dataclass
class Completed:
    """A finished sequence, gathered from its outputs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None


def run_all(sched: Scheduler, requests: Sequence[GenerationRequest], timeout: float = 300.0) -> list[Completed]:
    """Submit every request at once and wait for all of them (blocking helper for tests and scripts)."""
    results = [Completed() for _ in requests]
    done = threading.Semaphore(0)

    def collector(res: Completed) -> Callable[[StepOutput], None]:
        def on_output(out: StepOutput) -> None:
            res.token_ids += out.token_ids
            res.text += out.text
            res.logprobs += out.logprobs or []
            if out.prompt_logprobs is not None:
                res.prompt_logprobs = out.prompt_logprobs
            if out.finish_reason is not None:
                res.finish_reason, res.stop_reason, res.error = out.finish_reason, out.stop_reason, out.error
                done.release()
        return on_output

    for req, res in zip(requests, results):
        sched.submit(req, collector(res))
    deadline = time.monotonic() + timeout
    for _ in requests:
        if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError("requests did not finish in time")
    return results
