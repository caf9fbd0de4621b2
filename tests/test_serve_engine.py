"""The engine bridge (lmforge/serve/engine.py) and what it shares with `LLM`: prompts encoded by one
rule (lmforge/infer/prompt.py), every refused request field named as the OpenAI error's `param`
(the scheduler's `InvalidRequest.field`), outputs carried from the scheduler thread into the event
loop, and the token metrics."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from lmforge.errors import LMForgeError
from lmforge.infer.prompt import encode_text_prompts, render_chat_prompt
from lmforge.infer.scheduler import GenerationRequest, InvalidRequest, Scheduler, StepOutput, TokenLogprob
from lmforge.serve.app import create_app
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import ChoiceOutput, Choices, Engine, Mailbox
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import ChatMessage, ServeError
from serve_fixtures import NAME, ServerThread, make_llm

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def llm():
    return make_llm()


# ---- prompts: one rule for LLM and the server ----------------------------------------------------

def test_empty_text_prompt_is_eos_for_llm_and_server(llm):
    tok = llm.tokenizer
    engine = Engine(Scheduler(llm.model, tok), tok)
    assert encode_text_prompts(tok, ["", "hello"]) == [[tok.eos_id], tok.encode_prompt("hello")]
    assert engine.completion_prompts(["", "hello"]) == (["", "hello"], [[tok.eos_id], tok.encode_prompt("hello")])
    assert engine.completion_prompts([[5, 6], [7]]) == ([None, None], [[5, 6], [7]])
    assert engine.completion_prompts([5, 6]) == ([None], [[5, 6]])
    # LLM.generate("") continues from EOS: the same ids as the server's [EOS] prompt
    assert llm.generate("", max_new_tokens=4, temperature=0) == tok.decode(
        llm.generate([tok.eos_id], max_new_tokens=4, temperature=0), skip_special=True)


class NoEOS:
    eos_id = None

    def encode_prompt(self, text):
        return [ord(c) % 50 for c in text]


def test_empty_text_prompt_without_eos_is_an_error_naming_prompt(llm):
    with pytest.raises(LMForgeError, match=r"^prompt is empty and the tokenizer has no end-of-text token to start "
                                           r"from$"):
        encode_text_prompts(NoEOS(), ["ab", ""])
    with pytest.raises(ServeError) as e:
        Engine(Scheduler(llm.model, None), NoEOS()).completion_prompts("")
    assert (e.value.status, e.value.param) == (400, "prompt")
    assert e.value.message == "prompt is empty and the tokenizer has no end-of-text token to start from"


def test_chat_rendering_is_shared_with_llm_and_developer_falls_back_to_system(llm):
    tok = llm.tokenizer
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert render_chat_prompt(tok, MESSAGES) == llm.chat_prompt(MESSAGES) == expected
    as_developer = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
    assert render_chat_prompt(tok, as_developer) == expected  # ChatML rejects "developer": it gets "system"
    engine = Engine(Scheduler(llm.model, tok), tok)
    assert engine.chat_prompt([ChatMessage(**m) for m in as_developer]) == expected
    assert render_chat_prompt(tok, MESSAGES, add_generation_prompt=False) == tok.apply_chat_template(
        MESSAGES, add_generation_prompt=False, tokenize=True)
    with pytest.raises(LMForgeError, match="unknown role robot"):  # other rejections are the template's own
        render_chat_prompt(tok, [{"role": "robot", "content": "x"}])


# ---- every refused field is named ----------------------------------------------------------------

@pytest.mark.parametrize("change,field,message", [
    (dict(prompt_ids=[]), "prompt_ids", "prompt is empty; give at least one token"),
    (dict(prompt_ids=[5, 300]), "prompt_ids", "prompt token id 300 is outside the model's vocabulary (0..299)"),
    (dict(max_tokens=-1), "max_tokens", "max_tokens must be a non-negative integer, got -1"),
    (dict(max_tokens=127), "prompt_ids", "This model's maximum context length is 128 tokens. However, you requested "
                                         "129 tokens (2 in the messages, 127 in the completion). Please reduce the "
                                         "length of the messages or completion."),
    (dict(temperature=-1.0), "temperature", "temperature must be >= 0 (0 = greedy), got -1.0"),
    (dict(top_k=0), "top_k", "top_k must be a positive integer, got 0"),
    (dict(top_p=1.5), "top_p", "top_p must be in (0, 1], got 1.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "repetition_penalty must be > 0 (1 = off), got 0.0"),
    (dict(min_p=2.0), "min_p", "min_p must be in [0, 1], got 2.0"),
    (dict(stop_token_ids=[3, 300]), "stop_token_ids", "stop token id 300 is outside the model's vocabulary (0..299)"),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "logit_bias token id -1 is outside the model's vocabulary (0..299)"),
    (dict(logit_bias={5: -101.0}), "logit_bias", "logit_bias values must be between -100 and 100, got -101.0 for "
                                                 "token 5"),
])
def test_scheduler_validate_names_the_field(llm, change, field, message):
    sched = Scheduler(llm.model, llm.tokenizer)
    args = dict(prompt_ids=[5, 6], max_tokens=4)
    with pytest.raises(InvalidRequest) as e:
        sched.validate(GenerationRequest(**{**args, **change}))
    assert (e.value.field, str(e.value)) == (field, message)
    assert isinstance(e.value, LMForgeError)


def test_scheduler_validate_names_stop_when_there_is_no_tokenizer(llm):
    with pytest.raises(InvalidRequest) as e:
        Scheduler(llm.model, None).validate(GenerationRequest([5], stop=["x"]))
    assert (e.value.field, str(e.value)) == ("stop", "stop strings need a tokenizer, and this model has none")


def test_errors_of_a_model_without_tokenizer_name_their_field(llm):
    engine = Engine(Scheduler(llm.model, None, max_batch=2).start(), None)
    srv = ServerThread(create_app(ServerConfig(served_model_name=NAME), engine=engine))
    no_tokenizer = "this model has no tokenizer; send prompts as token ids"
    try:
        for path, body, param, message in [
                ("/v1/completions", {"prompt": "hi"}, "prompt", no_tokenizer),
                ("/v1/completions", {"prompt": [5, 6], "stop": "x"}, "stop",
                 "stop strings need a tokenizer, and this model has none"),
                ("/v1/chat/completions", {"messages": MESSAGES}, "messages", no_tokenizer),
                ("/tokenize", {"prompt": "hi"}, "prompt", no_tokenizer),
                ("/tokenize", {"messages": MESSAGES}, "messages", no_tokenizer),
                ("/detokenize", {"tokens": [5]}, "tokens", no_tokenizer)]:
            r = httpx.post(srv.url + path, json=body, timeout=30)
            assert (r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]) == (400, param, message)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        engine.scheduler.stop()
        srv.stop()


# ---- outputs across threads ----------------------------------------------------------------------

class FakeScheduler:
    def __init__(self):
        self.cancelled: list[int] = []

    def cancel(self, handle):
        self.cancelled.append(handle)


def make_choices(n: int) -> tuple[Choices, FakeScheduler, Metrics]:
    sched = FakeScheduler()
    metrics = Metrics(queue_length=lambda: 0, running_batch_size=lambda: 0)
    choices = Choices(sched, Mailbox(asyncio.get_running_loop()), metrics)
    choices.handles = [10 + i for i in range(n)]
    return choices, sched, metrics


def from_thread(choices: Choices, outputs: list[tuple[int, StepOutput]]) -> threading.Thread:
    """Deliver outputs through the choices' callbacks from another thread, as the scheduler does."""
    callbacks = {i: choices.callback(i) for i in {i for i, _ in outputs}}
    thread = threading.Thread(target=lambda: [callbacks[i](o) for i, o in outputs])
    thread.start()
    return thread


