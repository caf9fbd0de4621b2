"""The OpenAI-compatible server: each endpoint's schema and errors, streaming format, determinism
under concurrency, cancellation, auth, queue limits and loading state. The `openai` client is the
real client; httpx checks the raw wire format."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from lmforge.serve.app import create_app
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import Engine
from serve_fixtures import NAME, ServerThread, make_llm, offline_ids, slow_down, start_server

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return make_llm()


@pytest.fixture(scope="module")
def server(llm):
    srv, engine = start_server(llm, max_batch=32, max_queue=64)
    yield srv, engine
    engine.scheduler.stop()
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(text: str) -> list:
    """Parse an SSE body: JSON objects, and the literal "[DONE]"."""
    assert text.endswith("data: [DONE]\n\n")
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- completions --------------------------------------------------------------------------------

def test_completion_schema_and_offline_equality(client, llm):
    tok = llm.tokenizer
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-") and r.created > 0
    (c,) = r.choices
    ids = tok.encode_prompt("hello world")
    expected = offline_ids(llm, ids, 10, temperature=0)
    assert c.index == 0 and c.text == tok.decode(expected, skip_special=True)
    assert c.finish_reason == ("length" if len(expected) == 10 else "stop")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(ids) + len(expected)


def test_completion_prompt_forms_n_and_indices(client, llm):
    tok = llm.tokenizer
    a, b = tok.encode("ROMEO: but"), tok.encode("the quick")
    r = client.completions.create(model=NAME, prompt=[a, b], max_tokens=6, temperature=0.8, seed=5, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for idx, c in enumerate(r.choices):
        prompt, i = [a, b][idx // 2], idx % 2
        expected = offline_ids(llm, prompt, 6, temperature=0.8, seed=5 + i)  # sample i uses seed + i
        assert c.text == tok.decode(expected, skip_special=True)
    assert r.usage.prompt_tokens == len(a) + len(b)
    r2 = client.completions.create(model=NAME, prompt=a, max_tokens=6, temperature=0.8, seed=5)
    assert r2.choices[0].text == r.choices[0].text  # token ids as one prompt, verbatim
    r3 = client.completions.create(model=NAME, prompt=["ROMEO: but", "the quick"], max_tokens=4, temperature=0)
    assert len(r3.choices) == 2 and r3.usage.prompt_tokens == len(tok.encode_prompt("ROMEO: but")) + len(
        tok.encode_prompt("the quick"))


def test_completion_echo_logprobs(client, llm):
    tok = llm.tokenizer
    ids = tok.encode_prompt("hello world")
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=5, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith("hello world")
    lp = c.logprobs
    n = len(ids) + r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])  # up to logprobs + 1 entries
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens[:len(ids)]) == "hello world"
    # greedy: each generated token is the most likely one
    for t, top in zip(lp.tokens[len(ids):], lp.top_logprobs[len(ids):]):
        assert max(top, key=top.get) == t
    # echo with max_tokens 0 scores the prompt only (what evaluation harnesses send)
    r0 = client.completions.create(model=NAME, prompt="hello world", max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].text == "hello world" and r0.usage.completion_tokens == 0
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)


def test_completion_stream_format(server, client, llm):
    full = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert all(c.id == chunks[0].id and c.object == "text_completion" for c in chunks)
    body = httpx.post(server[0].url + "/v1/completions", json={
        "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}, timeout=30)
    assert body.status_code == 200 and body.headers["content-type"].startswith("text/event-stream")
    events = sse_events(body.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert all("usage" in e and e["usage"] is None for e in events[:-2])
    no_usage = sse_events(httpx.post(server[0].url + "/v1/completions", json={
        "prompt": "ROMEO:", "max_tokens": 3, "stream": True}, timeout=30).text)
    assert all("usage" not in e for e in no_usage[:-1])


def test_stop_strings_and_big_seeds(client, llm):
    tok = llm.tokenizer
    ids = tok.encode_prompt("ROMEO: but")
    full = tok.decode(offline_ids(llm, ids, 20, temperature=0), skip_special=True)
    assert len(full) > 12
    stop = full[8:10]
    r = client.completions.create(model=NAME, prompt="ROMEO: but", max_tokens=20, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=NAME, prompt="ROMEO: but", max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
    # the largest seed with n > 1: sample i uses (seed + i) mod 2**64, never an error
    r = client.completions.create(model=NAME, prompt="ROMEO: but", max_tokens=3, seed=2**64 - 1, n=2)
    assert len(r.choices) == 2


def test_logit_bias_steers_sampling_and_leaves_logprobs_raw(client, llm):
    """OpenAI's logit_bias: added to the logits before sampling (-100 bans a token, +100 forces it);
    the returned logprobs stay the model's own (vLLM's default), as for every sampling setting."""
    import torch

    ids = llm.tokenizer.encode_prompt("ROMEO: but")
    with torch.no_grad():
        logits_V = llm.model(torch.tensor([ids]))[0, -1].float()
    first, second = logits_V.topk(2).indices.tolist()
    banned = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                       logit_bias={str(first): -100})
    unbiased = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, logprobs=2)
    top = unbiased.choices[0].logprobs.top_logprobs[0]  # best first: the greedy token, then the runner-up
    lp = banned.choices[0].logprobs
    assert lp.tokens[0] == list(top)[1] != unbiased.choices[0].logprobs.tokens[0]
    assert lp.token_logprobs[0] == top[list(top)[1]] == pytest.approx(torch.log_softmax(logits_V, -1)[second].item(),
                                                                       abs=1e-4)
    forced = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0.9, seed=1,
                                       logit_bias={str(ids[-1]): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == llm.tokenizer.decode([ids[-1]] * 4)
    plain = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    zero = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logit_bias={"5": 0})
    assert zero.choices[0].text == plain.choices[0].text


def test_stream_with_several_prompts_and_n(client):
    kw = dict(model=NAME, prompt=["ROMEO: but", "the quick"], max_tokens=6, temperature=0.8, seed=9, n=2)
    full = client.completions.create(**kw)
    texts, finished = ["", "", "", ""], []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.append(c.index)
    assert texts == [c.text for c in full.choices] and sorted(finished) == [0, 1, 2, 3]


def test_stop_reason_names_the_stop_string_or_token_as_vllm_does(server, client, llm):
    """vLLM's `stop_reason`: the stop string or the stop token id that ended a choice; null when it
    ended at the tokenizer's EOS or at the length limit. An end-of-turn id that is not the EOS (a
    generation_config `eos_token_id` in vLLM) is reported like a stop token. Whole and streamed, for
    completions and chat completions; the openai client returns the field in `model_extra`."""
    tok = llm.tokenizer
    ids = tok.encode_prompt("ROMEO: but")
    greedy = offline_ids(llm, ids, 12, temperature=0)
    stop_id = greedy[2]
    by_id = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0,
                                      extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].model_extra["stop_reason"] == stop_id
    text = tok.decode(greedy, skip_special=True)
    stop_text = text[3:6]
    by_text = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, stop=[stop_text],
                                        extra_body={"ignore_eos": True})
    assert (by_text.choices[0].text, by_text.choices[0].model_extra["stop_reason"]) == \
        (text[:text.index(stop_text)], stop_text)
    at_eos = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0,
                                       logit_bias={str(tok.eos_id): 100})
    assert (at_eos.choices[0].finish_reason, at_eos.choices[0].model_extra["stop_reason"]) == ("stop", None)
    length = client.completions.create(model=NAME, prompt=ids, max_tokens=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert (length.choices[0].finish_reason, length.choices[0].model_extra["stop_reason"]) == ("length", None)

    end_of_turn = tok.end_of_turn_id
    assert end_of_turn != tok.eos_id and end_of_turn in tok.stop_ids
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0, logit_bias={str(end_of_turn): 100})
    assert (chat.choices[0].finish_reason, chat.choices[0].model_extra["stop_reason"]) == ("stop", end_of_turn)
    hi = [{"role": "user", "content": "hi"}]
    chat_stop = offline_ids(llm, tok.apply_chat_template(hi, add_generation_prompt=True), 12, temperature=0)[2]
    chunks = list(client.chat.completions.create(model=NAME, messages=hi, max_tokens=12, temperature=0, stream=True,
                                                 extra_body={"stop_token_ids": [chat_stop], "ignore_eos": True}))
    reasons = [(ch.choices[0].finish_reason, ch.choices[0].model_extra["stop_reason"]) for ch in chunks]
    assert reasons == [(None, None)] * (len(reasons) - 1) + [("stop", chat_stop)]
    raw = httpx.post(server[0].url + "/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                              "stop": [stop_text], "ignore_eos": True,
                                                              "stream": True}, timeout=30)
    events = sse_events(raw.text)[:-1]
    assert [e["choices"][0]["stop_reason"] for e in events] == [None] * (len(events) - 1) + [stop_text]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_unknown_request_fields_are_accepted_and_logged_once_per_name(server, client, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="lmforge.serve")
    body = {"prompt": "hello", "max_tokens": 2, "temperature": 0, "service_tier": "auto",
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    first = httpx.post(server[0].url + "/v1/completions", json=body, timeout=30)
    again = httpx.post(server[0].url + "/v1/completions", json=body, timeout=30)
    assert (first.status_code, again.status_code) == (200, 200)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi", "weight": 1}],
                                          max_tokens=2, temperature=0, extra_body={"service_tier": "auto"})
    assert chat.choices[0].finish_reason in ("stop", "length")
    warned = [r.getMessage() for r in caplog.records if r.name == "lmforge.serve" and r.levelno == logging.WARNING]
    assert warned == [f"ignored the request field '{name}': this server does not support it (logged once per field "
                      "name)" for name in ("service_tier", "stream_options.continuous_usage_stats",
                                           "messages[].weight")]


# ---- chat -----------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


def test_chat_schema_stream_and_offline_equality(server, client, llm):
    tok = llm.tokenizer
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=15, temperature=0.9, seed=3,
                                       logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    expected = offline_ids(llm, ids, 15, temperature=0.9, seed=3)
    assert c.message.role == "assistant" and c.message.content == tok.decode(expected, skip_special=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert len(c.logprobs.content) == len(expected)
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 and e.bytes == list(e.token.encode()) for e in
               c.logprobs.content)

    raw = httpx.post(server[0].url + "/v1/chat/completions", json={
        "messages": MESSAGES, "max_completion_tokens": 15, "temperature": 0.9, "seed": 3, "stream": True,
        "stream_options": {"include_usage": True}}, timeout=30)
    events = sse_events(raw.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(expected)
    finish = events[-3]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == c.finish_reason
    middle = events[1:-3]
    assert all(e["choices"][0]["finish_reason"] is None and set(e["choices"][0]["delta"]) == {"content"}
               for e in middle)
    assert "".join(e["choices"][0]["delta"]["content"] for e in middle) == c.message.content

    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=15, temperature=0.9, seed=3,
                                            stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == c.message.content
    # with control tokens kept in the text, the reply is exactly what LLM.chat gives offline
    raw = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=15, temperature=0.9, seed=3,
                                         extra_body={"skip_special_tokens": False})
    assert raw.choices[0].message.content == llm.chat(MESSAGES, max_new_tokens=15, temperature=0.9, seed=3)


def test_developer_role_is_the_system_role_and_text_response_format_is_accepted(client, llm):
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    a = client.chat.completions.create(model=NAME, messages=as_system, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=NAME, messages=as_developer, max_tokens=8, temperature=0,
                                       response_format={"type": "text"})
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.prompt_tokens == a.usage.prompt_tokens == len(
        llm.tokenizer.apply_chat_template(as_system, add_generation_prompt=True, tokenize=True))


def test_a_template_that_knows_the_developer_role_gets_it(server, llm):
    tok = llm.tokenizer
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    try:
        r = httpx.post(server[0].url + "/tokenize", json={"messages": [{"role": "developer", "content": "x"}]},
                       timeout=30)
    finally:
        tok.chat_template = saved
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("developer: x\n")


def test_chat_without_template_is_400(server, llm):
    tok = llm.tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        r = httpx.post(server[0].url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
    finally:
        tok.chat_template = saved
    assert r.status_code == 400
    assert "no chat template" in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages"


# ---- errors ---------------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "'prompt' is a required field"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [999999]}, 400, "prompt", "outside the model's vocabulary"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 500}, 400, "prompt",
     "This model's maximum context length is 128 tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "only with echo"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"a": 1.0}}, 400, "logit_bias", "keys must be token ids"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"999999": 1.0}}, 400, "logit_bias", "outside the model's"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", "between -100 and 100"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "unknown role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     400, "response_format", "response_format type 'xml' is not supported; use 'text', 'json_object' or 'json_schema'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
     400, "stream_options", "stream_options is only allowed when stream is true"),
    ("/v1/completions", {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only allowed when stream is true"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [999999]}, 400, "stop_token_ids",
     "stop token id 999999 is outside the model's vocabulary (0..299)"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix", "suffix is not supported by this server"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, 400, "best_of",
     "best_of other than n is not supported by this server"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 40}, 400, "n",
     "this request asks for 80 sequences (prompts x n); the limit is 64"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 500}, 400, "messages",
     "This model's maximum context length is 128 tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": -101}}, 400,
     "logit_bias", "logit_bias values must be between -100 and 100, got -101.0 for token 5"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools.0.function", "'tools.0.function' is a required field"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", None),
    ("/tokenize", {}, 400, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "outside"),
]


@pytest.mark.parametrize("path,body,status,param,message", BAD)
def test_bad_requests(server, path, body, status, param, message):
    url = server[0].url + path
    r = (httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
         if isinstance(body, bytes) else httpx.post(url, json=body, timeout=30))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    if message:
        assert message in err["message"], err["message"]
    assert "\n" not in err["message"]


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=1000)
    assert e.value.status_code == 400 and "maximum context length" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_other_routes_and_body_limit(server, llm):
    url = server[0].url
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.get(url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    big = {"prompt": "x" * (5 * 2**20)}
    r = httpx.post(url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    m = httpx.get(url + "/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == NAME and m["data"][0]["object"] == "model"
    assert m["data"][0]["max_model_len"] == 128
    tok = llm.tokenizer
    t = httpx.post(url + "/tokenize", json={"prompt": "hello world"}).json()
    assert t == {"tokens": tok.encode_prompt("hello world"), "count": len(tok.encode_prompt("hello world")),
                 "max_model_len": 128}
    t2 = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()
    assert t2["tokens"] == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert httpx.post(url + "/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": "hello world"}
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["pad_token"] == "<|pad|>"
    assert info["chat_template"] == tok.chat_template and "bos_token" in info


def test_skip_special_tokens(server, llm):
    tok = llm.tokenizer
    pad = tok.pad_id
    # a prompt given as ids with a control token inside: the echoed text hides it by default
    r = httpx.post(server[0].url + "/v1/completions", json={
        "prompt": [pad] + tok.encode("hello"), "max_tokens": 1, "echo": True, "temperature": 0}, timeout=30).json()
    assert r["choices"][0]["text"].startswith("hello") and "<|pad|>" not in r["choices"][0]["text"]
    r = httpx.post(server[0].url + "/v1/completions", json={
        "prompt": [pad] + tok.encode("hello"), "max_tokens": 1, "echo": True, "temperature": 0,
        "skip_special_tokens": False}, timeout=30).json()
    assert r["choices"][0]["text"].startswith("<|pad|>hello")


# ---- concurrency, cancellation, auth, limits -------------------------------------------------------

def test_32_concurrent_clients_equal_offline(server, llm):
    tok = llm.tokenizer
    words = "ROMEO: but soft, what light through yonder window breaks? hello world the quick brown fox".split()
    prompts = [" ".join(words[i % 7: i % 7 + 1 + i % 5]) for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=server[0].url + "/v1", api_key="x", max_retries=0, timeout=60)

    async def one(i: int):
        kw = dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, seed=i, top_p=0.9)
        if i % 4 == 1:
            stream = await aclient.completions.create(model=NAME, prompt=prompts[i], max_tokens=12, stream=True, **kw)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        r = await aclient.completions.create(model=NAME, prompt=prompts[i], max_tokens=12, **kw)
        return r.choices[0].text

    async def run_all():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await aclient.close()

    texts = asyncio.run(run_all())
    for i, text in enumerate(texts):
        kw = dict(temperature=0) if i % 2 == 0 else dict(temperature=1.0, seed=i, top_p=0.9)
        assert text == tok.decode(offline_ids(llm, tok.encode_prompt(prompts[i]), 12, **kw), skip_special=True), i


def test_disconnect_frees_the_slot(llm):
    srv, engine = start_server(llm, max_batch=4)
    slow_down(engine, 0.01)
    try:
        sched = engine.scheduler
        with httpx.stream("POST", srv.url + "/v1/completions", json={
                "prompt": "hello", "max_tokens": 120, "ignore_eos": True, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert sched.num_running == 1
            steps = sched.steps
        assert any(line.startswith("data: {") for line in got)
        deadline = time.monotonic() + 5
        while sched.num_running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.num_running == 0
        assert sched.steps - steps < 60  # freed long before the 120-token budget ran out
        # non-streamed requests are cancelled too when the client goes away
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 120, "ignore_eos": True},
                       timeout=0.3)
        deadline = time.monotonic() + 5
        while sched.num_running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.num_running == 0
    finally:
        engine.scheduler.stop()
        srv.stop()


def test_api_key_queue_full_and_metrics(llm):
    srv, engine = start_server(llm, api_key="s3cret", max_batch=1, max_queue=1)
    slow_down(engine, 0.01)
    url = srv.url
    try:
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v1/models", headers=good).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model=NAME, prompt="x")
        body = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=good, timeout=30) as r1:
            lines = r1.iter_lines()  # (kept: dropping the iterator closes the connection)
            next(lines)  # running: the one slot is taken
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=good, timeout=30) as r2:
                assert r2.status_code == 200  # waits in the queue (bound 1)
                r3 = httpx.post(url + "/v1/completions", json=body, headers=good, timeout=30)
                assert r3.status_code == 429 and r3.json()["error"]["type"] == "rate_limit_error"
        metrics = httpx.get(url + "/metrics").text
        assert 'lmforge_requests_total{route="/v1/completions",status="429"} 1.0' in metrics
        assert 'lmforge_requests_total{route="/v1/models",status="401"} 2.0' in metrics
        for name in ("lmforge_prompt_tokens_total", "lmforge_generation_tokens_total", "lmforge_queue_length",
                     "lmforge_running_batch_size", "lmforge_time_to_first_token_seconds_bucket",
                     "lmforge_time_per_output_token_seconds_bucket"):
            assert name in metrics
        ttft_count = [line for line in metrics.splitlines() if line.startswith("lmforge_time_to_first_token_seconds_count")]
        assert float(ttft_count[0].split()[-1]) >= 1
    finally:
        engine.scheduler.stop()
        srv.stop()


def test_503_while_loading(llm):
    release = threading.Event()

    def loader() -> Engine:
        release.wait(10)
        from lmforge.infer.scheduler import Scheduler
        return Engine(Scheduler(llm.model, llm.tokenizer, max_batch=2).start(), llm.tokenizer)

    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), loader=loader))
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        srv.server.config.app.state.lmforge.engine.scheduler.stop()
    finally:
        srv.stop()


def test_log_lines_and_log_prompts(server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lmforge.serve")
    secret = "hello secret world"
    httpx.post(server[0].url + "/v1/completions", json={"prompt": secret, "max_tokens": 3, "ignore_eos": True},
               timeout=30)

    def served_lines():  # the server logs once the response is sent, possibly after the client has it
        return [r.getMessage() for r in caplog.records if r.name == "lmforge.serve"]

    deadline = time.monotonic() + 5
    while not any("POST /v1/completions 200" in line for line in served_lines()) and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = served_lines()
    assert any("POST /v1/completions 200 prompt=" in line and "completion=3" in line for line in lines)
    assert not any(secret in line for line in lines)
    caplog.clear()
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME, log_prompts=True), engine=server[1]))
    try:
        httpx.post(srv.url + "/v1/completions", json={"prompt": secret, "max_tokens": 3}, timeout=30)
    finally:
        srv.stop()
    assert any(secret in r.getMessage() for r in caplog.records if r.name == "lmforge.serve")
