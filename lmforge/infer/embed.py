"""Sentence embeddings: `LLM.embed` of an encoder.

The final hidden states are pooled (mean over real tokens, or [CLS]) and L2-normalised, as
sentence-transformers does; a sentence-transformers folder's own settings (1_Pooling/config.json,
2_Normalize, max_seq_length: the model's `sentence_pooling`) are the defaults for that model.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError

PAD_MULTIPLE = 16  # batches are padded to a multiple of this width: few shapes, kernels set up once each


def texts_arg(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise LMForgeError(f"{what} takes a string or a list of strings")
    return list(texts)


def need_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise LMForgeError("this model has no encoder tokenizer (tokenizer.json), so it cannot read text")
    return tokenizer


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Any, texts: Any, pooling: Optional[str] = None,
          normalize: Optional[bool] = None, batch_size: int = 32, max_length: Optional[int] = None) -> torch.Tensor:
    """(N, C) sentence embeddings. pooling 'mean' (over real tokens) or 'cls'; normalize = unit L2 norm.
    None takes the model's sentence-transformers settings, else mean + normalize."""
    texts = texts_arg(texts, "embed")
    st = getattr(model, "sentence_pooling", None) or {}
    pooling = pooling or st.get("pooling", "mean")
    normalize = st.get("normalize", True) if normalize is None else normalize
    if pooling not in ("mean", "cls"):
        raise LMForgeError(f"pooling must be 'mean' or 'cls', got '{pooling}'")
    tok = need_tokenizer(tokenizer)
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


def embed_for_llm(llm: Any, texts: Any, pooling: Optional[str] = None, normalize: Optional[bool] = None,
                  batch_size: int = 32) -> torch.Tensor:
    """`LLM.embed` of an encoder."""
    return embed(llm.model, llm.tokenizer, texts, pooling=pooling, normalize=normalize, batch_size=batch_size)
