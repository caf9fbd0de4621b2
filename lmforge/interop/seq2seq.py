"""Hugging Face interop for encoder-decoders: T5ForConditionalGeneration (v1.0 ReLU and v1.1 gated
GELU) and BartForConditionalGeneration, in and out, numerically identical (the interop protocol:
lmforge/interop/__init__.py).

    load_hf(dir)                     HF folder -> (Seq2Seq, Seq2SeqConfig, Tokenizer or None)
    convert_from_hf(dir, out)        HF folder -> lmforge model directory
    convert_to_hf(model_dir, out)    lmforge model directory -> HF folder that transformers loads
    state_from_hf / state_to_hf      the weight renaming itself (tensors only)

Weights are renamed and stacked, never recomputed: q/k/v become the fused `qkv` ([q; k; v] rows),
cross-attention k/v the fused `kv`, T5 v1.1's wi_0/wi_1 the fused gated `fc_in` ([gate; up]); T5's
relative position tables (owned by block 0 of each stack in HF) are lmforge's `enc_rel_bias` /
`dec_rel_bias`; BART's `final_logits_bias` (1, V) is a (V,) buffer. Models are small enough to
convert in memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import MODEL_WEIGHTS, TOKENIZER, atomic_write_text, load_tensors, write_model_dir
from lmforge.errors import LMForgeError
from lmforge.interop.files import (DEFAULT_MAX_SHARD_SIZE, GENERATION_CONFIG, HF_CONFIG, HF_CONFIG_SIDECAR,
                                   SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TempDir, WeightSource, check_out,
                                   load_hf_tokenizer, read_json_file, stacked_parts, tensors_in_memory,
                                   write_hf_weights)
from lmforge.models.seq2seq import Seq2Seq, Seq2SeqConfig

ARCHITECTURES = ("T5ForConditionalGeneration", "BartForConditionalGeneration")
TOKENIZER_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)

_T5_FFN = {"relu": "relu", "gated-gelu": "gated-gelu", "gelu": "gelu", "gated-relu": "gated-relu"}
_BART_ACT = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def recognises(folder: Path, hf: dict | None) -> bool:
    """A transformers T5 or BART folder (by architecture, or by model_type when none is named)."""
    if hf is None:
        return False
    return any(a in ARCHITECTURES for a in hf.get("architectures") or []) or hf.get("model_type") in ("t5", "bart")


# ---- configs ---------------------------------------------------------------------------------

def config_from_hf(hf: dict, source: str = HF_CONFIG, tied: bool = True) -> Seq2SeqConfig:
    """Seq2SeqConfig of a T5 / BART config.json dict. `tied`: the weights have no separate lm_head."""
    model_type = hf.get("model_type")

    def need(*keys: str) -> list[int]:
        for key in keys:
            if not isinstance(hf.get(key), int):
                raise LMForgeError(f"{source} needs an integer '{key}' for {model_type}")
        return [hf[k] for k in keys]

    def opt_id(key: str, default: int) -> int:
        v = hf.get(key)
        return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else default)

    def forced(key: str) -> int | None:
        v = hf.get(key)
        return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)

    if model_type == "t5":
        vocab, d_model, d_kv, d_ff, n_layer, n_head = need("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in _T5_FFN:
            raise LMForgeError(f"{source}: feed_forward_proj '{proj}' is not supported (supported: {', '.join(_T5_FFN)})")
        pad = opt_id("pad_token_id", 0)
        return Seq2SeqConfig(
            arch="t5", vocab_size=vocab, block_size=int(hf.get("n_positions") or 512), n_encoder_layer=n_layer,
            n_decoder_layer=int(hf.get("num_decoder_layers") or n_layer), n_head=n_head, d_model=d_model, head_dim=d_kv,
            d_ff=d_ff, ffn=_T5_FFN[proj], relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), tie_embeddings=tied,
            # transformers scales the decoder output unless tie_word_embeddings is false (T5 v1.1);
            # transformers 5 also saves the flag itself as scale_decoder_outputs
            output_scale=bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)),
            pad_id=pad, eos_id=opt_id("eos_token_id", 1), decoder_start_id=opt_id("decoder_start_token_id", pad),
            dropout=0.0)
    if model_type == "bart":
        vocab, d_model, n_enc, n_dec, max_pos = need("vocab_size", "d_model", "encoder_layers", "decoder_layers",
                                                     "max_position_embeddings")
        heads = {hf.get("encoder_attention_heads"), hf.get("decoder_attention_heads")}
        ffn = {hf.get("encoder_ffn_dim"), hf.get("decoder_ffn_dim")}
        if len(heads) != 1 or len(ffn) != 1:
            raise LMForgeError(f"{source}: different encoder and decoder head counts or FFN widths are not supported")
        act = hf.get("activation_function", "gelu")
        if act not in _BART_ACT:
            raise LMForgeError(f"{source}: activation_function '{act}' is not supported (supported: {', '.join(_BART_ACT)})")
        for key in ("add_final_layer_norm", "normalize_before", "add_bias_logits", "normalize_embedding"):
            if hf.get(key, key == "normalize_embedding") is not (key == "normalize_embedding"):
                raise LMForgeError(f"{source}: {key}={hf.get(key)} is not supported (mBART / PLBart variants)")
        eos = opt_id("eos_token_id", 2)
        return Seq2SeqConfig(
            arch="bart", vocab_size=vocab, block_size=max_pos, n_encoder_layer=n_enc, n_decoder_layer=n_dec,
            n_head=heads.pop(), d_model=d_model, d_ff=ffn.pop(), ffn=_BART_ACT[act], norm_eps=1e-5,
            tie_embeddings=tied, scale_embedding=bool(hf.get("scale_embedding", False)),
            pad_id=opt_id("pad_token_id", 1), eos_id=eos, decoder_start_id=opt_id("decoder_start_token_id", eos),
            forced_bos_id=forced("forced_bos_token_id"), forced_eos_id=forced("forced_eos_token_id"),
            dropout=0.0, init_std=float(hf.get("init_std", 0.02)))
    raise LMForgeError(f"{source}: model_type '{model_type}' is not an encoder-decoder lmforge supports (t5, bart)")


def config_to_hf(cfg: Seq2SeqConfig, base: dict | None = None) -> dict:
    """config.json for transformers; `base` (the imported config) keeps keys lmforge does not model."""
    out = dict(base or {})
    common = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
                  decoder_start_token_id=cfg.decoder_start_id, is_encoder_decoder=True, torch_dtype="float32",
                  forced_bos_token_id=cfg.forced_bos_id, forced_eos_token_id=cfg.forced_eos_id)
    if cfg.arch == "t5":
        if cfg.output_scale and not cfg.tie_embeddings:
            raise LMForgeError("a T5 with an untied head and output scaling has no transformers equivalent")
        proj = {v: k for k, v in _T5_FFN.items()}.get(cfg.ffn)
        if proj is None:
            raise LMForgeError(f"T5 export supports ffn {', '.join(_T5_FFN.values())}, got '{cfg.ffn}'")
        out.update(common, architectures=["T5ForConditionalGeneration"], model_type="t5", d_kv=cfg.head_dim,
                   d_ff=cfg.d_ff, num_layers=cfg.n_encoder_layer, num_decoder_layers=cfg.n_decoder_layer,
                   num_heads=cfg.n_head, relative_attention_num_buckets=cfg.relative_buckets,
                   relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
                   feed_forward_proj=proj, dense_act_fn="gelu_new" if proj == "gated-gelu" else proj.split("-")[-1],
                   is_gated_act=proj.startswith("gated"), tie_word_embeddings=bool(cfg.output_scale),
                   scale_decoder_outputs=bool(cfg.output_scale), n_positions=cfg.block_size)
    else:
        act = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}.get(cfg.ffn)
        if act is None:
            raise LMForgeError(f"BART export supports ffn gelu, relu, gelu_tanh, got '{cfg.ffn}'")
        out.update(common, architectures=["BartForConditionalGeneration"], model_type="bart",
                   max_position_embeddings=cfg.block_size, encoder_layers=cfg.n_encoder_layer,
                   decoder_layers=cfg.n_decoder_layer, encoder_attention_heads=cfg.n_head,
                   decoder_attention_heads=cfg.n_head, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                   activation_function=act, scale_embedding=cfg.scale_embedding,
                   tie_word_embeddings=cfg.tie_embeddings, init_std=cfg.init_std)
        out.setdefault("bos_token_id", 0 if cfg.eos_id == 2 else None)
    return out


# ---- weights ---------------------------------------------------------------------------------

def _key_map(cfg: Seq2SeqConfig) -> dict[str, list[str]]:
    """lmforge key -> the HF keys stacked (dim 0, in order) to make it."""
    m: dict[str, list[str]] = {}
    if cfg.arch == "t5":
        m["tok_emb.weight"] = ["shared.weight"]
        m["enc_rel_bias.weight"] = ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        m["dec_rel_bias.weight"] = ["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        m["enc_norm_f.weight"] = ["encoder.final_layer_norm.weight"]
        m["dec_norm_f.weight"] = ["decoder.final_layer_norm.weight"]

        def ffn(prefix: str) -> dict[str, list[str]]:
            d = f"{prefix}.DenseReluDense"
            wi = [f"{d}.wi_0.weight", f"{d}.wi_1.weight"] if cfg.ffn.startswith("gated") else [f"{d}.wi.weight"]
            return {"fc_in.weight": wi, "fc_out.weight": [f"{d}.wo.weight"]}

        for i in range(cfg.n_encoder_layer):
            h, o = f"encoder.block.{i}.layer", f"encoder.{i}"
            sa = f"{h}.0.SelfAttention"
            m[f"{o}.attn.qkv.weight"] = [f"{sa}.q.weight", f"{sa}.k.weight", f"{sa}.v.weight"]
            m[f"{o}.attn.proj.weight"] = [f"{sa}.o.weight"]
            m[f"{o}.norm1.weight"] = [f"{h}.0.layer_norm.weight"]
            m.update({f"{o}.mlp.{k}": v for k, v in ffn(f"{h}.1").items()})
            m[f"{o}.norm2.weight"] = [f"{h}.1.layer_norm.weight"]
        for i in range(cfg.n_decoder_layer):
            h, o = f"decoder.block.{i}.layer", f"decoder.{i}"
            sa, ca = f"{h}.0.SelfAttention", f"{h}.1.EncDecAttention"
            m[f"{o}.self_attn.qkv.weight"] = [f"{sa}.q.weight", f"{sa}.k.weight", f"{sa}.v.weight"]
            m[f"{o}.self_attn.proj.weight"] = [f"{sa}.o.weight"]
            m[f"{o}.norm1.weight"] = [f"{h}.0.layer_norm.weight"]
            m[f"{o}.cross_attn.q.weight"] = [f"{ca}.q.weight"]
            m[f"{o}.cross_attn.kv.weight"] = [f"{ca}.k.weight", f"{ca}.v.weight"]
            m[f"{o}.cross_attn.proj.weight"] = [f"{ca}.o.weight"]
            m[f"{o}.norm2.weight"] = [f"{h}.1.layer_norm.weight"]
            m.update({f"{o}.mlp.{k}": v for k, v in ffn(f"{h}.2").items()})
            m[f"{o}.norm3.weight"] = [f"{h}.2.layer_norm.weight"]
        if not cfg.tie_embeddings:
            m["lm_head.weight"] = ["lm_head.weight"]
        return m

    m["tok_emb.weight"] = ["model.shared.weight"]
    m["final_logits_bias"] = ["final_logits_bias"]
    for side, short in (("encoder", "enc"), ("decoder", "dec")):
        m[f"{short}_pos.weight"] = [f"model.{side}.embed_positions.weight"]
        for p in ("weight", "bias"):
            m[f"{short}_emb_norm.{p}"] = [f"model.{side}.layernorm_embedding.{p}"]
    for side, n in (("encoder", cfg.n_encoder_layer), ("decoder", cfg.n_decoder_layer)):
        for i in range(n):
            h, o = f"model.{side}.layers.{i}", f"{side}.{i}"
            own = "attn" if side == "encoder" else "self_attn"
            norms = (["self_attn_layer_norm", "final_layer_norm"] if side == "encoder"
                     else ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"])
            for p in ("weight", "bias"):
                m[f"{o}.{own}.qkv.{p}"] = [f"{h}.self_attn.{x}_proj.{p}" for x in "qkv"]
                m[f"{o}.{own}.proj.{p}"] = [f"{h}.self_attn.out_proj.{p}"]
                m[f"{o}.mlp.fc_in.{p}"] = [f"{h}.fc1.{p}"]
                m[f"{o}.mlp.fc_out.{p}"] = [f"{h}.fc2.{p}"]
                for j, norm in enumerate(norms):
                    m[f"{o}.norm{j + 1}.{p}"] = [f"{h}.{norm}.{p}"]
                if side == "decoder":
                    m[f"{o}.cross_attn.q.{p}"] = [f"{h}.encoder_attn.q_proj.{p}"]
                    m[f"{o}.cross_attn.kv.{p}"] = [f"{h}.encoder_attn.{x}_proj.{p}" for x in "kv"]
                    m[f"{o}.cross_attn.proj.{p}"] = [f"{h}.encoder_attn.out_proj.{p}"]
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    return m


# Keys a transformers checkpoint may hold that are copies of the shared embedding (tied).
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "model.encoder.embed_tokens.weight",
                "model.decoder.embed_tokens.weight")


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: Seq2SeqConfig, source: str = "weights") -> dict[str, torch.Tensor]:
    """lmforge state dict from a transformers state dict (tied copies ignored; anything else unknown is an error)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, parts in _key_map(cfg).items():
        missing = [p for p in parts if p not in hf_state]
        if key == "final_logits_bias" and missing:
            out[key] = torch.zeros(cfg.vocab_size)  # transformers may leave the zero bias out
            continue
        if missing:
            raise LMForgeError(f"{source} is missing tensors: {', '.join(missing[:3])}")
        ts = [hf_state[p] for p in parts]
        out[key] = (ts[0] if len(ts) == 1 else torch.cat(ts, 0)).reshape(-1) if key == "final_logits_bias" \
            else (ts[0] if len(ts) == 1 else torch.cat(ts, 0))
        used.update(parts)
    ignorable = set(_TIED_COPIES) | {"lm_head.weight", "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"}
    extra = sorted(k for k in hf_state if k not in used and k not in ignorable)
    if extra:
        raise LMForgeError(f"{source} holds tensors lmforge does not model: {', '.join(extra[:3])}")
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def state_to_hf(state: dict[str, torch.Tensor], cfg: Seq2SeqConfig) -> dict[str, torch.Tensor]:
    """transformers state dict (without tied copies) from an lmforge state dict."""
    out: dict[str, torch.Tensor] = {}
    for key, parts in _key_map(cfg).items():
        t = state[key]
        if key == "final_logits_bias":
            out[parts[0]] = t.reshape(1, -1).contiguous()
            continue
        for name, piece in zip(parts, t.chunk(len(parts), 0) if len(parts) > 1 else [t]):
            out[name] = piece.contiguous()
    return out


