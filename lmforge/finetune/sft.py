"""Supervised fine-tuning (SFT): train a decoder to answer as the assistant of a chat template.

    lmforge finetune sft --base MODEL --data FILE --out RUN [--val-data F | --val-fraction F]
                         [--truncate | --drop-long] [--config F.yaml] [--section.key V ...]

The loss counts the assistant's tokens only (each turn's content and its end-of-turn token, so the
model learns to stop); `train.loss_on prompt_and_completion` counts every token. Examples are
packed into rows of train.seq_len tokens (`data.packing`, default on): positions restart at every
example and attention stays inside it (a block-diagonal causal mask), so a packed row trains
exactly like its examples one by one, without the padding. The TrainJob runs in the one training loop.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from lmforge.data.sampling import EpochOrder, EvalCoverage, split_validation
from lmforge.data.table import data_fingerprint
from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.finetune.base_model import chat_model_files, load_base, pad_id_of
from lmforge.train import distributed as D
from lmforge.train.adapters import LoRAConfig
from lmforge.train.config import TrainConfig
from lmforge.train.job import TrainJob

IGNORE = -100



@dataclass
class SFTTrainConfig(TrainConfig):
    loss_on: Literal["completion", "prompt_and_completion"] = config_field(
        "completion", "completion = assistant tokens only (their end-of-turn token included); "
                      "prompt_and_completion = every token")


@dataclass
class SFTDataConfig:
    packing: bool = config_field(True, "pack examples into train.seq_len rows (block-diagonal attention, positions restart)")
    long: Literal["truncate", "drop"] = config_field("truncate", "examples longer than train.seq_len: truncate or drop "
                                                       "(--truncate / --drop-long)")
    val_fraction: float = config_field(0.0, "hold out this share of whole examples for validation when no --val-data is given")
    template: Literal["auto", "chatml", "none"] = config_field(
        "auto", "auto = the base model's chat template, else ChatML (its tokens added when missing); "
                "chatml = always ChatML; none = plain prompt + completion + EOS (base models, no template)")


@dataclass
class SFTConfig:
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = SFTConfig  # `lmforge finetune sft --help-config`

# Fine-tuning starts from a trained model: fewer steps, a smaller peak and warmup than pretraining.
DEFAULTS = {"train": {"max_steps": 500, "lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0,
                      "micro_batch_size": 8, "eval_every": 100, "ckpt_every": 100, "eval_iters": 10}}


# ---- batches ----------------------------------------------------------------------------------

class PackedRows:
    """Deterministic micro-batches of rendered examples.

    Epoch e visits the examples in a permutation seeded by (seed, e) (an EpochOrder); with packing,
    consecutive examples fill rows of seq_len tokens greedily (an example that does not fit starts a new row),
    without packing each example is its own row (padded to the longest row of its micro-batch).
    Global row g of the stream is a pure function of (seed, g), so step s, micro-batch i always
    reads rows (s * per_step + i) * mb ... + mb, and resume is exact.
    """

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], seq_len: int, micro_batch_size: int,
                 micro_batches_per_step: int, seed: int, packing: bool, pad_id: int, shuffle: bool = True):
        if not examples:
            raise LMForgeError("no training examples left after filtering")
        self.examples, self.seq_len, self.mb = list(examples), seq_len, micro_batch_size
        self.per_step, self.packing, self.pad_id = micro_batches_per_step, packing, pad_id
        self.order = EpochOrder(len(self.examples), seed, shuffle)
        self._epochs: list[list[list[int]]] = []  # rows (lists of example indices) of each epoch
        self._starts: list[int] = [0]  # global index of each epoch's first row

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            rows: list[list[int]] = []
            used = self.seq_len + 1
            for i in self.order.epoch(len(self._epochs)):
                n = len(self.examples[i][0])
                if self.packing and rows and used + n <= self.seq_len:
                    rows[-1].append(i)
                    used += n
                else:
                    rows.append([i])
                    used = n
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        return self._epochs[e]

    def row(self, g: int) -> list[int]:
        e = 0
        while True:
            rows = self._epoch(e)
            if g < self._starts[e + 1]:
                return rows[g - self._starts[e]]
            e += 1

    def rows_per_epoch(self) -> int:
        return len(self._epoch(0))

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = self.seq_len if self.packing else max(sum(len(self.examples[i][0]) for i in r) for r in rows)
        B = len(rows)
        x_BT = torch.full((B, width), self.pad_id, dtype=torch.long)
        y_BT = torch.full((B, width), IGNORE, dtype=torch.long)
        seg_BT = torch.full((B, width), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            o = 0
            for k, i in enumerate(r):
                ids, labels = self.examples[i]
                n = len(ids)
                x_BT[b, o:o + n] = torch.tensor(ids)
                if n > 1:  # token t predicts token t+1 of the same example, never the next example
                    y_BT[b, o:o + n - 1] = torch.tensor(labels[1:])
                seg_BT[b, o:o + n] = k
                o += n
        return {"input_ids": x_BT, "labels": y_BT, "segment_ids": seg_BT}

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        g0 = (step * self.per_step + index) * self.mb
        return self.collate([self.row(g) for g in range(g0, g0 + self.mb)])

    def all_batches(self, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The first epoch's rows in order, as micro-batches (validation)."""
        rows = self._epoch(0)
        out = [self.collate(rows[i:i + self.mb]) for i in range(0, len(rows), self.mb)]
        return out[:limit] if limit else out

    def coverage(self, limit: int | None = None) -> EvalCoverage:
        """How many examples all_batches(limit) holds, of all."""
        rows = self._epoch(0)
        evaluated = sum(len(r) for r in (rows[:limit * self.mb] if limit else rows))
        return EvalCoverage(evaluated, len(self.examples), "examples")


