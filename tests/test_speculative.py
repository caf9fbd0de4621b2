"""Speculative decoding: greedy output token-identical to decoding without guesses (draft model and
prompt lookup), sampled output distributed as the target's, exact acceptance statistics, the
scheduler and the server with a draft, and one clear message for each bad input."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from lmforge.checkpoint import write_model_dir
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM
from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all
from lmforge.infer.generate import generate
from lmforge.infer.speculative import PromptLookup, Speculation, accept_guesses, generate_speculative
from lmforge.infer.sampling import SamplingParams
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.tokenizer import Tokenizer
from reference_libs import reference_lib

CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. " * 3,
          "ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


def decoder(vocab: int, seed: int, block_size: int = 96, **overrides) -> Decoder:
    torch.manual_seed(seed)
    cfg = config_from_preset("tiny", vocab_size=vocab, block_size=block_size, init_std=0.3, **overrides)
    return Decoder(cfg).eval()


def llm_of(model: Decoder, tok: Tokenizer | None) -> LLM:
    return LLM(model, model.cfg, tok)


@pytest.fixture(scope="module")
def pair(tok):
    """A target and a smaller draft (one layer) over the same tokenizer; the draft is the target's
    first layer, embeddings and head, and the target's second layer is damped, so the draft agrees
    with the target often but not always."""
    target = decoder(tok.vocab_size, 0, n_layer=2)
    with torch.no_grad():
        for name in ("attn.proj", "mlp.fc_out"):
            target.get_submodule(f"blocks.1.{name}").weight.mul_(0.3)
    draft = decoder(tok.vocab_size, 0, n_layer=1)
    state = {k: v for k, v in target.state_dict().items() if not k.startswith("blocks.1.")}
    draft.load_state_dict(state)
    return llm_of(target, tok), llm_of(draft, tok)


PROMPT = "ROMEO: but soft, what light through yonder"


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_with_a_draft_is_token_identical(pair, tok, k):
    target, draft = pair
    prompts = [tok.encode(PROMPT), tok.encode("hello world, this"), tok.encode("It is")]
    for p in prompts:
        want = target.generate(p, max_new_tokens=40, temperature=0)
        assert target.generate(p, max_new_tokens=40, temperature=0, draft=draft, num_draft_tokens=k) == want
    texts = ["ROMEO: but", "hello world, this is"]
    want = target.generate(texts, max_new_tokens=30, temperature=0, stop=["e "])
    assert target.generate(texts, max_new_tokens=30, temperature=0, stop=["e "], draft=draft,
                           num_draft_tokens=k) == want
    stats = target.last_stats
    assert 0 < stats.accepted < stats.proposed  # a draft that is sometimes right, sometimes wrong
    assert stats.acceptance_rate == stats.accepted / stats.proposed
    assert stats.tokens_per_target_forward == stats.tokens / stats.target_forwards > 1.0


def test_stream_with_a_draft_joins_to_generate(pair):
    target, draft = pair
    for kwargs in (dict(temperature=0), dict(temperature=0.9, seed=5, top_p=0.9)):
        for spec in (dict(draft=draft, num_draft_tokens=3), dict(prompt_lookup_num_tokens=2)):
            text = target.generate(PROMPT, max_new_tokens=30, stop=["e "], **spec, **kwargs)
            stats = target.last_stats
            assert "".join(target.stream(PROMPT, max_new_tokens=30, stop=["e "], **spec, **kwargs)) == text
            assert target.last_stats == stats


def test_greedy_with_stop_ids_penalty_and_bf16_cache(pair, tok):
    target, draft = pair
    p = tok.encode(PROMPT)
    plain = target.generate(p, max_new_tokens=40, temperature=0, repetition_penalty=1.3)
    assert target.generate(p, max_new_tokens=40, temperature=0, repetition_penalty=1.3, draft=draft) == plain
    bf16 = target.generate(p, max_new_tokens=40, temperature=0, kv_cache_dtype="bf16")
    assert target.generate(p, max_new_tokens=40, temperature=0, kv_cache_dtype="bf16", draft=draft) == bf16
    # a stop id mid-way (one the plain run produces): both stop at it
    plain = target.generate(p, max_new_tokens=40, temperature=0)
    stop = plain[5]
    (want,) = generate(target.model, [p], max_new_tokens=40, temperature=0, eos_id=stop)
    (got,), _ = generate_speculative(target.model, [p], Speculation(draft.model, 3), max_new_tokens=40,
                                     temperature=0, eos_id=stop)
    assert (got.ids, got.finish_reason) == (want.ids, want.finish_reason) == (plain[:plain.index(stop)], "eos")


def test_a_draft_equal_to_the_target_accepts_every_guess(tok):
    """No tokenizer (no EOS), so every row runs its whole budget: 1 token from the prefill, then
    steps of k guesses + 1 token."""
    model = decoder(tok.vocab_size, 0)
    target = llm_of(model, None)
    k = 3
    want = target.generate([5, 9, 11], max_new_tokens=1 + 4 * (k + 1), temperature=0)
    out = target.generate([5, 9, 11], max_new_tokens=1 + 4 * (k + 1), temperature=0, draft=target, num_draft_tokens=k)
    assert out == want
    s = target.last_stats
    assert (s.proposed, s.accepted, s.target_forwards, s.tokens) == (4 * k, 4 * k, 4, 4 * (k + 1))
    assert (s.acceptance_rate, s.tokens_per_target_forward) == (1.0, k + 1)


def test_prompt_lookup_proposes_what_followed_the_latest_ngram():
    look = PromptLookup(max_ngram=2)
    params = SamplingParams(0)
    # latest 2-gram (7, 8) first occurs at 1: propose what followed it
    assert look.propose([1, 7, 8, 9, 10, 11, 7, 8], 3, params, None, None) == ([9, 10, 11], None)
    # no 2-gram match: the latest 1-gram (4) first occurs at 0
    assert look.propose([4, 5, 6, 2, 4], 2, params, None, None) == ([5, 6], None)
    assert look.propose([1, 2, 3], 4, params, None, None) == ([], None)  # nothing to copy
    assert look.propose([3, 1, 3], 4, params, None, None) == ([1, 3], None)  # as many as there are


def test_prompt_lookup_greedy_is_token_identical_and_accepts_copies(tok):
    model = decoder(tok.vocab_size, 3)
    target = llm_of(model, None)
    prompt = tok.encode(PROMPT * 2)
    want = target.generate(prompt, max_new_tokens=40, temperature=0)
    assert target.generate(prompt, max_new_tokens=40, temperature=0, prompt_lookup_num_tokens=4) == want
    # a model that repeats its prompt: its own output is all copies
    repeat = [int(t) for t in want[:8]] * 4
    assert target.generate(repeat, max_new_tokens=20, temperature=0,
                           prompt_lookup_num_tokens=3) == target.generate(repeat, max_new_tokens=20, temperature=0)


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = int(counts.sum())
    keep = probs * n >= 5  # chi-square wants enough expected counts per cell; pool the rest
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([probs[keep], probs[~keep].sum()[None]]).double() * n
    if float(exp[-1]) == 0.0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * (obs.sum() / exp.sum()).item()).pvalue)


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_draws_from_the_target_distribution(point_mass):
    """20k rows of one step with 2 guesses on an 8-token vocabulary: the first emitted token (the
    first guess when accepted, else the draw after its rejection) follows the target's p, not q."""
    gen = torch.Generator().manual_seed(0)
    V, K, B = 8, 2, 20000
    p_TV = torch.softmax(torch.randn(K + 1, V, generator=gen) * 2, -1)
    q_KV = torch.softmax(torch.randn(K, V, generator=gen) * 2, -1)
    if point_mass:  # prompt lookup: guesses are given, q is a point mass on each
        guesses_BK = torch.tensor([[int(q_KV[0].argmax()), 3]]).repeat(B, 1)
        q_BKV = None
    else:
        guesses_BK = torch.stack([torch.multinomial(q_KV[i], B, replacement=True, generator=gen) for i in range(K)], 1)
        q_BKV = q_KV[None].expand(B, K, V)
    n_B, tok_B = accept_guesses(p_TV[None].expand(B, K + 1, V), guesses_BK, q_BKV, gen)
    first_B = torch.where(n_B > 0, guesses_BK[:, 0], tok_B)
    counts = torch.bincount(first_B, minlength=V)
    assert _chi2_p(counts, p_TV[0]) > 1e-3
    if not point_mass:
        assert _chi2_p(counts, q_KV[0]) < 1e-6
    # all guesses accepted: the bonus token comes from p_K
    bonus = tok_B[n_B == K]
    assert _chi2_p(torch.bincount(bonus, minlength=V), p_TV[K]) > 1e-3


