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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.train.config import TrainConfig

IGNORE = -100
EVAL_METRICS = "eval_metrics.json"
EVAL_PREDICTIONS = "eval_predictions.jsonl"


def _h(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class Seq2SeqDataConfig:
    source_column: str = _h("source", "column holding the source text")
    target_column: str = _h("target", "column holding the target text")
    prefix: str = _h("", "text put before every source (a T5 task prefix such as 'translate English to German: ')")
    max_source_length: Optional[int] = _h(None, "source tokens (EOS included); longer ones are cut; default the context")
    max_target_length: Optional[int] = _h(None, "target tokens (EOS included); longer ones are cut; default the context")
    val_fraction: float = _h(0.0, "hold out this share of examples for validation when no --val-data is given")
    group_by_length: bool = _h(True, "batch examples of similar length together (less padding; each epoch's "
                                     "order stays a seeded shuffle)")


@dataclass
class Seq2SeqGenerateConfig:
    max_new_tokens: int = _h(128, "longest generated target at evaluation")
    num_beams: int = _h(1, "beam search at evaluation (1 = greedy)")
    max_examples: int = _h(200, "validation examples generated at every evaluation (0 = no generation metrics)")
    batch_size: int = _h(32, "sources generated together")
    max_len_a: float = _h(0.0, "with max_len_b: each output cut at a * source tokens + b tokens, a guard "
                               "against loops (fairseq's --max-len-a/--max-len-b; 0 = no cut)")
    max_len_b: int = _h(0, "see max_len_a")


@dataclass
class Seq2SeqFinetuneConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: Seq2SeqDataConfig = field(default_factory=Seq2SeqDataConfig)
    generate: Seq2SeqGenerateConfig = field(default_factory=Seq2SeqGenerateConfig)


DEFAULTS = {"train": {"max_steps": 500, "lr": 5e-4, "warmup_steps": 50, "weight_decay": 0.01, "micro_batch_size": 16,
                      "eval_every": 100, "ckpt_every": 100, "eval_iters": 20, "beta2": 0.999, "log_every": 10}}


# ---- data -------------------------------------------------------------------------------------

@dataclass
class Pair:
    source: str
    target: str
    where: str


def read_pairs(path: str | Path, source: str = "source", target: str = "target") -> list[Pair]:
    """(source, target) pairs of a CSV / TSV / JSONL file; errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json"):
        raise LMForgeError(f"{path}: unsupported format '{suffix}'; use .csv, .tsv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LMForgeError(f"{path} is not UTF-8 text") from None
    rows: list[tuple[int, dict]] = []
    columns: dict[str, None] = {}
    if suffix in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LMForgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise LMForgeError(f"{path}:{n}: each line must be a JSON object")
            columns.update(dict.fromkeys(obj))
            rows.append((n, obj))
    else:
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = dict.fromkeys(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise LMForgeError(f"{path} holds no examples")
    for col in (source, target):
        if col not in columns:
            raise LMForgeError(f"{path}: no column '{col}'; columns present: {', '.join(columns) or 'none'} "
                               f"(choose others with --source-column / --target-column)")
    out = []
    for n, row in rows:
        s, t = row.get(source), row.get(target)
        for col, v in ((source, s), (target, t)):
            if not isinstance(v, str) or not v.strip():
                raise LMForgeError(f"{path}:{n}: empty {'source' if col == source else 'target'} in column '{col}'")
        out.append(Pair(s, t, f"{path}:{n}"))
    return out


class PairRows:
    """Tokenized (source, target) pairs in deterministic epochs: epoch e is a permutation seeded by
    (seed, e) and micro-batch (step, index) reads rows (step * per_step + index) * mb ..., so resume is exact."""

    GROUP = 64  # with group_by_length: micro-batches per sorted chunk

    def __init__(self, rows: list[tuple[list[int], list[int]]], collate: Any, micro_batch_size: int,
                 micro_batches_per_step: int, seed: int, shuffle: bool = True, group_by_length: bool = False):
        if not rows:
            raise LMForgeError("no training examples")
        self.rows, self.collate, self.mb, self.per_step, self.seed, self.shuffle = (
            rows, collate, micro_batch_size, micro_batches_per_step, seed, shuffle)
        self.group = group_by_length
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.rows), generator=g).tolist()
                if self.group:
                    # sort chunks of GROUP micro-batches by length, then shuffle the micro-batches
                    size = self.mb * self.GROUP
                    blocks = []
                    for i in range(0, len(order), size):
                        chunk = sorted(order[i:i + size], key=lambda r: len(self.rows[r][0]) + len(self.rows[r][1]))
                        blocks += [chunk[j:j + self.mb] for j in range(0, len(chunk), self.mb)]
                    order = [r for k in torch.randperm(len(blocks), generator=g).tolist() for r in blocks[k]]
                self._perm = (epoch, order)
            else:
                self._perm = (epoch, list(range(len(self.rows))))
        return self._perm[1]

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        n = len(self.rows)
        g0 = (step * self.per_step + index) * self.mb
        return self.collate([self.rows[self._order(g // n)[g % n]] for g in range(g0, g0 + self.mb)])

    def all_batches(self) -> list[dict[str, torch.Tensor]]:
        return [self.collate(self.rows[i:i + self.mb]) for i in range(0, len(self.rows), self.mb)]


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
    name = "seq2seq"

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        logits = model(batch["input_ids"])  # right padding: causal attention never reads it
        y = batch["labels"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        sel = y != IGNORE
        acc = (logits.argmax(-1)[sel] == y[sel]).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach(), "tokens": sel.sum()}


# ---- task -------------------------------------------------------------------------------------

def build_task(cfg: Seq2SeqFinetuneConfig, base: str | Path, data: str, val_data: Optional[str], out: str | Path,
               say: Any = None):
    from lmforge.eval.generation import generation_metrics
    from lmforge.infer.llm import LLM
    from lmforge.train import distributed as D
    from lmforge.train.denoise import Seq2SeqLMObjective, collate
    from lmforge.train.job import TrainJob

    say = say or (lambda msg: print(f"lmforge finetune seq2seq: {msg}", file=sys.stderr, flush=True))
    quiet = say if D.rank() == 0 else (lambda msg: None)
    t, d, g = cfg.train, cfg.data, cfg.generate
    base = Path(base)
    llm = LLM.load(base)
    model = llm.model
    family = getattr(model, "family", "decoder")
    if family not in ("seq2seq", "decoder"):
        raise LMForgeError(f"--base {base} is a {family} model; seq2seq fine-tunes encoder-decoders and decoders")
    tok = llm.tokenizer
    if tok is None:
        raise LMForgeError(f"--base {base} has no tokenizer (tokenizer.json); seq2seq fine-tuning reads text")
    examples = read_pairs(data, d.source_column, d.target_column)
    paths = [Path(data)]
    if val_data is not None:
        if d.val_fraction:
            raise LMForgeError("give either --val-data or --val-fraction, not both")
        val_examples = read_pairs(val_data, d.source_column, d.target_column)
        paths.append(Path(val_data))
    elif d.val_fraction:
        if not 0 < d.val_fraction < 1:
            raise LMForgeError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(t.seed)).tolist()
        k = max(1, round(len(examples) * d.val_fraction))
        val_examples, examples = [examples[i] for i in order[:k]], [examples[i] for i in order[k:]]
    else:
        val_examples = []

    ctx = int(model.cfg.block_size)
    if family == "seq2seq":
        eos = model.cfg.eos_id
        if tok.eos_id is not None and tok.eos_id != eos:
            raise LMForgeError(f"the tokenizer's EOS id ({tok.eos_id}) is not the model's ({eos})")
    else:
        eos = tok.eos_id
        if eos is None:
            raise LMForgeError(f"the tokenizer of {base} has no end-of-text token to end targets with")
    # a decoder reads source and target in one context: by default the source gets half of it
    max_src = d.max_source_length or (ctx if family == "seq2seq" else ctx // 2)
    max_tgt = d.max_target_length or ctx
    cut = {"source": 0, "target": 0}

    def encode_source(text: str) -> list[int]:
        ids = tok.encode(d.prefix + text)
        if family == "decoder":
            ids = ids + tok.encode("\n")
        elif not ids or ids[-1] != eos:
            ids = ids + [eos]
        if len(ids) > max_src:
            cut["source"] += 1
            ids = ids[:max_src - 1] + [ids[-1]]
        return ids

    def encode_pair(p: Pair) -> tuple[list[int], list[int]]:
        s = encode_source(p.source)
        tgt = tok.encode(p.target) + [eos]
        room = max_tgt if family == "seq2seq" else min(max_tgt, ctx + 1 - len(s))
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
        quiet(f"truncated {n_cut_train['source']} training and {cut['source'] - n_cut_train['source']} validation "
              f"sources longer than {max_src} tokens, {n_cut_train['target']} training and "
              f"{cut['target'] - n_cut_train['target']} validation targets longer than {max_tgt}")
    per_step = t.grad_accum * D.world_size()
    if family == "seq2seq":
        pad, start = model.cfg.pad_id, model.cfg.decoder_start_id
        coll = lambda rs: collate(rs, pad, start)  # noqa: E731
        objective: Any = Seq2SeqLMObjective()
    else:
        pad = tok.pad_id if tok.pad_id is not None else eos
        coll = decoder_collate(pad)
        objective = DecoderCompletionObjective()
    source = PairRows(rows, coll, t.micro_batch_size, per_step, t.seed, group_by_length=d.group_by_length)
    val_source = PairRows(vrows, coll, t.micro_batch_size, 1, t.seed, shuffle=False) if vrows else None
    quiet(f"{len(examples)} training pairs, {len(val_examples)} validation ({family} model, "
          f"columns '{d.source_column}' -> '{d.target_column}')")
    out = Path(out)
    gen_examples = val_examples[:g.max_examples]
    gen_sources = [encode_source(p.source) for p in gen_examples]

    def evaluate(live: torch.nn.Module) -> dict[str, Any]:
        preds = predict(live, tok, gen_sources, family, eos, pad, g)
        res = generation_metrics(preds, [p.target for p in gen_examples])
        from lmforge.checkpoint import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / EVAL_METRICS, json.dumps(res, indent=2))
        atomic_write_text(out / EVAL_PREDICTIONS, "".join(
            json.dumps({"source": p.source, "target": p.target, "prediction": y}, ensure_ascii=False) + "\n"
            for p, y in zip(gen_examples, preds)))
        return res

    resolved = {"train": dataclasses.asdict(t), "data": dataclasses.asdict(d), "generate": dataclasses.asdict(g),
                "model_config": dataclasses.asdict(model.cfg), "base": str(base)}
    model.train()
    return TrainJob(
        name="seq2seq", config=resolved, build_model=lambda: model, objective=objective, train_batches=source,
        eval_batches=(lambda: val_source.all_batches()[:t.eval_iters]) if val_source else None,
        evaluate=evaluate if gen_examples else None, files=_base_files(base),
        data_fingerprint={"dir": str(data), "sha256": _fingerprint(paths)}, report_perplexity=False,
        description=f"global batch {t.micro_batch_size * per_step} pairs")


@torch.no_grad()
def predict(model: torch.nn.Module, tok: Any, sources: list[list[int]], family: str, eos: int, pad: int,
            g: Seq2SeqGenerateConfig) -> list[str]:
    """Generated target texts for token-id sources (greedy or beam search), in batches."""
    from lmforge.infer.generate import generate
    from lmforge.infer.beam import beam_search_decoder
    from lmforge.infer.seq2seq import generate_seq2seq

    model = getattr(model, "module", model)
    out: list[str] = []
    for i in range(0, len(sources), g.batch_size):
        chunk = sources[i:i + g.batch_size]
        n = g.max_new_tokens
        if g.max_len_a > 0:  # fairseq's rule: no search past the batch's longest budget (each output is cut below)
            n = max(1, min(n, max(int(g.max_len_a * len(s) + g.max_len_b) for s in chunk)))
        if family == "seq2seq":
            gens = generate_seq2seq(model, chunk, max_new_tokens=n, temperature=0, num_beams=g.num_beams, tokenizer=tok)
        elif g.num_beams > 1:
            gens = beam_search_decoder(model, chunk, max_new_tokens=n, num_beams=g.num_beams, eos_id=eos, pad_id=pad,
                                       tokenizer=tok)
        else:
            n = min(n, int(model.cfg.block_size) - max(len(s) for s in chunk))
            gens = generate(model, chunk, max_new_tokens=max(n, 1), temperature=0, eos_id=eos, pad_id=pad,
                            tokenizer=tok)
        if g.max_len_a > 0:  # greedy: cutting the output = stopping at the budget; beams: the best beam, cut
            out += [tok.decode(x.ids[:int(g.max_len_a * len(src) + g.max_len_b)], skip_special=family == "seq2seq")
                    for x, src in zip(gens, chunk)]
        else:
            out += [x.text if x.text is not None else tok.decode(x.ids) for x in gens]
    return [s.strip() for s in out]


def _fingerprint(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def _base_files(base: Path) -> dict[str, bytes]:
    """Tokenizer files (and the HF config sidecar) that travel with the fine-tuned model."""
    from lmforge.checkpoint import resolve_model_dir

    d = base if (base / "config.json").is_file() else resolve_model_dir(base)
    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "hf_config.json"):
        if (d / name).is_file():
            files[name] = (d / name).read_bytes()
    if "hf_config.json" not in files and (d / "config.json").is_file():
        files["hf_config.json"] = (d / "config.json").read_bytes()
    return files


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-column", help="column holding the source (default source)")
    p.add_argument("--target-column", help="column holding the target (default target)")
    p.add_argument("--prefix", help="text put before every source, e.g. 'translate English to German: '")


def build_config(args: argparse.Namespace, overrides: Sequence[str]) -> Seq2SeqFinetuneConfig:
    from lmforge.config import from_dict
    from lmforge.finetune import layered_config

    layered = layered_config(args, overrides, DEFAULTS, sections=("train", "data", "generate"),
                             data_flags=("source_column", "target_column", "prefix"))
    return from_dict(Seq2SeqFinetuneConfig, layered)


def run(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, Any]:
    from lmforge.train.loop import train_job

    cfg = build_config(args, overrides)
    task = build_task(cfg, args.base, args.data, args.val_data, args.out)
    summary = train_job(task, cfg.train, args.out, resume=args.resume, overwrite=args.overwrite)
    metrics = Path(args.out) / EVAL_METRICS
    if metrics.is_file():
        summary.update(json.loads(metrics.read_text(encoding="utf-8")))
    return summary
