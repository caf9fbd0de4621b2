"""lmforge -> Hugging Face: models built (and briefly trained) by lmforge load in transformers with no
missing/unexpected weights and give the same logits; features no HF architecture has are refused."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reference_libs import reference_lib
transformers = reference_lib("transformers")

from lmforge.checkpoint import write_model_dir  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop.hf import convert_from_hf, convert_to_hf  # noqa: E402
from lmforge.models.decoder import Decoder, config_from_preset  # noqa: E402

V = 300
TOL = 1e-4
GPT2_STYLE = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64, pos_encoding="learned", mlp="gelu",
                  norm="layernorm", bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=96,
                   pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = std * torch.randn(p.shape, generator=g)
            p.copy_(1 + noise if p.dim() == 1 and name.endswith("weight") and "norm" in name else noise)


def make_model(seed: int = 0, **cfg) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(config_from_preset(None, **cfg))
    randomize_(model, seed)
    return model.eval()


def train_steps(model: Decoder, steps: int = 2) -> None:
    """A couple of real optimizer steps, so the exported weights are 'trained by lmforge'."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, V, (4, 17), generator=g)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def load_in_transformers(path: Path):
    """AutoModelForCausalLM.from_pretrained, failing on any missing / unexpected / re-initialised weight."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    log = buf.getvalue().lower()
    for word in ("missing", "unexpected", "not initialized", "newly initialized", "mismatch"):
        assert word not in log, log
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def export(model: Decoder, tmp_path: Path, tokenizer_path: Path | None = None, **kw) -> Path:
    write_model_dir(tmp_path / "lm", model, tokenizer_path)
    return convert_to_hf(str(tmp_path / "lm"), str(tmp_path / "hf"), **kw)


def assert_same_logits(ours: Decoder, hf_model, T: int = 24) -> float:
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        diff = (ours(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < TOL
    return diff


CASES = {
    "gpt2-style": (GPT2_STYLE, "GPT2LMHeadModel"),
    "gpt2-style-untied-wide-mlp": ({**GPT2_STYLE, "tie_embeddings": False, "mlp_hidden": 96}, "GPT2LMHeadModel"),
    "llama-style-gqa": (LLAMA_STYLE, "LlamaForCausalLM"),
    "llama-style-biases-tied": ({**LLAMA_STYLE, "bias": True, "tie_embeddings": True, "head_dim": 24},
                                "LlamaForCausalLM"),
    "qkv-bias": ({**LLAMA_STYLE, "qkv_bias": True}, "Qwen2ForCausalLM"),
    "qkv-bias-window": ({**LLAMA_STYLE, "qkv_bias": True, "sliding_window": 8}, "Qwen2ForCausalLM"),
    "sliding-window": ({**LLAMA_STYLE, "sliding_window": 8}, "MistralForCausalLM"),
    "qk-norm": ({**LLAMA_STYLE, "qk_norm": True}, "Qwen3ForCausalLM"),
    "qk-norm-window-tied-headdim": ({**LLAMA_STYLE, "qk_norm": True, "sliding_window": 8, "tie_embeddings": True,
                                     "head_dim": 24}, "Qwen3ForCausalLM"),
    "rope-llama3": ({**LLAMA_STYLE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}}, "LlamaForCausalLM"),
    "rope-yarn": ({**LLAMA_STYLE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16}}, "LlamaForCausalLM"),
    # lmforge's static NTK at block_size > original: exported as plain RoPE with the scaled base
    "rope-dynamic-static-ntk": ({**LLAMA_STYLE, "rope_scaling": {
        "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}}, "LlamaForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lmforge_model_exports_to_transformers(tmp_path, case):
    cfg, arch = CASES[case]
    model = make_model(**cfg)
    if case in ("gpt2-style", "llama-style-gqa"):
        train_steps(model)
    hf_dir = export(model, tmp_path)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    assert hf_cfg["architectures"] == [arch]
    assert hf_cfg["torch_dtype"] == "float32"
    assert (hf_dir / "generation_config.json").is_file()
    ref = load_in_transformers(hf_dir)
    assert type(ref).__name__ == arch
    assert_same_logits(model, ref, T=64 if "rope" in case else 24)  # 24 > the sliding window of 8


def test_bf16_export_keeps_dtype(tmp_path):
    model = make_model(**LLAMA_STYLE).to(torch.bfloat16)
    hf_dir = export(model, tmp_path)
    assert json.loads((hf_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = load_in_transformers(hf_dir)
    assert ref.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(ref.model.embed_tokens.weight, model.tok_emb.weight)


def test_sharded_export_round_trips(tmp_path):
    model = make_model(**LLAMA_STYLE)
    hf_dir = export(model, tmp_path, max_shard_size=40_000)  # 40 kB: many shards
    shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert_same_logits(model, load_in_transformers(hf_dir))
    # and back: the sharded folder imports to bit-identical lmforge tensors
    from safetensors.torch import load_file

    back = convert_from_hf(str(hf_dir), str(tmp_path / "lm2"))
    a, b = load_file(str(tmp_path / "lm" / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lmforge_tokenizer_exports_for_autotokenizer(tmp_path):
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog. " * 20, "hello world 123"], vocab_size=V)
    tok.save(tmp_path / "tokenizer.json")
    hf_dir = export(make_model(**GPT2_STYLE), tmp_path, tokenizer_path=tmp_path / "tokenizer.json")
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in hf_dir.iterdir()}
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|endoftext|>", tok.eos_id)
    assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<|pad|>", tok.pad_id)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    assert (hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (tok.eos_id, tok.pad_id)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen == {"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for text in ["hello world", "The lazy dog, 42 times!", "  spaces\nnewline ünïcödé"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("overrides, feature", [
    ({**GPT2_STYLE, "pos_encoding": "sinusoidal"}, "pos_encoding=sinusoidal"),
    ({**GPT2_STYLE, "qk_norm": True}, "qk_norm=true with GPT-2 layout"),
    ({**LLAMA_STYLE, "qk_norm": True, "qkv_bias": True}, "qk_norm=true together with qkv_bias=true"),
    ({**GPT2_STYLE, "mlp": "relu2"}, "mlp=relu2"),
    ({**LLAMA_STYLE, "logit_softcap": 30.0}, "logit_softcap=30.0"),
    ({**LLAMA_STYLE, "mlp": "gelu"}, "the mix pos_encoding=rope, norm=rmsnorm, mlp=gelu"),
    ({**GPT2_STYLE, "bias": False}, "bias=false with GPT-2 layout"),
    ({**LLAMA_STYLE, "bias": True, "sliding_window": 8}, "bias=true together with sliding_window"),
])
def test_features_without_hf_architecture_are_refused(tmp_path, overrides, feature):
    write_model_dir(tmp_path / "lm", make_model(**overrides))
    with pytest.raises(LMForgeError) as e:
        convert_to_hf(str(tmp_path / "lm"), str(tmp_path / "hf"))
    assert str(e.value).startswith("this model cannot be exported to Hugging Face format: no supported "
                                   f"architecture has {feature}")
    assert not (tmp_path / "hf").exists()


def test_export_from_run_dir_and_bad_sources(tmp_path):
    run = tmp_path / "run"
    model = make_model(**GPT2_STYLE)
    write_model_dir(run / "checkpoints" / "step_00000002", model)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    hf_dir = convert_to_hf(str(run), str(tmp_path / "hf"))  # a run resolves to its latest checkpoint
    assert_same_logits(model, load_in_transformers(hf_dir))

    with pytest.raises(LMForgeError,
                       match=r"hf is already a Hugging Face folder .*; import it with `lmforge convert --from-hf`"):
        convert_to_hf(str(hf_dir), str(tmp_path / "hf2"))
    with pytest.raises(LMForgeError, match="is an lmforge model directory, not a Hugging Face folder"):
        convert_from_hf(str(run / "checkpoints" / "step_00000002"), str(tmp_path / "lm2"))
    with pytest.raises(LMForgeError, match="checkpoint not found"):
        convert_to_hf(str(tmp_path / "nope"), str(tmp_path / "hf2"))
    with pytest.raises(LMForgeError, match="max_shard_size must be a positive number of bytes"):
        convert_to_hf(str(run), str(tmp_path / "hf2"), max_shard_size=0)
    with pytest.raises(LMForgeError, match="exists and is not empty"):
        convert_to_hf(str(run), str(hf_dir))
    ckpt = run / "checkpoints" / "step_00000002"
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(LMForgeError, match="model.safetensors is truncated or corrupt"):
        convert_to_hf(str(run), str(tmp_path / "hf2"))
    assert not (tmp_path / "hf2").exists()


OLD_DEMO_SHAPE = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64, pos_encoding="rope", norm="rmsnorm",
                      qk_norm=True, mlp="relu2", bias=False, tie_embeddings=False)


def test_a_model_without_equivalent_names_the_fix_and_an_exportable_recipe(tmp_path):
    import subprocess
    import sys

    write_model_dir(tmp_path / "lm", make_model(**OLD_DEMO_SHAPE))
    message = ("this model cannot be exported to Hugging Face format: no supported architecture has mlp=relu2 (use "
               "--model.mlp swiglu, as Qwen3 (with qk_norm) / Llama, or gelu with the GPT-2 layout); `lmforge train "
               "--recipe demo` trains a shape that exports (Qwen3)")
    with pytest.raises(LMForgeError) as e:
        convert_to_hf(str(tmp_path / "lm"), str(tmp_path / "hf"))
    assert str(e.value) == message
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "convert", "--to-hf", str(tmp_path / "lm"), "--out",
                           str(tmp_path / "hf")], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"error: {message}\n")
    assert not (tmp_path / "hf").exists()


def test_demo_recipe_run_and_its_seq2seq_finetune_export_as_qwen3(tmp_path):
    """`lmforge train --recipe demo` (narrowed to a tiny width) and `finetune seq2seq` on that run both
    export with `lmforge convert --to-hf`; transformers loads them with the same logits."""
    import os
    import subprocess
    import sys

    from lmforge.infer.llm import LLM
    from train_fixtures import REPO, make_data_dir

    def lmforge(*args: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    data = make_data_dir(tmp_path / "data")
    lmforge("train", "--data", str(data), "--out", str(tmp_path / "run"), "--recipe", "demo", "--model.n_layer", "2",
            "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32", "--train.seq_len", "32",
            "--train.micro_batch_size", "2", "--train.max_steps", "3", "--train.eval_iters", "1",
            "--train.progress", "false")
    pairs = [{"source": f"the {w} king", "target": f"king {w} the"} for w in ("old", "far", "land", "war", "love")]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    lmforge("finetune", "seq2seq", "--base", str(tmp_path / "run"), "--data", str(tmp_path / "pairs.jsonl"),
            "--out", str(tmp_path / "ft"), "--train.max_steps", "2", "--train.micro_batch_size", "2",
            "--train.progress", "false", "--generate.max_examples", "0")
    for run in ("run", "ft"):
        lmforge("convert", "--to-hf", str(tmp_path / run), "--out", str(tmp_path / f"{run}-hf"))
        hf_cfg = json.loads((tmp_path / f"{run}-hf" / "config.json").read_text())
        assert (hf_cfg["architectures"], hf_cfg["intermediate_size"]) == (["Qwen3ForCausalLM"], 688)
        ours = LLM.load(tmp_path / run).model
        ref = load_in_transformers(tmp_path / f"{run}-hf")
        idx = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert (ours(idx) - ref(idx).logits).abs().max().item() < TOL
