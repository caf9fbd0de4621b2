"""Encoder-decoders (T5 v1.0 / v1.1, BART) against transformers: logits with padding on both sides,
HF folder import/export, cached decoding, greedy and beam-search generation token for token, and
beam search for a decoder. Reference models are tiny random transformers models built from configs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from reference_libs import reference_lib
transformers = reference_lib("transformers")

from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.infer.beam import beam_search_decoder  # noqa: E402
from lmforge.infer.seq2seq import generate_seq2seq, right_pad  # noqa: E402
from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir  # noqa: E402
from lmforge.interop.seq2seq import config_from_hf, state_from_hf, state_to_hf  # noqa: E402
from lmforge.models.seq2seq import PRESETS, Seq2Seq, config_from_preset  # noqa: E402

V = 64
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


def randomize_(model: torch.nn.Module, seed: int, std: float) -> None:
    """Every parameter random (norm weights around 1), so a swapped or dropped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = std * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if p.dim() == 1 and "norm" in name and name.endswith("weight") else noise)


def hf_model(kind: str, seed: int = 0, std: float = 0.3, dec_layers: int = 3) -> torch.nn.Module:
    if kind.startswith("t5"):
        extra = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False) if kind == "t5-v1.1" else {}
        cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=dec_layers,
                                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                    dropout_rate=0.0, decoder_start_token_id=0, **extra)
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
                                      decoder_ffn_dim=40, max_position_embeddings=40, dropout=0.0,
                                      scale_embedding=kind == "bart-scaled")
        model = transformers.BartForConditionalGeneration(cfg)
    randomize_(model, seed, std)
    if kind.startswith("bart"):
        with torch.no_grad():
            model.final_logits_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def ours_from(hf: torch.nn.Module) -> Seq2Seq:
    cfg = config_from_hf(hf.config.to_dict(), tied=True)
    model = Seq2Seq(cfg).eval()
    model.load_state_dict(state_from_hf(hf.state_dict(), cfg), strict=False)
    return model


