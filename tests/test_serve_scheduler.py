"""Continuous-batching scheduler: results independent of the company a request keeps, equal to
`LLM.generate`; cancellation frees the slot within one step; bounded queue; logprobs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.infer.generate import generate_ids
from lmforge.infer.llm import LLM
from lmforge.infer.scheduler import GenerationRequest, QueueFull, Scheduler, run_all
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.tokenizer import Tokenizer

CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. " * 3,
          "ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3,
          "héllo wörld 日本語 — the quick brown fox jumps over the lazy dog. " * 3]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


def make_llm(tok: Tokenizer, **overrides) -> LLM:
    torch.manual_seed(0)
    cfg = config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=64, init_std=0.3, **overrides)
    model = Decoder(cfg).eval()
    return LLM(model, cfg, tok)


def prompts_for(tok: Tokenizer, n: int) -> list[list[int]]:
    text = "ROMEO: but soft, what light through yonder window breaks? hello world"
    ids = tok.encode(text)
    return [ids[i % 5: i % 5 + 2 + (7 * i) % 19] for i in range(n)]


def request(i: int, prompt: list[int]) -> GenerationRequest:
    # even: greedy; odd: seeded sampling with various settings; some with stop strings
    if i % 2 == 0:
        return GenerationRequest(prompt, max_tokens=12, temperature=0, stop=["e "] if i % 4 == 0 else ())
    return GenerationRequest(prompt, max_tokens=12, temperature=0.7 + 0.1 * (i % 3), seed=100 + i,
                             top_k=40 if i % 3 == 0 else None, top_p=0.9 if i % 5 == 1 else None,
                             repetition_penalty=1.3 if i % 7 == 1 else 1.0, stop=["o"] if i % 6 == 3 else ())


def offline(llm: LLM, req: GenerationRequest) -> list[int]:
    return llm.generate(req.prompt_ids, max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                        top_p=req.top_p, repetition_penalty=req.repetition_penalty, stop=list(req.stop) or None,
                        seed=req.seed)


@pytest.mark.parametrize("overrides", [{}, dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2,
                                                 qk_norm=True, sliding_window=9)])
def test_alone_equals_among_31_others_equals_llm_generate(tok, overrides):
    llm = make_llm(tok, **overrides)
    prompts = prompts_for(tok, 32)
    reqs = [request(i, p) for i, p in enumerate(prompts)]
    for i in (0, 8, 16):  # stop strings taken from the middle of what greedy decoding produces
        text = tok.decode(offline(llm, GenerationRequest(prompts[i], max_tokens=12, temperature=0)), skip_special=True)
        reqs[i].stop = [text[len(text) // 2:len(text) // 2 + 2]]
    # a small prefill chunk splits prompts over several iterations while others decode
    sched = Scheduler(llm.model, tok, max_batch=32, prefill_chunk=5).start()
    try:
        together = run_all(sched, reqs)
        alone = [run_all(sched, [r])[0] for r in reqs]
    finally:
        sched.stop()
    reasons = set()
    for i, r in enumerate(reqs):
        assert together[i].token_ids == alone[i].token_ids == offline(llm, r), i
        assert together[i].text == alone[i].text
        reasons.add(together[i].finish_reason)
        if not r.stop:
            assert together[i].text == tok.decode(together[i].token_ids, skip_special=True)
    assert "stop" in reasons and "length" in reasons


def test_admission_with_fewer_slots_than_requests(tok):
    """Only 5 slots: requests wait in the queue and enter between decode steps; same results."""
    llm = make_llm(tok)
    reqs = [request(i, p) for i, p in enumerate(prompts_for(tok, 12))]
    sched = Scheduler(llm.model, tok, max_batch=5, prefill_chunk=8).start()
    try:
        res = run_all(sched, reqs)
    finally:
        sched.stop()
    assert [r.token_ids for r in res] == [offline(llm, r) for r in reqs]


def test_eos_stops_and_ignore_eos(tok):
    llm = make_llm(tok)
    prompt = prompts_for(tok, 3)[2]
    greedy = offline(llm, GenerationRequest(prompt, max_tokens=30, temperature=0))
    first = greedy[0]
    sched = Scheduler(llm.model, tok, max_batch=4, stop_ids={first}).start()
    try:
        stopped, ignored, by_id = run_all(sched, [
            GenerationRequest(prompt, max_tokens=30, temperature=0),
            GenerationRequest(prompt, max_tokens=30, temperature=0, ignore_eos=True),
            GenerationRequest(prompt, max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[greedy[3]])])
    finally:
        sched.stop()
    assert stopped.token_ids == [] and stopped.finish_reason == "stop"
    assert ignored.token_ids[:5] == greedy[:5] and ignored.finish_reason == "length" and len(ignored.token_ids) == 30
    assert by_id.token_ids == greedy[:greedy.index(greedy[3])] and by_id.finish_reason == "stop"


def test_cancel_frees_slot_within_one_step(tok):
    llm = make_llm(tok)
    sched = Scheduler(llm.model, tok, max_batch=4, max_model_len=64).start()
    got, done = [], threading.Event()
    state = {}

    def on_output(out):
        got.append(out)
        if len(got) == 3:
            state["steps_at_cancel"] = sched.steps
            sched.cancel(out.seq_id)
        if out.finish_reason:
            state["steps_at_finish"] = sched.steps
            state["running_at_finish"] = sched.num_running
            done.set()

    try:
        short = GenerationRequest(prompts_for(tok, 2)[1], max_tokens=10, temperature=0)
        sched.submit(GenerationRequest(prompts_for(tok, 1)[0], max_tokens=50, temperature=0, ignore_eos=True), on_output)
        other = run_all(sched, [short])[0]
        assert done.wait(30)
        time.sleep(0.05)
        assert sched.num_running == 0 and sched.num_waiting == 0
    finally:
        sched.stop()
    assert got[-1].finish_reason == "cancelled"
    assert state["steps_at_finish"] - state["steps_at_cancel"] <= 1
    assert sum(len(o.token_ids) for o in got) < 10
    assert other.token_ids == offline(llm, short)


def test_queue_bound_and_validation(tok):
    llm = make_llm(tok)
    sched = Scheduler(llm.model, tok, max_batch=2, max_queue=2)  # not started: nothing leaves the queue
    p = prompts_for(tok, 1)[0]
    for _ in range(2):
        sched.submit(GenerationRequest(p, max_tokens=4), lambda out: None)
    with pytest.raises(QueueFull, match=r"2 requests are waiting \(limit 2\)"):
        sched.submit(GenerationRequest(p, max_tokens=4), lambda out: None)
    with pytest.raises(LMForgeError, match="maximum context length is 64 tokens. However, you requested 70 tokens"):
        sched.validate(GenerationRequest(list(range(5, 11)), max_tokens=64))
    with pytest.raises(LMForgeError, match="outside the model's vocabulary"):
        sched.validate(GenerationRequest([tok.vocab_size], max_tokens=1))
    with pytest.raises(LMForgeError, match="prompt is empty"):
        sched.validate(GenerationRequest([], max_tokens=1))


def test_logprobs_match_a_full_forward(tok):
    llm = make_llm(tok)
    prompt = prompts_for(tok, 8)[7]
    sched = Scheduler(llm.model, tok, max_batch=4, prefill_chunk=3).start()
    try:
        (res,) = run_all(sched, [GenerationRequest(prompt, max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2,
                                                   ignore_eos=True)])
    finally:
        sched.stop()
    seq = prompt + res.token_ids
    with torch.no_grad():
        lp_TV = torch.log_softmax(llm.model(torch.tensor([seq]))[0].float(), dim=-1)
    assert res.prompt_logprobs[0].logprob is None and len(res.prompt_logprobs) == len(prompt)
    for t in range(1, len(seq)):
        entry = res.prompt_logprobs[t] if t < len(prompt) else res.logprobs[t - len(prompt)]
        assert entry.token_id == seq[t]
        assert entry.logprob == pytest.approx(lp_TV[t - 1, seq[t]].item(), abs=1e-4)
        n_top = 2 if t < len(prompt) else 3
        top_ids = lp_TV[t - 1].topk(n_top).indices.tolist()
        assert [i for i, _ in entry.top] == top_ids
    # greedy: the chosen token is the best alternative
    assert all(e.top[0][0] == e.token_id for e in res.logprobs)


def test_penalties_and_min_p_against_a_plain_loop(tok):
    """presence/frequency penalties (OpenAI: on generated tokens), min_p and top_k, checked against
    a plain full-forward loop that applies the same rules."""
    llm = make_llm(tok)
    prompt = prompts_for(tok, 5)[4]
    reqs = [GenerationRequest(prompt, max_tokens=10, temperature=0, frequency_penalty=1.5, ignore_eos=True),
            GenerationRequest(prompt, max_tokens=10, temperature=0, presence_penalty=2.0, ignore_eos=True),
            GenerationRequest(prompt, max_tokens=10, temperature=0.8, min_p=0.2, seed=4, ignore_eos=True)]
    sched = Scheduler(llm.model, tok, max_batch=4).start()
    try:
        got = run_all(sched, reqs)
    finally:
        sched.stop()

    def reference(req):
        ids, counts = list(prompt), torch.zeros(tok.vocab_size)
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        for _ in range(req.max_tokens):
            with torch.no_grad():
                logits = llm.model(torch.tensor([ids]))[0, -1].float()
            logits = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0).float()
            if req.temperature == 0:
                t = int(logits.argmax())
            else:
                probs = (logits / req.temperature).softmax(-1)
                probs[probs < req.min_p * probs.max()] = 0
                t = int(torch.multinomial(probs[None], 1, generator=gen)[0, 0])
            ids.append(t)
            counts[t] += 1
        return ids[len(prompt):]

    plain = offline(llm, GenerationRequest(prompt, max_tokens=10, temperature=0))
    for req, res in zip(reqs, got):
        assert res.token_ids == reference(req)
    assert got[0].token_ids != plain or got[1].token_ids != plain  # the penalties changed something
    assert len(set(got[0].token_ids)) > len(set(plain))  # frequency penalty: more distinct tokens


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tok):
    """A 60-token prompt with an 8-token prefill budget per iteration: the running stream keeps
    getting a token every iteration meanwhile, and both results equal LLM.generate."""
    llm = make_llm(tok)
    ids = tok.encode("ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3)
    long_prompt, short_prompt = ids[:60], ids[:4]
    sched = Scheduler(llm.model, tok, max_batch=4, prefill_chunk=8)
    events = []
    short = GenerationRequest(short_prompt, max_tokens=40, temperature=0, ignore_eos=True)
    long = GenerationRequest(long_prompt, max_tokens=3, temperature=0, ignore_eos=True)
    sched.submit(short, lambda out: events.append(("short", out)))
    with torch.inference_mode():
        sched._step(set())  # the short prompt is admitted and decodes
        sched.submit(long, lambda out: events.append(("long", out)))
        while sched.num_running or sched.num_waiting:
            sched._step(set())
    names = [n for n, o in events if o.token_ids]
    first_long = names.index("long")
    assert names[:first_long].count("short") >= 60 // 8  # one short token per prefill chunk of the long prompt
    got_short = [t for n, o in events if n == "short" for t in o.token_ids]
    got_long = [t for n, o in events if n == "long" for t in o.token_ids]
    assert got_short == generate_ids(llm.model, [short_prompt], max_new_tokens=40, temperature=0)[0]
    assert got_long == generate_ids(llm.model, [long_prompt], max_new_tokens=3, temperature=0)[0]


def test_cancelled_and_finished_sequences_free_their_cache_rows(tok):
    """A sequence cancelled halfway through its prefill and finished ones leave empty rows: the
    next request in the same row starts at slot 0 and equals LLM.generate."""
    llm = make_llm(tok)
    ids = tok.encode("ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3)
    sched = Scheduler(llm.model, tok, max_batch=2, prefill_chunk=8)
    got = []
    with torch.inference_mode():
        handle = sched.submit(GenerationRequest(ids[:40], max_tokens=5, temperature=0), got.append)
        sched._step(set())  # 8 of its 40 prompt tokens are in row 0
        assert sched.cache.lengths == [8, 0]
        sched._step({handle})  # what the scheduler thread does with a cancel(handle)
        assert sched.cache.lengths == [0, 0] and got[-1].finish_reason == "cancelled"
        req = GenerationRequest(ids[3:12], max_tokens=6, temperature=0, ignore_eos=True)
        sched.submit(req, got.append)
        while sched.num_running or sched.num_waiting:
            sched._step(set())
    assert [t for o in got[1:] for t in o.token_ids] == offline(llm, req)
    assert sched.cache.lengths == [0, 0]


def test_softcap_model_and_non_decoder_refused(tok):
    llm = make_llm(tok, logit_softcap=2.0, pos_encoding="sinusoidal")
    reqs = [request(i, p) for i, p in enumerate(prompts_for(tok, 6))]
    sched = Scheduler(llm.model, tok, max_batch=8).start()
    try:
        res = run_all(sched, reqs)
    finally:
        sched.stop()
    assert [r.token_ids for r in res] == [offline(llm, r) for r in reqs]
    with pytest.raises(LMForgeError, match="decoder-only language models; this model is 'encoder'"):
        Scheduler(type("Encoder", (torch.nn.Module,), {"family": "encoder"})(), tok)
