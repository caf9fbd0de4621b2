"""Spelling normalisation of Shakespeare (First Folio -> modern), one run, anchors beside the models.

    python benchmarks/folio.py --minutes 15 --out runs/folio [--models t5,bart,decoder]

1. `lmforge data folio` pairs (whole plays held out: Henry V and Twelfth Night for validation,
   Hamlet and Macbeth for test).
2. Anchors on the held-out plays: copying the source unchanged, and a word-substitution table learned
   from the training pairs (most frequent modern form of each Folio word, words paired by a
   spelling-insensitive alignment inside each pair; unknown words copied).
3. Models, each fine-tuned with `lmforge finetune seq2seq` for `--minutes` on the CPU, then greedy
   (or `--beams`) decoding of every validation and test source:
   t5 / bart -- a T5-style and a BART-style encoder-decoder from scratch (t5-cpu / bart-cpu flavours,
   width `--d-model` 128, `--layers` 3+3, a byte-level BPE of `--vocab-size` trained on the pairs);
   decoder -- the pretrained decoder `--decoder-base` (make demo's run) with its own tokenizer.
   Experiment flags: --dropout, --lr, --batch, --steps, --spans (random aligned sub-spans of each
   pair added), --shuffled (synthetic pairs of aligned word units in random order added).
Clause pieces (--pieces N): the models train on the pairs cut at aligned clause ends into pieces of at
   most N tokens, and decode sources cut the same way, one piece at a time (outputs joined by spaces);
   a small model that loses its place in a long speech stays on track in a clause or two.
Cascade (--table-input): the models read the table's output instead of the Folio source (training
   sources through tables learned from the other plays, 5 folds) and learn to post-edit it;
   --max-len-a/--max-len-b cut each output at a * input tokens + b (loops end early);
   --max-word-change G adds the guarded cascade's row: the model's output where it changes at most G of
   the words, else the table's. --rescore decodes the models already trained in OUT again.
The validation plays are for choosing settings; the test plays are the reported figures. Prints one
table per split (BLEU, chrF, ROUGE-L, exact match) and writes OUT/results.json ({"val": ..., "test": ...}).
--results records the figures for docs/results/ (OUT's folder name.json), under stable keys: "pairs"
(per split), "val" / "test" {"copy", "table", MODEL, MODEL_guarded: metrics}, "models" {MODEL: label,
parameters, steps, train seconds, the validation loss by step, the last train loss}, "config".
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.data.folio import build_folio, skeleton  # noqa: E402
from lmforge.eval.generation import generation_metrics  # noqa: E402

DECODER_MAX_SOURCE = 128  # a decoder reads source and target in one context (the demo model's: 256)
PUNCT = ".,;:!?-—()\"“”"
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def substitution_table(pairs: list[dict]) -> dict[str, str]:
    """Folio word -> its most frequent modern form, from words paired inside each training pair."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for p in pairs:
        a, b = words(p["source"]), words(p["target"])
        sm = difflib.SequenceMatcher(a=[skeleton(w) or w for w in a], b=[skeleton(w) or w for w in b], autojunk=False)
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                for i, j in zip(range(i1, i2), range(j1, j2)):
                    counts[a[i]][b[j]] += 1
    return {w: c.most_common(1)[0][0] for w, c in counts.items()}


def jackknifed_table_inputs(pairs: list[dict], folds: int) -> list[dict]:
    """The training pairs with each source passed through a table learned from the other folds' plays.

    A table learned from all training pairs knows every training word, so a model trained on its output
    never meets a Folio word the table left unchanged -- which held-out plays are full of. Each fold's
    sources see a table that has not seen them, as held-out sources see the full table."""
    plays = sorted({p.get("play", "") for p in pairs})
    fold_of = {play: i % folds for i, play in enumerate(plays)}  # whole plays per fold, as held-out plays
    out = []
    for k in range(folds):
        table = substitution_table([p for p in pairs if fold_of[p.get("play", "")] != k])
        out += [{**p, "source": apply_table(table, p["source"])} for p in pairs if fold_of[p.get("play", "")] == k]
    return out