def export_architecture(cfg: Seq2SeqConfig, origin: dict | None = None) -> str:
    """The transformers family `convert --to-hf` writes: t5 or bart."""
    return cfg.arch


def hf_tensor_parts(cfg: Seq2SeqConfig, arch: str) -> dict[str, tuple[list[tuple[str, int, int]], bool]]:
    """{lmforge tensor: ([(HF name, first row, end row)], transposed)} of the export (adapters map through it)."""
    with torch.device("meta"):
        model = Seq2Seq(cfg)
    rows = {k: (v.shape[0] if v.dim() else 1) for k, v in model.state_dict().items()}
    return stacked_parts(_key_map(cfg).items(), rows)


def _is_tied(hf_state: dict[str, torch.Tensor], shared_key: str) -> bool:
    head = hf_state.get("lm_head.weight")
    return head is None or torch.equal(head, hf_state[shared_key])


def load_hf(hf_dir: Path, hf: dict, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model in eval mode, config, Tokenizer or None) from a transformers T5 / BART folder."""
    source = WeightSource(hf_dir)
    state = {name: source.get(name) for name in source.names()}
    shared = "shared.weight" if hf.get("model_type") == "t5" else "model.shared.weight"
    if shared not in state:
        raise LMForgeError(f"{hf_dir}: the weights have no '{shared}'")
    cfg = config_from_hf(hf, str(hf_dir / HF_CONFIG), tied=_is_tied(state, shared))
    ours = state_from_hf(state, cfg, str(hf_dir))
    if dtype is not None:
        ours = {k: v.to(dtype) for k, v in ours.items()}
    with torch.device("meta"):
        model = Seq2Seq(cfg)
    model = model.to_empty(device=device)
    # assign=True keeps the given tensors themselves: on the CPU unless moved to the device first
    model.load_state_dict({k: v.to(device) for k, v in ours.items()}, strict=False, assign=True)
    model.retie()
    model.eval()
    return model, cfg, load_hf_tokenizer(hf_dir, hf)


def convert_from_hf(src: Path, hf: dict, out: Path, overwrite: bool = False) -> Path:
    """HF T5 / BART folder -> lmforge model directory (config, weights, tokenizer files, hf_config.json)."""
    check_out(out, overwrite, src)
    model, cfg, _ = load_hf(src, hf)
    with TempDir(out) as tmp:
        extra = {name: (src / name).read_bytes() for name in TOKENIZER_FILES if (src / name).is_file()}
        extra[HF_CONFIG_SIDECAR] = (src / HF_CONFIG).read_bytes()
        write_model_dir(tmp, model, tokenizer_path=src / TOKENIZER, extra_files=extra)
    return out


def convert_to_hf(model_dir: Path, cfg: Seq2SeqConfig, out: Path, overwrite: bool = False,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """lmforge seq2seq model directory -> transformers folder (config.json, model.safetensors, tokenizer files)."""
    check_out(out, overwrite, model_dir)
    state = load_tensors(model_dir / MODEL_WEIGHTS)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    base = read_json_file(model_dir / HF_CONFIG_SIDECAR) if (model_dir / HF_CONFIG_SIDECAR).is_file() else None
    hf_cfg = config_to_hf(cfg, base)
    with TempDir(out) as tmp:
        write_hf_weights(tmp, tensors_in_memory(state_to_hf(state, cfg)), max_shard_size)
        atomic_write_text(tmp / HF_CONFIG, json.dumps(hf_cfg, indent=2))
        for name in (TOKENIZER, *TOKENIZER_FILES):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
    return out


__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "state_from_hf", "state_to_hf", "recognises",
           "load_hf", "convert_from_hf", "convert_to_hf"]
