"""`lmforge merge BASE ADAPTER --out DIR`: merged weights are base + scaling * B A, the merged model
gives the adapted model's logits, and a quantised base needs --dequantize (nothing written without)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import load_tensors, write_model_dir
from lmforge.infer.llm import LLM
from lmforge.interop.peft import save_adapter
from lmforge.nn import lora
from lmforge.nn.quant import quant_config, quantize_model
from test_hf_export import LLAMA_STYLE, V, make_model
from test_lora_peft import idx_BT, randomize_adapters_


def lmforge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True)


@pytest.fixture
def base_and_adapter(tmp_path):
    model = make_model(**LLAMA_STYLE)
    write_model_dir(tmp_path / "base", model)
    lora.add_lora(model, lora.LoRASettings(r=4, alpha=12, targets="q,v,o,down", use_rslora=True))
    randomize_adapters_(model)
    save_adapter(model, tmp_path / "adapter", base=tmp_path / "base")
    return tmp_path, model.eval()


def test_merged_weights_are_base_plus_scaled_BA(base_and_adapter):
    tmp_path, adapted = base_and_adapter
    done = lmforge_cli("merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'merged'}"
    base, merged = load_tensors(tmp_path / "base" / "model.safetensors"), load_tensors(tmp_path / "merged" / "model.safetensors")
    assert set(base) == set(merged)
    qkv = adapted.blocks[1].attn.qkv.adapters["default"]
    scaling = 12 / 4 ** 0.5
    q_rows = LLAMA_STYLE["n_head"] * 16  # head_dim 64 / 4
    want_q = base["blocks.1.attn.qkv.weight"][:q_rows] + scaling * qkv.lora_B["q"].weight @ qkv.lora_A["q"].weight
    assert torch.allclose(merged["blocks.1.attn.qkv.weight"][:q_rows], want_q, atol=1e-6)
    k_rows = slice(q_rows, q_rows + LLAMA_STYLE["n_kv_head"] * 16)  # k is not adapted: unchanged, bit for bit
    assert torch.equal(merged["blocks.1.attn.qkv.weight"][k_rows], base["blocks.1.attn.qkv.weight"][k_rows])
    assert torch.equal(merged["blocks.0.mlp.fc_in.weight"], base["blocks.0.mlp.fc_in.weight"])
    with torch.no_grad():
        diff = (LLM.load(tmp_path / "merged").model(idx_BT()) - adapted(idx_BT())).abs().max().item()
    assert diff < 1e-4


def test_quantised_base_needs_dequantize(base_and_adapter):
    tmp_path, _ = base_and_adapter
    model = make_model(**LLAMA_STYLE)
    quantize_model(model, quant_config("int8"))
    write_model_dir(tmp_path / "q8", model)
    done = lmforge_cli("merge", str(tmp_path / "q8"), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {tmp_path / 'q8'} is quantised (int8): merging would round the adapter "
                                   "away; pass --dequantize to merge into fp32 weights (then `lmforge quantize` "
                                   "the result)")
    assert not (tmp_path / "m").exists()
    done = lmforge_cli("merge", str(tmp_path / "q8"), str(tmp_path / "adapter"), "--out", str(tmp_path / "m"),
                       "--dequantize")
    assert done.returncode == 0, done.stderr
    merged = LLM.load(tmp_path / "m").model
    assert getattr(merged, "quantization", None) is None
    want = model.blocks[0].mlp.fc_in.dequantize()  # fc_in not adapted: the dequantised int8 weight
    assert torch.equal(merged.blocks[0].mlp.fc_in.weight, want)


def test_bad_adapter_paths(tmp_path, base_and_adapter):
    tmp_path, _ = base_and_adapter
    done = lmforge_cli("merge", str(tmp_path / "base"), str(tmp_path / "nope"), "--out", str(tmp_path / "m"))
    assert (done.returncode, done.stderr.strip()) == (2, f"error: adapter not found: {tmp_path / 'nope'}")
    done = lmforge_cli("merge", str(tmp_path / "base"), str(tmp_path / "base"), "--out", str(tmp_path / "m"))
    assert done.stderr.strip() == (f"error: {tmp_path / 'base'} is not a LoRA adapter directory (no "
                                   "adapter_config.json) nor a LoRA training run")
    assert not (tmp_path / "m").exists()
