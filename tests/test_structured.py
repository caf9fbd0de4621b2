"""Structured output (infer/grammar.py): JSON Schema, regex and choice constraints as token masks in
LLM.generate / chat / stream, in the scheduler per request, and on the server (response_format)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import openai
import pydantic
import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.infer.generate import generate
from lmforge.infer.grammar import Grammar, GrammarError, token_bytes
from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all
from lmforge.tokenizer import Tokenizer
from serve_fixtures import CORPUS, make_llm, start_server

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "zip", "ok"],
    "additionalProperties": False,
}


def check_schema(obj, schema=SCHEMA):
    """The checks of SCHEMA's keywords (jsonschema is not a dependency): raises AssertionError."""
    assert isinstance(obj, dict) and set(schema["required"]) <= set(obj) <= set(schema["properties"]), obj
    p = schema["properties"]
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 120
    if "score" in obj:
        assert type(obj["score"]) in (int, float) and -1 <= obj["score"] <= 1
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and all(t in p["tags"]["items"]["enum"]
                                                                            for t in obj["tags"])
    assert isinstance(obj["zip"], str) and re.fullmatch("[0-9]{5}", obj["zip"])
    assert type(obj["ok"]) is bool


@pytest.fixture(scope="module")
def llm():
    return make_llm(block_size=512)


def test_json_schema_output_parses_and_validates_for_many_seeds(llm):
    for seed in range(30):
        text = llm.generate("hello", max_new_tokens=300, guided_json=SCHEMA, seed=seed)
        check_schema(json.loads(text))


def test_response_format_json_schema_and_json_object_in_chat(llm):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    msgs = [{"role": "user", "content": "who?"}]
    for seed in range(5):
        check_schema(json.loads(llm.chat(msgs, response_format=rf, seed=seed, max_new_tokens=300)))
    assert isinstance(json.loads(llm.chat(msgs, response_format={"type": "json_object"}, temperature=0,
                                          max_new_tokens=300)), dict)
    assert "".join(llm.chat_stream(msgs, response_format=rf, seed=3, max_new_tokens=300)) == \
        llm.chat(msgs, response_format=rf, seed=3, max_new_tokens=300)


def test_regex_and_choice_outputs_match(llm):
    pattern = r"[0-9]{3}-[a-z]{2,4}(!|\?)"
    outs = llm.generate(["hello", "ROMEO"], guided_regex=pattern, seed=0, num_samples=5, max_new_tokens=50)
    for out in sum(outs, []):
        assert re.fullmatch(pattern, out), out
    choices = ["red", 'say "hi"', "back\\slash", "日本語", "red wine"]
    seen = {llm.generate("hello", guided_choice=choices, seed=s, temperature=5.0) for s in range(20)}
    assert seen <= set(choices) and len(seen) >= 3
    assert "".join(llm.stream("hi", guided_regex="(ab|cd)+x", seed=3)) == llm.generate("hi", guided_regex="(ab|cd)+x",
                                                                                         seed=3)


def test_mask_is_applied_before_sampling_settings(llm):
    # top_k=1 after the mask is greedy under the mask; any top_p keeps the best allowed token
    greedy = llm.generate("hello", guided_json=SCHEMA, temperature=0, max_new_tokens=300)
    assert llm.generate("hello", guided_json=SCHEMA, top_k=1, seed=5, max_new_tokens=300) == greedy
    assert llm.generate("hello", guided_json=SCHEMA, top_p=1e-6, seed=9, max_new_tokens=300) == greedy
    check_schema(json.loads(llm.generate("hello", guided_json=SCHEMA, temperature=1.5, top_p=0.9, top_k=50, seed=1,
                                         max_new_tokens=300)))


