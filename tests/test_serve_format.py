"""The server's OpenAI formatting (lmforge/serve/openai_format.py) on known scheduler outputs: the
exact JSON bodies and server-sent events of /v1/completions and /v1/chat/completions, and how
outputs are merged per choice (lmforge/serve/engine.py `merge_outputs`)."""

from __future__ import annotations

import asyncio
import json

from lmforge.infer.scheduler import StepOutput, TokenLogprob
from lmforge.serve.engine import ChoiceOutput, merge_outputs
from lmforge.serve.openai_format import ChatFormat, CompletionFormat
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest


class Letters:
    """A tokenizer whose token i is the i-th lowercase letter."""

    def decode(self, ids, skip_special=True):
        return "".join(chr(ord("a") + i) for i in ids)


def events(*objs) -> str:
    """The SSE text of these JSON objects, compact, in the key order written here."""
    return "".join(f"data: {json.dumps(o, separators=(',', ':'))}\n\n" for o in objs)


def run_stream(fmt, batches, n_choices) -> list[str]:
    async def gen():
        for b in batches:
            yield b

    async def collect():
        return [piece async for piece in fmt.stream("id-1", 5, "m", gen(), n_choices)]
    return asyncio.run(collect())


def test_completion_stream_with_echo_logprobs_and_usage():
    req = CompletionRequest.model_validate_json(
        '{"prompt": "hi", "max_tokens": 2, "echo": true, "logprobs": 1, "stream": true,'
        ' "stream_options": {"include_usage": true}}')
    fmt = CompletionFormat(Letters(), req, ["hi"], [[7, 8]])
    prompt_lp = [TokenLogprob(7, None, []), TokenLogprob(8, -2.0, [(2, -0.5)])]
    batches = [
        [(0, StepOutput(1, [0], "a", [TokenLogprob(0, -0.25, [(0, -0.25), (1, -1.5)])], prompt_lp,
                        prompt_tokens=2, completion_tokens=1))],
        [(0, StepOutput(1, [1], "b", [TokenLogprob(1, -0.75, [(2, -0.5)])], None, "length",
                        prompt_tokens=2, completion_tokens=2))],
    ]
    pieces = run_stream(fmt, batches, 1)
    base = {"id": "id-1", "object": "text_completion", "created": 5, "model": "m"}
    first = {**base, "choices": [{"index": 0, "text": "hia", "logprobs": {
        "tokens": ["h", "i", "a"], "token_logprobs": [None, -2.0, -0.25],
        "top_logprobs": [None, {"c": -0.5, "i": -2.0}, {"a": -0.25, "b": -1.5}], "text_offset": [0, 1, 2]},
        "finish_reason": None, "stop_reason": None}], "usage": None}
    second = {**base, "choices": [{"index": 0, "text": "b", "logprobs": {
        "tokens": ["b"], "token_logprobs": [-0.75], "top_logprobs": [{"c": -0.5, "b": -0.75}], "text_offset": [3]},
        "finish_reason": "length", "stop_reason": None}], "usage": None}
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
    assert pieces == [events(first), events(second), events(usage), "data: [DONE]\n\n"]


def test_completion_stream_skips_empty_outputs_and_has_no_usage_unless_asked():
    req = CompletionRequest.model_validate_json('{"prompt": [1, 2], "n": 2, "stream": true}')
    fmt = CompletionFormat(Letters(), req, [None], [[1, 2]])
    batches = [[(1, StepOutput(2, [], "", completion_tokens=0))],  # nothing to say: no chunk
               [(0, StepOutput(1, [4], "e", finish_reason="stop", completion_tokens=1)),
                (1, StepOutput(2, [5], "f", finish_reason="cancelled", completion_tokens=1))]]
    base = {"id": "id-1", "object": "text_completion", "created": 5, "model": "m"}
    assert run_stream(fmt, batches, 2) == [
        events({**base, "choices": [{"index": 0, "text": "e", "logprobs": None, "finish_reason": "stop",
                                     "stop_reason": None}]},
               {**base, "choices": [{"index": 1, "text": "f", "logprobs": None, "finish_reason": "stop",
                                     "stop_reason": None}]}),
        "data: [DONE]\n\n"]


def test_completion_full_body_echoes_a_token_id_prompt():
    req = CompletionRequest.model_validate_json('{"prompt": [7, 8], "echo": true, "logprobs": 0}')
    fmt = CompletionFormat(Letters(), req, [None], [[7, 8]])
    out = ChoiceOutput([0], "a", [TokenLogprob(0, -0.25, [])], [TokenLogprob(7, None, []), TokenLogprob(8, -2.0, [])],
                       "stop", completion_tokens=1)
    assert fmt.full("cmpl-x", 5, "m", [out]) == {
        "id": "cmpl-x", "object": "text_completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "text": "hia", "logprobs": {
            "tokens": ["h", "i", "a"], "token_logprobs": [None, -2.0, -0.25],
            "top_logprobs": [None, {"i": -2.0}, {"a": -0.25}], "text_offset": [0, 1, 2]},
            "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}, "system_fingerprint": None}


