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
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.train.config import TrainConfig

IGNORE = -100


def _h(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class SFTTrainConfig(TrainConfig):
    loss_on: Literal["completion", "prompt_and_completion"] = _h(
        "completion", "completion = assistant tokens only (their end-of-turn token included); "
                      "prompt_and_completion = every token")


@dataclass
class SFTDataConfig:
    packing: bool = _h(True, "pack examples into train.seq_len rows (block-diagonal attention, positions restart)")
    long: Literal["truncate", "drop"] = _h("truncate", "examples longer than train.seq_len: truncate or drop "
                                                       "(--truncate / --drop-long)")
    val_fraction: float = _h(0.0, "hold out this share of whole examples for validation when no --val-data is given")
    template: Literal["auto", "chatml", "none"] = _h(
        "auto", "auto = the base model's chat template, else ChatML (its tokens added when missing); "
                "chatml = always ChatML; none = plain prompt + completion + EOS (base models, no template)")


@dataclass
class SFTConfig:
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)


CONFIG = SFTConfig  # `lmforge finetune sft --help-config`

# Fine-tuning starts from a trained model: fewer steps, a smaller peak and warmup than pretraining.
SFT_DEFAULTS = {"train": {"max_steps": 500, "lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.0,
                          "micro_batch_size": 8, "eval_every": 100, "ckpt_every": 100, "eval_iters": 10}}
DEFAULTS = SFT_DEFAULTS


# ---- batches ----------------------------------------------------------------------------------

class PackedRows:
    """Deterministic micro-batches of rendered examples.

    Epoch e visits the examples in a permutation seeded by (seed, e); with packing, consecutive
    examples fill rows of seq_len tokens greedily (an example that does not fit starts a new row),
    without packing each example is its own row (padded to the longest row of its micro-batch).
    Global row g of the stream is a pure function of (seed, g), so step s, micro-batch i always
    reads rows (s * per_step + i) * mb ... + mb, and resume is exact.
    """

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], seq_len: int, micro_batch_size: int,
                 micro_batches_per_step: int, seed: int, packing: bool, pad_id: int, shuffle: bool = True):
        if not examples:
            raise LMForgeError("no training examples left after filtering")
        self.examples, self.seq_len, self.mb = list(examples), seq_len, micro_batch_size
        self.per_step, self.seed, self.packing, self.pad_id, self.shuffle = micro_batches_per_step, seed, packing, pad_id, shuffle
        self._epochs: list[list[list[int]]] = []  # rows (lists of example indices) of each epoch
        self._starts: list[int] = [0]  # global index of each epoch's first row

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            order = list(range(len(self.examples)))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
                order = torch.randperm(len(order), generator=g).tolist()
            rows: list[list[int]] = []
            used = self.seq_len + 1
            for i in order:
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


class SFTObjective:
    """Mean cross entropy over the tokens whose label is not -100."""

    name = "sft"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        y_BT = batch["labels"]
        # The vocabulary head runs on the labelled positions only: with assistant-only loss they are
        # often a small share of a packed row, and the head is a quarter of a small model's FLOPs.
        h_BTC = model(batch["input_ids"], segment_BT=batch["segment_ids"], hidden=True)
        labelled_BT = y_BT != IGNORE
        n = labelled_BT.sum()
        head = getattr(model, "module", model).head  # under DDP the wrapper holds the model
        logits_NV = head(h_BTC[labelled_BT])
        loss_sum = F.cross_entropy(logits_NV.float(), y_BT[labelled_BT], reduction="sum")
        loss = loss_sum / n.clamp(min=1)
        # tokens = real (non-padding) input tokens, as tok/s counts them in pretraining
        return loss, {"loss": loss.detach(), "tokens": (batch["segment_ids"] >= 0).sum()}


# ---- model, tokenizer and files -----------------------------------------------------------------

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


