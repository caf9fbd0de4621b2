"""Hugging Face -> lmforge: logits, padding, greedy generation and round trips against transformers.

Reference models are tiny, randomly initialised transformers models (every tensor randomised,
biases and norm weights included, so a swapped or dropped tensor changes the logits), saved with
save_pretrained into temp dirs: the hub is never contacted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from reference_libs import reference_lib
transformers = reference_lib("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lmforge.models.registry import load_model_dir  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.infer.generate import generate_ids  # noqa: E402
from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir, supported_architectures  # noqa: E402

V = 300  # vocabulary of every tiny model
TOL = 1e-4


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Every parameter random (norm weights around 1), so each one influences the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = std * torch.randn(p.shape, generator=g)
            is_norm_weight = p.dim() == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name)
            p.copy_(1 + noise if is_norm_weight else noise)


def _llama(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.LlamaConfig(**base)


HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=1, eos_token_id=2),
    "llama-gqa": lambda: _llama(rope_theta=5000.0),
    "llama-bias-headdim-tied": lambda: _llama(attention_bias=True, mlp_bias=True, head_dim=32,
                                              tie_word_embeddings=True, num_key_value_heads=4),
    "mistral-window": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=8, bos_token_id=1, eos_token_id=2),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "qwen2-window": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=8,
        max_window_layers=0, bos_token_id=1, eos_token_id=2),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "qwen3-window-tied": lambda: transformers.Qwen3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=8, max_window_layers=0, bos_token_id=1, eos_token_id=2),
}
ROPE_CONFIGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    # 'dynamic' only rescales past max_position_embeddings in transformers; the stray key is ignored there
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale-notrunc": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                            "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False, "beta_fast": 16.0},
}


def reference_config(name: str):
    """The transformers config of reference model `name`: one of HF_CONFIGS, or a Llama with ROPE_CONFIGS[name]
    (benchmarks/parity.py measures the same references)."""
    if name in HF_CONFIGS:
        return HF_CONFIGS[name]()
    return _llama(rope_parameters={**ROPE_CONFIGS[name], "rope_theta": 10000.0})


def save_hf(hf_cfg, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    randomize_(model, seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = save_hf(reference_config(name), tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def load_hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- logits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_with_and_without_padding(hf_dirs, name):
    path = hf_dirs(name)
    ours, cfg, _ = load_hf_dir(path)
    ref = load_hf(path)
    g = torch.Generator().manual_seed(1)
    T = 24  # > the sliding windows (8) of the mistral / qwen2-window configs
    idx = torch.randint(3, V, (3, T), generator=g)
    with torch.no_grad():
        assert max_diff(ours(idx), ref(idx).logits) < TOL

        # right padding: rows of length T, T-5, T-11; compare real positions only
        lens = torch.tensor([T, T - 5, T - 11])
        mask = torch.arange(T)[None] < lens[:, None]
        x = idx.masked_fill(~mask, 0)
        ref_l = ref(input_ids=x, attention_mask=mask.long()).logits
        assert max_diff(ours(x, pad_mask_BT=mask)[mask], ref_l[mask]) < TOL
        assert max_diff(ours(x)[mask], ref_l[mask]) < TOL  # causal: later padding never matters

        # left padding: HF needs explicit position_ids, lmforge derives them from pad_mask_BT
        mask = torch.arange(T)[None] >= (T - lens)[:, None]
        x = idx.masked_fill(~mask, 0)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ref_l = ref(input_ids=x, attention_mask=mask.long(), position_ids=pos).logits
        assert max_diff(ours(x, pad_mask_BT=mask)[mask], ref_l[mask]) < TOL


@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_rope_scaling_logits_match(hf_dirs, name):
    path = hf_dirs(name)
    ours, cfg, _ = load_hf_dir(path)
    assert cfg.rope_scaling["rope_type"] == ROPE_CONFIGS[name]["rope_type"]
    ref = load_hf(path)
    # The full context (64 = max_position_embeddings): past original_max_position_embeddings (16),
    # where the scaled frequencies matter; for 'dynamic' the longest length where HF does not rescale.
    idx = torch.randint(3, V, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(ours(idx), ref(idx).logits) < TOL


def test_dynamic_rope_drops_original_max_position_embeddings(hf_dirs):
    """transformers' 'dynamic' scales relative to max_position_embeddings and ignores
    original_max_position_embeddings; lmforge's table must then be plain RoPE up to the context."""
    _, cfg, _ = load_hf_dir(hf_dirs("dynamic"))
    assert cfg.rope_scaling == {"rope_type": "dynamic", "factor": 4.0}
    assert cfg.block_size == 64


