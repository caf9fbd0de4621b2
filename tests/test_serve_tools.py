"""Tool calling through /v1/chat/completions: the official openai client parses the tool calls of
whole and streamed replies; follow-up tool messages render into the prompt; bad tool requests are
OpenAI-shaped 400s naming the field.

The model is a scripted stand-in at the engine's scheduler seam (it replies with a given text, in
pieces), so the tests control exactly what the "model" writes; the prompt it receives is recorded
and compared with the chat template's rendering."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from lmforge.infer.scheduler import GenerationRequest, StepOutput
from lmforge.serve.app import create_app
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import Engine
from lmforge.tokenizer import CHATML_TEMPLATE

from serve_fixtures import NAME, ServerThread, make_llm
from tool_templates import LLAMA31

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
COUNT = {"type": "function", "function": {
    "name": "count", "description": "Count a word in a list.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"},
                                                    "words": {"type": "array", "items": {"type": "string"}}},
                   "required": ["word", "words"]}}}
ONE_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 + 385"}}\n</tool_call>'
TWO_CALLS = ('Let me compute.\n' + ONE_CALL +
             '\n<tool_call>\n{"name": "count", "arguments": {"word": "fig", "words": ["fig", "pear"]}}\n</tool_call>')


class ScriptedScheduler:
    """The scheduler's surface for the engine: each submitted sequence "generates" the next scripted
    reply, delivered in pieces of `piece` characters from a thread, then stops."""

    max_model_len, vocab, max_queue, num_waiting, num_running, spec_stats = 512, 300, 64, 0, 0, None

    def __init__(self, piece: int = 3):
        self.replies: list[str] = []
        self.prompts: list[list[int]] = []
        self.piece = piece
        self.next_id = 0

    def validate(self, req: GenerationRequest) -> None:
        pass

    def cancel(self, handle: int) -> None:
        pass

    def submit(self, req: GenerationRequest, callback) -> int:
        self.prompts.append(list(req.prompt_ids))
        text = self.replies.pop(0)
        sid = self.next_id = self.next_id + 1

        def run():
            pieces = [text[i:i + self.piece] for i in range(0, len(text), self.piece)] or [""]
            for n, p in enumerate(pieces, 1):
                time.sleep(0.001)
                callback(StepOutput(sid, [7], p, finish_reason="stop" if n == len(pieces) else None,
                                    completion_tokens=n))
        threading.Thread(target=run, daemon=True).start()
        return sid


@pytest.fixture(scope="module")
def served():
    llm = make_llm(chat_template=CHATML_TEMPLATE)
    sched = ScriptedScheduler()
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=Engine(sched, llm.tokenizer)))
    yield srv, sched, llm
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=30)


ASK = [{"role": "user", "content": "What is 47 + 385?"}]


def test_tool_call_whole(served, client):
    _, sched, llm = served
    sched.replies.append(TWO_CALLS)
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[CALC, COUNT], tool_choice="auto")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me compute."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "calculator", {"expression": "47 + 385"}),
        ("function", "count", {"word": "fig", "words": ["fig", "pear"]})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls) and calls[0].id != calls[1].id
    # the prompt the model saw: the conversation and the tools, rendered by the chat template
    assert sched.prompts[-1] == llm.tokenizer.apply_chat_template(ASK, tools=[CALC, COUNT], add_generation_prompt=True)


def test_parallel_tool_calls_false_keeps_the_first(served, client):
    served[1].replies.append(TWO_CALLS)
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[CALC, COUNT], parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["calculator"]


def test_plain_reply_with_tools_and_tool_choice_none(served, client):
    _, sched, llm = served
    sched.replies.append("Answer: 432")
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[CALC])
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == \
        ("Answer: 432", [], "stop")
    sched.replies.append(ONE_CALL)  # "none": the tools are not shown and nothing is parsed as a call
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[CALC], tool_choice="none")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ONE_CALL, "stop")
    assert sched.prompts[-1] == llm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True)


def test_streamed_tool_calls_match_openai_chunks(served, client):
    served[1].replies.append(TWO_CALLS)
    stream = client.chat.completions.create(model=NAME, messages=ASK, tools=[CALC, COUNT], stream=True)
    content, calls, reasons = "", {}, []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.id is not None:  # the first chunk of a call: id, type and name
                assert tc.type == "function" and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                calls[tc.index]["arguments"] += tc.function.arguments
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert content.strip() == "Let me compute."
    assert reasons == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("calculator", {"expression": "47 + 385"}), ("count", {"word": "fig", "words": ["fig", "pear"]})]


def test_stream_helper_of_the_openai_client(served, client):
    served[1].replies.append(ONE_CALL)
    with client.chat.completions.stream(model=NAME, messages=ASK, tools=[CALC]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": "47 + 385"})
    assert final.choices[0].finish_reason == "tool_calls"


def test_follow_up_tool_messages_render_into_the_prompt(served, client):
    _, sched, llm = served
    sched.replies.append(ONE_CALL)
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=[CALC]).choices[0].message
    call = first.tool_calls[0]
    follow = ASK + [first.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "432"}]
    sched.replies.append("Answer: 432")
    r = client.chat.completions.create(model=NAME, messages=follow, tools=[CALC])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Answer: 432", "stop")
    expected_text = llm.tokenizer.render_chat(
        ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "calculator", "arguments": {"expression": "47 + 385"}}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "432"}], add_generation_prompt=True, tools=[CALC])
    assert "<tool_response>\n432\n</tool_response>" in expected_text
    assert llm.tokenizer.decode(sched.prompts[-1]) == expected_text


@pytest.mark.parametrize("body,param,message", [
    ({"tool_choice": {"type": "function", "function": {"name": "sum"}}}, "tool_choice",
     "tool_choice names the function 'sum', which is not among the tools (calculator)"),
    ({"tool_choice": "required", "guided_regex": "a+"}, "guided_regex", "tool_choice 'required' constrains the "
     "reply to tool calls; it cannot be combined with guided_regex"),
    ({"tool_choice": "auto", "tools": None}, "tool_choice", "tool_choice is only allowed when tools are given"),
    ({"tools": [CALC, CALC]}, "tools", "tools has two functions named 'calculator'"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "432"}]}, "messages.[1].tool_call_id",
     "messages[1].tool_call_id 'call_x' answers no tool call of an earlier assistant message"),
    ({"messages": ASK + [{"role": "tool", "content": "432"}]}, "messages.[1].tool_call_id",
     "messages[1] is a tool message without 'tool_call_id'"),
    ({"tool_choice": "sometimes"}, "tool_choice", None),
])
def test_bad_tool_requests(served, body, param, message):
    import httpx

    req = {"model": NAME, "messages": ASK, "tools": [CALC], **body}
    r = httpx.post(served[0].url + "/v1/chat/completions", json={k: v for k, v in req.items() if v is not None})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    if message is not None:
        assert err["message"] == message


def test_template_without_tools_is_a_400():
    llm = make_llm(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=Engine(ScriptedScheduler(), llm.tokenizer)))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=NAME, messages=ASK, tools=[CALC])
        assert e.value.body["param"] == "tools"
        assert e.value.body["message"] == "this model's chat template does not render tools, so it cannot call them"
    finally:
        srv.stop()


def test_llama3_family_calls():
    llm = make_llm(chat_template=LLAMA31)
    sched = ScriptedScheduler()
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=Engine(sched, llm.tokenizer)))
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        sched.replies.append('{"name": "calculator", "parameters": {"expression": "1 + 2"}}')
        r = c.chat.completions.create(model=NAME, messages=ASK, tools=[CALC])
        call = r.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments), r.choices[0].message.content) == \
            ("calculator", {"expression": "1 + 2"}, None)
    finally:
        srv.stop()
