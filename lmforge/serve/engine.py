"""The engine bridge between HTTP requests and the scheduler (lmforge/infer/scheduler.py), whose
thread owns the model.

Prompts become token ids by infer's rules (`encode_text_prompts`, with the model's generation format
when it has one; `render_chat_prompt`), a request
becomes one `GenerationRequest` per (prompt, sample), and each sequence's outputs cross from the
scheduler thread into the event loop (`Choices`). No model math, no HTTP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from lmforge.errors import LMForgeError
from lmforge.infer.grammar import Grammar, GrammarError
from lmforge.infer.prompt import GenerationFormat, encode_text_prompts, render_chat_prompt
from lmforge.infer.scheduler import GenerationRequest, InvalidRequest, QueueFull, Scheduler, StepOutput, TokenLogprob
from lmforge.infer.speculative import check_draft
from lmforge.serve.config import ServerConfig
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import ChatMessage, ServeError


class Engine:
    """What the routes need: the scheduler, the tokenizer, the model's generation format (None: text
    prompts are continued) and the model's limits."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, model_path: str | None = None,
                 generation_format: GenerationFormat | None = None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.generation_format = generation_format
        self.max_model_len = scheduler.max_model_len
        self.model_path = model_path
        self._mailbox: Mailbox | None = None  # of the event loop that submitted last

    @classmethod
    def from_llm(cls, llm: Any, cfg: ServerConfig, draft: Any = None) -> "Engine":
        """An engine serving `llm`; `draft` (an LLM sharing its tokenizer) turns on speculative decoding."""
        if draft is not None:
            check_draft(llm.model, llm.tokenizer, draft.model, draft.tokenizer)
        sched = Scheduler(llm.model, llm.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                          max_model_len=cfg.max_model_len, num_threads=cfg.threads, kv_cache_dtype=cfg.kv_cache_dtype,
                          draft=None if draft is None else draft.model, num_draft_tokens=cfg.num_draft_tokens)
        return cls(sched.start(), llm.tokenizer, str(llm.path) if llm.path is not None else None,
                   llm.generation_format)

    # ---- prompts --------------------------------------------------------------------------------

    def require_tokenizer(self, param: str | None) -> Any:
        """The tokenizer; a 400 naming `param` (the request field that needs it) when there is none."""
        if self.tokenizer is None:
            raise ServeError(400, "this model has no tokenizer; send prompts as token ids", param=param)
        return self.tokenizer

    def check_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.scheduler.vocab
        for t in ids:
            if not 0 <= t < vocab:
                raise ServeError(400, f"token id {t} is outside the model's vocabulary (0..{vocab - 1})", param=param)

    def completion_prompts(self, prompt: Any) -> tuple[list[str | None], list[list[int]]]:
        """A completions `prompt` (a string, strings, token ids or lists of them) as (each prompt's
        text, or None for token ids; each prompt's token ids, used verbatim when given as ids). With a
        generation format a text prompt is a source: its text is the formatted source (what `echo`
        returns), its ids the format's."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ServeError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if all(isinstance(p, str) for p in prompt):  # the schema allows no mix of texts and ids
            tok = self.require_tokenizer("prompt")
            fmt = self.generation_format
            try:
                ids = encode_text_prompts(tok, prompt, fmt)
            except LMForgeError as e:
                raise ServeError(400, str(e), param="prompt") from None
            return [p if fmt is None else fmt.text(p) for p in prompt], ids
        for row in prompt:
            if not row:
                raise ServeError(400, "prompt is empty", param="prompt")
            self.check_ids(row, "prompt")
        return [None] * len(prompt), [list(row) for row in prompt]

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of `messages` (and `tools`) rendered by the tokenizer's chat template (as `LLM.chat_prompt`)."""
        tok = self.require_tokenizer("messages")
        if getattr(tok, "chat_template", None) is None or not hasattr(tok, "apply_chat_template"):
            raise ServeError(400, "this model has no chat template, so /v1/chat/completions cannot format messages; "
                                  "use /v1/completions with a prompt", param="messages")
        msgs = [m.template_message() for m in messages]
        try:
            return render_chat_prompt(tok, msgs, add_generation_prompt, tools)
        except LMForgeError as e:
            raise ServeError(400, str(e), param="messages") from None
        except Exception as e:  # jinja raises its own errors for messages a template rejects
            raise ServeError(400, f"the chat template could not format these messages: {e}", param="messages") from None

    # ---- generation ------------------------------------------------------------------------------

    def grammar(self, request: Any) -> Grammar | None:
        """The structured-output constraint a request asks for (`response_format`, or vLLM's
        `guided_json` / `guided_regex` / `guided_choice`), compiled; a 400 naming the field that
        cannot be compiled."""
        try:
            return Grammar.from_options(self.tokenizer, self.scheduler.vocab, request.response_format,
                                        request.guided_json, request.guided_regex, request.guided_choice)
        except GrammarError as e:
            raise ServeError(400, str(e), param=e.field) from None

    def submit(self, prompts: list[list[int]], n: int, sampling: GenerationRequest, metrics: Metrics,
               prompt_param: str = "prompt") -> "Choices":
        """Queue one sequence per (prompt, sample) with the settings of `sampling`; choice index =
        prompt_index * n + i. Sample i of a seeded request uses (seed + i) mod 2**64, so choice 0
        matches the same request with n=1. A prompt the scheduler refuses is a 400 naming
        `prompt_param` (the request field the prompt came from)."""
        seed = sampling.seed
        reqs = [replace(sampling, prompt_ids=p, seed=None if seed is None else (seed + i) % 2**64)
                for p in prompts for i in range(n)]
        for r in reqs:
            try:
                self.scheduler.validate(r)
            except InvalidRequest as e:
                raise ServeError(400, str(e), param=prompt_param if e.field == "prompt_ids" else e.field) from None
        limit = self.scheduler.max_queue
        if len(reqs) > limit:
            raise ServeError(400, f"this request asks for {len(reqs)} sequences (prompts x n); the limit is {limit}",
                             param="n")
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        choices = Choices(self.scheduler, self._mailbox, metrics)
        try:
            for i, r in enumerate(reqs):
                choices.handles.append(self.scheduler.submit(r, choices.callback(i)))
        except QueueFull as e:
            choices.cancel()
            raise ServeError(429, str(e)) from None
        choices.prompt_tokens = sum(len(p) for p in prompts)
        metrics.prompt_tokens.inc(choices.prompt_tokens)
        return choices