class SFTObjective:
    """Mean cross entropy over the tokens whose label is not -100."""

    name = "sft"
    loss_label = "cross entropy (nats/trained token)"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        y_BT = batch["labels"]
        # The vocabulary head runs on the labelled positions only: with assistant-only loss they are
        # often a small share of a packed row, and the head is a quarter of a small model's FLOPs.
        h_BTC = model(batch["input_ids"], segment_BT=batch["segment_ids"], hidden=True)
        labelled_BT = y_BT != IGNORE
        core = getattr(model, "module", model)  # under DDP the wrapper holds the model
        loss = core.head_loss(h_BTC[labelled_BT], y_BT[labelled_BT])  # no (N, vocab) logits on a plain head
        # tokens = real (non-padding) input tokens, as tok/s counts them in pretraining
        return loss, {"loss": loss.detach(), "tokens": (batch["segment_ids"] >= 0).sum()}


# ---- model, tokenizer and examples --------------------------------------------------------------

def prepare_chat_model(llm: Any, template: str) -> list[str]:
    """Give `llm` a chat template (mode auto / chatml / none); adds ChatML tokens and embedding rows
    when the tokenizer lacks them. Returns notes for the user."""
    from lmforge.tokenizer import CHATML_TEMPLATE

    tok, notes = llm.tokenizer, []
    if template == "none":
        tok.chat_template = None
        return notes
    if template == "auto" and tok.chat_template:
        return notes
    added = tok.add_chat_tokens()
    if added:
        old = llm.model.cfg.vocab_size
        if tok.vocab_size > old:
            llm.model.resize_token_embeddings(tok.vocab_size)
        llm.config = llm.model.cfg
        notes.append(f"added the chat tokens {', '.join(added)} to the tokenizer (ids {old}..{tok.vocab_size - 1}); "
                     "their embedding rows start at the mean embedding")
    tok.chat_template = CHATML_TEMPLATE
    notes.append("using the ChatML chat template" + (" (the base model has none)" if template == "auto" else ""))
    return notes


def render_examples(examples: list[Any], tok: Any, loss_on: str, seq_len: int, long: str,
                    say: Any = None) -> list[tuple[list[int], list[int]]]:
    """Render, then truncate or drop examples over seq_len tokens (counted and reported)."""
    from lmforge.data.chat import render_plain, render_with_mask

    out, truncated, dropped, empty = [], 0, 0, 0
    for ex in examples:
        if tok.chat_template:
            ids, labels = render_with_mask(tok, ex.messages, loss_on, tools=ex.tools)
        else:
            try:
                ids, labels = render_plain(tok, ex.messages, loss_on)
            except LMForgeError as e:
                raise LMForgeError(f"{ex.where}: {e}") from None
        if len(ids) > seq_len:
            if long == "drop":
                dropped += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if all(l == IGNORE for l in labels[1:]):
            empty += 1  # truncation cut every trained token
            continue
        out.append((ids, labels))
    if say is not None:
        if truncated:
            say(f"truncated {truncated} of {len(examples)} examples to {seq_len} tokens")
        if dropped:
            say(f"dropped {dropped} of {len(examples)} examples longer than {seq_len} tokens")
        if empty:
            say(f"dropped {empty} examples with no assistant tokens left after truncation")
    return out