KINDS = ["t5", "t5-v1.1", "bart", "bart-scaled"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_with_padding_on_both_sides(kind):
    hf = hf_model(kind)
    ours = ours_from(hf)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (3, 11), generator=g)
    tgt = torch.randint(3, V, (3, 7), generator=g)
    src_mask = torch.ones(3, 11, dtype=torch.long)
    src_mask[1, 8:] = 0
    src_mask[2, 4:] = 0
    tgt_mask = torch.ones(3, 7, dtype=torch.long)
    tgt_mask[2, 5:] = 0
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask).logits
        got = ours(src, tgt, src_mask_BS=src_mask.bool(), tgt_mask_BT=tgt_mask.bool())
        # padding really is ignored: row 2 alone, unpadded, gives the same logits
        alone = ours(src[2:, :4], tgt[2:, :5])
    valid = tgt_mask.bool()
    assert (ref - got)[valid].abs().max().item() < TOL
    assert (alone[0] - got[2, :5]).abs().max().item() < TOL
    assert ref.abs().max().item() > 0.5  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_cached_decoding_equals_full_forward(kind):
    ours = ours_from(hf_model(kind))
    src = torch.tensor([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]])
    mask = src != 0 if kind == "t5" else torch.ones_like(src, dtype=torch.bool)
    tgt = torch.tensor([[0, 4, 9, 3, 17, 22], [0, 8, 8, 2, 30, 31]])
    with torch.no_grad():
        full = ours(src, tgt, src_mask_BS=mask)
        memory = ours.encode(src, mask)
        cache = ours.new_cache(2, 6, src_mask_BS=mask)
        first = ours.decode(tgt[:, :2], memory, cache=cache)  # a two-token prefill, then single steps
        steps = [first] + [ours.decode(tgt[:, t:t + 1], None, cache=cache) for t in range(2, 6)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < TOL


@pytest.mark.parametrize("kind", ["t5", "t5-v1.1", "bart"])
def test_hf_folder_import_export_round_trip(kind, tmp_path):
    hf = hf_model(kind, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg, _ = load_hf_dir(tmp_path / "hf")
    src = torch.tensor([[5, 6, 7, 8, 1]])
    tgt = torch.tensor([[0, 4, 9, 3]])
    with torch.no_grad():
        ref = hf(input_ids=src, decoder_input_ids=tgt).logits
        assert (model(src, tgt) - ref).abs().max().item() < TOL

    convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "model_config.json").read_text())
    assert meta["family"] == "seq2seq" and meta["config"]["arch"] == kind.split("-")[0]
    convert_to_hf(tmp_path / "ours", tmp_path / "back")
    cls = type(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back, info = cls.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert (back.eval()(input_ids=src, decoder_input_ids=tgt).logits - ref).abs().max().item() < TOL


def test_state_dict_round_trip_is_exact():
    for kind in ("t5-v1.1", "bart"):
        hf = hf_model(kind)
        cfg = config_from_hf(hf.config.to_dict(), tied=True)
        sd = hf.state_dict()
        back = state_to_hf(state_from_hf(sd, cfg), cfg)
        assert back and all(torch.equal(back[k], sd[k]) for k in back)


def test_unsupported_configs_are_one_line_errors():
    with pytest.raises(LMForgeError, match="feed_forward_proj 'gated-silu' is not supported"):
        config_from_hf({"model_type": "t5", "vocab_size": 10, "d_model": 8, "d_kv": 2, "d_ff": 8, "num_layers": 1,
                        "num_heads": 4, "feed_forward_proj": "gated-silu"})
    with pytest.raises(LMForgeError, match="add_final_layer_norm=True is not supported"):
        config_from_hf({"model_type": "bart", "vocab_size": 10, "d_model": 8, "encoder_layers": 1, "decoder_layers": 1,
                        "max_position_embeddings": 8, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                        "encoder_ffn_dim": 8, "decoder_ffn_dim": 8, "add_final_layer_norm": True})


def test_preset_parameter_counts_match_transformers():
    # published counts, and the instantiated model agrees with the closed form
    assert config_from_preset("t5-small").num_params() == 60_506_624
    assert config_from_preset("t5-base").num_params() == 222_903_552
    assert config_from_preset("bart-base").num_params() == 139_420_416
    assert config_from_preset("bart-large").num_params() == 406_291_456
    for name in ("t5-tiny", "bart-tiny", "t5-cpu", "bart-cpu"):
        cfg = config_from_preset(name)
        with torch.device("meta"):
            assert Seq2Seq(cfg).num_params() == cfg.num_params()
    hf = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128))
    assert sum(p.numel() for p in hf.parameters()) == config_from_preset("bart-tiny").num_params()
    assert set(PRESETS) >= {"t5-small", "t5-base", "bart-base", "bart-large"}


# ---- generation --------------------------------------------------------------------------------

def _gen_model(kind: str):
    """A random model whose outputs end with EOS at different lengths (checked by the tests)."""
    hf = hf_model(kind, seed=7, std=0.3, dec_layers=2)  # transformers' T5 cache needs equal stacks
    with torch.no_grad():
        if kind == "t5":
            hf.shared.weight[1] *= 1.5
        else:
            hf.final_logits_bias[0, 2] = 4.0
            hf.final_logits_bias[0, 0] = -9.0  # keep the (unused) BOS out of the way
    return hf, ours_from(hf)


SETTINGS = [dict(num_beams=1), dict(num_beams=4), dict(num_beams=3, length_penalty=0.6, early_stopping=True),
            dict(num_beams=4, no_repeat_ngram_size=2, num_return_sequences=3),
            dict(num_beams=3, early_stopping="never", length_penalty=2.0)]


