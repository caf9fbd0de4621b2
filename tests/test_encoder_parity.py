"""Encoder parity with transformers: BERT, RoBERTa, DistilBERT, ModernBERT (every head), both directions."""

import json

import pytest
import torch

from reference_libs import reference_lib
tf = reference_lib("transformers")

from lmforge.errors import LMForgeError
from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir
from lmforge.models.encoder import HEADS, PRESETS, Encoder, config_from_preset

CLASS = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "modernbert": "ModernBert"}
SUFFIXES = ["Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification"]


def hf_config(kind: str, **extra):
    small = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=40)
    if kind == "bert":
        return tf.BertConfig(**small, type_vocab_size=2, **extra)
    if kind == "roberta":
        return tf.RobertaConfig(**small, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **extra)
    if kind == "distilbert":
        return tf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40,
                                   **extra)
    # 4 layers, global every 2nd, window 8: local attention matters at T=20
    return tf.ModernBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=64, local_attention=8,
                               global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                               cls_token_id=2, sep_token_id=3, **extra)


def batch(pad_id: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 14:] = 0
    mask[2, 7:] = 0
    types = torch.zeros(3, 20, dtype=torch.long)
    types[:, 9:] = 1
    return ids.masked_fill(mask == 0, pad_id), mask, types


@pytest.fixture(scope="module")
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("kind", list(CLASS))
def test_import_parity_every_head(kind, tmp_path, seeded):
    """hidden states, pooler and logits within 1e-4 (fp32), with padding (and token types for BERT)."""
    for suffix in SUFFIXES:
        hf_cfg = hf_config(kind, num_labels=3)
        ref = getattr(tf, CLASS[kind] + suffix)(hf_cfg).eval()
        d = tmp_path / suffix
        ref.save_pretrained(d)
        model, cfg, _ = load_hf_dir(d)
        assert cfg.head == {"Model": "none", "ForMaskedLM": "mlm", "ForSequenceClassification": "sequence",
                            "ForTokenClassification": "token"}[suffix]
        assert model.num_params() == sum(p.numel() for p in ref.parameters()) == cfg.num_params()
        ids, mask, types = batch(hf_cfg.pad_token_id or 0)
        kw = dict(input_ids=ids, attention_mask=mask)
        tt = types if kind == "bert" else None
        if tt is not None:
            kw["token_type_ids"] = tt
        with torch.no_grad():
            out = ref(**kw, output_hidden_states=True)
            h = model.encode(ids, mask.bool(), tt)
            y = model(ids, mask.bool(), tt)
        ref_h = out.last_hidden_state if suffix == "Model" else out.hidden_states[-1]
        torch.testing.assert_close(h, ref_h, atol=1e-4, rtol=0)
        if suffix == "Model":
            if kind in ("bert", "roberta"):
                torch.testing.assert_close(model.pooled(h), out.pooler_output, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(y, out.logits, atol=1e-4, rtol=0)
        if kind == "bert":  # token types change the result (they are really used)
            with torch.no_grad():
                assert (model.encode(ids, mask.bool(), None) - h).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(CLASS))
def test_export_loads_in_transformers_without_missing_or_unexpected(kind, tmp_path, seeded):
    for suffix in ("ForMaskedLM", "ForSequenceClassification"):
        hf_cfg = hf_config(kind, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                           label2id={"neg": 0, "neu": 1, "pos": 2})
        ref = getattr(tf, CLASS[kind] + suffix)(hf_cfg).eval()
        ref.save_pretrained(tmp_path / "src")
        convert_from_hf(str(tmp_path / "src"), str(tmp_path / "lm"), overwrite=True)
        meta = json.loads((tmp_path / "lm" / "model_config.json").read_text())
        assert meta["family"] == "encoder"
        if suffix == "ForSequenceClassification":
            assert meta["config"]["labels"] == ["neg", "neu", "pos"]
        convert_to_hf(str(tmp_path / "lm"), str(tmp_path / "out"), overwrite=True)
        back, info = getattr(tf, CLASS[kind] + suffix).from_pretrained(tmp_path / "out", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        ids, mask, _ = batch(hf_cfg.pad_token_id or 0)
        with torch.no_grad():
            a, b = ref(input_ids=ids, attention_mask=mask).logits, back.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        if suffix == "ForSequenceClassification":
            assert back.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
            assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_native_encoder_exports_as_modernbert(tmp_path):
    """lmforge's default pre-LN encoder is ModernBERT-shaped: it exports and transformers agrees."""
    from lmforge.checkpoint import write_model_dir

    torch.manual_seed(1)
    model = Encoder(config_from_preset("encoder-tiny", head="sequence", labels=["a", "b"], local_window=8,
                                       global_every=2)).eval()
    write_model_dir(tmp_path / "m", model)
    convert_to_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    ref, info = tf.ModernBertForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(5, 500, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), ref.eval()(input_ids=ids, attention_mask=mask.long()).logits,
                                   atol=1e-4, rtol=0)


def test_regression_head_with_one_label(tmp_path, seeded):
    ref = tf.BertForSequenceClassification(hf_config("bert", num_labels=1)).eval()
    ref.save_pretrained(tmp_path)
    model, cfg, _ = load_hf_dir(tmp_path)
    assert cfg.num_labels == 1
    ids, mask, types = batch(0)
    with torch.no_grad():
        y = model(ids, mask.bool(), types)
        assert y.shape == (3, 1)
        torch.testing.assert_close(y, ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset,cls,cfg", [
    ("bert-base", "BertModel", lambda: tf.BertConfig()),
    ("bert-large", "BertModel", lambda: tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                       intermediate_size=4096)),
    ("roberta-base", "RobertaModel", lambda: tf.RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                              type_vocab_size=1)),
    ("distilbert-base", "DistilBertModel", lambda: tf.DistilBertConfig()),
    ("modernbert-base", "ModernBertModel", lambda: tf.ModernBertConfig()),
    ("minilm-l6", "BertModel", lambda: tf.BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536)),
])
def test_preset_parameter_counts_match_transformers(preset, cls, cfg):
    with torch.device("meta"):
        ref = getattr(tf, cls)(cfg())
    assert config_from_preset(preset).num_params() == sum(p.numel() for p in ref.parameters())


def test_bert_base_count_and_head_counts():
    assert config_from_preset("bert-base").num_params() == 109_482_240
    for head in HEADS:  # the formula matches the module for every head
        c = config_from_preset("encoder-tiny", head=head, num_labels=3)
        assert Encoder(c).num_params() == c.num_params()
    assert set(PRESETS) >= {"bert-base", "bert-large", "roberta-base", "distilbert-base", "modernbert-base"}


def test_unsupported_architecture_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "vocab_size": 10,
                                                      "max_position_embeddings": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1, "hidden_size": 4,
                                                      "intermediate_size": 4, "hidden_act": "relu"}))
    with pytest.raises(LMForgeError, match="hidden_act 'relu' is not supported"):
        load_hf_dir(tmp_path)