def build_job(cfg: SFTConfig, args: Any, llm: Any = None) -> TrainJob:
    """The SFT TrainJob; `llm` (default: loaded from args.base) is the model to train (lmforge
    distill passes its student)."""
    from lmforge.data.chat import expand_paths, read_examples
    from lmforge.finetune.scaffold import say

    t, d = cfg.train, cfg.data
    llm = llm or load_base(args.base, "sft", needs="continue", trains="decoder models")
    model = llm.model
    seq_len = t.seq_len or model.cfg.block_size
    if seq_len > model.cfg.block_size:
        raise LMForgeError(f"train.seq_len ({seq_len}) is longer than the model's context ({model.cfg.block_size})")
    examples = read_examples(args.data)  # every line checked before anything is written or said
    paths = expand_paths(args.data)
    val_examples = None
    if getattr(args, "val_data", None) is not None:
        val_examples = read_examples(args.val_data)
        paths += expand_paths(args.val_data)
    examples, val_examples = split_validation(examples, val_examples, d.val_fraction, t.seed)
    vocab = model.cfg.vocab_size
    for note in prepare_chat_model(llm, d.template):
        say("sft", note)
    if cfg.lora.r is not None and llm.model.cfg.vocab_size > vocab and "tok_emb" not in cfg.lora.modules_to_save:
        raise LMForgeError(f"the base's tokenizer lacks the chat tokens, which add embedding rows the adapter must "
                           f"train: add tok_emb to --lora.modules_to_save, or use --data.template none")
    train_rows = render_examples(examples, llm.tokenizer, t.loss_on, seq_len, d.long, lambda msg: say("sft", msg))
    val_rows = render_examples(val_examples, llm.tokenizer, t.loss_on, seq_len, d.long) if val_examples else []
    pad = pad_id_of(llm.tokenizer)
    per_step = t.grad_accum * D.world_size()
    source = PackedRows(train_rows, seq_len, t.micro_batch_size, per_step, t.seed, d.packing, pad)
    val_source = PackedRows(val_rows, seq_len, t.micro_batch_size, 1, t.seed, d.packing, pad, shuffle=False) \
        if val_rows else None
    resolved = {**dataclasses.asdict(cfg), "model": dataclasses.asdict(model.cfg), "base": str(Path(args.base))}
    resolved["train"]["seq_len"] = seq_len
    n_tok = sum(len(ids) for ids, _ in train_rows)
    say("sft", f"{len(train_rows)} training examples ({n_tok:,} tokens, {source.rows_per_epoch()} rows of {seq_len} "
               f"per epoch{' packed' if d.packing else ''}), {len(val_rows)} validation examples")
    return TrainJob(
        name="sft", config=resolved, build_model=lambda: model, objective=SFTObjective(), train_batches=source,
        eval_batches=(lambda: val_source.all_batches(t.eval_iters)) if val_source else None,
        eval_coverage=val_source.coverage(t.eval_iters) if val_source else None,
        files=chat_model_files(llm, args.base), data_fingerprint={"dir": str(args.data), "sha256": data_fingerprint(paths)},
        flops_per_token=model.cfg.flops_per_token(seq_len) if hasattr(model.cfg, "flops_per_token") else None,
        description=f"global batch {t.micro_batch_size * per_step} rows x {seq_len} tokens")


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--truncate", dest="long", action="store_const", const="truncate",
                   help="cut examples longer than train.seq_len (default)")
    g.add_argument("--drop-long", dest="long", action="store_const", const="drop",
                   help="drop examples longer than train.seq_len")


FLAG_KEYS = {"long": "data.long"}  # --truncate / --drop-long