def model_files(llm: Any, base: Path) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json (chat template inside), chat_template.jinja and
    generation_config.json (EOS and end-of-turn ids), plus the HF config sidecar of imported models."""
    import tempfile

    tok = llm.tokenizer
    with tempfile.TemporaryDirectory() as d:
        tok.save(Path(d) / "tokenizer.json")
        files = {"tokenizer.json": (Path(d) / "tokenizer.json").read_bytes()}
    conf = tok.tokenizer_config()
    conf["model_max_length"] = llm.model.cfg.block_size
    base_dir = base if (base / "config.json").is_file() else None
    if base_dir is None:
        from lmforge.checkpoint import resolve_model_dir

        base_dir = resolve_model_dir(base)
    src_conf = base_dir / "tokenizer_config.json"
    if src_conf.is_file():  # keep the source's settings (tokenizer class, special tokens) and update the rest
        try:
            conf = {**json.loads(src_conf.read_text(encoding="utf-8")), **conf}
        except json.JSONDecodeError:
            pass
    files["tokenizer_config.json"] = json.dumps(conf, indent=2, ensure_ascii=False).encode()
    if tok.chat_template:
        files["chat_template.jinja"] = tok.chat_template.encode()
    stop = sorted(tok.stop_ids)
    gen: dict[str, Any] = {}
    src_gen = base_dir / "generation_config.json"
    if src_gen.is_file():
        try:
            gen = json.loads(src_gen.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            gen = {}
    if stop:
        gen["eos_token_id"] = stop if len(stop) > 1 else stop[0]
    if tok.pad_id is not None:
        gen["pad_token_id"] = tok.pad_id
    files["generation_config.json"] = json.dumps(gen, indent=2).encode()
    for name, src in (("hf_config.json", base_dir / "hf_config.json"), ("hf_config.json", base_dir / "config.json")):
        if src.is_file() and name not in files:
            files[name] = src.read_bytes()
    return files


def render_examples(examples: list[Any], tok: Any, loss_on: str, seq_len: int, long: str,
                    say: Any = None) -> list[tuple[list[int], list[int]]]:
    """Render, then truncate or drop examples over seq_len tokens (counted and reported)."""
    from lmforge.data.chat import render_plain, render_with_mask

    out, truncated, dropped, empty = [], 0, 0, 0
    for ex in examples:
        if tok.chat_template:
            ids, labels = render_with_mask(tok, ex.messages, loss_on)
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


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_task(cfg: SFTConfig, base: str | Path, data: Any, val_data: Any = None, say: Any = None) -> Any:
    from lmforge.data.chat import expand_paths, read_examples, split_examples
    from lmforge.infer.llm import LLM
    from lmforge.train import distributed as D
    from lmforge.train.job import TrainJob

    say = say or (lambda msg: print(f"lmforge finetune sft: {msg}", file=sys.stderr, flush=True))
    t, d = cfg.train, cfg.data
    base = Path(base)
    llm = LLM.load(base)
    if getattr(llm.model, "family", "decoder") != "decoder":
        raise LMForgeError(f"--base {base} is a {llm.model.family} model; SFT trains decoders")
    if llm.tokenizer is None:
        raise LMForgeError(f"--base {base} has no tokenizer (tokenizer.json); SFT needs one to render text")
    seq_len = t.seq_len or llm.model.cfg.block_size
    if seq_len > llm.model.cfg.block_size:
        raise LMForgeError(f"train.seq_len ({seq_len}) is longer than the model's context ({llm.model.cfg.block_size})")
    examples = read_examples(data)  # every line checked before anything is written or said
    paths = expand_paths(data)
    if val_data is not None:
        if d.val_fraction:
            raise LMForgeError("give either --val-data or --val-fraction, not both")
        val_examples = read_examples(val_data)
        paths += expand_paths(val_data)
    elif d.val_fraction:
        examples, val_examples = split_examples(examples, d.val_fraction, t.seed)
    else:
        val_examples = []
    notes = prepare_chat_model(llm, d.template)
    if D.rank() == 0:
        for note in notes:
            say(note)
    quiet = (lambda msg: None) if D.rank() != 0 else say
    train_rows = render_examples(examples, llm.tokenizer, t.loss_on, seq_len, d.long, quiet)
    val_rows = render_examples(val_examples, llm.tokenizer, t.loss_on, seq_len, d.long, None) if val_examples else []
    pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else (llm.tokenizer.eos_id or 0)
    per_step = t.grad_accum * D.world_size()
    source = PackedRows(train_rows, seq_len, t.micro_batch_size, per_step, t.seed, d.packing, pad)
    val_source = PackedRows(val_rows, seq_len, t.micro_batch_size, 1, t.seed, d.packing, pad, shuffle=False) \
        if val_rows else None
    model = llm.model
    resolved = {"train": dataclasses.asdict(t), "data": dataclasses.asdict(d),
                "model": dataclasses.asdict(model.cfg), "base": str(base)}
    resolved["train"]["seq_len"] = seq_len
    n_tok = sum(len(ids) for ids, _ in train_rows)
    if D.rank() == 0:
        say(f"{len(train_rows)} training examples ({n_tok:,} tokens, {source.rows_per_epoch()} rows of {seq_len} per "
            f"epoch{' packed' if d.packing else ''}), {len(val_rows)} validation examples")

    def build_model() -> torch.nn.Module:
        return model

    return TrainJob(
        name="sft", config=resolved, build_model=build_model, objective=SFTObjective(), train_batches=source,
        eval_batches=(lambda: val_source.all_batches(t.eval_iters)) if val_source else None,
        files=model_files(llm, base), data_fingerprint={"dir": str(data), "sha256": _fingerprint(paths)},
        flops_per_token=model.cfg.flops_per_token(seq_len) if hasattr(model.cfg, "flops_per_token") else None,
        description=f"global batch {t.micro_batch_size * per_step} rows x {seq_len} tokens")


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--truncate", action="store_true", help="cut examples longer than train.seq_len (default)")
    g.add_argument("--drop-long", action="store_true", help="drop examples longer than train.seq_len")


def build_config(args: argparse.Namespace, overrides: Sequence[str]) -> SFTConfig:
    from lmforge.config import deep_merge, from_dict
    from lmforge.finetune import layered_config

    layered = layered_config(args, overrides, SFT_DEFAULTS)
    if getattr(args, "drop_long", False):
        layered = deep_merge(layered, {"data": {"long": "drop"}})
    elif getattr(args, "truncate", False):
        layered = deep_merge(layered, {"data": {"long": "truncate"}})
    return from_dict(SFTConfig, layered)


def run(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
    from lmforge.train.loop import train_job

    cfg = build_config(args, overrides)
    task = build_task(cfg, args.base, args.data, args.val_data)
    return train_job(task, cfg.train, args.out, resume=args.resume, overwrite=args.overwrite)