def _hf_new_ids(out: torch.Tensor, eos: int, start: int) -> list[list[int]]:
    rows = []
    for row in out.tolist():
        row = row[start:]
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_greedy_and_beam_search_equal_transformers(kind):
    hf, ours = _gen_model(kind)
    eos = ours.cfg.eos_id
    sources = [[5, 6, 7, 8, 9, 10, eos], [11, 12, 13, eos], [20, 21, 22, 23, 24, 25, 26, 27, 28, eos], [30, 31, eos],
               [40, 41, 42, 43, 44, eos]]
    ids, mask = right_pad(sources, ours.cfg.pad_id, torch.device("cpu"))
    lengths = set()
    # BART's config forces EOS at the length limit (forced_eos_token_id=2); the import keeps that
    assert ours.cfg.forced_eos_id == (2 if kind == "bart" else None)
    extra = [dict(forced_bos_token_id=0, num_beams=1), dict(forced_bos_token_id=0, num_beams=3)] if kind == "bart" else []
    for settings in SETTINGS + extra:
        ref = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=10, do_sample=False, min_length=0,
                          **settings)
        want = _hf_new_ids(ref, eos, 1)
        ours.cfg.forced_bos_id = settings.pop("forced_bos_token_id", None)
        got = generate_seq2seq(ours, sources, max_new_tokens=10, temperature=0, **settings)
        if settings.get("num_return_sequences", 1) > 1:
            got = [g for row in got for g in row]
        assert [g.ids for g in got] == want, settings
        if ours.cfg.forced_bos_id is not None:
            assert all(w[0] == 0 for w in want)
        lengths.update(len(w) for w in want)
    ours.cfg.forced_bos_id = None
    assert max(lengths) >= 9 and len(lengths) >= 3  # some hypotheses end early, at different lengths


def test_sampling_is_seeded_and_batched_rows_equal_single_rows():
    _, ours = _gen_model("bart")
    sources = [[5, 6, 7, 2], [11, 12, 13, 14, 15, 16, 2]]
    a = generate_seq2seq(ours, sources, max_new_tokens=8, temperature=0.9, top_k=20, seed=3)
    b = generate_seq2seq(ours, sources, max_new_tokens=8, temperature=0.9, top_k=20, seed=3)
    assert [g.ids for g in a] == [g.ids for g in b]
    greedy = generate_seq2seq(ours, sources, max_new_tokens=8, temperature=0)
    for src, g in zip(sources, greedy):
        assert generate_seq2seq(ours, [src], max_new_tokens=8, temperature=0)[0].ids == g.ids
    with pytest.raises(LMForgeError, match="num_return_sequences must be between 1 and num_beams"):
        generate_seq2seq(ours, sources, num_beams=2, num_return_sequences=3)


def test_decoder_beam_search_equals_transformers(tmp_path):
    from lmforge.interop.hf import load_hf_dir as load_decoder

    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)
    randomize_(hf, 5, 0.3)
    with torch.no_grad():
        hf.lm_head.weight[2] *= 1.0  # tied with wte; EOS frequency comes from the random weights
    hf.eval().save_pretrained(tmp_path)
    model, _, _ = load_decoder(tmp_path)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    for settings in SETTINGS[1:]:
        ref = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=8, do_sample=False, pad_token_id=0,
                          **settings)
        want = _hf_new_ids(ref, 2, T)
        got = beam_search_decoder(model, prompts, max_new_tokens=8, eos_id=2, pad_id=0, **settings)
        if settings.get("num_return_sequences", 1) > 1:
            got = [g for row in got for g in row]
        assert [g.ids for g in got] == want, settings


def test_dropout_acts_in_training_only():
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset

    torch.manual_seed(0)
    for arch in ("t5", "bart"):
        model = Seq2Seq(config_from_preset(f"{arch}-tiny", vocab_size=64, dropout=0.5))
        src, tgt = torch.randint(3, 64, (2, 7)), torch.randint(3, 64, (2, 5))
        a, b = model(src, tgt), model(src, tgt)
        assert not torch.allclose(a, b)  # two training passes draw different masks
        model.eval()
        assert torch.equal(model(src, tgt), model(src, tgt))
        torch.manual_seed(1)
        model = Seq2Seq(config_from_preset(f"{arch}-tiny", vocab_size=64, dropout=0.0))
        assert torch.equal(model(src, tgt), model.eval()(src, tgt))  # dropout 0: training = inference
