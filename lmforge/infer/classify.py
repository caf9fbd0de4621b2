"""Classification: `LLM.classify` of encoder classifiers and decoder classifiers (models/heads.py).

An encoder's tokenizer frames each text (`[CLS] a [SEP] b [SEP]` with token types); a decoder
classifier reads `text [\n pair] EOS` and scores the last real token (data/labeled.decoder_rows).
A longformer encoder reads [CLS] globally, or with global_attention="question" the first text of
each pair (models/encoder.global_attention_mask).
Which of the two a model takes is its family's `encoder_tokenizer` (models/registry.py).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import torch

from lmforge.data.labeled import decoder_rows
from lmforge.errors import LMForgeError
from lmforge.infer.embed import PAD_MULTIPLE, need_tokenizer, texts_arg
from lmforge.models.encoder import global_attention_mask
from lmforge.models.registry import CLASSIFY, family_of


def label_names(model: torch.nn.Module) -> list[str]:
    cfg = model.cfg
    if hasattr(cfg, "label_names"):
        return cfg.label_names()
    id2label = getattr(cfg, "id2label", None) or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(cfg.num_labels)]


@torch.no_grad()
def class_logits(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
                 batch_size: int = 32, max_length: Optional[int] = None, progress: bool = False,
                 global_attention: Optional[str] = None) -> tuple[torch.Tensor, int]:
    """((N, num_labels) logits, number of texts truncated to the context); `progress` shows a bar of the
    batches on stderr; `global_attention` ("cls" | "question"): a longformer's global tokens."""
    from tqdm import tqdm

    family = family_of(model)
    if CLASSIFY not in family.can:
        raise LMForgeError("classify needs a classifier: an encoder with a sequence head or a decoder classifier "
                           "(`lmforge finetune classify`, or a Hugging Face …ForSequenceClassification folder)")
    if getattr(model.cfg, "head", "sequence") != "sequence":
        raise LMForgeError(f"this encoder has no sequence-classification head (model.head is '{model.cfg.head}')")
    if global_attention is not None and getattr(model.cfg, "attention", None) != "longformer":
        raise LMForgeError("global_attention is for longformer encoders (model.attention longformer)")
    device = model.tok_emb.weight.device
    outs, cut = [], 0
    limit = max_length or model.cfg.block_size
    for i in tqdm(range(0, len(texts), batch_size), desc="eval", unit="batch", file=sys.stderr, dynamic_ncols=True,
                  disable=not progress):
        chunk, chunk_pairs = texts[i:i + batch_size], None if pairs is None else pairs[i:i + batch_size]
        if family.encoder_tokenizer:
            b = need_tokenizer(tokenizer).batch(chunk, chunk_pairs, max_length, pad_to_multiple_of=PAD_MULTIPLE)
            cut += b["truncated"]
            glob = None if global_attention is None else global_attention_mask(
                b["input_ids"], global_attention, need_tokenizer(tokenizer).sep_id).to(device)
            outs.append(model(b["input_ids"].to(device), b["attention_mask"].to(device), b["token_type_ids"].to(device),
                              global_mask_BT=glob))
        else:
            idx, mask, n = decoder_rows(tokenizer, chunk, chunk_pairs, limit)
            cut += n
            outs.append(model(idx.to(device), pad_mask_BT=mask.to(device)))
    if not outs:
        return torch.zeros(0, model.cfg.num_labels), 0
    return torch.cat(outs).float().cpu(), cut


def classify(model: torch.nn.Module, tokenizer: Any, texts: Any, text_pairs: Any = None,
             batch_size: int = 32, global_attention: Optional[str] = None) -> list[dict[str, Any]]:
    """One {"label", "score", "probs"} per text (regression: score = the predicted value, probs empty)."""
    texts = texts_arg(texts, "classify")
    pairs = None if text_pairs is None else texts_arg(text_pairs, "classify (text_pairs)")
    if pairs is not None and len(pairs) != len(texts):
        raise LMForgeError(f"{len(texts)} texts but {len(pairs)} text pairs")
    logits, _ = class_logits(model, tokenizer, texts, pairs, batch_size, global_attention=global_attention)
    names = label_names(model)
    if logits.shape[-1] == 1:
        return [{"label": names[0], "score": float(v), "probs": {}} for v in logits[:, 0]]
    probs = logits.softmax(-1)
    out = []
    for row in probs:
        k = int(row.argmax())
        out.append({"label": names[k], "score": float(row[k]), "probs": {n: float(p) for n, p in zip(names, row)}})
    return out