def word_change(before: str, after: str) -> float:
    """Share of words changed between two texts: 1 - difflib's similarity ratio of their lower-cased words
    (punctuation ignored), 0 for the same words, 1 for nothing in common."""
    a, b = ([w.lower() for w in words(t) if w[0].isalnum()] for t in (before, after))
    return 1 - difflib.SequenceMatcher(a=a, b=b, autojunk=False).ratio() if a or b else 0.0


def guarded(inputs: list[str], outputs: list[str], max_change: float) -> list[str]:
    """Conservative post-editing: each output where it changes at most `max_change` of its input's words,
    else the input unchanged (a 5M-parameter post-editor's big rewrites are mostly loops and invented words)."""
    return [o if word_change(i, o) <= max_change else i for i, o in zip(inputs, outputs)]


def detok(tokens: list[str]) -> str:
    out = ""
    for t in tokens:
        if out and (t[0].isalnum() or t[0] in "'‘(&") and not out.endswith(("(", "'")):
            out += " "
        out += t
    return out


def apply_table(table: dict[str, str], text: str) -> str:
    return detok([table.get(w, w) for w in words(text)])


def aligned_cuts(source: str, target: str) -> list[tuple[int, int]]:
    """(source offset, target offset) pairs where both texts can be cut: before each word that the
    spelling-insensitive alignment pairs one to one, and at the two ends."""
    a, b = list(_WORD.finditer(source)), list(_WORD.finditer(target))
    key = lambda m: skeleton(m.group()) or m.group()  # noqa: E731
    sm = difflib.SequenceMatcher(a=[key(m) for m in a], b=[key(m) for m in b], autojunk=False)
    cuts = [(0, 0)]
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            cuts += [(a[i].start(), b[j].start()) for i, j in zip(range(i1, i2), range(j1, j2))
                     if a[i].group()[0].isalnum() and a[i].start() > 0]
    return cuts + [(len(source), len(target))]


_CLAUSE_END = re.compile(r"[.?!:;,][\"'’)\]]*$")


def _merge(pieces: list[tuple[str, str]], max_tokens: int, count: Callable[[str], int]) -> list[tuple[str, str]]:
    """Consecutive (source, target) clauses joined while the source stays within max_tokens."""
    out: list[tuple[str, str]] = []
    for src, tgt in pieces:
        if out and count(out[-1][0] + " " + src) <= max_tokens:
            out[-1] = (out[-1][0] + " " + src, (out[-1][1] + " " + tgt).strip())
        else:
            out.append((src, tgt))
    return out


