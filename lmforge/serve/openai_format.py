"""OpenAI response bodies of /v1/completions and /v1/chat/completions from the scheduler's outputs:
whole (JSON) or streamed (server-sent events), with logprobs and usage, as OpenAI and vLLM write
them."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from lmforge.infer.scheduler import StepOutput, TokenLogprob
from lmforge.tool_parser import (ForcedCallStream, ToolCall, ToolCallStream, parse_forced_calls, parse_tool_calls,
                                 template_family)
from lmforge.serve.engine import ChoiceOutput
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest, ServeError, StreamOptions

Batches = AsyncIterator[list[tuple[int, StepOutput]]]  # (choice index, output), as `Choices.batches` gives
SSE_DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(o: StepOutput | ChoiceOutput) -> str:
    return "length" if o.finish_reason == "length" else "stop"


def error_event(o: StepOutput) -> str:
    """A sequence that failed mid-stream: the error body as an event (the status is already 200)."""
    return sse(ServeError(500, o.error or "generation failed").body())


class EventStream:
    """The frame of a streamed response: chunks of one choice each (with "usage": null when the
    client asked for usage), an error event for a failed sequence, the usage event, [DONE]."""

    def __init__(self, base: dict, stream_options: StreamOptions | None):
        self.base = base
        self.include_usage = bool(stream_options and stream_options.include_usage)

    def chunk(self, choice: dict) -> str:
        c = {**self.base, "choices": [choice]}
        if self.include_usage:
            c["usage"] = None
        return sse(c)

    async def events(self, batches: Batches, on_output: Callable[[int, StepOutput], list[str]], prompt_tokens: int,
                     first: str = "") -> AsyncIterator[str]:
        """`first`, then per batch the events `on_output` makes of each choice's output, then the
        usage event (when asked for) and [DONE]."""
        if first:
            yield first
        done: dict[int, int] = {}  # completion tokens of each finished choice
        async for batch in batches:
            parts = []
            for idx, o in batch:
                if o.finish_reason == "error":
                    parts.append(error_event(o))
                    continue
                parts += on_output(idx, o)
                if o.finish_reason:
                    done[idx] = o.completion_tokens
            if parts:
                yield "".join(parts)
        if self.include_usage:
            yield sse({**self.base, "choices": [], "usage": usage(prompt_tokens, sum(done.values()))})
        yield SSE_DONE


class CompletionFormat:
    """Response bodies of /v1/completions."""

    def __init__(self, tokenizer: Any, req: CompletionRequest, texts: list[str | None], prompts: list[list[int]]):
        self.tok, self.req, self.texts, self.prompts = tokenizer, req, texts, prompts

    def _tokstr(self, i: int) -> str:
        return self.tok.decode([i]) if self.tok is not None else str(i)

    def _prompt_text(self, p: int) -> str:
        t = self.texts[p]
        if t is not None:
            return t
        return self.tok.decode(self.prompts[p], skip_special=self.req.skip_special_tokens) if self.tok else ""

    def logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        tokens, lps, tops, offs = [], [], [], []
        for e in entries:
            s = self._tokstr(e.token_id)
            tokens.append(s)
            lps.append(e.logprob)
            if e.logprob is None:
                tops.append(None)
            else:
                top = {self._tokstr(i): v for i, v in e.top}
                top.setdefault(s, e.logprob)  # the chosen token is always listed (up to logprobs + 1 entries)
                tops.append(top)
            offs.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def full(self, rid: str, created: int, model: str, outs: list[ChoiceOutput]) -> dict:
        n = self.req.n
        items = []
        for idx, o in enumerate(outs):
            p = idx // n
            prefix = self._prompt_text(p) if self.req.echo else ""
            lp = None
            if self.req.logprobs is not None:
                entries = (o.prompt_logprobs or []) + o.logprobs if self.req.echo else o.logprobs
                lp = self.logprobs(entries, 0)
            items.append({"index": idx, "text": prefix + o.text, "logprobs": lp,
                          "finish_reason": finish_reason(o), "stop_reason": o.stop_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": items,
                "usage": usage(sum(len(p) for p in self.prompts), sum(o.completion_tokens for o in outs)),
                "system_fingerprint": None}

    def stream(self, rid: str, created: int, model: str, batches: Batches, n_choices: int) -> AsyncIterator[str]:
        n = self.req.n
        frame = EventStream({"id": rid, "object": "text_completion", "created": created, "model": model},
                            self.req.stream_options)
        offsets = [0] * n_choices
        started = [False] * n_choices

        def on_output(idx: int, o: StepOutput) -> list[str]:
            text, entries = o.text, list(o.logprobs or [])
            if not started[idx]:
                started[idx] = True
                if self.req.echo:
                    text = self._prompt_text(idx // n) + text
                    entries = (o.prompt_logprobs or []) + entries
            lp = None
            if self.req.logprobs is not None:
                lp = self.logprobs(entries, offsets[idx])
                offsets[idx] += sum(len(s) for s in lp["tokens"])
            reason = finish_reason(o) if o.finish_reason else None
            if not (text or reason or (lp and lp["tokens"])):
                return []
            return [frame.chunk({"index": idx, "text": text, "logprobs": lp, "finish_reason": reason,
                                 "stop_reason": o.stop_reason})]
        return frame.events(batches, on_output, sum(len(p) for p in self.prompts))


class ChatFormat:
    """Response bodies of /v1/chat/completions. With tools (and tool_choice not "none") each reply is
    read by the tool-call parser of the chat template's family: calls become `message.tool_calls`
    (streamed as `delta.tool_calls`: a first chunk with id, type and name, then the arguments) and
    the finish reason "tool_calls"; text that is not a call stays the content."""

    def __init__(self, tokenizer: Any, req: ChatCompletionRequest, prompt_ids: list[int]):
        self.tok, self.req, self.ids = tokenizer, req, prompt_ids
        self.family = None
        if req.template_tools():
            self.family = template_family(getattr(tokenizer, "chat_template", None))
            if self.family is None:
                raise ServeError(400, "this model's chat template does not render tools, so it cannot call them",
                                 param="tools")

    def logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(i: int, v: float) -> dict:
            s = self.tok.decode([i])
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                            for e in entries]}

    def _calls(self, calls: list[ToolCall]) -> list[ToolCall]:
        return calls if self.req.parallel_tool_calls else calls[:1]

    def _message(self, o: ChoiceOutput) -> tuple[dict, str]:
        if self.family is None:
            return {"role": "assistant", "content": o.text, "refusal": None, "tool_calls": []}, finish_reason(o)
        forced = self.req.forced_tool_choice()
        if forced is not None:  # a constrained reply is only calls; one cut short stays text
            calls = parse_forced_calls(o.text, forced)
            content = "" if calls else o.text
        else:
            content, calls = parse_tool_calls(o.text, self.family)
        calls = self._calls(calls)
        reason = "tool_calls" if calls and finish_reason(o) == "stop" else finish_reason(o)
        return ({"role": "assistant", "content": content if content or not calls else None, "refusal": None,
                 "tool_calls": [c.openai() for c in calls]}, reason)

    def full(self, rid: str, created: int, model: str, outs: list[ChoiceOutput]) -> dict:
        items = []
        for i, o in enumerate(outs):
            message, reason = self._message(o)
            items.append({"index": i, "message": message,
                          "logprobs": self.logprobs(o.logprobs) if self.req.logprobs else None,
                          "finish_reason": reason, "stop_reason": o.stop_reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": items,
                "usage": usage(len(self.ids), sum(o.completion_tokens for o in outs)), "system_fingerprint": None}

    def stream(self, rid: str, created: int, model: str, batches: Batches, n_choices: int) -> AsyncIterator[str]:
        frame = EventStream({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model},
                            self.req.stream_options)
        forced = self.req.forced_tool_choice()
        parsers = [ForcedCallStream(forced) if forced is not None else ToolCallStream(self.family)
                   for _ in range(n_choices)] if self.family else []
        n_calls = [0] * n_choices

        def chunk(idx: int, delta: dict, lp: dict | None, reason: str | None,
                  stop_reason: int | str | None = None) -> str:
            return frame.chunk({"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason,
                                "stop_reason": stop_reason})

        def tool_events(idx: int, events: list, lp: dict | None) -> list[str]:
            parts = []
            for kind, value in events:
                if kind == "content":
                    parts.append(chunk(idx, {"content": value}, lp, None))
                    lp = None
                elif self.req.parallel_tool_calls or n_calls[idx] == 0:
                    k = n_calls[idx]
                    n_calls[idx] += 1
                    head = {"index": k, "id": value.id, "type": "function",
                            "function": {"name": value.name, "arguments": ""}}
                    parts.append(chunk(idx, {"tool_calls": [head]}, None, None))
                    parts.append(chunk(idx, {"tool_calls": [{"index": k, "function": {"arguments": value.arguments}}]},
                                       None, None))
            if lp and lp["content"]:  # tokens held back by the parser still report their logprobs
                parts.append(chunk(idx, {"content": ""}, lp, None))
            return parts

        def on_output(idx: int, o: StepOutput) -> list[str]:
            parts = []
            lp = self.logprobs(o.logprobs or []) if self.req.logprobs else None
            if parsers:
                parts += tool_events(idx, parsers[idx].feed(o.text), lp)
                if o.finish_reason:
                    parts += tool_events(idx, parsers[idx].finish(), None)
            elif o.text or (lp and lp["content"]):
                parts.append(chunk(idx, {"content": o.text}, lp, None))
            if o.finish_reason:
                reason = finish_reason(o)
                if n_calls[idx] and reason == "stop":
                    reason = "tool_calls"
                parts.append(chunk(idx, {}, None, reason, o.stop_reason))
            return parts
        roles = "".join(chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(n_choices))
        return frame.events(batches, on_output, len(self.ids), first=roles)
