"""Classification fine-tuning: train an encoder (or a decoder) to label texts.

    lmforge finetune classify --base MODEL --data TRAIN --val-data VAL --out RUN
                              [--text-column C] [--text-pair-column C] [--label-column C] [--section.key V ...]

Data: CSV / TSV / JSONL with a text column (and an optional text-pair column) and a label column
(strings or ints). Labels are mapped to ids in a stable order and stored with the model (`labels`
of an encoder, `id2label` of a decoder classifier). Encoders classify their [CLS] / pooled state
(BERT's pooler, RoBERTa / ModernBERT heads; `--model.pooling mean` for mean pooling); decoders
read the last real token (models/heads.py, as GPT2ForSequenceClassification). A longformer encoder
reads [CLS] globally (`--model.global_attention question`: the first text of each pair). Every eval writes
accuracy, macro-F1 and per-class figures to metrics.jsonl, the full set (with the confusion
matrix) to RUN/eval_metrics.json and a plot to RUN/confusion_matrix.png. Texts longer than the
context are truncated and counted. Runs in the one training loop (resume, accumulation, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.data.labeled import decoder_rows
from lmforge.data.sampling import ExampleBatches, split_validation
from lmforge.data.table import data_fingerprint
from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.finetune.base_model import TOKENIZER_FILES, copied_files, load_base, pad_id_of
from lmforge.models.encoder import global_attention_mask
from lmforge.train import distributed as D
from lmforge.train.adapters import LoRAConfig
from lmforge.train.config import TrainConfig
from lmforge.train.job import TrainJob

EVAL_METRICS = "eval_metrics.json"
CONFUSION_PNG = "confusion_matrix.png"



@dataclass
class ClassifyDataConfig:
    text_column: str = config_field("text", "column holding the text")
    text_pair_column: str = config_field("text_pair", "column holding the second text of a pair (used when present)")
    label_column: str = config_field("label", "column holding the label (string or int)")
    val_fraction: float = config_field(0.0, "hold out this share of examples for validation when no --val-data is given")
    max_length: Optional[int] = config_field(None, "tokens per example (longer ones are truncated); default the model's context")


@dataclass
class ClassifyModelConfig:
    pooling: Optional[Literal["cls", "mean"]] = config_field(None, "encoders: what the head reads; default the model's own (cls; a sentence-transformers folder's pooling)")
    dropout: Optional[float] = config_field(None, "encoders: dropout while fine-tuning; default the model's own")
    global_attention: Optional[Literal["cls", "question"]] = config_field(None, "longformer encoders: global tokens: cls (default) | question (the first text of a pair)")


@dataclass
class ClassifyConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = ClassifyConfig  # `lmforge finetune classify --help-config`
HEAD_MODULES = ("score", "cls_transform", "classifier")  # the families' classification heads: trained in full under LoRA
# Fine-tuning a pretrained encoder: BERT paper's range (lr 2e-5..5e-5, warmup, weight decay 0.01).
DEFAULTS = {"train": {"max_steps": 300, "lr": 5e-5, "warmup_steps": 30, "weight_decay": 0.01, "micro_batch_size": 16,
                      "eval_every": 100, "ckpt_every": 100, "eval_iters": 1000, "beta2": 0.999, "log_every": 10}}


# ---- rows -------------------------------------------------------------------------------------

def read_texts(path: str | Path) -> list[str]:
    """Texts to classify / embed: one per line, or the "text" field of a .jsonl / column of a .csv/.tsv."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        from lmforge.data.labeled import read_labeled

        return [e.text for e in read_labeled(p, need_label=False, pair=None)]
    if not p.is_file():
        raise LMForgeError(f"file not found: {p}")
    try:
        return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise LMForgeError(f"{p} is not UTF-8 text") from None


