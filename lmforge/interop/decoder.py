"""Hugging Face interop of the decoder family: GPT-2, Llama, Mistral, Qwen2 and Qwen3 checkpoints in
and out, numerically identical (the interop protocol: lmforge/interop/__init__.py).

    load_hf(dir)                      HF folder -> (Decoder, DecoderConfig, Tokenizer or None), in memory
    convert_from_hf(dir, out)         HF folder -> lmforge model directory
    convert_to_hf(model_dir, out)     lmforge model directory -> HF folder that transformers loads

Weights are renamed and reshaped, never recomputed: HF's q/k/v projections are stacked into lmforge's
fused `attn.qkv` ([q; k; v] rows), gate/up into `mlp.fc_in` ([gate; up] rows), GPT-2's Conv1D
weights (stored input-major) are transposed. HF's rotate-half RoPE layout is lmforge's, so no
permutation is needed.

Conversions stream: tensors are read one at a time from the source (safetensors `safe_open`, which
memory-maps the file) and written straight into the output file(s) by the streaming safetensors
writer of interop/files.py. A fused tensor is written as its parts back to back (concatenation
along dim 0 is byte concatenation), so the peak is one source tensor (two for a GPT-2 transpose),
never a second copy of the model. See docs/parity.md.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from lmforge.checkpoint import (MODEL_CONFIG, MODEL_WEIGHTS, TOKENIZER, atomic_write_text, load_state_checked,
                                model_state_for_saving)
from lmforge.errors import LMForgeError
from lmforge.interop.files import (DEFAULT_MAX_SHARD_SIZE, GENERATION_CONFIG, HF_CONFIG, HF_CONFIG_SIDECAR,
                                   SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, OutTensor, TempDir, WeightSource, check_out,
                                   first_id, load_hf_tokenizer, read_json_file, special_token_names,
                                   write_hf_weights, write_model_config, write_safetensors_streaming)
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer import CHAT_TEMPLATE_FILE, read_tokenizer_json, token_name

ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

_ROPE_KEYS = {  # the keys each rope type uses (HF ignores any others, and so do we)
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
}


def recognises(folder: Path, hf: dict | None) -> bool:
    """A transformers folder of one of ARCHITECTURES."""
    return hf is not None and any(a in ARCHITECTURES for a in hf.get("architectures") or [])


# ---- HF config.json <-> DecoderConfig --------------------------------------------------------

def _architecture(hf: dict, source: str) -> str:
    archs = hf.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise LMForgeError(f"{source} names no 'architectures'; supported: {', '.join(ARCHITECTURES)}")
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise LMForgeError(f"{source}: architecture {', '.join(map(str, archs))} is not supported; "
                       f"supported: {', '.join(ARCHITECTURES)}")


def _rope_from_hf(hf: dict, max_pos: int, source: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, lmforge rope_scaling) from transformers 5 `rope_parameters` or 4.x `rope_scaling`."""
    raw = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(raw, dict):
        raise LMForgeError(f"{source}: rope_parameters must be a JSON object, got {raw!r}")
    if any(isinstance(v, dict) for v in raw.values()):
        raise LMForgeError(f"{source}: per-layer-type rope_parameters are not supported")
    params = dict(raw)
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise LMForgeError(f"{source}: partial_rotary_factor={partial} is not supported "
                           "(lmforge rotates the whole head)")
    if kind == "default":
        return theta, None
    if kind not in _ROPE_KEYS:
        raise LMForgeError(f"{source}: rope type '{kind}' is not supported "
                           f"(supported: default, {', '.join(_ROPE_KEYS)})")
    if kind in ("llama3", "yarn"):
        # As transformers' standardize_rope_params: a top-level value wins, else max_position_embeddings.
        if hf.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", max_pos)
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}[kind]
    for key in required:
        if params.get(key) is None:
            raise LMForgeError(f"{source}: rope type '{kind}' needs '{key}'")
    # 'dynamic' in transformers scales relative to max_position_embeddings and ignores any
    # original_max_position_embeddings; dropping it makes lmforge's table equal HF's (see docs/parity.md).
    return theta, {"rope_type": kind, **{k: params[k] for k in _ROPE_KEYS[kind] if k in params}}


