"""What the one training loop trains: a `TrainJob`.

Every method — pretraining (causal LM, masked LM, span corruption), SFT, classification,
seq2seq, reward modelling, DPO, PPO, GRPO — is a TrainJob: a model to start from, an objective (loss
and logged stats), a source of training batches and, optionally, validation batches and extra
evaluation metrics. `lmforge.train.loop.train_job(task, train_cfg, out)` runs it with everything
the loop gives (accumulation, clipping, schedule, eval, metrics, atomic checkpoints, exact resume,
DDP). A new method adds a TrainJob builder, never a loop.

`lmforge train` builds its TrainJob from a pretraining objective (`objectives.PRETRAINING`): the
objective's `make(PretrainContext)` returns its `PretrainParts` (objective and batch sources).

Batch sources are deterministic: `micro_batch(step, index)` is a pure function of the seed, the
optimizer step and the micro-batch index (index = rank * grad_accum + a), so the step counter is
the data position and a resumed run sees exactly the batches it would have seen. Sources with
state that depends on the model (RL rollout buffers) save it through `state_dict()` /
`load_state_dict()`, which the loop stores in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from lmforge.data.sampling import EvalCoverage


class BatchSource(Protocol):
    def micro_batch(self, step: int, index: int) -> Any:
        """The `index`-th micro-batch of optimizer step `step` (CPU tensors in a tuple or dict)."""
        ...

    # Optional: bind(model) — the live (unwrapped) model, for sources that generate (RL rollouts);
    # state_dict() -> dict[str, Tensor] and load_state_dict(d) — state saved with checkpoints.


class Objective(Protocol):
    """What a batch means and which loss it gives: `loss, stats = objective(model, batch)`. `loss` is a
    scalar to backpropagate (a mean over the batch, so equal micro-batches average correctly under
    gradient accumulation); `stats` maps names to detached scalars the loop logs ("tokens" counts
    the step's tokens when the job has no fixed tokens_per_step; "loss" is not logged twice).
    `loss_label` names the loss and its unit: the y-axis of loss.png."""

    name: str
    loss_label: str

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ...


@dataclass
class TrainJob:
    name: str
    config: dict[str, Any]                      # resolved config: RUN/config.yaml, compared on resume
    build_model: Callable[[], torch.nn.Module]  # the initial model (the loop seeds first)
    objective: Objective                        # loss, stats = objective(model, batch)
    train_batches: Any                          # BatchSource
    eval_batches: Callable[[], Sequence[Any]] | None = None  # fixed validation batches
    eval_coverage: EvalCoverage | None = None   # how much of the validation set they hold (None: all of it)
    evaluate: Callable[[torch.nn.Module], dict[str, Any]] | None = None  # extra metrics at every eval
    files: dict[str, bytes] = field(default_factory=dict)    # written into RUN and every checkpoint
    run_files: dict[str, bytes] = field(default_factory=dict)  # written into RUN only (data_meta.json)
    data_fingerprint: Any = None                # must be equal on resume (e.g. the data's sha256)
    tokens_per_step: int | None = None          # fixed tokens per optimizer step (else stats["tokens"])
    flops_per_token: int | None = None          # for the MFU figure
    # trained beside the model, saved in the train state but not in the model files (a distillation projection)
    extra_modules: torch.nn.Module | None = None
    bytes_per_token: float | None = None        # validation bits per byte = val_loss / ln 2 / this
    report_perplexity: bool = True              # val_ppl = exp(val_loss) (language-model losses)
    description: str = ""                       # one line for the start message ("global batch ...")
    # loss.png panels under the loss: {y-axis label: metrics.jsonl keys drawn in it} (RL rewards, KL, ...)
    plot_panels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # LoRA / QLoRA (train/adapters.py): the `lora` config section (None or lora.r unset: full fine-tuning),
    # the base model's directory the adapter goes on (None: the job's initial model, written to RUN/base),
    # and the modules the job creates fresh (a classifier's head), trained in full under LoRA
    lora: Any = None
    base: str | None = None
    head_modules: tuple[str, ...] = ()


@dataclass
class PretrainContext:
    """What a pretraining objective gets to build its batches (`lmforge train --train.objective NAME`)."""

    train_tokens: Any            # np.ndarray memmap of the train split (documents separated by EOS); the
                                 # rows of an image-text split for clip (PretrainSpec.open_data reads the data)
    val_tokens: Any              # the same for the validation split
    seq_len: int
    micro_batch_size: int
    micro_batches_per_step: int  # grad_accum x world size
    eval_iters: int
    seed: int
    tokenizer: Any               # lmforge Tokenizer of the prepared data
    options: Any                 # the `objective` config section (ObjectiveConfig)
    model_cfg: Any               # the resolved model config
    train_name: str = "train split"  # how error messages name the splits
    val_name: str = "val split"
    val_bytes_per_token: float | None = None  # UTF-8 bytes per token of the validation split


@dataclass
class PretrainParts:
    """What a pretraining objective contributes to its TrainJob."""

    objective: Objective
    train_batches: Any                           # BatchSource
    eval_batches: Callable[[], Sequence[Any]]    # the fixed validation batches
    eval_coverage: EvalCoverage | None = None    # how much of the val split they read (None: all of it)
    tokens_per_step: int | None = None           # fixed tokens per optimizer step (else stats["tokens"])
    bytes_per_token: float | None = None         # for validation bits per byte
    report_perplexity: bool = False              # val_ppl = exp(val_loss): a language-model loss


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) tuple / list / dict batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def iter_rank_share(items: Sequence[Any], rank: int, world: int) -> Iterable[Any]:
    for i in range(rank, len(items), world):
        yield items[i]
