"""Reward-model scoring: `LLM.score(prompt, completion)` and `lmforge score`.

The prompt + completion are rendered exactly as `lmforge finetune reward` trained on them
(data/alignment_data.encode_scored: the chat template with the reply closed by its end-of-turn
token, or plain text + EOS), and the score head reads the last real token (models/heads.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lmforge.errors import LMForgeError
from lmforge.models.registry import SCORE, family_of


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any],
          batch_size: int = 32) -> list[float]:
    from lmforge.data.alignment_data import encode_scored

    if SCORE not in family_of(model).tasks(model.cfg) or int(model.cfg.num_labels) != 1:
        raise LMForgeError("score needs a reward model (a 'lmforge finetune reward' run: one score output)")
    if tokenizer is None:
        raise LMForgeError("this reward model has no tokenizer, so it cannot score text")
    if len(prompts) != len(completions):
        raise LMForgeError(f"{len(prompts)} prompts for {len(completions)} completions")
    ctx = int(model.cfg.block_size)
    seqs = []
    for p, c in zip(prompts, completions):
        ids = encode_scored(tokenizer, p, c)
        if len(ids) > ctx:
            raise LMForgeError(f"prompt + completion is {len(ids)} tokens, longer than the model's context ({ctx})")
        seqs.append(ids)
    device = model.tok_emb.weight.device
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool, device=device)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s, device=device)
            mask[j, :len(s)] = True
        out += model(ids, pad_mask_BT=mask)[:, 0].float().tolist()
    return out