# ---- greedy generation -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-window", "qwen2", "qwen2-window", "qwen3",
                                  "qwen3-window-tied"])
def test_greedy_32_tokens_match_hf_generate(hf_dirs, name):
    path = hf_dirs(name)
    ours, _, _ = load_hf_dir(path)
    ref = load_hf(path)
    ref.generation_config.eos_token_id = None  # run all 32 steps on both sides
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (12, 5)]
    got = generate_ids(ours, prompts, max_new_tokens=32, temperature=0.0, pad_id=0)

    T = max(map(len, prompts))
    x = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(x)
    for b, p in enumerate(prompts):  # left padding, as generation wants
        x[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=x, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           pad_token_id=0)
    want = out[:, T:].tolist()
    assert got == want
    assert all(len(r) == 32 for r in got)


# ---- round trips -----------------------------------------------------------------------------

def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "llama-bias-headdim-tied", "mistral-window", "qwen2",
                                  "qwen2-window", "qwen3", "qwen3-window-tied", "llama3"])
def test_round_trip_hf_lmforge_hf_identical(hf_dirs, tmp_path, name):
    src = hf_dirs(name)
    lm_dir = convert_from_hf(str(src), str(tmp_path / "lm"))
    back = convert_to_hf(str(lm_dir), str(tmp_path / "hf"))
    a, b = _tensors(src), _tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    src_cfg = json.loads((src / "config.json").read_text())
    back_cfg = json.loads((back / "config.json").read_text())
    for key in ("architectures", "model_type", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "hidden_size", "n_embd", "num_key_value_heads", "head_dim", "sliding_window", "use_sliding_window",
                "rope_parameters", "attention_bias", "mlp_bias"):
        if key in src_cfg:
            assert src_cfg[key] == back_cfg[key], key
    # the lmforge directory loads through the ordinary checkpoint path to the same numbers
    m1, _, _ = load_model_dir(lm_dir)
    m2, _, _ = load_hf_dir(src)
    idx = torch.randint(3, V, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(m1(idx), m2(idx))


def test_gpt2_release_layout_without_prefix_and_with_old_buffers(hf_dirs, tmp_path):
    """The original gpt2 release stores 'h.0...' without 'transformer.' plus the causal-mask buffers."""
    src = hf_dirs("gpt2")
    dst = tmp_path / "gpt2-release"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(src / "model.safetensors")).items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    a, _, _ = load_hf_dir(dst)
    b, _, _ = load_hf_dir(src)
    idx = torch.randint(3, V, (1, 10))
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))


def test_sharded_safetensors_and_legacy_bin_load(hf_dirs, tmp_path):
    src = hf_dirs("llama-gqa")
    ref, _, _ = load_hf_dir(src)
    idx = torch.randint(3, V, (1, 12))
    # sharded by transformers itself
    sharded = tmp_path / "sharded"
    load_hf(src).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    m, _, _ = load_hf_dir(sharded)
    # legacy pytorch_model.bin: read with torch.load(weights_only=True), and a warning
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(str(src / "model.safetensors")), legacy / "pytorch_model.bin")
    with pytest.warns(UserWarning, match=r"pytorch_model\.bin.*weights_only=True"):
        m2, _, _ = load_hf_dir(legacy)
    with torch.no_grad():
        assert torch.equal(m(idx), ref(idx))
        assert torch.equal(m2(idx), ref(idx))


