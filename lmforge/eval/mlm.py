"""`lmforge eval` on an encoder with an MLM head: masked-token loss, top-1 accuracy and the
most-frequent-token baseline, on evenly spread windows of a prepared data directory's val split
masked with the fixed evaluation seed (15%, 80/10/10; `lmforge.data.masking`), so checkpoints compare."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.dataset import TokenData
from lmforge.data.masking import (IGNORE, Masker, mask_token_id, masked_eval_batches, most_frequent_token,
                                   special_token_ids)
from lmforge.data.windows import EvalWindows
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM


@torch.no_grad()
def evaluate_mlm(ckpt: Any, data_dir: str, batch_size: int = 8, max_windows: int = 200, seq_len: int = 128,
                 progress: bool = False) -> dict[str, Any]:
    """Masked-LM figures of an encoder (an LLM, or its path) on at most `max_windows` windows of `seq_len`
    tokens; `progress` shows a bar of the batches on stderr."""
    from tqdm import tqdm

    llm = LLM.of(ckpt)
    model = llm.model
    if getattr(model.cfg, "head", None) != "mlm":
        raise LMForgeError(f"{llm.path} is an encoder without an MLM head (head '{model.cfg.head}'); "
                           "evaluate classifiers with a labelled --data file")
    data = TokenData(data_dir)
    tok = data.tokenizer()
    special = special_token_ids(tok)
    cls_id = tok.hf.token_to_id("[CLS]")
    seq_len = min(seq_len, model.cfg.block_size - model.cfg.position_offset)
    body = seq_len - (cls_id is not None)
    val = data.split("val")
    n = max(1, min(max_windows, (len(val) - 1) // body))
    windows = EvalWindows(val, body, batch_size, -(-n // batch_size), name="val split")
    masker = Masker(model.cfg.vocab_size, mask_token_id(tok), special, 0.15)
    frequent = most_frequent_token(data.split("train"), special, model.cfg.vocab_size)
    loss_sum, correct, base, count = 0.0, 0, 0, 0
    device = model.tok_emb.weight.device
    for batch in tqdm(masked_eval_batches(windows, masker, cls_id), total=windows.n_batches, desc="eval", unit="batch",
                      file=sys.stderr, dynamic_ncols=True, disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        sel_BT = batch["labels"] != IGNORE
        logits_NV = model(batch["input_ids"], select_BT=sel_BT).float()
        y_N = batch["labels"][sel_BT]
        loss_sum += float(F.cross_entropy(logits_NV, y_N, reduction="sum"))
        correct += int((logits_NV.argmax(-1) == y_N).sum())
        base += int((y_N == frequent).sum())
        count += int(y_N.numel())
    if count == 0:
        raise LMForgeError(f"the val split of {data_dir} is too short to evaluate")
    return {"mlm_loss": loss_sum / count, "mlm_acc": correct / count, "baseline_acc": base / count,
            "masked_tokens": count, "windows": windows.n_batches * batch_size, "seq_len": seq_len,
            "checkpoint": str(llm.path), "data": str(data_dir)}
