"""Preference training on pairs: reading them, the reward-model and DPO objectives, their batch
source, and the one-off reference pass of DPO. Both run in the one training loop (`train_job`).

Batch layout (`pair_batch`): B pairs become 2B right-padded rows, chosen rows first,
    ids_NT        prompt + completion tokens (N = 2B), padding = pad id
    pad_mask_NT   True on real tokens
    labels_NT     next-token targets aligned with the logits: labels[t] = ids[t+1] where ids[t+1]
                  is a completion token, else -100 (prompt and padding never count)
    ref_logps_N   reference log-probability (sum over completion tokens), precomputed once
    n_tokens_N    completion tokens per row (for length-averaged IPO)
    margin_B      optional per-pair margin (reward model)
Sampling (`pair_batches`, an `ExampleBatches`): step s takes the global batch positions s*G .. s*G+G-1
of an endless sequence of epoch-wise permutations seeded by (seed, epoch), so batches are a pure
function of (seed, step, micro-batch index) and resume is exact.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from lmforge.data.alignment_data import EncodedPair, ReadStats, encode_pairs, read_preferences
from lmforge.data.sampling import ExampleBatches
from lmforge.train import alignment as A


def pair_batch(pairs: Sequence[EncodedPair], idx: Sequence[int], pad_id: int,
               ref_logps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The batch layout above of pairs[idx]; `ref_logps` (2, n_pairs): the sums of the chosen and
    rejected completions' reference log-probs, or None."""
    picked = [pairs[i] for i in idx]
    seqs = [p.prompt + p.chosen for p in picked] + [p.prompt + p.rejected for p in picked]
    plen = [len(p.prompt) for p in picked] * 2
    N, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros(N, T, dtype=torch.bool)
    labels = torch.full((N, T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        L = len(s)
        ids[i, :L] = torch.tensor(s)
        mask[i, :L] = True
        labels[i, plen[i] - 1:L - 1] = ids[i, plen[i]:L]
    n_tok = (labels != -100).sum(1)
    margin = torch.tensor([p.margin for p in picked], dtype=torch.float32)
    batch = {"ids": ids, "pad_mask": mask, "labels": labels, "n_tokens": n_tok, "margin": margin}
    if ref_logps is not None:
        t = torch.as_tensor(list(idx), dtype=torch.long)
        batch["ref_logps"] = torch.cat([ref_logps[0, t], ref_logps[1, t]])
    return batch


def pair_batches(pairs: Sequence[EncodedPair], pad_id: int, micro_batch_size: int, micro_batches_per_step: int,
                 seed: int, ref_logps: torch.Tensor | None = None, shuffle: bool = True) -> ExampleBatches:
    """The loop's batch source of preference pairs (module docstring)."""
    return ExampleBatches(len(pairs), lambda idx: pair_batch(pairs, idx, pad_id, ref_logps), micro_batch_size,
                          micro_batches_per_step, seed, shuffle)


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probs of the completion tokens of each row, (N,). Rows are right-padded, so
    causal attention alone keeps padding out of every real token's view."""
    logits_NTV = model(batch["ids"])
    return A.sequence_logps(logits_NTV, batch["labels"])


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int,
                    batch_size: int = 16, autocast: torch.dtype = torch.float32) -> torch.Tensor:
    """(2, n_pairs) reference log-probs of chosen and rejected completions: the one pass over the
    data that replaces a live reference model during DPO. Runs on the model's device under the
    training forward's autocast dtype, so step 1's loss is ln 2: exactly on the CPU, up to the
    kernels' summation order on a GPU."""
    from lmforge.train.job import to_device

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for b in pair_batches(pairs, pad_id, batch_size, 1, 0, shuffle=False).all_batches():
        with torch.autocast(device.type, dtype=autocast, enabled=autocast != torch.float32):
            lp = completion_logps(model, to_device(b, device)).float().cpu()
        B = lp.shape[0] // 2
        out.append(torch.stack([lp[:B], lp[B:]]))
    model.train(was)
    return torch.cat(out, 1)


class DPOObjective:
    """DPO on a batch of pairs with precomputed reference log-probs (TRL's metric names)."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float | None = None):
        self.beta, self.loss_type, self.ls, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha
        self.loss_label = f"DPO loss ({loss_type}, per pair)" + (" + rpo_alpha x NLL" if rpo_alpha is not None else "")

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        lp_N = completion_logps(model, batch)
        ref_N = batch["ref_logps"].to(lp_N.dtype)
        B = lp_N.shape[0] // 2
        # NLL of the chosen completions, per token over the batch (TRL's nll_loss, for rpo_alpha)
        nll = -lp_N[:B].sum() / batch["n_tokens"][:B].sum().clamp(min=1).to(lp_N.dtype)
        if self.loss_type == "ipo":  # IPO compares length-averaged log-probs (as TRL does)
            n = batch["n_tokens"].clamp(min=1).to(lp_N.dtype)
            lp_N, ref_N = lp_N / n, ref_N / n
        losses, cr, rr = A.dpo_loss(lp_N[:B], lp_N[B:], ref_N[:B], ref_N[B:], self.beta, self.loss_type, self.ls)
        loss = losses.mean()
        if self.rpo_alpha is not None:
            loss = loss + self.rpo_alpha * nll
        stats = {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
                 "rewards/accuracies": (cr > rr).float().mean(), "rewards/margins": (cr - rr).mean(),
                 "logps/chosen": lp_N[:B].detach().mean(), "logps/rejected": lp_N[B:].detach().mean(),
                 "nll_loss": nll.detach(), "tokens": batch["pad_mask"].sum()}
        return loss, stats


class RewardObjective:
    """Bradley-Terry loss on the scores read at each row's last real token."""

    name = "reward"
    loss_label = "Bradley-Terry loss (per pair)"

    def __init__(self, center_coef: float = 0.0, use_margin: bool = False):
        self.center_coef, self.use_margin = center_coef, use_margin

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        r_N = model(batch["ids"], pad_mask_BT=batch["pad_mask"])[:, 0].float()
        B = r_N.shape[0] // 2
        rc, rr = r_N[:B], r_N[B:]
        margin = batch["margin"] if self.use_margin else None
        loss = A.bradley_terry_loss(rc, rr, margin, self.center_coef)
        d = (rc - rr).detach()
        stats = {"accuracy": (d > 0).float().mean(), "margin": d.mean(), "reward/chosen": rc.detach().mean(),
                 "reward/rejected": rr.detach().mean(), "tokens": batch["pad_mask"].sum()}
        return loss, stats


LN2 = math.log(2.0)


def training_pairs(method: str, args: Any, tokenizer: Any, max_len: int,
                   seed: int) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, validation) token ids of --data (and --val-data, or --val-fraction of --data): the
    pairs of reward and DPO training; what was skipped is reported."""
    from lmforge.data.sampling import split_validation
    from lmforge.finetune.scaffold import say

    stats = ReadStats()
    pairs = read_preferences(args.data, stats)
    val_pairs = read_preferences(args.val_data, stats) if getattr(args, "val_data", None) else None
    pairs, val_pairs = split_validation(pairs, val_pairs, getattr(args, "val_fraction", None), seed)
    train = encode_pairs(tokenizer, pairs, max_len, stats)
    val = encode_pairs(tokenizer, val_pairs, max_len, stats) if val_pairs else []
    for note in stats.notes:
        say(method, note)
    return train, val