def labeled_batch(ids: Sequence[list[int]], types: Optional[Sequence[list[int]]], labels: Sequence[int],
                  rows: list[int], pad_id: int, max_len: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The micro-batch of examples `rows`: right-padded ids, attention mask, labels, and the token types
    when the model's tokenizer makes them (encoders)."""
    T = max(len(ids[i]) for i in rows)
    if max_len:  # a few distinct widths: kernels (oneDNN) are set up once per shape
        T = min(-(-T // 16) * 16, max_len)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    tt = torch.zeros((B, T), dtype=torch.long)
    m = torch.zeros((B, T), dtype=torch.bool)
    for b, i in enumerate(rows):
        n = len(ids[i])
        x[b, :n] = torch.tensor(ids[i])
        if types is not None:
            tt[b, :n] = torch.tensor(types[i])
        m[b, :n] = True
    batch = {"input_ids": x, "attention_mask": m, "labels": torch.tensor([labels[i] for i in rows], dtype=torch.long)}
    if types is not None:
        batch["token_type_ids"] = tt
    return batch


def classifier_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, num_labels): every classifier takes ids and a padding mask, encoders token types too (and a
    longformer its global tokens)."""
    extra = {"token_type_BT": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    if "global_attention_mask" in batch:
        extra["global_mask_BT"] = batch["global_attention_mask"]
    return model(batch["input_ids"], pad_mask_BT=batch["attention_mask"], **extra)


class ClassifyObjective:
    """Cross entropy over classes (mean over the micro-batch); stats: acc, tokens."""

    name = "classify"
    loss_label = "cross entropy (nats/example)"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits = classifier_logits(model, batch).float()
        y = batch["labels"]
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach(), "tokens": batch["attention_mask"].sum()}


# ---- task -------------------------------------------------------------------------------------

def build_job(cfg: ClassifyConfig, args: Any, llm: Any = None) -> TrainJob:
    """The classification TrainJob; `llm` (default: loaded from args.base) is the model to train
    (lmforge distill passes its student)."""
    from lmforge.data.labeled import label_ids, label_set, read_labeled
    from lmforge.eval.classification import classification_metrics, plot_confusion
    from lmforge.finetune.scaffold import say

    t, d, m = cfg.train, cfg.data, cfg.model
    base, data = Path(args.base), args.data
    llm = llm or load_base(base, "classify")
    family = llm.family
    if family.as_classifier is None:
        raise LMForgeError(f"--base {base} is a {family.name} model, which lmforge finetune classify cannot turn "
                           "into a classifier (it trains encoders and decoders)")
    cols = dict(text=d.text_column, pair=d.text_pair_column, label=d.label_column)
    examples = read_labeled(data, **cols)
    paths = [Path(data)]
    val_examples = None
    if getattr(args, "val_data", None) is not None:
        val_examples = read_labeled(args.val_data, **cols)
        paths.append(Path(args.val_data))
    examples, val_examples = split_validation(examples, val_examples, d.val_fraction, t.seed)
    labels = label_set(examples)
    if len(labels) < 2:
        raise LMForgeError(f"{data}: the training data has {len(labels)} label(s) ({', '.join(labels)}); "
                           "classification needs at least 2")
    y_train = label_ids(examples, labels)
    y_val = label_ids(val_examples, labels)  # an unknown label at eval is an error naming it

    # the model: the base body with a fresh classification head for these labels
    pooling = m.pooling
    read_as = getattr(llm.model, "sentence_pooling", None)
    if pooling is None and read_as:
        # a sentence-transformers model was trained to be read through its own pooling (mean for
        # the MiniLM / MPNet models); its BERT pooler took no part in that training
        pooling = read_as["pooling"]
        say("classify", f"classifier reads the {pooling}-pooled hidden states, as the sentence-transformers "
                        "model does (--model.pooling cls for the BERT pooler)")
    with _seeded(t.seed):
        model = family.as_classifier(llm.model, labels, pooling=pooling, dropout=m.dropout)
    limit = d.max_length or family.max_tokens(model.cfg)
    if m.global_attention is not None and getattr(model.cfg, "attention", None) != "longformer":
        raise LMForgeError(f"--model.global_attention is for longformer encoders; --base {base} is not one")
    model.train()

    def encode(exs: list[Any]) -> tuple[list[list[int]], Optional[list[list[int]]], int]:
        texts = [e.text for e in exs]
        pairs = [e.pair for e in exs] if any(e.pair for e in exs) else None
        if family.encoder_tokenizer:  # [CLS] a [SEP] b [SEP] with token types
            return llm.tokenizer.encode_pairs(texts, pairs, limit)
        idx, mask, cut = decoder_rows(llm.tokenizer, texts, pairs, limit)
        return [row[:int(k)].tolist() for row, k in zip(idx, mask.sum(1))], None, cut

    ids, types, cut = encode(examples)
    vids, vtypes, vcut = encode(val_examples) if val_examples else ([], None, 0)
    if cut or vcut:
        say("classify", f"truncated {cut} training and {vcut} validation texts longer than {limit} tokens")
    pad = pad_id_of(llm.tokenizer)
    per_step = t.grad_accum * D.world_size()
    def batch_of(ids_: Sequence[list[int]], types_: Any, ys: Sequence[int], rows: list[int]) -> dict[str, torch.Tensor]:
        batch = labeled_batch(ids_, types_, ys, rows, pad, limit)
        if m.global_attention is not None:
            batch["global_attention_mask"] = global_attention_mask(batch["input_ids"], m.global_attention,
                                                                   llm.tokenizer.sep_id)
        return batch

    source = ExampleBatches(len(ids), lambda rows: batch_of(ids, types, y_train, rows), t.micro_batch_size, per_step,
                            t.seed)
    val_source = ExampleBatches(len(vids), lambda rows: batch_of(vids, vtypes, y_val, rows), t.micro_batch_size, 1,
                                t.seed, shuffle=False) if vids else None
    counts = {n: y_train.count(i) for i, n in enumerate(labels)}
    say("classify", f"{len(examples)} training examples, {len(val_examples)} validation; labels "
                    + ", ".join(f"{n} ({c})" for n, c in counts.items()))
    out = Path(args.out)

    def evaluate(live: torch.nn.Module) -> dict[str, Any]:
        preds: list[int] = []
        with torch.no_grad():
            for b in val_source.all_batches():
                dev = next(live.parameters()).device
                preds += classifier_logits(live, {k: v.to(dev) for k, v in b.items()}).argmax(-1).tolist()
        res = classification_metrics(y_val, preds, labels)
        from lmforge.checkpoint import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / EVAL_METRICS, json.dumps(res, indent=2))
        plot_confusion(res, out / CONFUSION_PNG)
        row = {"accuracy": res["accuracy"], "macro_f1": res["macro_f1"]}
        for n, pc in res["per_class"].items():
            row[f"precision/{n}"], row[f"recall/{n}"] = pc["precision"], pc["recall"]
        return row

    resolved = {**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.cfg), "base": str(base),
                "labels": labels}
    return TrainJob(
        name="classify", config=resolved, build_model=lambda: model, objective=ClassifyObjective(),
        train_batches=source, eval_batches=(lambda: val_source.all_batches(t.eval_iters)) if val_source else None,
        eval_coverage=val_source.coverage(t.eval_iters) if val_source else None,
        evaluate=evaluate if val_source else None,
        files=copied_files(base, TOKENIZER_FILES + ("vocab.txt",)),
        data_fingerprint={"dir": str(data), "sha256": data_fingerprint(paths)}, report_perplexity=False,
        description=f"global batch {t.micro_batch_size * per_step} examples, {len(labels)} labels",
        head_modules=tuple(n for n in HEAD_MODULES if getattr(model, n, None) is not None))


@contextlib.contextmanager
def _seeded(seed: int):
    """A fresh head initialised from train.seed, whatever the process's global RNG holds (two runs
    in one Python process, or two seeds, must not share or differ by accident)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", help="column holding the text (default text)")
    p.add_argument("--text-pair-column", help="column holding the second text of a pair (default text_pair)")
    p.add_argument("--label-column", help="column holding the label (default label)")


FLAG_KEYS = {"text_column": "data.text_column", "text_pair_column": "data.text_pair_column",
             "label_column": "data.label_column"}


def final_metrics(out: Path) -> dict[str, Any]:
    """The last evaluation's accuracy and macro-F1, for the run summary."""
    metrics = out / EVAL_METRICS
    if not metrics.is_file():
        return {}
    res = json.loads(metrics.read_text(encoding="utf-8"))
    return {"accuracy": res["accuracy"], "macro_f1": res["macro_f1"]}
