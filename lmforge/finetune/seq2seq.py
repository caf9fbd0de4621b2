"""Sequence-to-sequence fine-tuning: source text in, target text out.

    lmforge finetune seq2seq --base MODEL --data TRAIN --val-data VAL --out RUN
                             [--source-column C] [--target-column C] [--prefix "translate English to German: "]

Data: CSV / TSV / JSONL with a source and a target column (names configurable). An encoder-decoder
(T5, BART, an lmforge seq2seq run) reads `prefix + source` plus EOS and is trained with teacher
forcing on the target (decoder start token, then the target; loss on target tokens only). A
decoder-only model is trained on the same files as prompt + completion: `prefix + source` and a
newline as the prompt (no loss), the target and EOS as the completion. Sources and targets longer
than `data.max_source_length` / `data.max_target_length` (default: the model's context; for a
decoder the source gets half of it) are cut and counted. Every evaluation reports the validation loss and, on up to `generate.max_examples`
validation examples, BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score) and exact match of the
generated targets (greedy, or beam search with `generate.num_beams`); the last evaluation's
predictions go to RUN/eval_predictions.jsonl and its metrics to RUN/eval_metrics.json.

The run and every checkpoint record the format (generation_format.json: the prefix, and a decoder's
separator "\n"), so `LLM.generate`, `lmforge generate` and the server read a text prompt as a source
and return the generated target alone, exactly as `predict` does here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from lmforge.checkpoint import GENERATION_FORMAT
from lmforge.data.sampling import EvalCoverage, ExampleBatches, split_validation
from lmforge.data.table import data_fingerprint, read_table
from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.finetune.base_model import TOKENIZER_FILES, copied_files, load_base, pad_id_of
from lmforge.infer.prompt import GenerationFormat
from lmforge.train import distributed as D
from lmforge.train.adapters import LoRAConfig
from lmforge.train.config import TrainConfig
from lmforge.train.job import TrainJob

IGNORE = -100
EVAL_METRICS = "eval_metrics.json"
EVAL_PREDICTIONS = "eval_predictions.jsonl"



@dataclass
class Seq2SeqDataConfig:
    source_column: str = config_field("source", "column holding the source text")
    target_column: str = config_field("target", "column holding the target text")
    prefix: str = config_field("", "text put before every source (a T5 task prefix such as 'translate English to German: ')")
    max_source_length: Optional[int] = config_field(None, "source tokens (EOS included); longer ones are cut; default the context")
    max_target_length: Optional[int] = config_field(None, "target tokens (EOS included); longer ones are cut; default the context")
    val_fraction: float = config_field(0.0, "hold out this share of examples for validation when no --val-data is given")
    group_by_length: bool = config_field(True, "batch examples of similar length together (less padding; each epoch's "
                                     "order stays a seeded shuffle)")


@dataclass
class Seq2SeqGenerateConfig:
    max_new_tokens: int = config_field(128, "longest generated target at evaluation")
    num_beams: int = config_field(1, "beam search at evaluation (1 = greedy)")
    max_examples: int = config_field(200, "validation examples generated at every evaluation (0 = no generation metrics)")
    batch_size: int = config_field(32, "sources generated together")
    max_len_a: float = config_field(0.0, "with max_len_b: each output cut at a * source tokens + b tokens, a guard "
                               "against loops (fairseq's --max-len-a/--max-len-b; 0 = no cut)")
    max_len_b: int = config_field(0, "see max_len_a")


@dataclass
class Seq2SeqFinetuneConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: Seq2SeqDataConfig = field(default_factory=Seq2SeqDataConfig)
    generate: Seq2SeqGenerateConfig = field(default_factory=Seq2SeqGenerateConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = Seq2SeqFinetuneConfig  # `lmforge finetune seq2seq --help-config`
DEFAULTS = {"train": {"max_steps": 500, "lr": 5e-4, "warmup_steps": 50, "weight_decay": 0.01, "micro_batch_size": 16,
                      "eval_every": 100, "ckpt_every": 100, "eval_iters": 1000, "beta2": 0.999, "log_every": 10}}


# ---- data -------------------------------------------------------------------------------------

@dataclass
class Pair:
    source: str
    target: str
    where: str


def read_pairs(path: str | Path, source: str = "source", target: str = "target") -> list[Pair]:
    """(source, target) pairs of a CSV / TSV / JSONL file; errors name the file, line and column."""
    rows, columns = read_table(path)
    if not rows:
        raise LMForgeError(f"{path} holds no examples")
    for col in (source, target):
        if col not in columns:
            raise LMForgeError(f"{path}: no column '{col}'; columns present: {', '.join(columns) or 'none'} "
                               f"(choose others with --source-column / --target-column)")
    out = []
    for where, row in rows:
        s, t = row.get(source), row.get(target)
        for col, v in ((source, s), (target, t)):
            if not isinstance(v, str) or not v.strip():
                raise LMForgeError(f"{where}: empty {'source' if col == source else 'target'} in column '{col}'")
        out.append(Pair(s, t, where))
    return out


GROUP = 64  # with data.group_by_length: micro-batches per sorted chunk


def pair_batches(rows: list[tuple[list[int], list[int]]], collate: Any, micro_batch_size: int,
                 micro_batches_per_step: int, seed: int, shuffle: bool = True,
                 group_by_length: bool = False) -> ExampleBatches:
    """The loop's batch source of tokenized (source, target) pairs; `collate` takes a list of pairs.
    With group_by_length each epoch's permutation is cut into chunks of GROUP micro-batches, each
    chunk sorted by length, and the micro-batches shuffled: little padding, still a seeded shuffle."""
    def by_length(order: list[int], g: torch.Generator) -> list[int]:
        size = micro_batch_size * GROUP
        blocks = []
        for i in range(0, len(order), size):
            chunk = sorted(order[i:i + size], key=lambda r: len(rows[r][0]) + len(rows[r][1]))
            blocks += [chunk[j:j + micro_batch_size] for j in range(0, len(chunk), micro_batch_size)]
        return [r for k in torch.randperm(len(blocks), generator=g).tolist() for r in blocks[k]]

    return ExampleBatches(len(rows), lambda idx: collate([rows[i] for i in idx]), micro_batch_size,
                          micro_batches_per_step, seed, shuffle, arrange=by_length if group_by_length else None)


def decoder_collate(pad_id: int):
    """Decoder-only rows: prompt + completion in one sequence, loss on the completion only."""
    def collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        T = max(len(s) + len(t) for s, t in rows) - 1
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for i, (s, t) in enumerate(rows):
            seq = s + t
            x[i, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[i, len(s) - 1:len(seq) - 1] = torch.tensor(t)
        return {"input_ids": x, "labels": y}
    return collate


class DecoderCompletionObjective:
    """Cross entropy of the completion (target) tokens of prompt + completion rows. Stats: acc, tokens."""

    name = "seq2seq"
    loss_label = "cross entropy (nats/target token)"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["input_ids"])  # right padding: causal attention never reads it
        y = batch["labels"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        sel = y != IGNORE
        acc = (logits.argmax(-1)[sel] == y[sel]).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach(), "tokens": sel.sum()}


# ---- task -------------------------------------------------------------------------------------

def build_job(cfg: Seq2SeqFinetuneConfig, args: Any, llm: Any = None) -> TrainJob:
    """The seq2seq TrainJob; `llm` (default: loaded from args.base) is the model to train (lmforge
    distill passes its student)."""
    from lmforge.eval.generation import generation_metrics
    from lmforge.finetune.scaffold import say
    from lmforge.train.denoise import Seq2SeqLMObjective, collate

    t, d, g = cfg.train, cfg.data, cfg.generate
    base, data = Path(args.base), args.data
    llm = llm or load_base(base, "seq2seq", needs="generate", trains="seq2seq and decoder models")
    model, tok = llm.model, llm.tokenizer
    # A decoder reads source and target in one context (a prompt it continues); an encoder-decoder
    # encodes the source and generates the target on its own.
    in_context = "continue" in llm.tasks
    examples = read_pairs(data, d.source_column, d.target_column)
    paths = [Path(data)]
    val_examples = None
    if getattr(args, "val_data", None) is not None:
        val_examples = read_pairs(args.val_data, d.source_column, d.target_column)
        paths.append(Path(args.val_data))
    examples, val_examples = split_validation(examples, val_examples, d.val_fraction, t.seed)

    ctx = int(model.cfg.block_size)
    if in_context:
        eos = tok.eos_id
        if eos is None:
            raise LMForgeError(f"the tokenizer of {base} has no end-of-text token to end targets with")
    else:
        eos = model.cfg.eos_id
        if tok.eos_id is not None and tok.eos_id != eos:
            raise LMForgeError(f"the tokenizer's EOS id ({tok.eos_id}) is not the model's ({eos})")
    # a decoder reads source and target in one context: by default the source gets half of it
    max_src = d.max_source_length or (ctx // 2 if in_context else ctx)
    max_tgt = d.max_target_length or ctx
    cut = {"source": 0, "target": 0}
    # a decoder's target follows its source after a newline; an encoder-decoder's source ends with EOS
    fmt = GenerationFormat(prefix=d.prefix, separator="\n" if in_context else "")

    def encode_source(text: str) -> list[int]:
        ids = fmt.encode(tok, text)
        if not in_context and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        if len(ids) > max_src:
            cut["source"] += 1
            ids = ids[:max_src - 1] + [ids[-1]]
        return ids

    def encode_pair(p: Pair) -> tuple[list[int], list[int]]:
        s = encode_source(p.source)
        tgt = tok.encode(p.target) + [eos]
        room = min(max_tgt, ctx + 1 - len(s)) if in_context else max_tgt
        if room < 2:
            raise LMForgeError(f"{p.where}: the source fills the model's context ({ctx} tokens); "
                               "lower data.max_source_length")
        if len(tgt) > room:
            cut["target"] += 1
            tgt = tgt[:room - 1] + [eos]
        return s, tgt

    rows = [encode_pair(p) for p in examples]
    n_cut_train = dict(cut)
    vrows = [encode_pair(p) for p in val_examples]
    if any(cut.values()):
        say("seq2seq", f"truncated {n_cut_train['source']} training and {cut['source'] - n_cut_train['source']} "
                       f"validation sources longer than {max_src} tokens, {n_cut_train['target']} training and "
                       f"{cut['target'] - n_cut_train['target']} validation targets longer than {max_tgt}")
    per_step = t.grad_accum * D.world_size()
    if in_context:
        pad = pad_id_of(tok)
        coll = decoder_collate(pad)
        objective: Any = DecoderCompletionObjective()
    else:
        pad, start = model.cfg.pad_id, model.cfg.decoder_start_id
        coll = lambda rs: collate(rs, pad, start)  # noqa: E731
        objective = Seq2SeqLMObjective()
    source = pair_batches(rows, coll, t.micro_batch_size, per_step, t.seed, group_by_length=d.group_by_length)
    val_source = pair_batches(vrows, coll, t.micro_batch_size, 1, t.seed, shuffle=False) if vrows else None
    say("seq2seq", f"{len(examples)} training pairs, {len(val_examples)} validation ({llm.family.name} model, "
                   f"columns '{d.source_column}' -> '{d.target_column}')")
    out = Path(args.out)
    gen_examples = val_examples[:g.max_examples]
    gen_coverage = EvalCoverage(len(gen_examples), len(val_examples), "examples")  # generation metrics read these
    gen_sources = [encode_source(p.source) for p in gen_examples]

    def evaluate(live: torch.nn.Module) -> dict[str, Any]:
        preds = predict(live, tok, gen_sources, eos, pad, g, progress=t.progress)
        res = {**generation_metrics(preds, [p.target for p in gen_examples]), **gen_coverage.labels("generation")}
        from lmforge.checkpoint import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / EVAL_METRICS, json.dumps(res, indent=2))
        atomic_write_text(out / EVAL_PREDICTIONS, "".join(
            json.dumps({"source": p.source, "target": p.target, "prediction": y}, ensure_ascii=False) + "\n"
            for p, y in zip(gen_examples, preds)))
        return res

    resolved = {**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model.cfg), "base": str(base)}
    return TrainJob(
        name="seq2seq", config=resolved, build_model=lambda: model, objective=objective, train_batches=source,
        eval_batches=(lambda: val_source.all_batches(t.eval_iters)) if val_source else None,
        eval_coverage=val_source.coverage(t.eval_iters) if val_source else None,
        evaluate=evaluate if gen_examples else None,
        files={**copied_files(base, TOKENIZER_FILES + ("generation_config.json",)),
               GENERATION_FORMAT: fmt.to_json().encode()},
        data_fingerprint={"dir": str(data), "sha256": data_fingerprint(paths)}, report_perplexity=False,
        description=f"global batch {t.micro_batch_size * per_step} pairs")


@torch.no_grad()
def predict(model: torch.nn.Module, tok: Any, sources: list[list[int]], eos: int, pad: int,
            g: Seq2SeqGenerateConfig, progress: bool = False) -> list[str]:
    """Generated target texts for token-id sources (greedy or beam search), in batches: an
    encoder-decoder's target, or a decoder's continuation of the source; what `LLM.generate` returns
    for the same sources of a run with their generation format. With `progress`, a bar on stderr once
    generating takes a while."""
    from tqdm import tqdm

    from lmforge.models.registry import CONTINUE, family_of
    from lmforge.train.loop import EVAL_BAR_DELAY
    from lmforge.infer.generate import generate
    from lmforge.infer.beam import beam_search_decoder
    from lmforge.infer.seq2seq import generate_seq2seq

    model = getattr(model, "module", model)
    in_context = CONTINUE in family_of(model).tasks(model.cfg)
    out: list[str] = []
    for i in tqdm(range(0, len(sources), g.batch_size), desc="eval: generating", unit="batch", file=sys.stderr,
                  dynamic_ncols=True, leave=False, delay=EVAL_BAR_DELAY, disable=not progress):
        chunk = sources[i:i + g.batch_size]
        n = g.max_new_tokens
        if g.max_len_a > 0:  # fairseq's rule: no search past the batch's longest budget (each output is cut below)
            n = max(1, min(n, max(int(g.max_len_a * len(s) + g.max_len_b) for s in chunk)))
        if not in_context:
            gens = generate_seq2seq(model, chunk, max_new_tokens=n, temperature=0, num_beams=g.num_beams, tokenizer=tok)
        elif g.num_beams > 1:
            gens = beam_search_decoder(model, chunk, max_new_tokens=n, num_beams=g.num_beams, eos_id=eos, pad_id=pad,
                                       tokenizer=tok)
        else:
            n = min(n, int(model.cfg.block_size) - max(len(s) for s in chunk))
            gens = generate(model, chunk, max_new_tokens=max(n, 1), temperature=0, eos_id=eos, pad_id=pad,
                            tokenizer=tok)
        if g.max_len_a > 0:  # greedy: cutting the output = stopping at the budget; beams: the best beam, cut
            out += [tok.decode(x.ids[:int(g.max_len_a * len(src) + g.max_len_b)], skip_special=not in_context)
                    for x, src in zip(gens, chunk)]
        else:
            out += [x.text if x.text is not None else tok.decode(x.ids) for x in gens]
    return out


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-column", help="column holding the source (default source)")
    p.add_argument("--target-column", help="column holding the target (default target)")
    p.add_argument("--prefix", help="text put before every source, e.g. 'translate English to German: '")


FLAG_KEYS = {"source_column": "data.source_column", "target_column": "data.target_column", "prefix": "data.prefix"}


def final_metrics(out: Path) -> dict[str, Any]:
    """The last evaluation's generation metrics, for the run summary."""
    metrics = out / EVAL_METRICS
    return json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}