def test_every_row_has_its_own_matcher(llm):
    prompts = ["hello world", "ROMEO: but", "the quick brown fox"]
    batch = llm.generate(prompts, guided_json=SCHEMA, temperature=0, max_new_tokens=300)
    assert batch == [llm.generate(p, guided_json=SCHEMA, temperature=0, max_new_tokens=300) for p in prompts]
    assert len(set(batch)) == 3


def test_stop_ids_only_when_complete_and_never_an_empty_mask(llm):
    tok = llm.tokenizer
    V = llm.config.vocab_size
    eos, end_of_turn = tok.eos_id, tok.token_to_id("<|im_end|>")
    grammar = llm.grammar(guided_json=SCHEMA)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        m = grammar.matcher({eos, end_of_turn})
        for step in range(400):
            allowed = m.allowed_V()
            assert allowed.shape == (V,) and allowed.any()
            ids = allowed.nonzero()[:, 0]
            specials = set(tok.special_ids) - {eos, end_of_turn}
            assert not any(int(i) in specials for i in ids)
            if allowed[eos]:
                assert allowed[end_of_turn] and m.matcher.is_accepting()
            if step == 0:
                assert not allowed[eos]  # "" is not a JSON object
            pick = int(ids[torch.randint(len(ids), (1,), generator=gen)])
            m.accept(pick)
            if m.done:
                break
        assert m.done


def test_length_cut_reports_length(llm):
    grammar = llm.grammar(guided_json=SCHEMA)
    (gen,) = generate(llm.model, [llm.tokenizer.encode("hello")], max_new_tokens=4, eos_id=llm.stop_ids, seed=0,
                      tokenizer=llm.tokenizer, grammar=grammar)
    assert gen.finish_reason == "length" and len(gen.ids) == 4 and gen.text.startswith('{"')
    (full,) = generate(llm.model, [llm.tokenizer.encode("hello")], max_new_tokens=300, eos_id=llm.stop_ids, seed=0,
                       tokenizer=llm.tokenizer, grammar=grammar)
    assert full.finish_reason == "eos" and full.ids[:4] == gen.ids


@pytest.mark.parametrize("kwargs,message", [
    ({"guided_json": {"type": "foo"}}, "guided_json cannot be compiled into a grammar: Invalid type: foo"),
    ({"guided_regex": "[a-"}, "guided_regex cannot be compiled into a grammar: "),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                         "pattern": "(?<=a)b"}}}},
     "response_format cannot be compiled into a grammar: "),
    ({"response_format": {"type": "xml"}},
     "response_format type 'xml' is not supported; use 'text', 'json_object' or 'json_schema'"),
    ({"guided_choice": []}, "guided_choice must be a non-empty list of strings"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON: "),
    ({"guided_regex": "a", "guided_choice": ["a"]},
     "give at most one of response_format, guided_json, guided_regex, guided_choice; got guided_regex and "
     "guided_choice"),
    ({"guided_regex": "a", "num_beams": 2},
     "guided_regex works with sampling and greedy decoding; it does not combine with beam search or speculative "
     "decoding"),
])
def test_bad_constraints_are_clear_errors(llm, kwargs, message):
    with pytest.raises(LMForgeError) as e:
        llm.generate("hello", **kwargs)
    assert str(e.value).startswith(message)
    if isinstance(e.value, GrammarError):  # of two options, the second is at fault
        assert e.value.field == [k for k in kwargs if k != "num_beams"][-1]


def test_text_response_format_is_no_constraint(llm):
    assert llm.grammar(response_format={"type": "text"}) is None
    assert llm.generate("hello", response_format={"type": "text"}, seed=0) == llm.generate("hello", seed=0)


