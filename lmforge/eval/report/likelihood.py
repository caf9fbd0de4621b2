"""Log-likelihoods of texts under a decoder, as lm-eval scores a continuation of an empty context."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), T), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits in fp32; fp64 ones (parity tests) stay fp64."""
    return x if x.dtype == torch.float64 else x.float()


def score_prefix_id(tokenizer: Any) -> int:
    """The token a sentence is scored after: BOS, else EOS (lm-eval's prefix_token_id)."""
    bos = tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    return bos if bos is not None else tokenizer.eos_id


@torch.no_grad()
def causal_token_logprobs(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
                          batch_size: int = 32) -> list[np.ndarray]:
    """Per text, the log-probabilities of its tokens after BOS (EOS without one); a text that starts
    with that token is scored from its second token. Texts longer than the context keep their end."""
    prefix = score_prefix_id(tokenizer)
    rows = []
    for ids in tokenizer.encode_batch(list(texts)):
        rows.append(ids if ids and ids[0] == prefix else [prefix, *ids])
    ctx = int(model.cfg.block_size)
    device = model.tok_emb.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of similar lengths: little padding
    out: list[np.ndarray] = [np.zeros(0)] * len(rows)
    for i in range(0, len(order), batch_size):
        which = order[i:i + batch_size]
        chunk = [rows[k][-(ctx + 1):] for k in which]  # lm-eval keeps the last max_length + 1
        ids_BT, mask_BT = padded(chunk, 0, device)
        logp_BTV = F.log_softmax(at_least_fp32(model(ids_BT[:, :-1], pad_mask_BT=mask_BT[:, :-1])), dim=-1)
        lp_BT = logp_BTV.gather(-1, ids_BT[:, 1:, None])[..., 0]
        for j, (k, r) in enumerate(zip(which, chunk)):
            out[k] = lp_BT[j, :len(r) - 1].double().cpu().numpy()
    return out