def config_from_hf(hf: dict, source: str = HF_CONFIG) -> tuple[DecoderConfig, str]:
    """(DecoderConfig, architecture) from a transformers config.json dict; rejects what lmforge cannot express."""
    arch = _architecture(hf, source)

    def need(*keys: str) -> list:
        for key in keys:
            if not isinstance(hf.get(key), int):
                raise LMForgeError(f"{source} needs an integer '{key}' for {arch}")
        return [hf[k] for k in keys]

    if arch == "GPT2LMHeadModel":
        vocab, n_pos, n_embd, n_layer, n_head = need("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LMForgeError(f"{source}: activation_function '{act}' is not supported "
                               "(lmforge's GELU is the tanh approximation: gelu_new or gelu_pytorch_tanh)")
        for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                         ("add_cross_attention", True)):
            if hf.get(key, not bad) == bad:
                raise LMForgeError(f"{source}: {key}={str(bad).lower()} is not supported")
        cfg = DecoderConfig(
            vocab_size=vocab, block_size=n_pos, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
            mlp_hidden=hf.get("n_inner") or 4 * n_embd, pos_encoding="learned", mlp="gelu", norm="layernorm",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True, qkv_bias=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), dropout=0.0,
            init_std=float(hf.get("initializer_range", 0.02)))
        return cfg, arch

    vocab, hidden, n_layer, n_head, inter, max_pos = need(
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LMForgeError(f"{source}: hidden_act '{act}' is not supported (lmforge's SwiGLU uses silu)")
    bias, qkv_bias, qk_norm, window = False, False, False, None
    if arch == "LlamaForCausalLM":
        attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise LMForgeError(f"{source}: attention_bias={str(attn_bias).lower()} with mlp_bias="
                               f"{str(mlp_bias).lower()} is not supported (lmforge has biases on all linear layers "
                               "or on none; the two must be equal)")
        bias = attn_bias
    elif arch == "MistralForCausalLM":
        window = hf.get("sliding_window", 4096)  # transformers' MistralConfig default when the key is absent
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if arch == "Qwen2ForCausalLM":
            qkv_bias = True
        else:  # Qwen3: per-head RMSNorm of queries and keys; attention_bias puts biases on q, k, v and o
            qk_norm = True
            if hf.get("attention_bias", False):
                raise LMForgeError(f"{source}: attention_bias=true is not supported for {arch} (lmforge has biases "
                                   "on q/k/v only or on every linear layer, not on the attention projections alone)")
        if hf.get("use_sliding_window", False):
            window = hf.get("sliding_window", 4096)
            kinds = hf.get("layer_types") or [
                "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
                for i in range(n_layer)]
            if len(set(kinds)) > 1:
                raise LMForgeError(f"{source}: sliding-window attention on only some layers (max_window_layers="
                                   f"{hf.get('max_window_layers')}) is not supported; "
                                   "lmforge applies it to all or none")
            if kinds and kinds[0] != "sliding_attention":
                window = None
    theta, scaling = _rope_from_hf(hf, max_pos, source)
    n_kv = hf.get("num_key_value_heads") or n_head
    head_dim = hf.get("head_dim") or hidden // n_head
    cfg = DecoderConfig(
        vocab_size=vocab, block_size=max_pos, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, n_embd=hidden,
        head_dim=head_dim, mlp_hidden=inter, pos_encoding="rope", rope_theta=theta, rope_scaling=scaling,
        mlp="swiglu", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), bias=bias, qkv_bias=qkv_bias,
        qk_norm=qk_norm, tie_embeddings=bool(hf.get("tie_word_embeddings", False)), sliding_window=window, dropout=0.0,
        init_std=float(hf.get("initializer_range", 0.02)))
    return cfg, arch


# The error's last word when a model has no HF equivalent: a recipe whose models export.
_EXPORTABLE_RECIPE = "`lmforge train --recipe demo` trains a shape that exports (Qwen3)"