class _NotATensor:  # a pickled object that torch.load(weights_only=True) must refuse to build
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_legacy_bin_with_arbitrary_objects_is_refused(hf_dirs, tmp_path, capsys):
    legacy = tmp_path / "evil"
    legacy.mkdir()
    (legacy / "config.json").write_text((hf_dirs("llama-gqa") / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": _NotATensor()}, legacy / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LMForgeError, match=r"pytorch_model\.bin cannot be loaded as plain weights"):
            load_hf_dir(legacy)
    assert "unpickled!" not in capsys.readouterr().out


# ---- tokenizer -------------------------------------------------------------------------------

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "  leading spaces and\ttabs\n",
         "numbers 12345 and ünïcödé ✓", "</s> looks special"]


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["hello world, the quick brown fox jumps over the lazy dog. " * 4, "numbers 12345"]
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def test_tokenizer_parity_with_autotokenizer(hf_dirs, tmp_path):
    from lmforge.infer.llm import LLM

    folder = tmp_path / "with-tok"
    load_hf(hf_dirs("llama-gqa")).save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe_tokenizer(), bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    llm = LLM.load(folder)
    assert llm.tokenizer.vocab_size == len(hf_tok) and llm.tokenizer.hf.get_vocab() == hf_tok.get_vocab()
    assert llm.tokenizer.eos_id == hf_tok.eos_token_id == 1
    assert llm.tokenizer.pad_id == hf_tok.pad_token_id == 2
    for text in TEXTS:
        # lmforge's encode never adds specials (HF's default adds the post-processor's BOS) and reads
        # special-token text as plain text unless allow_special=True (HF always parses it)
        ours = llm.tokenizer.encode(text, allow_special=True)
        assert ours == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert hf_tok(text)["input_ids"] == [hf_tok.bos_token_id] + ours, text
        assert llm.tokenizer.decode(ours) == hf_tok.decode(ours)
        if "</s>" not in text:
            assert llm.tokenizer.encode(text) == ours
    assert 1 not in llm.tokenizer.encode(TEXTS[-1])  # "</s>" as text is not the EOS token

    # convert_from_hf keeps the tokenizer and the EOS name (tokenizer_config.json)
    lm_dir = convert_from_hf(str(folder), str(tmp_path / "lm"))
    tok_cfg = json.loads((lm_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["eos_token"], tok_cfg["pad_token"], tok_cfg["bos_token"]) == ("</s>", "<pad>", "<s>")
    assert (lm_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    # ... and LLM.load of the converted dir knows the EOS and encodes prompts as HF does (with BOS)
    converted = LLM.load(lm_dir)
    assert converted.tokenizer.eos_id == 1 and converted.tokenizer.pad_id == 2
    for text in TEXTS:
        assert converted.tokenizer.encode_prompt(text) == hf_tok(text)["input_ids"] == llm.tokenizer.encode_prompt(text)
    # ... and exports them back so AutoTokenizer encodes as before
    back = convert_to_hf(str(lm_dir), str(tmp_path / "hf"))
    hf_back = transformers.AutoTokenizer.from_pretrained(back)
    assert hf_back.eos_token == "</s>" and hf_back.pad_token == "<pad>"
    assert all(hf_back(t)["input_ids"] == hf_tok(t)["input_ids"] for t in TEXTS)


def test_eos_from_config_id_when_no_tokenizer_config(hf_dirs, tmp_path):
    from lmforge.interop.files import load_hf_tokenizer

    folder = tmp_path / "bare-tok"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dirs("llama-gqa") / "config.json").read_text())  # eos_token_id 2
    _bpe_tokenizer().save(str(folder / "tokenizer.json"))
    tok = load_hf_tokenizer(folder, json.loads((folder / "config.json").read_text()))
    assert tok.eos_id == 2 and tok.hf.id_to_token(2) == "<pad>"


def test_folder_without_tokenizer_loads_with_none(hf_dirs):
    _, _, tok = load_hf_dir(hf_dirs("gpt2"))
    assert tok is None


# ---- bad input -------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder: Path, fn) -> None:
    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LMForgeError, match=r"empty has no config\.json; a Hugging Face model folder needs one"):
        convert_from_hf(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(hf_dirs, tmp_path):
    bad = _copy(hf_dirs("llama-gqa"), tmp_path / "bad")
    _edit_config(bad, architectures=["FalconForCausalLM"])
    with pytest.raises(LMForgeError) as e:
        load_hf_dir(bad)
    assert str(e.value).endswith(f"architecture FalconForCausalLM is not supported; supported: "
                                 f"{', '.join(supported_architectures())}")


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": True}, "attention_bias=true with mlp_bias=false is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope type 'longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5 is not supported"),
    ({"num_hidden_layers": None}, "needs an integer 'num_hidden_layers'"),
])
def test_unsupported_config_options(hf_dirs, tmp_path, changes, message):
    bad = _copy(hf_dirs("llama-gqa"), tmp_path / "bad")
    _edit_config(bad, **changes)
    with pytest.raises(LMForgeError, match=message):
        load_hf_dir(bad)