def test_sampled_generation_with_a_draft_follows_the_target():
    """End to end on an 8-token vocabulary: the second generated token (the first one guessed by
    the draft) has the target's distribution p(t2) = sum over t1 of p(t1) p(t2 | t1)."""
    target, draft = llm_of(decoder(8, 0), None), llm_of(decoder(8, 1, n_layer=1), None)
    prompt, N = [1, 2, 3], 1500
    samples = target.generate(prompt, max_new_tokens=3, temperature=1.0, seed=0, num_samples=N, draft=draft,
                              num_draft_tokens=2)
    assert target.last_stats.proposed == N

    def second_token(model: Decoder) -> torch.Tensor:
        with torch.no_grad():
            p1 = target.model(torch.tensor([prompt]))[0, -1].softmax(-1)
            rows = torch.tensor([prompt + [t] for t in range(8)])
            return p1 @ model(rows)[:, -1].softmax(-1)

    counts = torch.bincount(torch.tensor([s[1] for s in samples]), minlength=8)
    assert _chi2_p(counts, second_token(target.model)) > 1e-3
    assert _chi2_p(counts, second_token(draft.model)) < 1e-6


def test_scheduler_with_a_draft_gives_the_same_greedy_tokens(pair, tok):
    target, draft = pair
    prompts = [tok.encode(t) for t in (PROMPT, "hello world", "It is the", "soft, what")]
    reqs = [GenerationRequest(p, max_tokens=20, temperature=0) for p in prompts]
    reqs.append(GenerationRequest(prompts[0], max_tokens=20, temperature=0, logprobs=2))  # decodes without guesses
    reqs.append(GenerationRequest(prompts[0], max_tokens=20, temperature=0, stop=["e "]))
    reqs.append(GenerationRequest(prompts[1], max_tokens=20, temperature=0.8, seed=3))
    reqs.append(GenerationRequest(prompts[2], max_tokens=20, temperature=1.2, seed=4, top_k=50, repetition_penalty=1.3))
    plain = Scheduler(target.model, tok, max_batch=3).start()
    spec = Scheduler(target.model, tok, max_batch=3, draft=draft.model, num_draft_tokens=3).start()
    try:
        want, got = run_all(plain, reqs), run_all(spec, reqs)
    finally:
        plain.stop()
        spec.stop()
    for w, g in list(zip(want, got))[:6]:
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    assert got[0].token_ids == target.generate(prompts[0], max_new_tokens=20, temperature=0)
    # sampled: the same guesses and draws as LLM.generate with the draft and the same seed
    for r, g in zip(reqs[6:], got[6:]):
        assert g.token_ids == target.generate(r.prompt_ids, max_new_tokens=20, temperature=r.temperature, seed=r.seed,
                                              top_k=r.top_k, repetition_penalty=r.repetition_penalty, draft=draft,
                                              num_draft_tokens=3)
    assert spec.spec_stats.accepted > 0 and spec.spec_stats.tokens_per_target_forward > 1.0


