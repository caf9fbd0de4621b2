"""Causal language modelling, `lmforge train`'s default objective: next-token cross entropy on
random token windows of the prepared data (`lmforge.data.windows`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.data.windows import EvalWindows, TrainWindows
from lmforge.train.job import PretrainContext, PretrainParts


class CausalLMObjective:
    """Next-token cross entropy. batch = (x_BT, y_BT) with y the inputs shifted left by one;
    targets equal to `ignore_index` (default -100) do not count."""

    name = "causal_lm"
    loss_label = "cross entropy (nats/token)"

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x_BT, y_BT = batch
        logits_BTV = model(x_BT)
        # Cross entropy in fp32 even under autocast: the softmax over a large vocabulary is where
        # half precision loses the most.
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), ignore_index=self.ignore_index)
        return loss, {"loss": loss.detach()}


def make_causal_lm(ctx: PretrainContext) -> PretrainParts:
    train = TrainWindows(ctx.train_tokens, ctx.seq_len, ctx.micro_batch_size, ctx.micro_batches_per_step, ctx.seed,
                         name=ctx.train_name)
    val = EvalWindows(ctx.val_tokens, ctx.seq_len, ctx.micro_batch_size, ctx.eval_iters, name=ctx.val_name)
    return PretrainParts(CausalLMObjective(), train, lambda: [val.batch(i) for i in range(val.n_batches)],
                         eval_coverage=val.coverage(),
                         tokens_per_step=ctx.micro_batch_size * ctx.micro_batches_per_step * ctx.seq_len,
                         bytes_per_token=ctx.val_bytes_per_token, report_perplexity=True)