def source_pieces(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """The text cut after every word that ends a clause (. ? ! : ; ,), consecutive clauses joined again
    while a piece stays within max_tokens (as `count` measures): the units a piece-trained model decodes
    one at a time. A clause longer than max_tokens stays whole."""
    clauses, cur = [], []
    for w in text.split():
        cur.append(w)
        if _CLAUSE_END.search(w):
            clauses.append(" ".join(cur))
            cur = []
    if cur:
        clauses.append(" ".join(cur))
    return [src for src, _ in _merge([(c, "") for c in clauses], max_tokens, count)]


def aligned_pieces(source: str, target: str, max_tokens: int, count: Callable[[str], int]) -> list[tuple[str, str]]:
    """A training pair cut where `source_pieces` cuts sources: after a source word that ends a clause, if
    the spelling-insensitive alignment pairs it and the next word with two consecutive target words (the
    target is cut after the first one's partner, its punctuation included); then joined up to max_tokens."""
    a, b = source.split(), target.split()
    key = lambda w: skeleton(w) or w.lower()  # noqa: E731
    sm = difflib.SequenceMatcher(a=[key(w) for w in a], b=[key(w) for w in b], autojunk=False)
    partner = {i + k: j + k for i, j, n in sm.get_matching_blocks() for k in range(n)}
    clauses, s0, t0 = [], 0, 0
    for i in range(len(a) - 1):
        j = partner.get(i)
        if _CLAUSE_END.search(a[i]) and j is not None and j >= t0 and partner.get(i + 1) == j + 1:
            clauses.append((" ".join(a[s0:i + 1]), " ".join(b[t0:j + 1])))
            s0, t0 = i + 1, j + 1
    clauses.append((" ".join(a[s0:]), " ".join(b[t0:])))
    return _merge(clauses, max_tokens, count)


def piece_pairs(pairs: list[dict], max_tokens: int, count: Callable[[str], int]) -> list[dict]:
    """Every pair as its aligned pieces (pieces left without a source or a target are dropped)."""
    return [{"source": s, "target": t} for p in pairs for s, t in aligned_pieces(p["source"], p["target"],
                                                                                   max_tokens, count) if s and t]


def span_pairs(pairs: list[dict], per_pair: int, seed: int = 0) -> list[dict]:
    """`per_pair` random aligned sub-spans (3-16 words) of each pair: more, shorter examples of the
    same pairs, so that the model learns local rewriting rather than whole speeches by heart."""
    rng = random.Random(seed)
    out = []
    for p in pairs:
        cuts = aligned_cuts(p["source"], p["target"])
        if len(cuts) < 6:
            continue
        for _ in range(per_pair):
            i = rng.randrange(0, len(cuts) - 4)
            k = min(len(cuts) - 1, i + rng.randint(3, 16))
            (s0, t0), (s1, t1) = cuts[i], cuts[k]
            src, tgt = p["source"][s0:s1].strip(), p["target"][t0:t1].strip()
            if k < len(cuts) - 1:  # a cut inside the speech: punctuation before the next word belongs to it
                src, tgt = src.rstrip(",;:-— "), tgt.rstrip(",;:-— ")
            if src and tgt:
                out.append({"source": src, "target": tgt})
    return out


def shuffled_pairs(pairs: list[dict], n: int, seed: int = 0) -> list[dict]:
    """`n` synthetic pairs of 4-24 aligned word units drawn from random training pairs, in random
    order. Every unit is a real Folio word with its modern form (and its punctuation), but the order
    is new: the model can only produce the target by reading the source, which makes it learn to copy
    and rewrite word by word early, instead of learning whole speeches by heart."""
    rng = random.Random(seed)
    units: list[tuple[str, str]] = []
    for p in pairs:
        cuts = aligned_cuts(p["source"], p["target"])
        for (s0, t0), (s1, t1) in zip(cuts, cuts[1:]):
            src, tgt = p["source"][s0:s1].strip(), p["target"][t0:t1].strip()
            if src and src[-1].isalnum():  # punctuation the editor added here depends on context: drop it
                tgt = tgt.rstrip(PUNCT + " ")
            units.append((src, tgt))
    out = []
    for _ in range(n):
        chosen = [rng.choice(units) for _ in range(rng.randint(4, 24))]
        src, tgt = " ".join(u[0] for u in chosen), " ".join(u[1] for u in chosen)
        out.append({"source": src, "target": tgt})
    return out


def train_model(kind: str, data: Path, out: Path, minutes: float, tok_path: Path, args: argparse.Namespace) -> Path:
    from lmforge.checkpoint import write_model_dir
    from lmforge.finetune.scaffold import prepare
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.loop import train_job

    max_len, max_src, lr = str(args.max_len), str(args.max_len), str(args.lr)
    if kind == "decoder":  # a pretrained decoder (make demo's) with its own tokenizer: source, newline, target
        base = Path(args.decoder_base)
        max_src, lr = str(DECODER_MAX_SOURCE), str(args.decoder_lr)
    else:  # an encoder-decoder from scratch, with the BPE trained on the training pairs
        tok = Tokenizer.from_file(tok_path)
        torch.manual_seed(0)
        base = out / f"{kind}-init"
        d = args.d_model
        shape = dict(vocab_size=tok.vocab_size, n_encoder_layer=args.layers, n_decoder_layer=args.layers, d_model=d,
                     n_head=d // 32, head_dim=32, d_ff=3 * d if kind == "t5" else 4 * d, dropout=args.dropout,
                     block_size=args.max_len + 2)
        write_model_dir(base, Seq2Seq(config_from_preset(f"{kind}-cpu", **shape)), tokenizer_path=tok_path)
    train_file = data / "train.jsonl"
    if args.spans or args.shuffled:
        pairs = [json.loads(x) for x in train_file.read_text().splitlines()]
        extra = span_pairs(pairs, args.spans) + shuffled_pairs(pairs, args.shuffled)
        train_file = out / f"train+spans{args.spans}+shuffled{args.shuffled}.jsonl"
        train_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs + extra))
    val_file = data / "val.jsonl"
    if args.pieces:  # train on aligned clause pieces of at most --pieces tokens of this model's tokenizer
        from lmforge.tokenizer import Tokenizer

        count = token_counter(Tokenizer.from_file(base / "tokenizer.json" if kind == "decoder" else tok_path))

        def as_pieces(path: Path, name: str) -> Path:
            rows = piece_pairs([json.loads(x) for x in path.read_text().splitlines()], args.pieces, count)
            piece_file = out / f"{kind}-{name}-pieces{args.pieces}.jsonl"
            piece_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in rows))
            return piece_file

        train_file, val_file = as_pieces(train_file, "train"), as_pieces(val_file, "val")
    ns = argparse.Namespace(base=str(base), data=str(train_file), val_data=str(val_file),
                              out=str(out / kind), resume=None, overwrite=True, config=None, recipe=None,
                              val_fraction=None, source_column=None, target_column=None, prefix=None)
    over = ["--train.max_steps", str(args.steps or 100000), "--train.max_minutes", str(minutes),
            "--train.micro_batch_size", str(args.batch), "--train.lr", lr, "--train.warmup_steps", "100",
            "--train.eval_every", "400", "--train.ckpt_every", "400", "--train.eval_iters", "10",
            "--train.log_every", "50", "--data.max_source_length", max_src, "--data.max_target_length", max_len,
            "--generate.max_examples", "50", "--generate.max_new_tokens", max_len, "--generate.batch_size", "50"]
    job, cfg = prepare("seq2seq", ns, over)
    train_job(job, cfg.train, ns.out, overwrite=True)
    return out / kind