def _unsupported_features(cfg: DecoderConfig) -> list[str]:
    """Features of `cfg` that no supported HF architecture has, each named as an lmforge config key
    with the change that makes the model exportable."""
    bad = []
    if cfg.pos_encoding == "sinusoidal":
        bad.append("pos_encoding=sinusoidal (use --model.pos_encoding rope, as Llama / Qwen3, or learned with the "
                   "GPT-2 layout)")
    if cfg.mlp == "relu2":
        bad.append("mlp=relu2 (use --model.mlp swiglu, as Qwen3 (with qk_norm) / Llama, or gelu with the GPT-2 layout)")
    if cfg.logit_softcap:
        bad.append(f"logit_softcap={cfg.logit_softcap} (leave model.logit_softcap unset)")
    if bad:
        return bad
    gpt2_like = (cfg.pos_encoding, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    llama_like = (cfg.pos_encoding, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    if not gpt2_like and not llama_like:
        return [f"the mix pos_encoding={cfg.pos_encoding}, norm={cfg.norm}, mlp={cfg.mlp} (GPT-2 is learned/layernorm/"
                "gelu, the Llama family and Qwen3 rope/rmsnorm/swiglu)"]
    if gpt2_like:
        if cfg.qk_norm:
            bad.append("qk_norm=true with GPT-2 layout (QK-norm is Qwen3's: rope, rmsnorm, swiglu)")
        if not cfg.bias:
            bad.append("bias=false with GPT-2 layout (GPT-2 has biases everywhere)")
        if cfg.n_kv_head != cfg.n_head:
            bad.append("n_kv_head != n_head with GPT-2 layout")
        if cfg.head_dim * cfg.n_head != cfg.n_embd:
            bad.append("head_dim * n_head != n_embd with GPT-2 layout")
        if cfg.sliding_window is not None:
            bad.append("sliding_window with GPT-2 layout")
    elif cfg.qk_norm and (cfg.bias or cfg.qkv_bias):
        bad.append(f"qk_norm=true together with {'bias' if cfg.bias else 'qkv_bias'}=true (Qwen3, the architecture "
                   "with QK-norm, has no biases here; use --model.bias false --model.qkv_bias false)")
    elif cfg.bias and cfg.sliding_window is not None:
        bad.append("bias=true together with sliding_window (Llama has no sliding window, Mistral no biases)")
    return bad


def hf_architectures_for(cfg: DecoderConfig) -> list[str]:
    """HF architectures that express `cfg` exactly, preferred first; raises naming the feature if none."""
    bad = _unsupported_features(cfg)
    if bad:
        raise LMForgeError(f"this model cannot be exported to Hugging Face format: no supported architecture has "
                           f"{'; '.join(bad)}; {_EXPORTABLE_RECIPE}")
    if cfg.pos_encoding == "learned":
        return ["GPT2LMHeadModel"]
    if cfg.qk_norm:
        return ["Qwen3ForCausalLM"]
    if cfg.bias:
        return ["LlamaForCausalLM"]  # attention_bias = mlp_bias = true
    if cfg.qkv_bias:
        return ["Qwen2ForCausalLM"]
    if cfg.sliding_window is not None:
        return ["MistralForCausalLM"]
    return ["LlamaForCausalLM", "MistralForCausalLM"]


def _rope_to_hf(cfg: DecoderConfig) -> tuple[float, Optional[dict]]:
    sc = cfg.rope_scaling
    kind = (sc or {}).get("rope_type", (sc or {}).get("type", "default"))
    if not sc or kind == "default":
        return cfg.rope_theta, None
    if kind == "dynamic":
        factor = float(sc["factor"])
        orig = sc.get("original_max_position_embeddings")
        if orig is not None and cfg.block_size > int(orig):
            # lmforge fixes the NTK-scaled base at block_size; HF's 'dynamic' would not scale inside
            # max_position_embeddings. The fixed table is exactly plain RoPE with this base
            # (the same expression as lmforge.nn.layers.rope_inv_freq).
            D = cfg.head_dim
            base = cfg.rope_theta * ((factor * cfg.block_size / int(orig)) - (factor - 1)) ** (D / (D - 2))
            return base, None
        return cfg.rope_theta, {"rope_type": "dynamic", "factor": factor}
    if kind not in _ROPE_KEYS:
        raise LMForgeError(f"rope scaling type '{kind}' cannot be exported (supported: {', '.join(_ROPE_KEYS)})")
    out = {"rope_type": kind, **{k: sc[k] for k in _ROPE_KEYS[kind] if k in sc}}
    if kind == "llama3":  # lmforge defaults these; transformers requires them
        out.setdefault("low_freq_factor", 1.0)
        out.setdefault("high_freq_factor", 4.0)
    if kind == "yarn":
        out.setdefault("original_max_position_embeddings", cfg.block_size)
    return cfg.rope_theta, out


def config_to_hf(cfg: DecoderConfig, arch: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
                 token_ids: Optional[dict[str, Any]] = None) -> dict:
    """transformers config.json dict for `cfg` (architecture `arch`, default the first that fits)."""
    archs = hf_architectures_for(cfg)
    arch = arch if arch in archs else archs[0]
    ids = {f"{k}_token_id": (token_ids or {}).get(k) for k in ("bos", "eos", "pad")}
    dtype_name = str(dtype).removeprefix("torch.")
    common = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
              "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
              **ids, "torch_dtype": dtype_name, "dtype": dtype_name}
    if arch == "GPT2LMHeadModel":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": None if cfg.mlp_hidden == 4 * cfg.n_embd else cfg.mlp_hidden,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    theta, scaling = _rope_to_hf(cfg)
    out = {**common, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
           "attention_dropout": cfg.dropout,
           # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling. Both say the same.
           "rope_theta": theta, "rope_scaling": scaling,
           "rope_parameters": {"rope_type": "default", "rope_theta": theta} if scaling is None
           else {**scaling, "rope_theta": theta}}
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        out.update(sliding_window=cfg.sliding_window)
    else:  # Qwen2 and Qwen3: the same sliding-window keys
        if arch == "Qwen3ForCausalLM":
            out.update(attention_bias=False)
        sliding = cfg.sliding_window is not None
        out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                   max_window_layers=0 if sliding else cfg.n_layer,
                   layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.n_layer)
    return out


