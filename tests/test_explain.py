"""Explanations (lmforge/eval/report/explain.py): integrated gradients equal Captum's
LayerIntegratedGradients on the same model and baseline, attributions are complete, attention maps
equal the probabilities the model attends with, rollout rows sum to 1, and `lmforge explain`
writes its PNG + JSON."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from explain_fixtures import decoder_classifier_llm, decoder_llm, encoder_llm, seq2seq_llm
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.eval.report.explain import AttentionRecorder, Explained, explain, integrated_gradients, rollout
from reference_libs import reference_lib

TEXT = "the king and queen rode out"


def captum_attributions(llm, ex: Explained, steps: int) -> torch.Tensor:
    """Captum's LayerIntegratedGradients on the token embedding, same inputs, baseline and output."""
    lig = reference_lib("captum.attr").LayerIntegratedGradients
    model = llm.model

    def forward(ids_BT):
        if ex.kind == "label":
            types = None if ex.type_ids is None else ex.type_ids.expand_as(ids_BT)
            return model(ids_BT, token_type_BT=types) if types is not None else model(ids_BT)
        return F.log_softmax(model(ids_BT)[:, -1].float(), -1)

    attr = lig(forward, model.tok_emb).attribute(torch.tensor([ex.ids]), baselines=torch.tensor([ex.baseline_ids]),
                                                 target=ex.target_id, n_steps=steps, method="gausslegendre")
    return attr[0].sum(-1).detach()


@pytest.mark.parametrize("make", [decoder_llm, lambda: decoder_llm(pos_encoding="rope"), decoder_classifier_llm,
                                  encoder_llm],
                         ids=["decoder", "decoder-rope", "decoder-classifier", "encoder-classifier"])
def test_integrated_gradients_equal_captum_and_are_complete(make):
    llm = make()
    ex = Explained(llm, TEXT, None)
    ours, completeness = integrated_gradients(ex, steps=32)
    theirs = captum_attributions(llm, ex, steps=32)
    assert ours.shape == (len(ex.ids),)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    assert completeness["relative_error"] < 0.01 and completeness["within_1pct"]
    assert completeness["sum_attributions"] == pytest.approx(float(ours.sum()), abs=1e-6)
    assert completeness["output_difference"] == pytest.approx(
        completeness["output"] - completeness["baseline_output"], abs=1e-9)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_attributions_are_complete(arch):
    result = explain(seq2seq_llm(arch), TEXT, steps=64)
    c = result["completeness"]
    assert result["target"]["kind"] == "first_target_token"
    assert c["relative_error"] < 0.01 and len(result["attributions"]) == len(result["tokens"])
    assert sum(result["attributions"]) == pytest.approx(c["output_difference"], rel=0.01)
    assert set(result["attention"]) == {"encoder.attn", "decoder.self_attn", "decoder.cross_attn"}
    assert set(result["rollout"]) == {"encoder.attn", "decoder.self_attn"}  # cross-attention is not square


def test_masked_lm_explains_the_mask_and_says_when_there_is_none():
    llm = encoder_llm("mlm")
    result = explain(llm, "the king and [MASK] rode out")
    assert result["target"]["kind"] == "masked_token" and result["completeness"]["within_1pct"]
    with pytest.raises(LMForgeError, match=r"a masked-LM encoder explains the token at a mask: put \[MASK\]"):
        explain(llm, TEXT)
    with pytest.raises(LMForgeError, match="has no output to explain"):
        explain(encoder_llm("none"), TEXT)


def test_attention_maps_are_what_the_model_attends_with():
    """Recomputed probabilities @ v reproduce each attention module's output (SDPA's own result)."""
    llm = decoder_llm()
    ids = torch.tensor([llm.tokenizer.encode(TEXT)])
    outputs = []
    handles = [blk.attn.register_forward_hook(lambda m, a, out: outputs.append(out)) for blk in llm.model.blocks]
    inputs = []
    handles += [blk.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for blk in llm.model.blocks]
    with AttentionRecorder(llm.model) as rec, torch.no_grad():
        llm.model(ids)
    for h in handles:
        h.remove()
    maps = rec.stacks()["blocks.attn"]  # (L, B, H, T, T)
    T = ids.shape[1]
    assert maps.shape == (2, 1, 4, T, T)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 1, 4, T), atol=1e-6)
    assert float(maps[..., 0, 1:].abs().max()) == 0.0  # causal: the first token sees itself only
    for layer, blk in enumerate(llm.model.blocks):
        attn = blk.attn
        _, _, v = attn.qkv(inputs[layer]).split([attn.n_head * attn.head_dim] * 3, dim=-1)
        v_BHTD = v.view(1, T, attn.n_head, attn.head_dim).transpose(1, 2)
        y = attn.proj((maps[layer] @ v_BHTD).transpose(1, 2).reshape(1, T, -1))
        assert torch.allclose(y, outputs[layer], atol=1e-5)


def test_rollout_rows_sum_to_one_and_follow_the_definition():
    torch.manual_seed(0)
    maps = torch.rand(3, 2, 5, 5).softmax(-1)
    r = rollout(maps)
    assert torch.allclose(r.sum(-1), torch.ones(5), atol=1e-6)
    expected = torch.eye(5, dtype=torch.float64)
    for a in maps.double():
        a = 0.5 * a.mean(0) + 0.5 * torch.eye(5, dtype=torch.float64)
        expected = (a / a.sum(-1, keepdim=True)) @ expected
    assert torch.allclose(r.double(), expected, atol=1e-6)
    result = explain(encoder_llm(), TEXT)
    for row in result["rollout"]["blocks.attn"]:
        assert sum(row) == pytest.approx(1.0, abs=1e-4)


def test_target_label_and_token_errors():
    cls = encoder_llm()
    assert explain(cls, TEXT, target="negative")["target"]["name"] == "negative"
    with pytest.raises(LMForgeError, match="--target 'maybe' is not a label of this classifier; its labels: "
                                           "negative, positive"):
        explain(cls, TEXT, target="maybe")
    dec = decoder_llm()
    token = dec.tokenizer.id_to_token(dec.tokenizer.encode(" king")[0])
    assert explain(dec, TEXT, target=dec.tokenizer.decode([dec.tokenizer.encode(" king")[0]]))["target"]["id"] == \
        dec.tokenizer.token_to_id(token)
    with pytest.raises(LMForgeError, match="tokens of this tokenizer; give one token"):
        explain(dec, TEXT, target="the king and queen")


def test_explain_cli_writes_png_and_json(tmp_path, capsys):
    llm = encoder_llm()
    model_dir = tmp_path / "model"
    from lmforge.checkpoint import write_model_dir

    llm.tokenizer.save(tmp_path / "tokenizer.json")
    write_model_dir(model_dir, llm.model, tmp_path / "tokenizer.json")
    assert main(["explain", str(model_dir), TEXT, "--target", "positive", "--out", str(tmp_path / "x"),
                 "--steps", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "x" / "explain.json").read_text())
    assert printed["target"]["name"] == saved["target"]["name"] == "positive"
    assert printed["attributions"] == saved["attributions"] and saved["completeness"]["steps"] == 16
    for name in ("attention.png", "attributions.png"):
        assert (tmp_path / "x" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["explain", str(model_dir), TEXT, "--target", "maybe", "--out", str(tmp_path / "y")]) == 2
    assert "error: --target 'maybe' is not a label" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