def test_server_with_a_draft_answers_like_without(pair, tok):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    from lmforge.serve.config import ServerConfig
    from lmforge.serve.engine import Engine

    target, draft = pair
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    texts = []
    for d in (None, draft):
        cfg = ServerConfig(served_model_name="m", max_batch=2, num_draft_tokens=3)
        engine = Engine.from_llm(target, cfg, draft=d)
        try:
            with TestClient(create_app(cfg, engine)) as client:
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["text"])
                metrics = client.get("/metrics").text
            stats = engine.scheduler.spec_stats
            assert f"lmforge_spec_decode_accepted_tokens {float(stats.accepted)}" in metrics
            assert f"lmforge_spec_decode_acceptance_rate {stats.acceptance_rate}" in metrics
            assert (stats.accepted > 0) == (d is not None)
        finally:
            engine.scheduler.stop()
    assert texts[1] == texts[0] == target.generate(PROMPT, max_new_tokens=24, temperature=0)


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_drafts_and_settings_are_one_clear_error(pair, tok):
    target, draft = pair
    other_vocab = llm_of(decoder(tok.vocab_size + 1, 0, n_layer=1), None)
    with pytest.raises(LMForgeError) as e:
        target.generate("ROMEO:", draft=other_vocab)
    assert str(e.value) == (f"the draft's vocabulary has {tok.vocab_size + 1} tokens but the target's has "
                            f"{tok.vocab_size}; a draft must share the target's tokenizer")
    other_tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ,.:?"])
    i = next(i for i in range(tok.vocab_size) if tok.id_to_token(i) != other_tok.id_to_token(i))
    with pytest.raises(LMForgeError) as e:
        target.generate("ROMEO:", draft=LLM(draft.model, draft.config, other_tok))
    assert str(e.value) == (f"the draft's tokenizer differs from the target's: token {i} is "
                            f"{tok.id_to_token(i)!r} for the target and {other_tok.id_to_token(i)!r} for the draft; "
                            "a draft must share the target's tokenizer")
    cases = [(dict(draft=draft, num_draft_tokens=0), "num_draft_tokens must be a positive integer, got 0"),
             (dict(prompt_lookup_num_tokens=-1), "prompt_lookup_num_tokens must be a positive integer, got -1"),
             (dict(draft=draft, prompt_lookup_num_tokens=2),
              "give either a draft model or prompt_lookup_num_tokens, not both"),
             (dict(draft=draft, num_beams=2), "speculative decoding does not combine with beam search; use num_beams=1"),
             (dict(kv_cache_dtype="fp16"), "kv_cache_dtype must be 'auto', 'fp32' or 'bf16', got 'fp16'")]
    for kwargs, message in cases:
        with pytest.raises(LMForgeError) as e:
            target.generate("ROMEO:", max_new_tokens=4, **kwargs)
        assert str(e.value) == message
    short = llm_of(decoder(tok.vocab_size, 0, block_size=16, n_layer=1), tok)
    with pytest.raises(LMForgeError) as e:
        target.generate("ROMEO:", max_new_tokens=30, draft=short)
    n = len(tok.encode("ROMEO:")) + 29
    assert str(e.value) == (f"the draft's context (16 tokens) is shorter than the prompt plus the new tokens ({n}); "
                            "use a draft with a longer context or generate fewer tokens")