def test_token_bytes_of_lmforge_vocabularies():
    bpe = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    toks, special = token_bytes(bpe, 304)  # a padded embedding: ids 300..303 have no token
    assert special == [0, 1, 2, 3, 4, 300, 301, 302, 303]
    ids = bpe.encode("héllo wörld 日本語")
    assert b"".join(toks[i] for i in ids) == "héllo wörld 日本語".encode()
    wp = Tokenizer.train_wordpiece(CORPUS * 3, vocab_size=120)
    toks, special = token_bytes(wp, wp.vocab_size)
    assert special == [0, 1, 2, 3, 4]
    ids = wp.encode("hello world")
    assert b"".join(toks[i] for i in ids) == b" hello world"
    char = Tokenizer.train_char(["abc {}"])
    toks, _ = token_bytes(char, char.vocab_size)
    assert [toks[i] for i in char.encode("a {")] == [b"a", b" ", b"{"]


def test_scheduler_constrains_each_request_like_llm_generate(llm):
    grammar = llm.grammar(guided_json=SCHEMA)
    choice = llm.grammar(guided_choice=["yes", "no"])
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=8).start()
    try:
        prompts = [llm.tokenizer.encode(p) for p in ["hello", "ROMEO: but", "the quick"]]
        reqs = [GenerationRequest(p, max_tokens=300, temperature=t, seed=s, grammar=grammar)
                for p in prompts for t, s in ((0.0, None), (1.0, 7))]
        reqs.append(GenerationRequest(prompts[0], max_tokens=10, temperature=0))  # unconstrained company
        reqs.append(GenerationRequest(prompts[1], max_tokens=10, temperature=1.0, seed=3, grammar=choice))
        results = run_all(sched, reqs)
    finally:
        sched.stop()
    for req, res in zip(reqs[:6], results):
        assert res.finish_reason == "stop"
        check_schema(json.loads(res.text))
        alone = llm.generate(req.prompt_ids, guided_json=SCHEMA, temperature=req.temperature, seed=req.seed,
                             max_new_tokens=300)
        assert res.token_ids == alone
    assert results[6].token_ids == llm.generate(prompts[0], temperature=0, max_new_tokens=10)
    assert results[7].text in ("yes", "no")


def test_scheduler_refuses_a_constraint_that_cannot_end(llm):
    sched = Scheduler(llm.model, llm.tokenizer)
    req = GenerationRequest([5, 6], grammar=llm.grammar(guided_regex="a+"), ignore_eos=True)
    with pytest.raises(LMForgeError, match="guided_regex needs a stop token to end the output; ignore_eos leaves none"):
        sched.validate(req)


# ---- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm):
    srv, engine = start_server(llm, max_batch=8, max_queue=64)
    yield srv
    engine.scheduler.stop()
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_response_format_json_schema(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "who?"}],
                                       response_format=rf, n=4, seed=0, max_tokens=300)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        check_schema(json.loads(choice.message.content))
    cut = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "who?"}],
                                         response_format=rf, seed=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    streamed = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "who?"}],
                                              response_format=rf, seed=0, max_tokens=300, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == r.choices[0].message.content


def test_openai_client_completions_json_object_and_guided_extras(client):
    r = client.completions.create(model="tiny-test", prompt="hello", seed=1, max_tokens=300, n=3,
                                  extra_body={"response_format": {"type": "json_object"}})
    for c in r.choices:
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)
    assert any(c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model="tiny-test", prompt="hello", max_tokens=20, seed=2,
                                  extra_body={"guided_choice": ["cat", "dog"]}, n=4)
    assert {c.text for c in r.choices} <= {"cat", "dog"}
    r = client.completions.create(model="tiny-test", prompt="hello", max_tokens=20, seed=2,
                                  extra_body={"guided_regex": "[a-c]{4}"})
    assert re.fullmatch("[a-c]{4}", r.choices[0].text)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=120)
    likes_tea: bool


def test_openai_client_parse_with_a_pydantic_model(client):
    r = client.beta.chat.completions.parse(model="tiny-test", messages=[{"role": "user", "content": "who?"}],
                                           response_format=Person, seed=0, max_tokens=300)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Person) and parsed == Person.model_validate_json(r.choices[0].message.content)