def token_counter(tok: Any) -> Callable[[str], int]:
    return lambda text: len(tok.encode(text))


def predict_run(run: Path, sources: list[str], max_len: int, beams: int = 1, max_len_a: float = 0.0,
                max_len_b: int = 0, pieces: int = 0) -> tuple[list[str], float]:
    """Decode every source with the model in `run`; with `pieces`, each source is cut into clause pieces
    of at most that many tokens, each piece decoded on its own, and the outputs joined with spaces."""
    from lmforge.finetune.seq2seq import Seq2SeqGenerateConfig, predict
    from lmforge.infer.llm import LLM

    llm = LLM.load(run)
    tok = llm.tokenizer
    split = [source_pieces(s, pieces, token_counter(tok)) if pieces else [s] for s in sources]
    sources = [p for ps in split for p in ps]
    if "continue" not in llm.tasks:  # an encoder-decoder: the source, cut to max_len with its EOS
        eos, pad = llm.model.cfg.eos_id, llm.model.cfg.pad_id
        ids = [tok.encode(s)[:max_len - 1] + [eos] for s in sources]
    else:  # as `lmforge finetune seq2seq` encodes a decoder's prompt: the source and a newline
        eos, pad = tok.eos_id, tok.pad_id
        ids = [tok.encode(s) + tok.encode("\n") for s in sources]
        ids = [x if len(x) <= DECODER_MAX_SOURCE else x[:DECODER_MAX_SOURCE - 1] + x[-1:] for x in ids]
    t0 = time.time()
    preds = predict(llm.model, tok, ids, eos, pad,
                    Seq2SeqGenerateConfig(max_new_tokens=max_len + max_len // 4, num_beams=beams, batch_size=64,
                                          max_len_a=max_len_a, max_len_b=max_len_b))
    outputs = iter(preds)
    return [" ".join(next(outputs) for _ in ps) for ps in split], time.time() - t0