def test_seq2seq_refuses_speculation():
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset as s2s_preset

    torch.manual_seed(0)
    cfg = s2s_preset("t5-tiny", vocab_size=64)
    llm = LLM(Seq2Seq(cfg).eval(), cfg, None)
    with pytest.raises(LMForgeError) as e:
        llm.generate([5, 6, 7], prompt_lookup_num_tokens=3)
    assert str(e.value) == f"speculative decoding works with decoder-only models; this is a {llm.family.name} model"


def test_cli_generate_with_a_draft_and_its_errors(pair, tok, tmp_path, capsys):
    target, draft = pair
    tok.save(tmp_path / "tok.json")
    write_model_dir(tmp_path / "target", target.model, tmp_path / "tok.json")
    write_model_dir(tmp_path / "draft", draft.model, tmp_path / "tok.json")
    write_model_dir(tmp_path / "bad", decoder(tok.vocab_size + 1, 0, n_layer=1))

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["generate", str(tmp_path / "target"), "--prompt", PROMPT, "--temperature", "0",
                     "--max-new-tokens", "20", "--threads", "1", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, plain, _ = run()
    assert code == 0
    code, out, err = run("--draft", str(tmp_path / "draft"), "--num-draft-tokens", "3", "--kv-cache-dtype", "fp32")
    assert (code, out) == (0, plain)
    assert err.startswith("speculative decoding: acceptance rate ")
    assert run("--prompt-lookup-num-tokens", "3")[:2] == (0, plain)
    assert run("--draft", str(tmp_path / "bad")) == (
        2, "", f"error: the draft's vocabulary has {tok.vocab_size + 1} tokens but the target's has {tok.vocab_size}; "
               "a draft must share the target's tokenizer\n")
    code, out, err = run("--draft", str(tmp_path / "draft"), "--stream")
    assert (code, out) == (0, plain) and err.startswith("speculative decoding: acceptance rate ")
    for args, fragment in ((["--num-draft-tokens", "0"], "argument --num-draft-tokens: expected a positive integer, got '0'"),
                           (["--kv-cache-dtype", "fp16"], "argument --kv-cache-dtype: invalid choice: 'fp16'")):
        with pytest.raises(SystemExit) as e:
            run(*args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_same_tokens_as_transformers_assisted_generation(tmp_path):
    """The pair exported for transformers (Qwen3 shape): `generate(assistant_model=...)` greedy gives
    the tokens lmforge's speculative decoding gives."""
    transformers = reference_lib("transformers")
    from lmforge.interop.hf import convert_to_hf

    shape = dict(block_size=64, pos_encoding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", bias=False,
                 tie_embeddings=False)
    target, draft = decoder(97, 0, n_layer=2, **shape), decoder(97, 0, n_layer=1, **shape)
    with torch.no_grad():
        for name in ("attn.proj", "mlp.fc_out"):
            target.get_submodule(f"blocks.1.{name}").weight.mul_(0.3)
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("blocks.1.")})
    hf = [transformers.AutoModelForCausalLM.from_pretrained(
        convert_to_hf(write_model_dir(tmp_path / name, m), tmp_path / f"hf-{name}"), dtype=torch.float32).eval()
        for name, m in (("target", target), ("draft", draft))]
    for m in hf:
        m.generation_config.eos_token_id = None
    prompt = [5, 17, 33, 2, 90, 41, 41, 7]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = hf[0].generate(ids, attention_mask=torch.ones_like(ids), assistant_model=hf[1], max_new_tokens=30,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    got = llm_of(target, None).generate(prompt, max_new_tokens=30, temperature=0, draft=llm_of(draft, None),
                                        num_draft_tokens=4)
    assert got == want


def test_serve_refuses_a_missing_draft_and_a_bad_cache_dtype(pair, tmp_path):
    from lmforge.serve import serve

    model = str(write_model_dir(tmp_path / "m", pair[0].model))
    with pytest.raises(LMForgeError) as e:
        serve(model, port=8123, draft=str(tmp_path / "nope"))
    assert str(e.value) == f"draft model not found: {tmp_path / 'nope'}"
    with pytest.raises(LMForgeError) as e:
        serve(model, port=8123, kv_cache_dtype="fp16")
    assert str(e.value) == "kv_cache_dtype must be 'auto', 'fp32' or 'bf16', got 'fp16'"
