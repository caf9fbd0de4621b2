"""Using encoders and classifiers: loading, sentence embeddings, classification.

`LLM.load` hands a path here first (`load_encoder`); `LLM.embed` and `LLM.classify` call
`embed` / `classify`. Embeddings pool the final hidden states (mean over real tokens, or [CLS])
and L2-normalise, as sentence-transformers does; a sentence-transformers folder's own settings
(1_Pooling/config.json, 2_Normalize, max_seq_length) are the defaults for that model.
Classification also serves decoder classifiers (models/heads.py, read at the last real token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError

PAD_MULTIPLE = 16  # batches are padded to a multiple of this width: few shapes, kernels set up once each


def load_encoder(path: Path, device: str | torch.device = "cpu"):
    """(model, config, EncoderTokenizer or None) when `path` is an encoder (HF / sentence-transformers
    folder or lmforge encoder directory); None otherwise."""
    from lmforge.interop import encoder as enc

    if path.is_dir() and (enc.is_encoder_hf_dir(path) or (path / "modules.json").is_file()):
        return enc.load_hf_encoder_dir(path, device=device)
    if not enc.is_encoder_model_dir(path):
        return None
    from lmforge.checkpoint import load_model_dir, resolve_model_dir
    from lmforge.wordpiece import EncoderTokenizer

    model, cfg, tok = load_model_dir(path, device=device)
    directory = resolve_model_dir(path)
    pool = directory / enc.POOLING_FILE
    model.sentence_pooling = json.loads(pool.read_text(encoding="utf-8")) if pool.is_file() else None
    limit = cfg.block_size - cfg.position_offset
    return model, cfg, (EncoderTokenizer.from_file(tok, max_length=limit) if tok is not None else None)


def _texts(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise LMForgeError(f"{what} takes a string or a list of strings")
    return list(texts)


def _need_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not hasattr(tokenizer, "batch"):
        raise LMForgeError("this model has no encoder tokenizer (tokenizer.json), so it cannot read text")
    return tokenizer


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Any, texts: Any, pooling: Optional[str] = None,
          normalize: Optional[bool] = None, batch_size: int = 32, max_length: Optional[int] = None) -> torch.Tensor:
    """(N, C) sentence embeddings. pooling 'mean' (over real tokens) or 'cls'; normalize = unit L2 norm.
    None takes the model's sentence-transformers settings, else mean + normalize."""
    if getattr(model, "family", None) != "encoder":
        raise LMForgeError("embed needs an encoder model (BERT family or a sentence-transformers folder)")
    texts = _texts(texts, "embed")
    st = getattr(model, "sentence_pooling", None) or {}
    pooling = pooling or st.get("pooling", "mean")
    normalize = st.get("normalize", True) if normalize is None else normalize
    if pooling not in ("mean", "cls"):
        raise LMForgeError(f"pooling must be 'mean' or 'cls', got '{pooling}'")
    tok = _need_tokenizer(tokenizer)
    max_length = max_length or st.get("max_seq_length")
    device = model.tok_emb.weight.device
    out = []
    for i in range(0, len(texts), batch_size):
        b = tok.batch(texts[i:i + batch_size], max_length=max_length, pad_to_multiple_of=PAD_MULTIPLE)
        mask = b["attention_mask"].to(device)
        h_BTC = model.encode(b["input_ids"].to(device), mask, b["token_type_ids"].to(device))
        if pooling == "cls":
            e_BC = h_BTC[:, 0]
        else:
            m = mask[..., None].to(h_BTC.dtype)
            e_BC = (h_BTC * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out.append(F.normalize(e_BC, p=2, dim=-1) if normalize else e_BC)
    if not out:
        return torch.zeros(0, model.cfg.n_embd)
    return torch.cat(out).float().cpu()


def label_names(model: torch.nn.Module) -> list[str]:
    cfg = model.cfg
    if hasattr(cfg, "label_names"):
        return cfg.label_names()
    id2label = getattr(cfg, "id2label", None) or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(cfg.num_labels)]


@torch.no_grad()
def class_logits(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
                 batch_size: int = 32, max_length: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """((N, num_labels) logits, number of texts truncated to the context)."""
    family = getattr(model, "family", None)
    device = model.tok_emb.weight.device
    outs, cut = [], 0
    if family == "encoder":
        if model.cfg.head != "sequence":
            raise LMForgeError(f"this encoder has no sequence-classification head (model.head is '{model.cfg.head}')")
        tok = _need_tokenizer(tokenizer)
        for i in range(0, len(texts), batch_size):
            b = tok.batch(texts[i:i + batch_size], None if pairs is None else pairs[i:i + batch_size], max_length,
                          pad_to_multiple_of=PAD_MULTIPLE)
            cut += b["truncated"]
            outs.append(model(b["input_ids"].to(device), b["attention_mask"].to(device), b["token_type_ids"].to(device)))
    elif family == "decoder_classifier":
        from lmforge.data.labeled import decoder_rows

        limit = max_length or model.cfg.block_size
        for i in range(0, len(texts), batch_size):
            idx, mask, n = decoder_rows(tokenizer, texts[i:i + batch_size],
                                        None if pairs is None else pairs[i:i + batch_size], limit)
            cut += n
            outs.append(model(idx.to(device), pad_mask_BT=mask.to(device)))
    else:
        raise LMForgeError("classify needs a classifier: an encoder with a sequence head or a decoder classifier "
                           "(`lmforge finetune classify`, or a Hugging Face …ForSequenceClassification folder)")
    if not outs:
        return torch.zeros(0, model.cfg.num_labels), 0
    return torch.cat(outs).float().cpu(), cut


def classify(model: torch.nn.Module, tokenizer: Any, texts: Any, text_pairs: Any = None,
             batch_size: int = 32) -> list[dict[str, Any]]:
    """One {"label", "score", "probs"} per text (regression: score = the predicted value, probs empty)."""
    texts = _texts(texts, "classify")
    pairs = None if text_pairs is None else _texts(text_pairs, "classify (text_pairs)")
    if pairs is not None and len(pairs) != len(texts):
        raise LMForgeError(f"{len(texts)} texts but {len(pairs)} text pairs")
    logits, _ = class_logits(model, tokenizer, texts, pairs, batch_size)
    names = label_names(model)
    if logits.shape[-1] == 1:
        return [{"label": names[0], "score": float(v), "probs": {}} for v in logits[:, 0]]
    probs = logits.softmax(-1)
    out = []
    for row in probs:
        k = int(row.argmax())
        out.append({"label": names[k], "score": float(row[k]), "probs": {n: float(p) for n, p in zip(names, row)}})
    return out