@pytest.mark.parametrize("body,param,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "response_format cannot be compiled into a grammar: Invalid type: foo"),
    ({"guided_regex": "[a-"}, "guided_regex", "guided_regex cannot be compiled into a grammar: "),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice",
     "give at most one of response_format, guided_json, guided_regex, guided_choice"),
])
def test_uncompilable_constraints_are_openai_400s(server, body, param, message):
    for path, base in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(server.url + path, json={**base, **body}, timeout=30)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
        assert err["message"].startswith(message)


def test_benchmark_quick_mode_measures_masks_and_decode_steps(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import structured

    assert structured.main(["--quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "llguidance 1.9.1" and out["tokens"] == 24
    assert sorted(out["engine_choice"]["engines"]) == ["llguidance 1.9.1", "lm-format-enforcer 0.11.3",
                                                       "outlines-core 0.2.14", "xgrammar 0.2.9"]
    (tiny,) = out["models"].values()
    assert tiny["vocab_size"] == 512 and [b["batch"] for b in tiny["batches"]] == [1, 2]
    for b in tiny["batches"]:
        assert b["constrained_tokens"] >= b["batch"] and b["rows_complete_valid_json"] == b["rows_complete"]
        assert 0 < b["mask_ms_per_token"]["p50"] <= b["mask_ms_per_token"]["p99"]
        assert b["decode_step_ms"] > 0 and b["json_schema_step_ms"] > 0


# ---- tool_choice "required" / a named function: the reply is constrained to valid calls ------------------

PICK = {"type": "function", "function": {"name": "pick", "description": "pick an operation",
                                         "parameters": {"type": "object", "properties": {
                                             "op": {"type": "string", "enum": ["add", "sub"]},
                                             "twice": {"type": "boolean"}}, "required": ["op", "twice"],
                                             "additionalProperties": False}}}
SHOUT = {"type": "function", "function": {"name": "shout", "parameters": {
    "type": "object", "properties": {"loud": {"type": "boolean"}}, "required": ["loud"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tool_client():
    srv, engine = start_server(make_llm(block_size=2048), max_batch=4, max_queue=16)  # tool schemas are long prompts
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    engine.scheduler.stop()
    srv.stop()


@pytest.mark.parametrize("seed", range(4))
def test_required_tool_choice_always_gives_calls_that_validate(tool_client, seed):
    client = tool_client
    for stream in (False, True):
        kw = dict(model="tiny-test", messages=[{"role": "user", "content": "go"}], tools=[PICK, SHOUT],
                  tool_choice="required", parallel_tool_calls=False, seed=seed, max_tokens=200)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            name, args = calls[0].function.name, json.loads(calls[1].function.arguments)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            (call,) = choice.message.tool_calls
            name, args, reason = call.function.name, json.loads(call.function.arguments), choice.finish_reason
        assert reason == "tool_calls"
        if name == "pick":
            assert set(args) == {"op", "twice"} and args["op"] in ("add", "sub") and type(args["twice"]) is bool
        else:
            assert name == "shout" and set(args) == {"loud"} and type(args["loud"]) is bool


def test_named_tool_choice_calls_that_function(tool_client):
    client = tool_client
    for seed in range(3):
        r = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "go"}],
                                           tools=[PICK, SHOUT], seed=seed, max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "shout"}})
        (call,) = r.choices[0].message.tool_calls
        assert (call.function.name, r.choices[0].finish_reason, r.choices[0].message.content) == ("shout", "tool_calls", None)
        assert type(json.loads(call.function.arguments)["loud"]) is bool


def test_forced_tool_choice_with_response_format_is_a_400(server):
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny-test", "messages": [{"role": "user", "content": "go"}], "tools": [PICK],
        "tool_choice": "required", "response_format": {"type": "json_object"}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format"
    assert r.json()["error"]["message"] == ("tool_choice 'required' constrains the reply to tool calls; it cannot be "
                                            "combined with response_format")
