"""Training objectives: what a batch means and which loss it gives.

The loop knows nothing about language modelling. It asks an objective for a loss:

    loss, stats = objective(model, batch)

`loss` is a scalar tensor to backpropagate (a mean over the batch, so micro-batches of equal size
average correctly under gradient accumulation); `stats` maps names to detached scalar tensors the
loop may log. New methods (MLM, classification, SFT, DPO, reward modelling, PPO, distillation) add
an objective class and register it in `OBJECTIVES`; the loop stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError


class Objective(Protocol):
    name: str

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...


class CausalLMObjective:
    """Next-token cross entropy. batch = (x_BT, y_BT) with y the inputs shifted left by one;
    targets equal to `ignore_index` (default -100) do not count."""

    name = "causal_lm"

    def __init__(self, ignore_index: int = -100):
        self.ignore_index = ignore_index

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x_BT, y_BT = batch
        logits_BTV = model(x_BT)
        # Cross entropy in fp32 even under autocast: the softmax over a large vocabulary is where
        # half precision loses the most.
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), ignore_index=self.ignore_index)
        return loss, {"loss": loss.detach()}


@dataclass
class PretrainContext:
    """What a pretraining objective gets to build its batches (`lmforge train --objective NAME`)."""

    train_tokens: Any            # np.ndarray memmap of the train split (documents separated by EOS)
    val_tokens: Any              # the same for the validation split
    seq_len: int
    micro_batch_size: int
    micro_batches_per_step: int  # grad_accum x world size
    eval_iters: int
    seed: int
    tokenizer: Any               # lmforge Tokenizer of the prepared data
    options: Any                 # the `objective` config section (ObjectiveConfig)
    model_cfg: Any               # the resolved model config


@dataclass
class PretrainSpec:
    """A pretraining objective of some model family: `make(ctx)` returns
    (objective, train batch source, eval_batches callable returning a list of batches)."""

    family: str
    default_preset: str
    make: Callable[[PretrainContext], tuple[Any, Any, Callable[[], Sequence[Any]]]]


# name -> spec; family modules / objectives register here (causal_lm is built in by the loop).
PRETRAINING: dict[str, PretrainSpec] = {}


OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "causal_lm": CausalLMObjective,
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        names = list(OBJECTIVES) + [n for n in PRETRAINING if n not in OBJECTIVES]
        raise LMForgeError(f"unknown objective '{name}' in train.objective; available: {', '.join(names)}")
    return OBJECTIVES[name]()


def _register_family_objectives() -> None:
    """Pretraining objectives of other families register themselves in PRETRAINING on import."""
    from lmforge.train import mlm  # noqa: F401  (encoders: "mlm")
    from lmforge.train import denoise  # noqa: F401  (encoder-decoders: "span_corruption", "text_infilling")


_register_family_objectives()
