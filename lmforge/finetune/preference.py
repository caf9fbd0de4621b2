"""Preference training on pairs: the reward-model and DPO objectives, their batch source, and the
one-off reference pass of DPO. Both run in the one training loop (`train_job`).

Batch layout (`PairBatches.micro_batch`): B pairs become 2B right-padded rows, chosen rows first,
    ids_NT        prompt + completion tokens (N = 2B), padding = pad id
    pad_mask_NT   True on real tokens
    labels_NT     next-token targets aligned with the logits: labels[t] = ids[t+1] where ids[t+1]
                  is a completion token, else -100 (prompt and padding never count)
    ref_logps_N   reference log-probability (sum over completion tokens), precomputed once
    n_tokens_N    completion tokens per row (for length-averaged IPO)
    margin_B      optional per-pair margin (reward model)
Sampling: step s takes the global batch positions s*G .. s*G+G-1 of an endless sequence of
epoch-wise permutations seeded by (seed, epoch), so batches are a pure function of (seed, step,
micro-batch index) and resume is exact.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from lmforge.data.alignment_data import EncodedPair
from lmforge.train import alignment as A


def pair_rows(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate pairs into the batch layout above (without ref_logps)."""
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    plen = [len(p.prompt) for p in pairs] * 2
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
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return {"ids": ids, "pad_mask": mask, "labels": labels, "n_tokens": n_tok, "margin": margin}


def epoch_positions(seed: int, n_items: int, start: int, count: int) -> np.ndarray:
    """Item indices at global positions start .. start+count-1 of the endless permuted stream."""
    out = np.empty(count, dtype=np.int64)
    cache: dict[int, np.ndarray] = {}
    for j, g in enumerate(range(start, start + count)):
        epoch = g // n_items
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed & 0xFFFFFFFF, epoch]).permutation(n_items)
        out[j] = cache[epoch][g % n_items]
    return out


class PairBatches:
    """Deterministic micro-batches of preference pairs (see module docstring)."""

    def __init__(self, pairs: Sequence[EncodedPair], micro_batch_size: int, micro_batches_per_step: int, seed: int,
                 pad_id: int, ref_logps: torch.Tensor | None = None):
        self.pairs, self.mb, self.per_step, self.seed, self.pad_id = list(pairs), micro_batch_size, micro_batches_per_step, seed, pad_id
        self.ref = ref_logps  # (2, n_pairs): sums of chosen and rejected log-probs, or None

    def rows(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = pair_rows([self.pairs[i] for i in idx], self.pad_id)
        if self.ref is not None:
            t = torch.as_tensor(np.asarray(idx))
            batch["ref_logps"] = torch.cat([self.ref[0, t], self.ref[1, t]])
        return batch

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        start = (step * self.per_step + index) * self.mb
        return self.rows(epoch_positions(self.seed, len(self.pairs), start, self.mb).tolist())

    def fixed_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Every pair once, in order (validation)."""
        n = len(self.pairs)
        return [self.rows(list(range(i, min(i + batch_size, n)))) for i in range(0, n, batch_size)]


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
    src = PairBatches(pairs, batch_size, 1, 0, pad_id)
    out = []
    for b in src.fixed_batches(batch_size):
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