def test_chat_stream_with_logprobs_and_a_failed_choice():
    req = ChatCompletionRequest.model_validate_json(
        '{"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": true, "logprobs": true,'
        ' "top_logprobs": 1}')
    fmt = ChatFormat(Letters(), req, [0, 1, 2])
    batches = [[(0, StepOutput(1, [3], "d", [TokenLogprob(3, -0.5, [(3, -0.5)])], completion_tokens=1)),
                (1, StepOutput(2, [], "", finish_reason="error", error="boom"))],
               [(0, StepOutput(1, [], "", [], finish_reason="stop", completion_tokens=1))]]
    base = {"id": "id-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}

    def chunk(idx, delta, lp, reason):
        return {**base, "choices": [{"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason,
                                     "stop_reason": None}]}

    d = {"token": "d", "logprob": -0.5, "bytes": [100]}
    assert run_stream(fmt, batches, 2) == [
        events(chunk(0, {"role": "assistant", "content": ""}, None, None),
               chunk(1, {"role": "assistant", "content": ""}, None, None)),
        events(chunk(0, {"content": "d"}, {"content": [{**d, "top_logprobs": [d]}]}, None),
               {"error": {"message": "boom", "type": "internal_server_error", "param": None, "code": None}}),
        events(chunk(0, {}, None, "stop")),
        "data: [DONE]\n\n"]


def test_chat_stream_usage_and_full_body():
    req = ChatCompletionRequest.model_validate_json(
        '{"messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": {"include_usage": true}}')
    fmt = ChatFormat(Letters(), req, [0, 1, 2])
    pieces = run_stream(fmt, [[(0, StepOutput(1, [0, 1], "ab", finish_reason="length", completion_tokens=2))]], 1)
    base = {"id": "id-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    assert pieces == [
        events({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None, "stop_reason": None}], "usage": None}),
        events({**base, "choices": [{"index": 0, "delta": {"content": "ab"}, "logprobs": None,
                                     "finish_reason": None, "stop_reason": None}], "usage": None},
               {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length",
                                     "stop_reason": None}], "usage": None}),
        events({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
        "data: [DONE]\n\n"]
    out = ChoiceOutput([0, 1], "ab", [], None, "length", completion_tokens=2)
    assert fmt.full("chatcmpl-x", 5, "m", [out]) == {
        "id": "chatcmpl-x", "object": "chat.completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ab", "refusal": None, "tool_calls": []},
                     "logprobs": None, "finish_reason": "length", "stop_reason": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, "system_fingerprint": None}


def test_stop_reason_is_reported_on_the_choice_that_a_stop_ended():
    """vLLM's `stop_reason`: the stop string or stop token id that ended a choice, null otherwise; in
    the whole body, and in the last streamed chunk of the choice (earlier chunks carry null)."""
    chat = ChatCompletionRequest.model_validate_json('{"messages": [{"role": "user", "content": "x"}], "n": 2, '
                                                     '"stream": true}')
    fmt = ChatFormat(Letters(), chat, [0])
    batches = [[(0, StepOutput(1, [3], "d", finish_reason="stop", stop_reason="END", completion_tokens=1)),
                (1, StepOutput(2, [4], "e", completion_tokens=1))],
               [(1, StepOutput(2, [], "", finish_reason="stop", stop_reason=7, completion_tokens=1))]]
    base = {"id": "id-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}

    def chunk(idx, delta, reason, stop_reason):
        return {**base, "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": reason,
                                     "stop_reason": stop_reason}]}
    assert run_stream(fmt, batches, 2)[1:] == [
        events(chunk(0, {"content": "d"}, None, None), chunk(0, {}, "stop", "END"),
               chunk(1, {"content": "e"}, None, None)),
        events(chunk(1, {}, "stop", 7)),
        "data: [DONE]\n\n"]
    outs = [ChoiceOutput([3], "d", [], None, "stop", 1, stop_reason="END"),
            ChoiceOutput([4], "e", [], None, "stop", 1, stop_reason=7),
            ChoiceOutput([5], "f", [], None, "stop", 1)]  # at EOS: null
    assert [c["stop_reason"] for c in fmt.full("c", 5, "m", outs)["choices"]] == ["END", 7, None]
    completion = CompletionRequest.model_validate_json('{"prompt": "x", "n": 3, "stream": true}')
    cfmt = CompletionFormat(Letters(), completion, ["x"], [[0]])
    assert [c["stop_reason"] for c in cfmt.full("c", 5, "m", outs)["choices"]] == ["END", 7, None]
    streamed = run_stream(cfmt, [[(0, StepOutput(1, [3], "d", finish_reason="stop", stop_reason="END",
                                                 completion_tokens=1))]], 1)
    assert streamed[0] == events({"id": "id-1", "object": "text_completion", "created": 5, "model": "m",
                                  "choices": [{"index": 0, "text": "d", "logprobs": None, "finish_reason": "stop",
                                               "stop_reason": "END"}]})


def test_merge_outputs_coalesces_each_choice_in_order_of_arrival():
    a = StepOutput(1, [1], "b", [TokenLogprob(1, -1.0, [])], [TokenLogprob(9, None, [])], completion_tokens=1)
    b = StepOutput(2, [2], "c", None, completion_tokens=1)
    c = StepOutput(1, [3, 4], "de", [TokenLogprob(3, -0.5, []), TokenLogprob(4, -0.25, [])], None, "stop",
                   stop_reason="\n\n", completion_tokens=3)
    merged = merge_outputs([(1, a), (0, b), (1, c)])
    assert merged == [
        (1, StepOutput(1, [1, 3, 4], "bde", [TokenLogprob(1, -1.0, []), TokenLogprob(3, -0.5, []),
                                               TokenLogprob(4, -0.25, [])], [TokenLogprob(9, None, [])], "stop",
                       stop_reason="\n\n", completion_tokens=3)),
        (0, b)]
    assert a.token_ids == [1] and a.text == "b" and len(a.logprobs) == 1  # the inputs are left as they were