def training_curve(run: Path) -> dict[str, Any]:
    """Steps, the validation loss by step and the last train loss of a run (its metrics.jsonl)."""
    from lmforge.train.metrics import read_rows

    rows = read_rows(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    return {"steps": max((r["step"] for r in rows if "step" in r), default=0),
            "val_loss_by_step": [[r["step"], round(r["val_loss"], 4)] for r in rows if "val_loss" in r],
            "train_loss_last": round(train[-1]["loss"], 4) if train else None}


def main() -> None:
    from lmforge.bench.results import add_results_flag, record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/folio")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per model")
    ap.add_argument("--models", default="t5,bart", help="which models to train: t5, bart (from scratch), decoder "
                    "(--decoder-base fine-tuned), or none")
    ap.add_argument("--decoder-base", default="runs/demo",
                    help="the pretrained decoder that model 'decoder' fine-tunes (make demo's run)")
    ap.add_argument("--decoder-lr", type=float, default=1e-3)
    ap.add_argument("--vocab-size", type=int, default=2048, help="byte-level BPE size (261 = bytes alone)")
    ap.add_argument("--d-model", type=int, default=128, help="model width (heads of 32)")
    ap.add_argument("--layers", type=int, default=3, help="encoder and decoder blocks each")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32, help="pairs per optimizer step")
    ap.add_argument("--max-len", type=int, default=160, help="source and target tokens kept (EOS included)")
    ap.add_argument("--spans", type=int, default=0,
                    help="add this many random aligned sub-spans of each training pair to the training data")
    ap.add_argument("--shuffled", type=int, default=0,
                    help="add this many synthetic pairs of aligned word units in random order to the training data")
    ap.add_argument("--steps", type=int, default=0, help="also stop after this many steps (0 = the time budget alone)")
    ap.add_argument("--beams", type=int, default=1, help="beam search width of the models' decoding (1 = greedy)")
    ap.add_argument("--rescore", action="store_true",
                    help="decode and score the models already trained in OUT (by an earlier run with the same "
                    "data flags) instead of training them again")
    ap.add_argument("--max-len-a", type=float, default=0.0,
                    help="cut each output at a * source tokens + b (--max-len-b): a guard against loops; 0 = no cut")
    ap.add_argument("--max-len-b", type=int, default=0)
    ap.add_argument("--max-word-change", type=float, default=0.0,
                    help="with --table-input, also score the guarded cascade: the model's output where it changes at "
                    "most this share of the table output's words, else the table output (0 = no such row)")
    ap.add_argument("--pieces", type=int, default=0,
                    help="train on aligned clause pieces of at most this many tokens and decode sources cut the same "
                         "way, one piece at a time (0 = whole speeches)")
    ap.add_argument("--table-input", action="store_true",
                    help="cascade: the models read the substitution table's output instead of the Folio source "
                    "(they learn to post-edit it: punctuation, case, the words the table gets wrong)")
    add_results_flag(ap, "OUT's folder name")
    args = ap.parse_args()
    start = time.time()
    out = Path(args.out)
    data = out / "data"
    if not (data / "test.jsonl").is_file():
        build_folio(data, overwrite=True)
    load = lambda name: [json.loads(x) for x in (data / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    train = load("train")
    # validation plays choose settings; the test plays are the reported figures
    splits = {name: ([p["source"] for p in load(name)], [p["target"] for p in load(name)]) for name in ("val", "test")}
    table = substitution_table(train)
    results: dict[str, dict[str, dict]] = {name: {} for name in splits}
    figures: dict[str, Any] = {"pairs": {"train": len(train), **{name: len(src) for name, (src, _) in splits.items()}},
                               **{name: {} for name in splits}, "models": {}}  # --results: the same, stable keys
    table_outputs = {name: [apply_table(table, s) for s in sources] for name, (sources, _) in splits.items()}
    for name, (sources, refs) in splits.items():
        results[name]["copy source"] = figures[name]["copy"] = generation_metrics(sources, refs)
        results[name]["word substitution table"] = figures[name]["table"] = generation_metrics(table_outputs[name], refs)

    model_data, model_sources = data, {name: sources for name, (sources, _) in splits.items()}
    if args.table_input:  # the same pairs with every source passed through a substitution table first
        model_data = out / "data-table-input"
        model_data.mkdir(parents=True, exist_ok=True)
        model_sources = table_outputs
        rows = {"train": jackknifed_table_inputs(train, folds=5),
                **{name: [{**p, "source": src} for p, src in zip(load(name), table_outputs[name])] for name in splits}}
        for name, pairs in rows.items():
            (model_data / f"{name}.jsonl").write_text(
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    tok_path = out / f"tokenizer-{args.vocab_size}.json"
    if not tok_path.is_file():
        from lmforge.tokenizer import Tokenizer

        texts = [p["source"] for p in train] + [p["target"] for p in train]
        Tokenizer.train_bpe(texts, args.vocab_size).save(tok_path)
    train_seconds: dict[str, int] = {}
    if args.rescore:
        if not (out / "results.json").is_file():
            raise SystemExit(f"--rescore: no {out / 'results.json'}; train the models first (without --rescore)")
        train_seconds = json.loads((out / "results.json").read_text()).get("train_seconds", {})
    for kind in [m for m in args.models.split(",") if m in ("t5", "bart", "decoder")]:
        t0 = time.time()
        if args.rescore:  # decode again with other settings; the training time is the one recorded then
            run, train_s = out / kind, train_seconds.get(kind, 0)
            if not (run / "config.yaml").is_file():
                raise SystemExit(f"--rescore: no trained model in {run}")
        else:
            run = train_model(kind, model_data, out, args.minutes, tok_path, args)
            train_s = time.time() - t0
            train_seconds[kind] = round(train_s)
        from lmforge.models.registry import load_model_dir

        n = load_model_dir(run)[0].num_params()
        label = {"t5": "T5-style", "bart": "BART-style", "decoder": "decoder (make demo's, fine-tuned)"}[kind]
        label = f"{label} ({n / 1e6:.1f}M)" + (", table input" if args.table_input else "") \
            + (f", pieces <= {args.pieces}" if args.pieces else "") + (f", beams {args.beams}" if args.beams > 1 else "")
        figures["models"][kind] = {"label": label, "params": n, "train_seconds": round(train_s), **training_curve(run)}
        for name, (sources, refs) in splits.items():
            preds, gen_s = predict_run(run, model_sources[name], args.max_len, args.beams, args.max_len_a,
                                         args.max_len_b, args.pieces)
            results[name][label] = figures[name][kind] = {**generation_metrics(preds, refs),
                                                          "train_seconds": round(train_s),
                                                          "generate_seconds": round(gen_s)}
            if args.table_input and args.max_word_change > 0:
                kept = guarded(model_sources[name], preds, args.max_word_change)
                results[name][f"table + {kind} post-edit, guard {args.max_word_change:g}"] = \
                    figures[name][f"{kind}_guarded"] = {**generation_metrics(kept, refs), "train_seconds": round(train_s),
                                                        "model_outputs_kept": sum(k == p for k, p in zip(kept, preds))}
            (out / f"{kind}_{name}_predictions.jsonl").write_text(
                "".join(json.dumps({"source": s, "target": r, "prediction": p}, ensure_ascii=False) + "\n"
                        for s, r, p in zip(sources, refs, preds)))
    results["config"] = figures["config"] = {k: v for k, v in vars(args).items()}
    results["train_seconds"] = train_seconds
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.results:
        record(out.name, figures, out=args.results, wall_s=time.time() - start)
    for name, (sources, _) in splits.items():
        print(f"\nFolio -> modern spelling, {name} plays ({len(sources)} speeches), {len(train)} training pairs")
        print(f"{'system':<56} {'BLEU':>6} {'chrF':>6} {'ROUGE-L':>8} {'exact':>6}")
        for system, m in results[name].items():
            print(f"{system:<56} {m['bleu']:>6.1f} {m['chrf']:>6.1f} {m['rougeL']:>8.1f} {m['exact_match']:>6.1f}")


if __name__ == "__main__":
    main()
