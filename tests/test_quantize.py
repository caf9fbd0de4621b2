"""Weight-only quantisation (nn/quant.py): round-trip bounds, kernels vs their dequantised reference,
quantised model directories (save, reload, CLI), every family through the same Linear replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import MODEL_CONFIG, MODEL_WEIGHTS, write_model_dir
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM
from lmforge.infer.quantize import quantize_model_dir
from lmforge.models import decoder, encoder, seq2seq
from lmforge.nn.quant import (QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, pack_int4, quant_config,
                              quantize_model, state_bytes)
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["hello world, this is a tiny corpus for a tiny tokenizer. " * 3,
          "ROMEO: but soft, what light through yonder window breaks? It is the east. " * 3]


def _weight(N: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    tok.save(root / "tok.json")
    torch.manual_seed(0)
    model = decoder.Decoder(decoder.config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    return write_model_dir(root / "fp", model, root / "tok.json")


# ---- schemes ------------------------------------------------------------------------------------

def test_int8_round_trip_error_is_at_most_half_a_step_per_channel():
    w = _weight(96, 72)  # 72: padded to 80 inputs for the kernel
    q = QuantizedLinear.from_weight(w, None, "int8")
    step_N = w.abs().amax(1) / 127
    err_N = (q.dequantize() - w).abs().amax(1)
    assert q.qweight.shape == (96, 80) and q.qweight.dtype == torch.int8
    assert bool((err_N <= 0.5 * step_N * 1.01 + 1e-7).all())  # bf16 scales: 1% slack


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(group_size):
    w = _weight(100, 256, seed=1)  # 100 rows: padded to 128 for the kernel
    q = QuantizedLinear.from_weight(w, None, "int4", group_size)
    w_NGS = w.view(100, -1, group_size)
    step_NG = (w_NGS.amax(-1) - w_NGS.amin(-1)) / 15
    err_NG = (q.dequantize() - w).abs().view(100, -1, group_size).amax(-1)
    assert q.qweight.shape == (128, 128) and q.scales.shape == (256 // group_size, 128, 2)
    assert bool((err_NG <= 0.5 * step_NG * 1.02 + 1e-3 * step_NG.amax()).all())


def test_int4_packing_is_the_layout_of_pytorchs_cpu_kernel():
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pack_int4(q), torch._convert_weight_to_int4pack_for_cpu(q, 2))


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 32), ("int4", 128)])
def test_quantized_linear_equals_its_dequantised_reference(scheme, group_size):
    w, b = _weight(200, 256, seed=3), torch.linspace(-1, 1, 200)
    q = QuantizedLinear.from_weight(w, b, scheme, group_size)
    for M in (1, 5):
        x = torch.randn(2, M, 256, generator=torch.Generator().manual_seed(M))
        ref = x.to(torch.bfloat16).float() @ q.dequantize().t() + b  # the kernel reads bf16 activations
        out = q(x)
        assert out.dtype == torch.float32 and out.shape == (2, M, 200)
        # bf16 output rounding: relative 2^-8 of the largest logit
        assert (out - ref).abs().max().item() <= 2 ** -8 * ref.abs().max().item()


def test_quantized_embedding_rows_equal_the_dequantised_table():
    w = _weight(70, 64, seed=4)
    for scheme, g in (("int8", None), ("int4", 32)):
        emb = QuantizedEmbedding.from_weight(w, None, scheme, g)
        idx = torch.tensor([[0, 69, 33], [64, 31, 32]])
        assert torch.equal(emb(idx), emb.dequantize()[idx])


# ---- models -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,group_size,embeddings", [("int8", None, False), ("int8", None, True),
                                                           ("int4", 32, False), ("int4", 64, True)])
def test_saved_and_reloaded_quantised_model_gives_identical_tokens(model_dir, tmp_path, scheme, group_size, embeddings):
    qc = quant_config(scheme, group_size, embeddings)
    on_load = LLM.load(model_dir, quantize=scheme, group_size=group_size, quantize_embeddings=embeddings)
    out = quantize_model_dir(model_dir, tmp_path / "q", qc)
    meta = json.loads((out / MODEL_CONFIG).read_text())
    assert meta["quantization"] == {"scheme": scheme, "group_size": group_size, "embeddings": embeddings,
                                    "compute_dtype": "bfloat16"}
    reloaded = LLM.load(out)
    assert reloaded.tokenizer is not None and (out / "tokenizer.json").is_file()
    tied = isinstance(reloaded.model.lm_head, TiedQuantizedHead)
    assert tied == embeddings and isinstance(reloaded.model.blocks[0].mlp.fc_in, QuantizedLinear)
    a = on_load.generate("hello world", max_new_tokens=20, temperature=0)
    assert a == reloaded.generate("hello world", max_new_tokens=20, temperature=0)
    ids = torch.tensor([reloaded.tokenizer.encode("ROMEO: but soft")])
    with torch.no_grad():
        assert torch.equal(on_load.model(ids), reloaded.model(ids))


def test_quantised_logits_stay_close_to_fp32_and_weights_shrink(model_dir):
    fp = LLM.load(model_dir)
    ids = torch.tensor([fp.tokenizer.encode("ROMEO: but soft, what light")])
    with torch.no_grad():
        ref = fp.model(ids)
        for scheme, g, bound in (("int8", None, 0.01), ("int4", 32, 0.12)):
            q = LLM.load(model_dir, quantize=scheme, group_size=g, quantize_embeddings=True)
            assert (q.model(ids) - ref).abs().max().item() <= bound * ref.abs().max().item()
    sizes = {s: state_bytes(LLM.load(model_dir, quantize=s, group_size=g, quantize_embeddings=True).model)
             for s, g in (("int8", None), ("int4", 32))}
    fp_bytes = state_bytes(fp.model)
    # tiny model: norms, biases and learned positions stay fp32, so the ratios (29%, 20%) are above the
    # 25% / 12.5% of the weights alone; int8 = 98,304 int8 weights + 19,200 table + scales + 16,384 positions ...
    assert fp_bytes == 4 * sum(p.numel() for p in fp.model.parameters()) and fp_bytes == 493_568
    assert (sizes["int8"], sizes["int4"]) == (143_960, 97_792)


def test_encoder_and_seq2seq_run_quantised_close_to_fp32():
    torch.manual_seed(0)
    enc = encoder.Encoder(encoder.config_from_preset("encoder-tiny", vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = enc(ids)
        quantize_model(enc, quant_config("int8"))
        assert isinstance(enc.blocks[0].mlp.fc_in, QuantizedLinear)
        assert (enc(ids) - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
    s2s = seq2seq.Seq2Seq(seq2seq.config_from_preset("t5-tiny", vocab_size=128)).eval()
    tgt = ids[:, :5]
    with torch.no_grad():
        ref = s2s(ids, tgt)
        quantize_model(s2s, quant_config("int8", embeddings=True))
        assert isinstance(s2s.lm_head, TiedQuantizedHead) == s2s.cfg.tie_embeddings
        assert (s2s(ids, tgt) - ref).abs().max().item() <= 0.03 * ref.abs().max().item()


# ---- errors and the CLI -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(quantize="int3"), "unknown quantisation scheme 'int3'; choose one of: int8, int4"),
    (dict(quantize="int4", group_size=48), "int4 group size must be one of 32, 64, 128, got 48"),
    (dict(quantize="int8", group_size=64), "--group-size applies to int4 only; int8 has one scale per output channel"),
    (dict(group_size=64), "--group-size and --quantize-embeddings go with --quantize int8|int4"),
])
def test_bad_quantisation_options_name_the_problem(model_dir, kwargs, message):
    with pytest.raises(LMForgeError) as e:
        LLM.load(model_dir, **kwargs)
    assert str(e.value) == message


def test_group_size_must_divide_the_model_width():
    model = decoder.Decoder(decoder.config_from_preset("tiny", vocab_size=64, n_embd=96, n_head=4))
    with pytest.raises(LMForgeError) as e:
        quantize_model(model, quant_config("int4", 64))
    assert str(e.value) == "int4 group size 64 does not divide the model width 96; choose one of 32"


def test_cli_quantize_then_generate_info_and_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(model_dir), "--scheme", "int8", "--quantize-embeddings", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    expected = LLM.load(model_dir, quantize="int8", quantize_embeddings=True).generate(
        "hello", max_new_tokens=8, temperature=0)
    assert capsys.readouterr().out == "hello" + expected + "\n"
    assert main(["generate", str(model_dir), "--quantize", "int8", "--quantize-embeddings", "--prompt", "hello",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "hello" + expected + "\n"
    text = tmp_path / "held_out.txt"
    text.write_text(CORPUS[1], encoding="utf-8")
    assert main(["eval", str(model_dir), "--data", str(text), "--quantize", "int8", "--quantize-embeddings"]) == 0
    on_load = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--data", str(text)]) == 0
    assert {**json.loads(capsys.readouterr().out), "checkpoint": None} == {**on_load, "checkpoint": None}
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization"]["scheme"] == "int8" and info["weight_bytes"] == (out / MODEL_WEIGHTS).stat().st_size

    assert main(["quantize", str(out), "--scheme", "int4", "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == ("error: the model is already quantised (int8); quantise the original "
                                       "full-precision model instead\n")
    assert main(["generate", str(out), "--quantize", "int8", "--prompt", "hi"]) == 2
    assert "already quantised (int8)" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--scheme", "fp8", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == "error: unknown quantisation scheme 'fp8'; choose one of: int8, int4\n"
    assert main(["serve", str(model_dir), "--quantize", "int4", "--group-size", "100"]) == 2
    assert capsys.readouterr().err == "error: int4 group size must be one of 32, 64, 128, got 100\n"
    assert main(["convert", str(out), "--to-hf", "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds int8 weights, which Hugging Face folders cannot hold; "
                                       "export the full-precision model it was quantised from\n")
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_cli_quantizes_an_imported_hugging_face_decoder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "hf")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "hf"), "--scheme", "int4", "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    q, fp = LLM.load(out), LLM.load(tmp_path / "hf")
    ids = [5, 9, 17, 3]
    with torch.no_grad():
        ref = fp.model(torch.tensor([ids]))
        assert (q.model(torch.tensor([ids])) - ref).abs().max().item() <= 0.15 * ref.abs().max().item()
    assert q.generate(ids, max_new_tokens=6, temperature=0) == LLM.load(
        tmp_path / "hf", quantize="int4", group_size=32).generate(ids, max_new_tokens=6, temperature=0)
    assert not (out / ".fp-import").exists() and (out / MODEL_WEIGHTS).stat().st_size < (
        tmp_path / "hf" / "model.safetensors").stat().st_size / 3


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 32)])
def test_serving_scheduler_batches_a_quantised_model_like_generate_alone(model_dir, scheme, group_size):
    from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all

    llm = LLM.load(model_dir, quantize=scheme, group_size=group_size, quantize_embeddings=True)
    ids = llm.tokenizer.encode("ROMEO: but soft, what light through yonder window breaks? hello world")
    prompts = [ids[i % 5: i % 5 + 2 + (7 * i) % 19] for i in range(8)]
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=8, prefill_chunk=5).start()
    try:
        together = run_all(sched, [GenerationRequest(p, max_tokens=10, temperature=0) for p in prompts])
    finally:
        sched.stop()
    # the kernels compute each row on its own, so a row's tokens do not depend on its batch
    assert [t.token_ids for t in together] == [llm.generate(p, max_new_tokens=10, temperature=0) for p in prompts]


def test_a_truncated_quantised_file_names_the_problem(model_dir, tmp_path):
    out = quantize_model_dir(model_dir, tmp_path / "q", quant_config("int8"))
    data = (out / MODEL_WEIGHTS).read_bytes()
    (out / MODEL_WEIGHTS).write_bytes(data[:-100])
    with pytest.raises(LMForgeError) as e:
        LLM.load(out)
    assert str(e.value).startswith(f"checkpoint file {out / MODEL_WEIGHTS} is truncated or corrupt (tensor '")
