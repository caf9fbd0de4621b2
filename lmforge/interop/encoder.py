"""Hugging Face interop of the encoder family: BERT, RoBERTa, DistilBERT, ModernBERT and Longformer in and out
(the interop protocol: lmforge/interop/__init__.py).

    load_hf(dir)                    HF folder -> (Encoder, EncoderConfig, Tokenizer or None)
    convert_from_hf(dir, out)       HF folder -> lmforge model directory
    convert_to_hf(model_dir, out)   lmforge encoder -> HF folder that transformers loads

One table per family maps lmforge tensor names to Hugging Face names; separate q/k/v projections
are stacked into lmforge's fused `attn.qkv` ([q; k; v] rows); Longformer's global projections into
`attn.q_global` (query_global) and `attn.kv_global` ([key_global; value_global]). Longformer is
RoBERTa's body with LongformerSelfAttention, so it shares RoBERTa's table. Which head an architecture has
(`…Model`, `…ForMaskedLM`, `…ForSequenceClassification`, `…ForTokenClassification`) sets
`EncoderConfig.head`. A sentence-transformers folder (modules.json) loads as its transformer with
its pooling and normalisation kept in `sentence_pooling.json` (models/encoder.SENTENCE_POOLING_FILE),
which `LLM.embed` follows.
Encoders are small (BERT-large is 1.3 GB in fp32), so tensors are converted in memory.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.checkpoint import MODEL_WEIGHTS, TOKENIZER, atomic_write_text, load_tensors, read_json, save_tensors
from lmforge.errors import LMForgeError
from lmforge.interop.files import (DEFAULT_MAX_SHARD_SIZE, HF_CONFIG, HF_CONFIG_SIDECAR, SENTENCE_TRANSFORMERS_MODULES,
                                   SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TempDir, WeightSource, check_out,
                                   load_hf_tokenizer, read_hf_config, read_json_file, tensors_in_memory,
                                   stacked_parts, state_from_plan, write_hf_weights,
                                   write_model_config)
from lmforge.models.encoder import SENTENCE_POOLING_FILE, EncoderConfig
from lmforge.models.registry import build_model, get_family

KINDS = ("bert", "roberta", "distilbert", "modernbert", "longformer")
_CLASS = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "modernbert": "ModernBert",
          "longformer": "Longformer"}
_ROBERTA_BODY = ("roberta", "longformer")  # learned positions counted from pad_id + 1, post-LN, RoBERTa heads
_SUFFIX = {"Model": "none", "ForMaskedLM": "mlm", "ForSequenceClassification": "sequence",
           "ForTokenClassification": "token"}
ENCODER_ARCHITECTURES = {f"{c}{s}": (k, h) for k, c in _CLASS.items() for s, h in _SUFFIX.items()}
ENCODER_ARCHITECTURES["BertForPreTraining"] = ("bert", "mlm")  # the NSP head is dropped
ARCHITECTURES = tuple(ENCODER_ARCHITECTURES)
_PREFIX = {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.", "modernbert": "model.",
           "longformer": "longformer."}
_TOKENIZER_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, "vocab.txt", "vocab.json", "merges.txt")


def encoder_architecture(hf: dict) -> Optional[str]:
    """The first encoder architecture a config.json names, or None (then it is not an encoder)."""
    for arch in hf.get("architectures") or []:
        if arch in ENCODER_ARCHITECTURES:
            return arch
    return None


def recognises(folder: Path, hf: dict | None) -> bool:
    """A transformers encoder folder, or a sentence-transformers folder (modules.json)."""
    return (folder / SENTENCE_TRANSFORMERS_MODULES).is_file() or (hf is not None and encoder_architecture(hf) is not None)


# ---- config.json <-> EncoderConfig ------------------------------------------------------------

def _need(hf: dict, key: str, source: str) -> Any:
    if key not in hf:
        raise LMForgeError(f"{source} lacks '{key}'")
    return hf[key]


def _labels(hf: dict, head: str) -> tuple[int, Optional[list[str]]]:
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]
        return len(names), names
    return int(hf.get("num_labels", 2)), None


def config_from_hf(hf: dict, source: str = "config.json", arch: Optional[str] = None) -> tuple[EncoderConfig, str]:
    """(EncoderConfig, architecture) of a transformers config.json dict."""
    arch = arch or encoder_architecture(hf)
    if arch is None:
        raise LMForgeError(f"{source}: architecture {hf.get('architectures')} is not an encoder lmforge reads; "
                           f"supported: {', '.join(ENCODER_ARCHITECTURES)}")
    kind, head = ENCODER_ARCHITECTURES[arch]
    num_labels, labels = _labels(hf, head) if head in ("sequence", "token") else (2, None)
    common: dict[str, Any] = dict(vocab_size=_need(hf, "vocab_size", source), head=head, num_labels=num_labels,
                                  labels=labels, pad_id=int(hf.get("pad_token_id") or 0))
    if kind in ("bert",) + _ROBERTA_BODY:
        if hf.get("hidden_act", "gelu") != "gelu":
            raise LMForgeError(f"{source}: hidden_act '{hf.get('hidden_act')}' is not supported (only gelu)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise LMForgeError(f"{source}: position_embedding_type '{hf['position_embedding_type']}' is not supported")
        cfg = dict(common, block_size=_need(hf, "max_position_embeddings", source),
                   n_layer=_need(hf, "num_hidden_layers", source), n_head=_need(hf, "num_attention_heads", source),
                   n_embd=_need(hf, "hidden_size", source), mlp_hidden=_need(hf, "intermediate_size", source),
                   type_vocab_size=int(hf.get("type_vocab_size", 2)), pos_encoding="learned", mlp="gelu",
                   prenorm=False, bias=True, norm_bias=True, norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                   dropout=float(hf.get("hidden_dropout_prob", 0.1)), pooler=arch.endswith("Model"),
                   classifier_pooling="cls", classifier_act="tanh", classifier_norm=False,
                   classifier_dense=kind in _ROBERTA_BODY and head == "sequence")
        if kind in _ROBERTA_BODY:
            cfg["position_offset"] = cfg["pad_id"] + 1
        if kind == "longformer":
            cfg.update(attention="longformer", attention_window=_need(hf, "attention_window", source))
        if kind == "bert" and head == "sequence":
            cfg["pooler"] = True  # BertForSequenceClassification classifies the pooler output
    elif kind == "distilbert":
        if hf.get("sinusoidal_pos_embds"):
            raise LMForgeError(f"{source}: sinusoidal_pos_embds is not supported")
        if hf.get("activation", "gelu") != "gelu":
            raise LMForgeError(f"{source}: activation '{hf.get('activation')}' is not supported (only gelu)")
        cfg = dict(common, block_size=_need(hf, "max_position_embeddings", source), n_layer=_need(hf, "n_layers", source),
                   n_head=_need(hf, "n_heads", source), n_embd=_need(hf, "dim", source),
                   mlp_hidden=_need(hf, "hidden_dim", source), type_vocab_size=0, pos_encoding="learned", mlp="gelu",
                   prenorm=False, bias=True, norm_bias=True, norm_eps=1e-12, dropout=float(hf.get("dropout", 0.1)),
                   pooler=False, classifier_pooling="cls", classifier_act="relu", classifier_norm=False,
                   classifier_dense=head == "sequence")
    else:  # modernbert
        for key, want in (("hidden_activation", "gelu"), ("classifier_activation", "gelu")):
            if hf.get(key, want) != want:
                raise LMForgeError(f"{source}: {key} '{hf.get(key)}' is not supported (only {want})")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise LMForgeError(f"{source}: attention_bias and mlp_bias must match")
        if hf.get("tie_word_embeddings", True) is False and head == "mlm":
            raise LMForgeError(f"{source}: an untied MLM decoder is not supported")
        n_layer = _need(hf, "num_hidden_layers", source)
        types = hf.get("layer_types")
        every = int(hf.get("global_attn_every_n_layers", 3))
        if isinstance(types, list):
            glob = [i for i, t in enumerate(types) if t == "full_attention"]
            every = glob[1] if len(glob) > 1 else n_layer
            if [t == "full_attention" for t in types] != [i % every == 0 for i in range(n_layer)]:
                raise LMForgeError(f"{source}: layer_types {types} is not an every-n-th-layer-global pattern")
        rope = hf.get("rope_parameters") or {}
        g_theta = (rope.get("full_attention") or {}).get("rope_theta", hf.get("global_rope_theta", 160000.0))
        l_theta = (rope.get("sliding_attention") or {}).get("rope_theta", hf.get("local_rope_theta", 10000.0))
        for part in rope.values():
            if isinstance(part, dict) and part.get("rope_type", "default") != "default":
                raise LMForgeError(f"{source}: rope_type '{part['rope_type']}' is not supported")
        cfg = dict(common, block_size=_need(hf, "max_position_embeddings", source), n_layer=n_layer,
                   n_head=_need(hf, "num_attention_heads", source), n_embd=_need(hf, "hidden_size", source),
                   mlp_hidden=_need(hf, "intermediate_size", source), pos_encoding="rope", mlp="geglu", prenorm=True,
                   bias=bool(hf.get("attention_bias", False)), norm_bias=bool(hf.get("norm_bias", False)),
                   norm_eps=float(hf.get("norm_eps", 1e-5)), rope_theta=float(g_theta), local_rope_theta=float(l_theta),
                   local_window=int(hf.get("local_attention", 128)) if every > 1 else None, global_every=every,
                   head_bias=bool(hf.get("classifier_bias", False)), mlm_bias=bool(hf.get("decoder_bias", True)),
                   dropout=float(hf.get("mlp_dropout", 0.0)), pooler=False,
                   classifier_pooling=hf.get("classifier_pooling", "cls"), classifier_act="gelu",
                   classifier_norm=True, classifier_dense=True)
    return EncoderConfig(**cfg), arch


def hf_kind(cfg: EncoderConfig) -> str:
    """Which transformers family an lmforge encoder config is (or a one-line error)."""
    if cfg.attention == "longformer":
        if cfg.pos_encoding == "learned" and not cfg.prenorm and cfg.mlp == "gelu" and cfg.bias and cfg.norm_bias \
                and cfg.position_offset:
            return "longformer"
        raise LMForgeError("this longformer encoder has no Hugging Face equivalent: LongformerModel is RoBERTa-shaped "
                           "(pos_encoding learned, position_offset, post-LN, gelu, biases)")
    if cfg.pos_encoding == "rope":
        if cfg.prenorm and cfg.mlp == "geglu" and cfg.classifier_norm and cfg.classifier_act == "gelu" and not cfg.pooler:
            return "modernbert"
    elif not cfg.prenorm and cfg.mlp == "gelu" and cfg.bias and cfg.norm_bias:
        if cfg.position_offset:
            return "roberta"
        if cfg.type_vocab_size == 0 and not cfg.pooler:
            return "distilbert"
        if cfg.type_vocab_size > 0:
            return "bert"
    raise LMForgeError("this encoder (pos_encoding={}, prenorm={}, mlp={}) has no Hugging Face equivalent; BERT, "
                       "RoBERTa, DistilBERT, ModernBERT and Longformer shapes export".format(cfg.pos_encoding, cfg.prenorm, cfg.mlp))


def config_to_hf(cfg: EncoderConfig, kind: Optional[str] = None, dtype: torch.dtype = torch.float32) -> dict:
    kind = kind or hf_kind(cfg)
    head_suffix = {v: k for k, v in _SUFFIX.items()}[cfg.head]
    hf: dict[str, Any] = {"architectures": [_CLASS[kind] + head_suffix], "model_type": kind,
                          "vocab_size": cfg.vocab_size, "pad_token_id": cfg.pad_id,
                          "max_position_embeddings": cfg.block_size, "dtype": str(dtype).removeprefix("torch.")}
    if cfg.head in ("sequence", "token"):
        names = cfg.label_names()
        hf["id2label"] = {str(i): n for i, n in enumerate(names)}
        hf["label2id"] = {n: i for i, n in enumerate(names)}
        if cfg.head == "sequence":
            hf["problem_type"] = "regression" if cfg.num_labels == 1 else "single_label_classification"
    if kind in ("bert",) + _ROBERTA_BODY:
        hf.update(num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, hidden_size=cfg.n_embd,
                  intermediate_size=cfg.mlp_hidden, type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
                  hidden_act="gelu", hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                  position_embedding_type="absolute")
        if kind in _ROBERTA_BODY:
            hf.update(bos_token_id=0, eos_token_id=2)
        if kind == "longformer":
            hf.update(attention_window=list(cfg.attention_window), sep_token_id=2)
    elif kind == "distilbert":
        hf.update(n_layers=cfg.n_layer, n_heads=cfg.n_head, dim=cfg.n_embd, hidden_dim=cfg.mlp_hidden, activation="gelu",
                  dropout=cfg.dropout, attention_dropout=cfg.dropout, sinusoidal_pos_embds=False,
                  tie_weights_=True)
    else:
        every = cfg.global_every if cfg.local_window is not None else 1
        hf.update(num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, hidden_size=cfg.n_embd,
                  intermediate_size=cfg.mlp_hidden, hidden_activation="gelu", classifier_activation="gelu",
                  norm_eps=cfg.norm_eps, norm_bias=cfg.norm_bias, attention_bias=cfg.bias, mlp_bias=cfg.bias,
                  classifier_bias=cfg.head_bias, decoder_bias=cfg.mlm_bias, classifier_pooling=cfg.classifier_pooling,
                  local_attention=cfg.local_window or 128, global_attn_every_n_layers=every,
                  layer_types=["full_attention" if i % every == 0 else "sliding_attention" for i in range(cfg.n_layer)],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
                  global_rope_theta=cfg.rope_theta, local_rope_theta=cfg.local_rope_theta,
                  embedding_dropout=0.0, mlp_dropout=cfg.dropout, attention_dropout=cfg.dropout,
                  tie_word_embeddings=True)
    return hf


# ---- tensor name maps (lmforge name -> HF names; several HF names are stacked along dim 0) -------

def _lin(lm: str, hf: str, bias: bool = True) -> list[tuple[str, list[str]]]:
    return [(f"{lm}.weight", [f"{hf}.weight"])] + ([(f"{lm}.bias", [f"{hf}.bias"])] if bias else [])


def _qkv(lm: str, q: str, k: str, v: str, bias: bool) -> list[tuple[str, list[str]]]:
    out = [(f"{lm}.weight", [f"{q}.weight", f"{k}.weight", f"{v}.weight"])]
    return out + ([(f"{lm}.bias", [f"{q}.bias", f"{k}.bias", f"{v}.bias"])] if bias else [])


def tensor_map(cfg: EncoderConfig, kind: str) -> list[tuple[str, list[str]]]:
    """(lmforge name, [HF names]) for every tensor; HF body names carry the family prefix."""
    p = _PREFIX[kind]
    nb = cfg.norm_bias
    m: list[tuple[str, list[str]]] = []
    if kind in ("bert",) + _ROBERTA_BODY:
        m += [("tok_emb.weight", [p + "embeddings.word_embeddings.weight"]),
              ("pos_emb.weight", [p + "embeddings.position_embeddings.weight"])]
        if cfg.type_vocab_size:
            m += [("type_emb.weight", [p + "embeddings.token_type_embeddings.weight"])]
        m += _lin("emb_norm", p + "embeddings.LayerNorm")
        for i in range(cfg.n_layer):
            h = f"{p}encoder.layer.{i}."
            b = f"blocks.{i}."
            m += _qkv(b + "attn.qkv", h + "attention.self.query", h + "attention.self.key", h + "attention.self.value", True)
            if kind == "longformer":
                sa = h + "attention.self."
                m += _lin(b + "attn.q_global", sa + "query_global")
                m += [(f"{b}attn.kv_global.{t}", [f"{sa}key_global.{t}", f"{sa}value_global.{t}"]) for t in ("weight", "bias")]
            m += _lin(b + "attn.proj", h + "attention.output.dense") + _lin(b + "norm1", h + "attention.output.LayerNorm")
            m += _lin(b + "mlp.fc_in", h + "intermediate.dense") + _lin(b + "mlp.fc_out", h + "output.dense")
            m += _lin(b + "norm2", h + "output.LayerNorm")
        if cfg.pooler:
            m += _lin("pooler.dense", p + "pooler.dense")
        if kind == "bert":
            mlm = [("mlm_transform.dense", "cls.predictions.transform.dense"),
                   ("mlm_transform.norm", "cls.predictions.transform.LayerNorm")]
            mlm_bias, cls_dense, classifier = "cls.predictions.bias", None, "classifier"
        else:
            mlm = [("mlm_transform.dense", "lm_head.dense"), ("mlm_transform.norm", "lm_head.layer_norm")]
            mlm_bias = "lm_head.bias"
            cls_dense, classifier = ("classifier.dense", "classifier.out_proj") if cfg.head == "sequence" else (None, "classifier")
    elif kind == "distilbert":
        m += [("tok_emb.weight", [p + "embeddings.word_embeddings.weight"]),
              ("pos_emb.weight", [p + "embeddings.position_embeddings.weight"])]
        m += _lin("emb_norm", p + "embeddings.LayerNorm")
        for i in range(cfg.n_layer):
            h = f"{p}transformer.layer.{i}."
            b = f"blocks.{i}."
            m += _qkv(b + "attn.qkv", h + "attention.q_lin", h + "attention.k_lin", h + "attention.v_lin", True)
            m += _lin(b + "attn.proj", h + "attention.out_lin") + _lin(b + "norm1", h + "sa_layer_norm")
            m += _lin(b + "mlp.fc_in", h + "ffn.lin1") + _lin(b + "mlp.fc_out", h + "ffn.lin2")
            m += _lin(b + "norm2", h + "output_layer_norm")
        mlm = [("mlm_transform.dense", "vocab_transform"), ("mlm_transform.norm", "vocab_layer_norm")]
        mlm_bias, cls_dense, classifier = "vocab_projector.bias", "pre_classifier", "classifier"
    else:
        m += [("tok_emb.weight", [p + "embeddings.tok_embeddings.weight"])] + _lin("emb_norm", p + "embeddings.norm", nb)
        for i in range(cfg.n_layer):
            h = f"{p}layers.{i}."
            b = f"blocks.{i}."
            if i > 0:
                m += _lin(b + "norm1", h + "attn_norm", nb)
            m += _lin(b + "attn.qkv", h + "attn.Wqkv", cfg.bias) + _lin(b + "attn.proj", h + "attn.Wo", cfg.bias)
            m += _lin(b + "norm2", h + "mlp_norm", nb)
            m += _lin(b + "mlp.fc_in", h + "mlp.Wi", cfg.bias) + _lin(b + "mlp.fc_out", h + "mlp.Wo", cfg.bias)
        m += _lin("norm_f", p + "final_norm", nb)
        mlm = [("mlm_transform.dense", "head.dense"), ("mlm_transform.norm", "head.norm")]
        mlm_bias, cls_dense, classifier = "decoder.bias", "head.dense", "classifier"
    if cfg.head == "mlm":
        m += _lin(*mlm[0], bias=cfg.head_bias) + _lin(*mlm[1], bias=nb)
        if cfg.mlm_bias:
            m += [("mlm_bias", [mlm_bias])]
    elif cfg.head in ("sequence", "token"):
        if cfg._has_classifier_transform(cfg.head):
            m += _lin("cls_transform.dense", cls_dense, bias=cfg.head_bias)
            if cfg.classifier_norm:
                m += _lin("cls_transform.norm", "head.norm", nb)
        m += _lin("classifier", classifier)
    return m


def export_architecture(cfg: EncoderConfig, origin: dict | None = None) -> str:
    """The transformers family `convert --to-hf` writes (bert, roberta, distilbert, modernbert, longformer)."""
    return hf_kind(cfg)


def hf_tensor_parts(cfg: EncoderConfig, kind: str) -> dict[str, tuple[list[tuple[str, int, int]], bool]]:
    """{lmforge tensor: ([(HF name, first row, end row)], transposed)} of the export (adapters map through it)."""
    with torch.device("meta"):
        model = build_model(get_family("encoder"), cfg, device="meta")
    rows = {k: (v.shape[0] if v.dim() else 1) for k, v in model.state_dict().items()}
    parts = stacked_parts(tensor_map(cfg, kind), rows)
    if cfg.head == "none":  # a bare …Model is saved without the family prefix, as save_pretrained does
        p = _PREFIX[kind]
        parts = {lm: ([(h[len(p):] if h.startswith(p) else h, a, b) for h, a, b in ps], t) for lm, (ps, t) in parts.items()}
    return parts


# Tensors a Hugging Face file may hold that the architecture does not use (buffers saved by old
# versions, tied decoders, BertForPreTraining's NSP head, a pooler under …ForMaskedLM).
_IGNORABLE = re.compile(r"(position_ids|token_type_ids|rotary_emb\..*|cls\.seq_relationship\..*|"
                        r"cls\.predictions\.decoder\.(weight|bias)|lm_head\.decoder\.(weight|bias)|"
                        r"vocab_projector\.weight|decoder\.weight|(bert|roberta|longformer)\.pooler\.dense\.(weight|bias))$")


def state_from_hf(names: list[str], get, cfg: EncoderConfig, kind: str, where: str) -> dict[str, torch.Tensor]:
    """lmforge state dict from HF tensors (`get(name)`); body names may lack the family prefix
    (files saved from a bare `BertModel`)."""
    have = set(names)
    p = _PREFIX[kind]
    bare = not any(n.startswith(p) for n in have)

    def full(n: str) -> str:
        return n[len(p):] if bare and n.startswith(p) else n

    return state_from_plan(tensor_map(cfg, kind), have, get, where, _IGNORABLE, name=full)


def state_to_hf(state: dict[str, torch.Tensor], cfg: EncoderConfig, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for lm, hs in tensor_map(cfg, kind):
        if lm.startswith("pooler.") and cfg.head in ("mlm", "token"):
            continue  # transformers' …ForMaskedLM / …ForTokenClassification have no pooler
        t = state[lm]
        for h, piece in zip(hs, t.chunk(len(hs), 0)):
            out[h] = piece.contiguous()
    if cfg.head == "none":  # a bare …Model is saved without the family prefix, as save_pretrained does
        p = _PREFIX[kind]
        out = {k[len(p):] if k.startswith(p) else k: v for k, v in out.items()}
    return out


# ---- sentence-transformers folders ------------------------------------------------------------

def sentence_transformers_layout(folder: Path) -> Optional[tuple[Path, dict]]:
    """(transformer folder, {"pooling": ..., "normalize": ...}) of a sentence-transformers folder, or None."""
    mod_file = folder / SENTENCE_TRANSFORMERS_MODULES
    if not mod_file.is_file():
        return None
    modules = read_json_file(mod_file)
    if not isinstance(modules, list):
        raise LMForgeError(f"{mod_file} must hold a list of modules")
    body, pooling = None, {"pooling": "mean", "normalize": False}
    for mod in modules:
        mtype, sub = str(mod.get("type", "")), folder / str(mod.get("path", ""))
        kind = mtype.rsplit(".", 1)[-1]  # sentence_transformers.models.X (v2-v5) or ...modules.X (v6)
        if kind == "Transformer":
            body = sub
        elif kind == "Pooling":
            pc = read_json_file(sub / "config.json")
            mode = pc.get("pooling_mode")  # sentence-transformers 6: "cls" | "mean" | [...]
            if mode is None:  # earlier versions: one boolean per mode
                legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                          "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                          "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
                mode = [v for k, v in legacy.items() if pc.get(k)]
            mode = mode[0] if isinstance(mode, list) and len(mode) == 1 else mode
            if mode not in ("cls", "mean"):
                raise LMForgeError(f"{sub / 'config.json'}: pooling {mode} is not supported (only cls or mean)")
            pooling["pooling"] = mode
        elif kind == "Normalize":
            pooling["normalize"] = True
        else:
            raise LMForgeError(f"{mod_file}: module {mtype} is not supported (Transformer, Pooling, Normalize)")
    if body is None:
        raise LMForgeError(f"{mod_file} names no sentence_transformers.models.Transformer module")
    # where sentence-transformers truncates: sentence_bert_config.json (v2-v5), else the tokenizer's model_max_length (v6)
    for cfg_file, key in ((body / "sentence_bert_config.json", "max_seq_length"),
                          (body / "tokenizer_config.json", "model_max_length")):
        msl = read_json_file(cfg_file).get(key) if cfg_file.is_file() else None
        if isinstance(msl, int) and 0 < msl < 10**6:
            pooling["max_seq_length"] = msl
            break
    return body, pooling


# ---- load / convert ---------------------------------------------------------------------------

def _read(hf_dir: Path):
    st = sentence_transformers_layout(hf_dir) if hf_dir.is_dir() else None
    body, pooling = (st if st is not None else (hf_dir, None))
    hf = read_hf_config(body)
    cfg, arch = config_from_hf(hf, str(body / HF_CONFIG))
    kind = ENCODER_ARCHITECTURES[arch][0]
    src = WeightSource(body)
    if kind in ("bert",) + _ROBERTA_BODY and cfg.head != "sequence":  # a pooler is optional: keep it when saved
        pooled = any(n.endswith("pooler.dense.weight") for n in src.names())
        if pooled != cfg.pooler:
            cfg = dataclasses.replace(cfg, pooler=pooled)
    state = state_from_hf(src.names(), src.get, cfg, kind, str(body))
    return body, hf, cfg, state, pooling


def load_hf(hf_dir: Path, hf_cfg: dict | None, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """(Encoder in eval mode, EncoderConfig, Tokenizer or None) from a HF or sentence-transformers folder.
    The model's `sentence_pooling` attribute holds the folder's pooling settings (or None)."""
    body, hf, cfg, state, pooling = _read(hf_dir)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    family = get_family("encoder")
    model = build_model(family, cfg, device, state, body).eval()
    model.sentence_pooling = pooling
    return model, cfg, load_hf_tokenizer(body, hf, encoder=True, max_length=family.max_tokens(cfg))


def convert_from_hf(src: Path, hf_cfg: dict | None, out_p: Path, overwrite: bool = False) -> Path:
    """HF (or sentence-transformers) encoder folder -> lmforge model directory."""
    body, hf, cfg, state, pooling = _read(src)
    check_out(out_p, overwrite, src)
    with TempDir(out_p) as tmp:
        save_tensors(tmp / MODEL_WEIGHTS, state, metadata={"format": "pt", "lmforge": "encoder"})
        write_model_config(tmp, "encoder", cfg)
        atomic_write_text(tmp / HF_CONFIG_SIDECAR, json.dumps(hf, indent=2))
        if pooling is not None:
            atomic_write_text(tmp / SENTENCE_POOLING_FILE, json.dumps(pooling, indent=2))
        for name in (TOKENIZER,) + _TOKENIZER_FILES:
            if (body / name).is_file():
                shutil.copyfile(body / name, tmp / name)
    return out_p


def convert_to_hf(model_dir: Path, cfg: EncoderConfig, out_p: Path, overwrite: bool = False,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """lmforge encoder model directory -> HF folder (config.json, model.safetensors, tokenizer files)."""
    from lmforge.models.registry import load_tokenizer

    kind = hf_kind(cfg)
    check_out(out_p, overwrite, model_dir)
    state = load_tensors(model_dir / MODEL_WEIGHTS)
    hf_state = state_to_hf(state, cfg, kind)
    dtype = state["tok_emb.weight"].dtype
    hf = config_to_hf(cfg, kind, dtype)
    origin = model_dir / HF_CONFIG_SIDECAR
    if origin.is_file():  # keep what the source said about tokens (bos/eos/...) where it does not conflict
        old = read_json(origin)
        if isinstance(old, dict) and old.get("model_type") == kind:
            hf = {**{k: v for k, v in old.items() if k not in ("id2label", "label2id", "num_labels")}, **hf}
    with TempDir(out_p) as tmp:
        write_hf_weights(tmp, tensors_in_memory(hf_state), max_shard_size)
        atomic_write_text(tmp / HF_CONFIG, json.dumps(hf, indent=2))
        for name in (TOKENIZER,) + _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        if (model_dir / TOKENIZER).is_file() and not (model_dir / TOKENIZER_CONFIG).is_file():
            tok = load_tokenizer(get_family("encoder"), cfg, model_dir / TOKENIZER)
            atomic_write_text(tmp / TOKENIZER_CONFIG, json.dumps(tok.tokenizer_config(cfg.block_size), indent=2))
        if (model_dir / SENTENCE_POOLING_FILE).is_file():
            shutil.copyfile(model_dir / SENTENCE_POOLING_FILE, tmp / SENTENCE_POOLING_FILE)
    return out_p
