"""The decoder: exact parameter counts, presets, masks, KV cache and padding behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.models.decoder import PRESETS, Decoder, DecoderConfig, config_from_preset
from lmforge.nn.layers import sinusoidal_table

FLAVOURS = {
    "gpt2-style": dict(),
    "llama-style": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2),
    "sinusoidal-qknorm": dict(pos_encoding="sinusoidal", qk_norm=True, mlp="relu2", logit_softcap=30.0),
    "qwen2-window": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, sliding_window=8),
}


def test_published_parameter_counts():
    assert config_from_preset("gpt2").num_params() == 124_439_808
    assert config_from_preset("gpt2-medium").num_params() == 354_823_168
    assert config_from_preset("gpt2-large").num_params() == 774_030_080
    assert config_from_preset("gpt2-xl").num_params() == 1_557_611_200
    assert config_from_preset("llama2-7b").num_params() == 6_738_415_616
    assert round(config_from_preset("gpt3-175b").num_params() / 1e9, 1) == 174.6


@pytest.mark.parametrize("preset", ["tiny", "small", "gpt2", "llama-small"])
def test_analytic_count_equals_instantiated_model(preset):
    cfg = config_from_preset(preset)
    with torch.device("meta"):
        model = Decoder(cfg)
    assert model.num_params() == cfg.num_params()


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_analytic_count_for_every_flavour(flavour):
    cfg = config_from_preset("tiny", **FLAVOURS[flavour])
    assert Decoder(cfg).num_params() == cfg.num_params()


def test_flops_and_kv_cache_formulas():
    cfg = config_from_preset("gpt2")
    # 6 * (non-embedding params + LM head matmul) + 12 * L * H * D * T
    n = 85_056_000 + 50257 * 768
    assert cfg.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert cfg.kv_cache_bytes_per_token(2) == 2 * 12 * 12 * 64 * 2
    gqa = config_from_preset("llama-small")
    assert gqa.kv_cache_bytes_per_token(2) == 2 * 12 * 4 * 64 * 2


def test_swiglu_hidden_default_follows_llama():
    assert DecoderConfig(n_embd=4096, n_head=32, mlp="swiglu").mlp_hidden == 11008
    assert DecoderConfig(n_embd=384, n_head=6).mlp_hidden == 1536


def test_bad_model_configs_name_the_problem():
    with pytest.raises(LMForgeError, match=r"model.n_head \(6\) must be a multiple of model.n_kv_head \(4\)"):
        DecoderConfig(n_head=6, n_kv_head=4)
    with pytest.raises(LMForgeError, match="model.pos_encoding must be one of learned, sinusoidal, rope, got 'alibi'"):
        DecoderConfig(pos_encoding="alibi")
    with pytest.raises(LMForgeError, match=r"unknown preset 'gtp2' \(did you mean 'gpt2'\?\)"):
        config_from_preset("gtp2")


def test_tied_head_shares_the_embedding():
    model = Decoder(config_from_preset("tiny"))
    assert model.lm_head.weight is model.tok_emb.weight
    untied = Decoder(config_from_preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", **FLAVOURS["llama-style"])).eval()
    x = torch.randint(0, 512, (2, 24))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(model(x)[:, :12], model(y)[:, :12], rtol=0, atol=1e-6)


def test_sliding_window_limits_what_a_position_sees():
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", n_layer=1, **FLAVOURS["qwen2-window"])).eval()
    x = torch.randint(0, 512, (1, 30))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % 512  # position 5 is outside the window of positions >= 13 (5 + 8)
    diff = (model(x) - model(y)).abs().amax(-1)[0]
    assert diff[13:].max().item() == 0.0
    assert diff[5:13].min().item() > 0.0


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_kv_cache_prefill_and_steps_equal_full_forward(flavour):
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", **FLAVOURS[flavour])).eval()
    x = torch.randint(0, 512, (2, 40))
    full = model(x)
    cache = model.new_cache(2, 64)
    pieces = [model(x[:, :25], cache=cache)]
    pieces += [model(x[:, t:t + 1], cache=cache) for t in range(25, 33)]
    pieces.append(model(x[:, 33:], cache=cache))  # a multi-token chunk after a prefill
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_left_padding_gives_the_unpadded_logits(flavour):
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", **FLAVOURS[flavour])).eval()
    a, b = torch.randint(0, 512, (1, 20)), torch.randint(0, 512, (1, 13))
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 7:] = a[0], b[0]
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, :7] = False
    out = model(batch, pad_mask_BT=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], model(a)[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1, 7:], model(b)[0], rtol=0, atol=2e-5)
    # The same through the KV cache, then a decode step.
    cache = model.new_cache(2, 32)
    model(batch, pad_mask_BT=mask, cache=cache)
    nxt = torch.tensor([[5], [9]])
    step = model(nxt, cache=cache)
    torch.testing.assert_close(step[1, -1], model(torch.cat([b, nxt[1:]], 1))[0, -1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_cache_rows_of_different_lengths_equal_each_row_alone(flavour):
    """The serving scheduler's layout: every row its own length, prefilled through a one-row view
    (two chunks for the first), then decode steps on all rows at once."""
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", **FLAVOURS[flavour])).eval()
    prompts = [torch.randint(0, 512, (1, n)) for n in (17, 5, 11)]
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        model(prompts[0][:, :9], cache=cache.rows(0, 1))
        model(prompts[0][:, 9:], cache=cache.rows(0, 1))
        for r in (1, 2):
            model(prompts[r], cache=cache.rows(r, r + 1))
        assert cache.lengths == [17, 5, 11]
        nxt = torch.tensor([[3], [4], [5]])
        for _ in range(2):
            step = model(nxt, cache=cache)
            for r in range(3):
                prompts[r] = torch.cat([prompts[r], nxt[r:r + 1]], 1)
                torch.testing.assert_close(step[r, -1], model(prompts[r])[0, -1], rtol=0, atol=2e-5)
            nxt = nxt + 1
        # two tokens per row at once (how speculative decoding verifies drafts), then roll them back
        pair = torch.tensor([[6, 7], [8, 9], [10, 11]])
        out = model(pair, cache=cache)
        for r in range(3):
            full = model(torch.cat([prompts[r], pair[r:r + 1]], 1))[0, -2:]
            torch.testing.assert_close(out[r], full, rtol=0, atol=2e-5)
        cache.truncate(2)
    assert cache.lengths == [19, 7, 13]


def test_bf16_cache_gives_the_fp32_greedy_tokens():
    from lmforge.infer.generate import generate_ids

    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", init_std=0.3, **FLAVOURS["llama-style"])).eval()
    prompt = torch.randint(0, 512, (1, 12))
    cache = model.new_cache(1, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        toks = [int(model(prompt, cache=cache, last_only=True)[0, -1].argmax())]
        for _ in range(15):
            toks.append(int(model(torch.tensor([toks[-1:]]), cache=cache)[0, -1].argmax()))
    assert cache.dtype == torch.bfloat16 and cache.nbytes() * 2 == model.new_cache(1, 40).nbytes()
    assert toks == generate_ids(model, prompt.tolist(), max_new_tokens=16, temperature=0)[0]


def test_context_overflow_is_a_clear_error():
    model = Decoder(config_from_preset("tiny")).eval()
    with pytest.raises(LMForgeError, match=r"sequence of 129 tokens is longer than the context \(128\)"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_sinusoidal_table_matches_the_formula():
    table = sinusoidal_table(50, 16)
    pos, i = 37, 3
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 16)), abs=1e-6)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", **FLAVOURS["llama-style"]))
    x = torch.randint(0, 512, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert abs(loss.item() - math.log(512)) < 0.1  # a fresh model predicts ~uniformly
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_info_cli_prints_exact_counts(capsys):
    assert main(["info", "--preset", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "36,864 bytes bf16" in out
    assert main(["info", "--preset", "gpt3-175b", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 174_604_259_328
    assert info["kv_cache_bytes_per_token"]["bf16"] == 2 * 96 * 12288 * 2


def test_info_cli_overrides_and_errors(capsys):
    assert main(["info", "--preset", "gpt2", "--model.n_layer", "2", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 124_439_808 - 10 * 7_087_872
    assert main(["info", "--preset", "gpt2", "--model.n_layr", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'model.n_layr' (did you mean 'n_layer'?)")
    assert main(["info", "--preset", "gpt2", "--model.n_layer", "two"]) == 2
    assert capsys.readouterr().err == "error: config key 'model.n_layer' must be an integer, got 'two'\n"


def test_presets_are_all_valid():
    for name in PRESETS:
        cfg = config_from_preset(name)
        assert cfg.preset == name and cfg.num_params() > 0