class Mailbox:
    """Carries outputs from the scheduler thread into the event loop with at most one wake-up of the
    loop per batch of outputs (a decode step of 32 sequences makes one hand-over, not 32; each
    hand-over is a syscall and a fight for the GIL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # any thread
        with self.lock:
            self.items.append((queue, item))
            wake = len(self.items) == 1
        if wake:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class ChoiceOutput:
    """One choice, gathered from all its outputs."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    completion_tokens: int = 0
    error: str | None = None
    stop_reason: int | str | None = None


class Choices:
    """The sequences of one HTTP request: their scheduler handles, and their outputs delivered into
    the event loop as (choice index, StepOutput)."""

    def __init__(self, scheduler: Scheduler, mailbox: Mailbox, metrics: Metrics):
        self.scheduler = scheduler
        self.mailbox = mailbox
        self.metrics = metrics
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.handles: list[int] = []
        self.completion: dict[int, int] = {}  # tokens generated per choice so far
        self.prompt_tokens = 0

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion.values())

    def callback(self, index: int) -> Callable[[StepOutput], None]:
        t0 = time.monotonic()
        last: float | None = None

        def on_output(out: StepOutput) -> None:  # scheduler thread
            nonlocal last
            now = time.monotonic()
            self.completion[index] = out.completion_tokens
            if out.token_ids:
                self.metrics.tokens_generated(len(out.token_ids), now - (t0 if last is None else last),
                                              first=last is None)
                last = now
            self.mailbox.post(self.queue, (index, out))
        return on_output

    def cancel(self) -> None:
        """Free every slot this request holds (a no-op for finished sequences)."""
        for h in self.handles:
            self.scheduler.cancel(h)

    async def batches(self) -> AsyncIterator[list[tuple[int, StepOutput]]]:
        """Batches of outputs, each choice's outputs in a batch merged into one, until every choice
        has finished."""
        left = len(self.handles)
        while left:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            left -= sum(1 for _, o in batch if o.finish_reason is not None)
            yield merge_outputs(batch)

    async def collect(self, is_disconnected: Callable[[], Awaitable[bool]]) -> list[ChoiceOutput]:
        """Every choice, whole. A client gone away (499) cancels them; a failed sequence is a 500."""
        outs = [ChoiceOutput([], "", [], None, None) for _ in self.handles]
        left = len(outs)
        try:
            while left:
                try:
                    i, o = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        raise ServeError(499, "client disconnected") from None
                    continue
                out = outs[i]
                out.token_ids += o.token_ids
                out.text += o.text
                out.logprobs += o.logprobs or []
                if o.prompt_logprobs is not None:
                    out.prompt_logprobs = o.prompt_logprobs
                out.completion_tokens = o.completion_tokens
                if o.finish_reason is not None:
                    out.finish_reason, out.stop_reason, out.error = o.finish_reason, o.stop_reason, o.error
                    left -= 1
        finally:
            if left:
                self.cancel()
        for o in outs:
            if o.finish_reason == "error":
                raise ServeError(500, o.error or "generation failed")
        return outs


def merge_outputs(outs: list[tuple[int, StepOutput]]) -> list[tuple[int, StepOutput]]:
    """Coalesce the outputs of each choice, in order of each choice's first output (a client that
    reads slower than tokens arrive gets them in fewer, larger chunks)."""
    merged: dict[int, StepOutput] = {}
    for i, o in outs:
        m = merged.get(i)
        if m is None:
            merged[i] = replace(o, token_ids=list(o.token_ids),
                                logprobs=list(o.logprobs) if o.logprobs is not None else None)
        else:
            m.token_ids += o.token_ids
            m.text += o.text
            if o.logprobs is not None:
                m.logprobs = (m.logprobs or []) + o.logprobs
            m.prompt_logprobs = m.prompt_logprobs or o.prompt_logprobs
            m.finish_reason, m.stop_reason, m.error = o.finish_reason, o.stop_reason, o.error
            m.completion_tokens = o.completion_tokens
    return list(merged.items())