# ---- tensor name maps ------------------------------------------------------------------------

@dataclass
class _Entry:
    """One lmforge tensor = its HF parts stacked along dim 0 (each transposed first if `transpose`)."""

    lm: str
    parts: list[tuple[str, int]]  # (HF name without prefix, rows it contributes)
    transpose: bool = False


def _tensor_map(cfg: DecoderConfig, layout: str, lm_shapes: dict[str, tuple[int, ...]]) -> list[_Entry]:
    entries: list[_Entry] = []
    H, K, D, F = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden

    def add(lm: str, hf: str | list[tuple[str, int]], transpose: bool = False) -> None:
        if lm not in lm_shapes:
            return  # e.g. no bias in this config
        parts = hf if isinstance(hf, list) else [(hf, lm_shapes[lm][0] if lm_shapes[lm] else 1)]
        entries.append(_Entry(lm, parts, transpose and len(lm_shapes[lm]) == 2))

    if layout == "gpt2":
        add("tok_emb.weight", "wte.weight")
        add("pos_emb.weight", "wpe.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"h.{i}."
            for p in ("weight", "bias"):
                add(b + f"norm1.{p}", h + f"ln_1.{p}")
                add(b + f"attn.qkv.{p}", h + f"attn.c_attn.{p}", transpose=True)
                add(b + f"attn.proj.{p}", h + f"attn.c_proj.{p}", transpose=True)
                add(b + f"norm2.{p}", h + f"ln_2.{p}")
                add(b + f"mlp.fc_in.{p}", h + f"mlp.c_fc.{p}", transpose=True)
                add(b + f"mlp.fc_out.{p}", h + f"mlp.c_proj.{p}", transpose=True)
        add("norm_f.weight", "ln_f.weight")
        add("norm_f.bias", "ln_f.bias")
    else:
        add("tok_emb.weight", "embed_tokens.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"layers.{i}."
            add(b + "norm1.weight", h + "input_layernorm.weight")
            add(b + "attn.q_norm.weight", h + "self_attn.q_norm.weight")  # Qwen3's QK-norm
            add(b + "attn.k_norm.weight", h + "self_attn.k_norm.weight")
            for p in ("weight", "bias"):
                add(b + f"attn.qkv.{p}", [(h + f"self_attn.q_proj.{p}", H * D), (h + f"self_attn.k_proj.{p}", K * D),
                                          (h + f"self_attn.v_proj.{p}", K * D)])
                add(b + f"attn.proj.{p}", h + f"self_attn.o_proj.{p}")
                add(b + f"mlp.fc_in.{p}", [(h + f"mlp.gate_proj.{p}", F), (h + f"mlp.up_proj.{p}", F)])
                add(b + f"mlp.fc_out.{p}", h + f"mlp.down_proj.{p}")
            add(b + "norm2.weight", h + "post_attention_layernorm.weight")
        add("norm_f.weight", "norm.weight")
    add("lm_head.weight", "lm_head.weight")
    covered = {e.lm for e in entries}
    if covered != set(lm_shapes):  # a model feature the map does not know: a bug, not a user error
        raise AssertionError(f"tensor map out of date: {sorted(set(lm_shapes) ^ covered)}")
    return entries


def _hf_prefix(layout: str) -> str:
    return "transformer." if layout == "gpt2" else "model."


def _layout(arch: str) -> str:
    """The tensor layout of an architecture: GPT-2's ('gpt2') or the Llama family's ('llama')."""
    return "gpt2" if arch == "GPT2LMHeadModel" else "llama"


def _expected_lm_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors an lmforge file holds for `cfg` (tied head stored once); no memory used."""
    with torch.device("meta"):
        model = Decoder(cfg)
    return {k: tuple(v.shape) for k, v in model_state_for_saving(model).items()}


def _hf_part_shape(entry: _Entry, rows: int, lm_shape: tuple[int, ...]) -> tuple[int, ...]:
    if entry.transpose:
        return tuple(reversed(lm_shape))
    return (rows, *lm_shape[1:]) if lm_shape else ()


def export_architecture(cfg: DecoderConfig, origin: dict | None = None) -> str:
    """The HF architecture `convert --to-hf` writes for `cfg`: the one the model came from (`origin`,
    its HF config), when it still expresses it, else the preferred one."""
    preferred = next((a for a in (origin or {}).get("architectures") or [] if a in ARCHITECTURES), None)
    return next((a for a in hf_architectures_for(cfg) if a == preferred), hf_architectures_for(cfg)[0])


def hf_tensor_parts(cfg: DecoderConfig, arch: str) -> dict[str, tuple[list[tuple[str, int, int]], bool]]:
    """{lmforge tensor: ([(full HF name, first row, end row), ...], transposed)}: where each tensor of a
    model with `cfg` lies in architecture `arch` (adapters map their modules through this)."""
    layout = _layout(arch)
    prefix = _hf_prefix(layout)
    out = {}
    for e in _tensor_map(cfg, layout, _expected_lm_shapes(cfg)):
        parts, start = [], 0
        for hf_name, rows in e.parts:
            parts.append((hf_name if hf_name == "lm_head.weight" else prefix + hf_name, start, start + rows))
            start += rows
        out[e.lm] = (parts, e.transpose)
    return out


# ---- import ----------------------------------------------------------------------------------

def _import_plan(hf_dir: Path, source: WeightSource, cfg: DecoderConfig, arch: str,
                 dtype: Optional[torch.dtype] = None) -> list[OutTensor]:
    """The lmforge tensors of `cfg`, each with a reader over the HF tensors; checks names and shapes first."""
    layout = _layout(arch)
    lm_shapes = _expected_lm_shapes(cfg)
    entries = _tensor_map(cfg, layout, lm_shapes)
    names = set(source.names())
    prefix = _hf_prefix(layout)
    if not any(n.startswith(prefix) for n in names):
        prefix = ""  # base-model files (e.g. the original gpt2 release) have no prefix

    def full(hf_name: str) -> str:
        return hf_name if hf_name == "lm_head.weight" else prefix + hf_name

    wanted = {full(n) for e in entries for n, _ in e.parts}
    ignorable = re.compile(r"(^|\.)(h\.\d+\.attn\.(bias|masked_bias)|rotary_emb\.inv_freq)$")  # old saved buffers
    extra = sorted(n for n in names - wanted if not ignorable.search(n)
                   and not (n == "lm_head.weight" and cfg.tie_embeddings))  # a tied head is the embedding
    missing = sorted(wanted - names)
    where = f"the weights in {hf_dir}"
    if missing:
        raise LMForgeError(f"{where} lack tensors that {HF_CONFIG} implies: {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise LMForgeError(f"{where} hold tensors that {arch} with this {HF_CONFIG} does not use: "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    emb = full(entries[0].parts[0][0])
    out_dtype = dtype or source.dtype(emb)
    plan = []
    for e in entries:
        for hf_name, rows in e.parts:
            want = _hf_part_shape(e, rows, lm_shapes[e.lm])
            got = source.shape(full(hf_name))
            if got != want:
                raise LMForgeError(f"{source.files[full(hf_name)]}: tensor '{full(hf_name)}' has shape {got}, "
                                   f"{HF_CONFIG} implies {want}")

        def chunks(e: _Entry = e) -> Iterator[torch.Tensor]:
            for hf_name, _ in e.parts:
                t = source.get(full(hf_name))
                yield t.t().contiguous() if e.transpose else t

        plan.append(OutTensor(e.lm, lm_shapes[e.lm], out_dtype, chunks))
    return plan


def load_hf(hf_dir: Path, hf_cfg: dict, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """(Decoder in eval mode, DecoderConfig, Tokenizer or None) from a Hugging Face model folder.

    Weights keep their stored dtype unless `dtype` is given.
    """
    cfg, arch = config_from_hf(hf_cfg, str(hf_dir / HF_CONFIG))
    source = WeightSource(hf_dir)
    plan = _import_plan(hf_dir, source, cfg, arch, dtype)
    state = {}
    for t in plan:
        pieces = list(t.chunks())
        state[t.name] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)).to(t.dtype)
        del pieces
    with torch.device("meta"):
        model = Decoder(cfg)
    load_state_checked(model, state, hf_dir)
    del state
    model = model.to(device).eval()
    return model, cfg, load_hf_tokenizer(hf_dir, hf_cfg)


def convert_from_hf(src: Path, hf_cfg: dict, out_p: Path, overwrite: bool = False) -> Path:
    """Write the HF folder `src` as an lmforge model directory `out_p` (streamed; atomic)."""
    cfg, arch = config_from_hf(hf_cfg, str(src / HF_CONFIG))
    check_out(out_p, overwrite, src)
    source = WeightSource(src)
    plan = _import_plan(src, source, cfg, arch)
    has_tok = (src / TOKENIZER).is_file()
    specials = special_token_names(src, hf_cfg, read_tokenizer_json(src / TOKENIZER)) if has_tok else {}
    with TempDir(out_p) as tmp:
        write_safetensors_streaming(tmp / MODEL_WEIGHTS, plan, metadata={"format": "pt", "lmforge": "decoder"})
        write_model_config(tmp, "decoder", cfg)
        atomic_write_text(tmp / HF_CONFIG_SIDECAR, json.dumps(hf_cfg, indent=2))
        if (src / GENERATION_CONFIG).is_file():
            shutil.copyfile(src / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        if has_tok:
            shutil.copyfile(src / TOKENIZER, tmp / TOKENIZER)
            tok_cfg = read_json_file(src / TOKENIZER_CONFIG) if (src / TOKENIZER_CONFIG).is_file() else {}
            tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
            for k in ("bos", "eos", "pad"):
                tok_cfg[f"{k}_token"] = specials[k]  # resolved plain strings: what LLM.load reads
            atomic_write_text(tmp / TOKENIZER_CONFIG, json.dumps(tok_cfg, indent=2, ensure_ascii=False))
            if (src / CHAT_TEMPLATE_FILE).is_file():
                shutil.copyfile(src / CHAT_TEMPLATE_FILE, tmp / CHAT_TEMPLATE_FILE)
    return out_p


# ---- export ----------------------------------------------------------------------------------

def _export_plan(source: WeightSource, cfg: DecoderConfig, arch: str, where: Path) -> list[OutTensor]:
    layout = _layout(arch)
    lm_shapes = _expected_lm_shapes(cfg)
    names = set(source.names())
    missing, extra = sorted(set(lm_shapes) - names), sorted(names - set(lm_shapes))
    if missing or extra:
        parts = ([f"missing tensors: {', '.join(missing[:5])}"] if missing else []) + \
                ([f"unexpected tensors: {', '.join(extra[:5])}"] if extra else [])
        raise LMForgeError(f"{where} does not match its {MODEL_CONFIG} ({'; '.join(parts)})")
    for name, want in lm_shapes.items():
        if source.shape(name) != want:
            raise LMForgeError(f"{where}: tensor '{name}' has shape {source.shape(name)}, the config expects {want}")
    out_dtype = source.dtype("tok_emb.weight")
    prefix = _hf_prefix(layout)
    plan = []
    for e in _tensor_map(cfg, layout, lm_shapes):
        start = 0
        for hf_name, rows in e.parts:
            rng = None if len(e.parts) == 1 else (start, start + rows)
            start += rows

            def chunks(lm: str = e.lm, rng: Optional[tuple[int, int]] = rng,
                       tr: bool = e.transpose) -> Iterator[torch.Tensor]:
                t = source.get(lm, rng)
                yield t.t().contiguous() if tr else t

            full = hf_name if hf_name == "lm_head.weight" else prefix + hf_name
            plan.append(OutTensor(full, _hf_part_shape(e, rows, lm_shapes[e.lm]), out_dtype, chunks))
    return plan


def convert_to_hf(model_dir: Path, cfg: DecoderConfig, out_p: Path, overwrite: bool = False,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write an lmforge decoder model directory as a Hugging Face folder that transformers loads.

    config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards of at most
    `max_shard_size` bytes plus model.safetensors.index.json), generation_config.json and, when the
    model has a tokenizer, tokenizer.json + tokenizer_config.json + special_tokens_map.json.
    """
    check_out(out_p, overwrite, model_dir)
    origin = read_json_file(model_dir / HF_CONFIG_SIDECAR) if (model_dir / HF_CONFIG_SIDECAR).is_file() else {}
    origin = origin if isinstance(origin, dict) else {}
    arch = export_architecture(cfg, origin)
    if not (model_dir / MODEL_WEIGHTS).is_file():
        raise LMForgeError(f"checkpoint file missing: {model_dir / MODEL_WEIGHTS}")
    source = WeightSource(model_dir, single=MODEL_WEIGHTS, index="", allow_bin=False)
    plan = _export_plan(source, cfg, arch, model_dir / MODEL_WEIGHTS)
    dtype = plan[0].dtype

    tok_path = model_dir / TOKENIZER
    tok_cfg: dict[str, Any] = {}
    ids: dict[str, Optional[int]] = {k: first_id(origin.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}
    if tok_path.is_file():
        raw = read_tokenizer_json(tok_path)
        if (model_dir / TOKENIZER_CONFIG).is_file():  # came from HF: keep its settings (chat template, classes)
            tok_cfg = read_json_file(model_dir / TOKENIZER_CONFIG)
            tok_cfg = tok_cfg if isinstance(tok_cfg, dict) else {}
        else:  # an lmforge tokenizer: its EOS / pad tokens, loaded verbatim by PreTrainedTokenizerFast
            vocab = raw.get_vocab(with_added_tokens=True)
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                       "model_max_length": cfg.block_size,
                       **{f"{k}_token": t for k, t in (("eos", "<|endoftext|>"), ("pad", "<|pad|>")) if t in vocab}}
        for k in ("bos", "eos", "pad"):
            name = token_name(tok_cfg.get(f"{k}_token"))
            if name is not None and raw.token_to_id(name) is not None:
                ids[k] = raw.token_to_id(name)
    hf_cfg = config_to_hf(cfg, arch, dtype=dtype, token_ids=ids)

    with TempDir(out_p) as tmp:
        write_hf_weights(tmp, plan, max_shard_size)
        atomic_write_text(tmp / HF_CONFIG, json.dumps(hf_cfg, indent=2))
        if (model_dir / GENERATION_CONFIG).is_file():
            shutil.copyfile(model_dir / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        else:
            gen = {f"{k}_token_id": v for k, v in ids.items() if v is not None}
            atomic_write_text(tmp / GENERATION_CONFIG, json.dumps(gen, indent=2))
        if tok_path.is_file():
            shutil.copyfile(tok_path, tmp / TOKENIZER)
            template_file = model_dir / CHAT_TEMPLATE_FILE
            if template_file.is_file():  # a chat model: the template goes in both places transformers reads
                tok_cfg["chat_template"] = template_file.read_text(encoding="utf-8")
                shutil.copyfile(template_file, tmp / CHAT_TEMPLATE_FILE)
            atomic_write_text(tmp / TOKENIZER_CONFIG, json.dumps(tok_cfg, indent=2, ensure_ascii=False))
            specials = {f"{k}_token": token_name(tok_cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
            atomic_write_text(tmp / SPECIAL_TOKENS_MAP,
                              json.dumps({k: v for k, v in specials.items() if v is not None}, indent=2,
                                         ensure_ascii=False))
    return out_p