def test_qwen3_reads_qk_norm_and_refuses_attention_bias(hf_dirs, tmp_path):
    _, cfg, _ = load_hf_dir(hf_dirs("qwen3"))
    assert (cfg.qk_norm, cfg.mlp, cfg.bias, cfg.qkv_bias, cfg.head_dim, cfg.n_kv_head) == (True, "swiglu", False, False,
                                                                                           24, 2)
    bad = _copy(hf_dirs("qwen3"), tmp_path / "bad")
    _edit_config(bad, attention_bias=True)
    with pytest.raises(LMForgeError) as e:
        load_hf_dir(bad)
    assert str(e.value) == (f"{bad / 'config.json'}: attention_bias=true is not supported for Qwen3ForCausalLM "
                            "(lmforge has biases on q/k/v only or on every linear layer, not on the attention "
                            "projections alone)")


def test_qwen2_window_on_some_layers_only_is_refused(hf_dirs, tmp_path):
    bad = _copy(hf_dirs("qwen2-window"), tmp_path / "bad")
    _edit_config(bad, layer_types=["full_attention", "sliding_attention"], max_window_layers=1)
    with pytest.raises(LMForgeError, match="sliding-window attention on only some layers"):
        load_hf_dir(bad)


def test_missing_extra_and_misshapen_tensors(hf_dirs, tmp_path):
    src = hf_dirs("llama-gqa")
    missing = _copy(src, tmp_path / "missing")
    _edit_weights(missing, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LMForgeError,
                       match=r"lack tensors that config\.json implies: model\.layers\.1\.mlp\.up_proj\.weight$"):
        convert_from_hf(str(missing), str(tmp_path / "out"))

    extra = _copy(src, tmp_path / "extra")
    _edit_weights(extra, lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(LMForgeError, match=r"hold tensors that LlamaForCausalLM with this config\.json does not use: "
                                           r"model\.layers\.2\.mlp\.up_proj\.weight$"):
        convert_from_hf(str(extra), str(tmp_path / "out"))

    shape = _copy(src, tmp_path / "shape")
    _edit_weights(shape, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(LMForgeError, match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                                           r"\(16, 64\), config\.json implies \(32, 64\)$"):
        load_hf_dir(shape)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_truncated_safetensors(hf_dirs, tmp_path):
    bad = _copy(hf_dirs("llama-gqa"), tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(LMForgeError, match=r"weights file .*model\.safetensors is truncated or corrupt"):
        convert_from_hf(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_out_dir_refused_unless_overwrite_and_failures_leave_it_untouched(hf_dirs, tmp_path, monkeypatch):
    src = hf_dirs("gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LMForgeError, match=r"--out .*out exists and is not empty; pass --overwrite to replace it"):
        convert_from_hf(str(src), str(out))
    with pytest.raises(LMForgeError, match="would replace the source"):
        convert_from_hf(str(src), str(src), overwrite=True)

    # a failure half-way through writing leaves the old --out as it was and no temp dir behind
    from lmforge.interop import files as hf_mod

    real_get, calls = hf_mod.WeightSource.get, []

    def failing_get(self, name, rows=None):
        calls.append(name)
        if len(calls) > 5:
            raise LMForgeError("simulated read failure")
        return real_get(self, name, rows)

    monkeypatch.setattr(hf_mod.WeightSource, "get", failing_get)
    with pytest.raises(LMForgeError, match="simulated read failure"):
        convert_from_hf(str(src), str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.undo()

    convert_from_hf(str(src), str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["generation_config.json", "hf_config.json", "model.safetensors",
                                                      "model_config.json"]


def test_written_safetensors_are_valid_for_the_reference_reader(hf_dirs, tmp_path):
    lm_dir = convert_from_hf(str(hf_dirs("gpt2")), str(tmp_path / "lm"))
    with safe_open(str(lm_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "lmforge": "decoder"}
        qkv = f.get_tensor("blocks.0.attn.qkv.weight")
    c_attn = load_file(str(hf_dirs("gpt2") / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(qkv, c_attn.t())  # GPT-2's Conv1D layout is transposed