def test_collect_gathers_each_choice_and_counts_tokens():
    async def main():
        choices, sched, metrics = make_choices(2)

        async def connected():
            return False

        from_thread(choices, [(0, StepOutput(1, [4], "e", [TokenLogprob(4, -1.0, [])], [TokenLogprob(2, None, [])],
                                             completion_tokens=1)),
                              (1, StepOutput(2, [7, 8], "hi", None, finish_reason="length", completion_tokens=2)),
                              (0, StepOutput(1, [5], "f", [TokenLogprob(5, -2.0, [])], finish_reason="stop",
                                             completion_tokens=2))]).join()
        outs = await choices.collect(connected)
        return outs, sched, metrics, choices

    outs, sched, metrics, choices = asyncio.run(main())
    assert outs == [ChoiceOutput([4, 5], "ef", [TokenLogprob(4, -1.0, []), TokenLogprob(5, -2.0, [])],
                                 [TokenLogprob(2, None, [])], "stop", completion_tokens=2),
                    ChoiceOutput([7, 8], "hi", [], None, "length", completion_tokens=2)]
    assert sched.cancelled == [] and choices.completion_tokens == 4
    sample = metrics.registry.get_sample_value
    assert sample("lmforge_generation_tokens_total") == 4.0
    assert sample("lmforge_time_to_first_token_seconds_count") == 2.0  # each choice's first tokens
    assert sample("lmforge_time_per_output_token_seconds_count") == 1.0  # choice 0's second output


def test_collect_fails_and_cancels():
    async def failed():
        choices, sched, _ = make_choices(2)

        async def connected():
            return False

        from_thread(choices, [(1, StepOutput(2, [], "", finish_reason="error", error="boom")),
                              (0, StepOutput(1, [3], "d", finish_reason="stop", completion_tokens=1))]).join()
        with pytest.raises(ServeError) as e:
            await choices.collect(connected)
        return e.value, sched

    err, sched = asyncio.run(failed())
    assert (err.status, err.message, sched.cancelled) == (500, "boom", [])  # both had finished: nothing to free

    async def gone():
        choices, sched, _ = make_choices(2)

        async def disconnected():
            return True

        with pytest.raises(ServeError) as e:
            await choices.collect(disconnected)
        return e.value, sched

    err, sched = asyncio.run(gone())
    assert (err.status, err.message, sched.cancelled) == (499, "client disconnected", [10, 11])


def test_batches_merge_each_choice_until_all_finish():
    async def main():
        choices, _, _ = make_choices(2)
        from_thread(choices, [(0, StepOutput(1, [1], "b", completion_tokens=1)),
                              (1, StepOutput(2, [2], "c", finish_reason="stop", completion_tokens=1)),
                              (0, StepOutput(1, [3], "d", finish_reason="length", completion_tokens=2))]).join()
        return [batch async for batch in choices.batches()]

    batches = asyncio.run(main())
    # all three arrived before the first read: one batch, choice 0's outputs merged
    assert batches == [[(0, StepOutput(1, [1, 3], "bd", finish_reason="length", completion_tokens=2)),
                        (1, StepOutput(2, [2], "c", finish_reason="stop", completion_tokens=1))]]
