"""Generation engine: KV cache vs full recompute, sampling, batching, stop strings, EOS, streaming."""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import LMForgeError
from lmforge.infer.generate import TextTracker, generate, generate_ids, stream_text
from lmforge.infer.sampling import SamplingParams, apply_repetition_penalty, process_logits
from lmforge.models.decoder import Decoder, config_from_preset

EOS = 0


class ByteTok:
    """Byte-level BPE with no merges: every byte is a token, so multi-byte characters span tokens."""

    def __init__(self) -> None:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=258, special_tokens=["<|endoftext|>", "<|pad|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(["x"], trainer)
        self.hf = hf
        self.eos_id, self.pad_id = hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|pad|>")
        self.vocab_size = hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)


pytestmark = pytest.mark.usefixtures("one_thread")


TOK = ByteTok()
assert TOK.eos_id == EOS and TOK.vocab_size == 258


def random_model(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    # A large init std gives peaked, varied logits (a 0.02 init is nearly uniform and repetitive).
    cfg = config_from_preset("tiny", vocab_size=258, block_size=64, init_std=0.3, **overrides)
    return Decoder(cfg).eval()


def script_model(script: list[int]) -> Decoder:
    """A model whose greedy choice at position p is script[p + 1], whatever the tokens are:
    blocks output zero, the residual stream is a one-hot of the position, the head maps it."""
    cfg = config_from_preset("tiny", vocab_size=258, block_size=128, n_embd=128, tie_embeddings=False)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for lin in (block.attn.proj, block.mlp.fc_out):
                lin.weight.zero_()
                lin.bias.zero_()
        model.tok_emb.weight.zero_()
        model.pos_emb.weight.copy_(torch.eye(128))
        model.lm_head.weight.zero_()
        for p in range(len(script) - 1):
            model.lm_head.weight[script[p + 1], p] = 10.0
    return model


PREFIX = "héllo"
TEXT = " wörld, 日本語 😀 the quick brown fox."
SCRIPT = TOK.encode(PREFIX + TEXT) + [EOS]


def naive_greedy(model: Decoder, prompt: list[int], n: int) -> list[int]:
    """Reference: recompute the whole sequence at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


VARIANTS = {
    "learned": {},
    "rope": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "sliding_gqa": dict(pos_encoding="rope", n_head=4, n_kv_head=2, sliding_window=8, norm="rmsnorm", bias=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_greedy_equals_full_recompute(variant):
    model = random_model(**VARIANTS[variant])
    prompt = [5, 17, 99, 3, 200, 42, 7]
    got = generate_ids(model, [prompt], max_new_tokens=30, temperature=0)[0]
    want = naive_greedy(model, prompt, 30)
    assert got == want
    assert len(set(got)) > 3  # a real sequence, not one token repeated


@pytest.mark.parametrize("variant", ["learned", "sliding_gqa"])
def test_batch_with_left_padding_equals_one_at_a_time(variant):
    model = random_model(seed=1, **VARIANTS[variant])
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44, 45, 46], [7] * 4 + [250, 251, 9, 60, 61, 62, 63, 64]]
    batched = generate_ids(model, prompts, max_new_tokens=20, temperature=0, pad_id=TOK.pad_id)
    single = [generate_ids(model, [p], max_new_tokens=20, temperature=0)[0] for p in prompts]
    assert batched == single
    assert all(len(r) == 20 for r in batched)
    assert batched[0] == naive_greedy(model, prompts[0], 20)


def test_seeded_sampling_is_reproducible_and_depends_on_seed():
    model = random_model()
    a = generate_ids(model, [[1, 2, 3]], max_new_tokens=30, temperature=1.0, seed=123)
    b = generate_ids(model, [[1, 2, 3]], max_new_tokens=30, temperature=1.0, seed=123)
    c = generate_ids(model, [[1, 2, 3]], max_new_tokens=30, temperature=1.0, seed=124)
    assert a == b
    assert a != c
    # The private generator leaves torch's global RNG alone.
    torch.manual_seed(5)
    x = torch.rand(3)
    torch.manual_seed(5)
    generate_ids(model, [[1, 2, 3]], max_new_tokens=5, temperature=1.0, seed=1)
    assert torch.equal(torch.rand(3), x)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = random_model(seed=2)
    prompt = [[9, 8, 7, 6]]
    greedy = generate_ids(model, prompt, max_new_tokens=25, temperature=0)
    assert generate_ids(model, prompt, max_new_tokens=25, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate_ids(model, prompt, max_new_tokens=25, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_sampling_filters_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                         TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    input_ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    ours = process_logits(logits, params, seen)
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                 TopPLogitsWarper(0.8)):
        ref = proc(input_ids, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite])
    assert 1 <= int(finite.sum(dim=1).min()) and int(finite.sum(dim=1).max()) < 20


def test_repetition_penalty_formula():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0]]


def test_strong_repetition_penalty_prevents_repeats():
    model = random_model(seed=3)
    prompt = [1, 2, 3, 4]
    plain = generate_ids(model, [prompt], max_new_tokens=40, temperature=0)[0]
    assert len(set(prompt + plain)) < len(prompt + plain)  # without it, the model repeats itself
    out = generate_ids(model, [prompt], max_new_tokens=20, temperature=0, repetition_penalty=1e4)[0]
    assert len(set(prompt + out)) == len(prompt) + 20


def test_script_model_and_eos_stop():
    model = script_model(SCRIPT)
    prompt = TOK.encode(PREFIX)
    (g,) = generate(model, [prompt], max_new_tokens=100, temperature=0, eos_id=EOS, tokenizer=TOK)
    assert g.text == TEXT
    assert g.finish_reason == "eos"
    assert g.ids == SCRIPT[len(prompt):-1]  # EOS itself not included
    (g,) = generate(model, [prompt], max_new_tokens=5, temperature=0, eos_id=EOS, tokenizer=TOK)
    assert g.finish_reason == "length" and g.ids == SCRIPT[len(prompt):len(prompt) + 5]


def test_finished_rows_stop_growing():
    model = script_model(SCRIPT)
    short, long_ = TOK.encode("h"), TOK.encode(PREFIX + " wörld,")
    gens = generate(model, [short, long_], max_new_tokens=100, temperature=0, eos_id=EOS, tokenizer=TOK,
                    pad_id=TOK.pad_id)
    assert [g.finish_reason for g in gens] == ["eos", "eos"]
    assert gens[0].ids == SCRIPT[len(short):-1]
    assert gens[1].ids == SCRIPT[len(long_):-1]
    assert gens[1].text == " 日本語 😀 the quick brown fox."


def test_stop_strings_cut_output():
    model = script_model(SCRIPT)
    prompt = TOK.encode(PREFIX)
    (g,) = generate(model, [prompt], max_new_tokens=100, temperature=0, eos_id=EOS, tokenizer=TOK,
                    stop=["brown", "quick"])
    assert g.text == " wörld, 日本語 😀 the "
    assert g.finish_reason == "stop"
    assert TOK.decode(g.ids) == " wörld, 日本語 😀 the quick"  # ids run to the token completing the stop
    # A stop string that spans a multi-byte character split across byte tokens.
    (g,) = generate(model, [prompt], max_new_tokens=100, temperature=0, eos_id=EOS, tokenizer=TOK, stop="本語")
    assert g.text == " wörld, 日"
    with pytest.raises(LMForgeError, match="stop strings need a tokenizer"):
        generate(model, [prompt], max_new_tokens=3, stop="x")


def test_streaming_pieces_join_to_text_and_hold_back_partial_characters():
    model = script_model(SCRIPT)
    prompt = TOK.encode(PREFIX)
    pieces = list(stream_text(model, TOK, prompt, max_new_tokens=100, temperature=0, eos_id=EOS))
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    n_tokens = len(SCRIPT) - len(prompt) - 1
    assert len(pieces) < n_tokens  # the bytes of ö, 日本語 and 😀 were held back until complete
    assert "😀" in pieces  # four byte tokens released as one character

    pieces = list(stream_text(model, TOK, prompt, max_new_tokens=100, temperature=0, eos_id=EOS, stop="brown fox"))
    assert "".join(pieces) == " wörld, 日本語 😀 the quick "
    assert all("b" not in p for p in pieces)  # "b", "br", ... were held back and then dropped


def test_streaming_matches_generate_when_sampling():
    model = random_model(seed=4)
    prompt = [40, 50, 60]
    for seed in range(3):
        (g,) = generate(model, [prompt], max_new_tokens=30, temperature=1.0, top_k=50, seed=seed, tokenizer=TOK)
        pieces = list(stream_text(model, TOK, prompt, max_new_tokens=30, temperature=1.0, top_k=50, seed=seed))
        assert "".join(pieces) == g.text == TOK.decode(g.ids)
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_text_tracker_on_multibyte_text():
    text = "aé日本語😀b€ ok"
    ids = TOK.encode(text)
    tracker, pieces = TextTracker(TOK), []
    for t in ids:
        tracker.push(t)
        pieces.append(tracker.take())
    tracker.finish()
    pieces.append(tracker.take())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert [p for p in pieces if p] == ["a", "é", "日", "本", "語", "😀", "b", "€", " ", "o", "k"]


def test_prompt_longer_than_context_is_an_error():
    model = random_model()  # block_size 64
    with pytest.raises(LMForgeError) as e:
        generate_ids(model, [[1] * 70], max_new_tokens=5)
    assert str(e.value) == "prompt has 70 tokens but the model's context is 64"


def test_max_new_tokens_clamped_to_context_with_one_warning():
    model = random_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate_ids(model, [[1] * 60], max_new_tokens=10, temperature=0)[0]
    assert len(out) == 4
    msgs = [str(w.message) for w in caught]
    assert msgs == ["prompt (60 tokens) + max_new_tokens (10) exceeds the model's context (64); "
                    "generating at most 4 new tokens"]


def test_bad_arguments():
    model = random_model()
    with pytest.raises(LMForgeError, match="temperature must be >= 0"):
        generate_ids(model, [[1]], temperature=-1)
    with pytest.raises(LMForgeError, match="top_p must be in"):
        generate_ids(model, [[1]], top_p=0.0)
    with pytest.raises(LMForgeError, match="outside the model's vocabulary"):
        generate_ids(model, [[1, 258]])
    with pytest.raises(LMForgeError, match="prompt is empty"):
        generate_ids(model, [[]])
