"""Long inputs: lmforge's Longformer attention (sliding window + global tokens) against dense attention
on the same shape and against transformers' LongformerModel at equal weights, in one run.

    python benchmarks/longformer.py [--quick] [--lengths 512,1024,2048,4096,8192] [--window 256]
                                    [--repeats 3] [--task [--task-minutes 15]] [--threads N]
                                    [--json OUT] [--results PATH]

Shape: encoder-small's width (6 layers x 256, 4 heads, vocabulary 4096) in Longformer's layout
(RoBERTa's: learned positions, post-LN, GELU MLP of 4 x 256), batch 1, one global token ([CLS]),
attention window 256 (128 keys on each side). Weights: a randomly initialised LongformerModel saved
as a Hugging Face folder; lmforge loads that folder (`LLM.load`), so both frameworks hold the same
weights. Variants:

    longformer    lmforge, attention="longformer" (lmforge/nn/longformer.py), global_mask_BT = [CLS]
    dense         lmforge, the same weights with attention="standard": every token attends to every
                  token through scaled_dot_product_attention (the global projections go unused); on
                  CPU that is a fused flash kernel, whose memory is linear in length too
    dense_math    the same, through SDPA's math backend, which materialises the n x n scores (as
                  transformers' eager BERT / RoBERTa attention does)
    transformers  LongformerModel (fp32, eager), global_attention_mask = [CLS]

Time: one forward pass without gradients, the variants taking turns `repeats` times; medians.
Memory: the peak RSS of a fresh process above what it held after loading the model and making the
input (one small warm-up pass first pays the one-time costs), through one forward pass at the length.
`max_abs_diff`: the largest difference between lmforge's and transformers' last hidden states.
Targets at 4,096 tokens: longformer time <= 0.5 x dense, memory <= 0.25 x dense, time < transformers;
each dense target is reported against both dense variants.

With --task, a long-document task too: which kind of play (the First Folio's comedies, histories,
tragedies; Pericles with the comedies) a 4,096-token passage of the built-in Shakespeare comes from.
Whole plays are held out for the test (TEST_PLAYS, two of each kind); the poems are left out. A
WordPiece vocabulary of 4,096 is trained on the training plays; each play is cut at line ends into
passages of about 4,094 tokens. The same freshly initialised encoder (encoder-small's shape,
attention="longformer", window 256) is fine-tuned by `lmforge finetune classify` twice for the same
wall-clock budget (--task-minutes each, default 15): on whole passages ([CLS] global) and on passages
truncated to 512 tokens; `task.accuracy` is each one's test accuracy (target: whole beats truncated).
--quick: a tiny shape at 64 and 128 tokens, memory of the two lmforge variants at 128 (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("longformer", "dense", "dense_math", "transformers")
FULL = dict(lengths=[512, 1024, 2048, 4096, 8192], window=256, n_layer=6, n_head=4, n_embd=256, vocab_size=4096,
            repeats=3, memory_lengths=None, memory_variants=VARIANTS)
# --quick: a tiny shape; memory at the last length only, of the two lmforge variants (one process each)
QUICK = dict(lengths=[64, 128], window=16, n_layer=2, n_head=2, n_embd=32, vocab_size=256, repeats=1,
             memory_lengths=[128], memory_variants=("longformer", "dense"))
TARGET_AT = 4096
GENRES = {
    "comedy": ("tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure",
               "comedy_of_errors", "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream",
               "merchant_of_venice", "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well",
               "twelfth_night", "winters_tale", "pericles"),
    "history": ("john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1",
                "henry_vi_part_2", "henry_vi_part_3", "richard_iii", "henry_viii"),
    "tragedy": ("troilus_and_cressida", "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet",
                "timon_of_athens", "julius_caesar", "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra",
                "cymbeline"),
}
TEST_PLAYS = ("winters_tale", "twelfth_night", "henry_v", "richard_ii", "hamlet", "macbeth")
# from scratch: one step of 8 whole passages takes ~17 s on one thread of this CPU, so 15 minutes is ~2 epochs
TASK = dict(passage_tokens=4094, truncated_tokens=512, vocab_size=4096, window=256, minutes=15.0, max_steps=None,
            micro_batch_size=2, grad_accum=4, lr=1e-3, warmup_steps=5, shape=dict(n_layer=6, n_head=4, n_embd=256))
QUICK_TASK = dict(TASK, passage_tokens=62, truncated_tokens=16, vocab_size=64, window=8, minutes=None, max_steps=2,
                  shape=dict(n_layer=1, n_head=2, n_embd=32))
TARGET_TIME_VS_DENSE, TARGET_MEMORY_VS_DENSE = 0.5, 0.25


def make_hf_folder(a: dict[str, Any], out: Path) -> Path:
    """A randomly initialised LongformerModel of the benchmark's shape, saved to `out`."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LongformerConfig(vocab_size=a["vocab_size"], hidden_size=a["n_embd"], num_hidden_layers=a["n_layer"],
                              num_attention_heads=a["n_head"], intermediate_size=4 * a["n_embd"],
                              max_position_embeddings=max(a["lengths"]) + 2, attention_window=a["window"],
                              type_vocab_size=1, pad_token_id=1)
    tf.LongformerModel(cfg).save_pretrained(out)
    return out


def load_variant(variant: str, hf_dir: Path):
    """A callable running one forward pass of `variant` on (ids, global mask)."""
    if variant == "transformers":
        import transformers as tf

        ref = tf.LongformerModel.from_pretrained(hf_dir).eval()
        return lambda ids, glob: ref(input_ids=ids, global_attention_mask=glob.long()).last_hidden_state
    import dataclasses

    from lmforge.infer.llm import LLM
    from lmforge.models.encoder import Encoder

    model = LLM.load(hf_dir).model
    if variant == "longformer":
        return lambda ids, glob: model.encode(ids, global_mask_BT=glob)
    dense = Encoder(dataclasses.replace(model.cfg, attention="standard", attention_window=None)).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if "_global" not in k})
    if variant == "dense":
        return lambda ids, glob: dense.encode(ids)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense_math(ids: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return dense.encode(ids)
    return dense_math


def inputs(T: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(3, vocab_size, (1, T), generator=g)
    ids[:, 0] = 0  # <s>, the global token
    glob = torch.zeros(1, T, dtype=torch.bool)
    glob[:, 0] = True
    return ids, glob


def probe(spec_json: str) -> None:
    """In a fresh process: working memory (peak RSS above the loaded state) of one forward pass."""
    from lmforge.bench import machine as M

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    run = load_variant(spec["variant"], Path(spec["dir"]))
    with torch.no_grad():
        run(*inputs(spec["window"], spec["vocab_size"]))  # one-time costs (lazy kernels, thread pools)
        ids, glob = inputs(spec["length"], spec["vocab_size"])
        M.reset_peak_rss()
        before = M.rss_bytes()
        run(ids, glob)
        peak = M.peak_rss_bytes()
    print(json.dumps({"working_bytes": peak - before, "baseline_rss_bytes": before}))


def memory(variant: str, hf_dir: Path, T: int, a: dict[str, Any]) -> int:
    spec = dict(variant=variant, dir=str(hf_dir), length=T, window=a["window"], vocab_size=a["vocab_size"],
                threads=torch.get_num_threads())
    done = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} memory probe at {T} tokens failed: {done.stderr.strip()[-2000:]}")
    return int(json.loads(done.stdout.splitlines()[-1])["working_bytes"])


def bench(a: dict[str, Any], hf_dir: Path) -> dict[str, Any]:
    runs = {v: load_variant(v, hf_dir) for v in VARIANTS}
    curve: dict[str, Any] = {}
    for T in a["lengths"]:
        ids, glob = inputs(T, a["vocab_size"])
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        last: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for v in VARIANTS:  # warm-up at this shape
                last[v] = runs[v](ids, glob)
            for _ in range(a["repeats"]):
                for v in VARIANTS:
                    t0 = time.perf_counter()
                    runs[v](ids, glob)
                    times[v].append(time.perf_counter() - t0)
        row: dict[str, Any] = {f"{v}_s": round(statistics.median(times[v]), 4) for v in VARIANTS}
        row["max_abs_diff"] = float((last["longformer"] - last["transformers"]).abs().max())
        row["time_vs_dense"] = round(row["longformer_s"] / row["dense_s"], 4)
        row["time_vs_dense_math"] = round(row["longformer_s"] / row["dense_math_s"], 4)
        row["time_vs_transformers"] = round(row["longformer_s"] / row["transformers_s"], 4)
        if a["memory_lengths"] is None or T in a["memory_lengths"]:
            for v in a["memory_variants"]:
                row[f"{v}_working_bytes"] = memory(v, hf_dir, T, a)
            for d in ("dense", "dense_math", "transformers"):
                if f"{d}_working_bytes" in row:
                        row[f"memory_vs_{d}"] = round(row["longformer_working_bytes"] / max(row[f"{d}_working_bytes"], 1), 4)
        curve[str(T)] = row
        print(f"{T:>6} tokens: " + ", ".join(f"{v} {row[f'{v}_s'] * 1e3:.0f} ms" for v in VARIANTS)
              + ("; working memory " + ", ".join(f"{v} {row[f'{v}_working_bytes'] / 2**20:.0f} MiB"
                                                  for v in a["memory_variants"])
                 if "memory_vs_dense" in row else ""),
              file=sys.stderr)
    return curve


def targets(curve: dict[str, Any]) -> list[dict[str, Any]]:
    row = curve.get(str(TARGET_AT))
    if row is None:
        return []
    checks = [("time_vs_dense", TARGET_TIME_VS_DENSE, "forward time vs dense attention (flash SDPA)"),
              ("time_vs_dense_math", TARGET_TIME_VS_DENSE, "forward time vs dense attention (n x n scores)"),
              ("memory_vs_dense", TARGET_MEMORY_VS_DENSE, "working memory vs dense attention (flash SDPA)"),
              ("memory_vs_dense_math", TARGET_MEMORY_VS_DENSE, "working memory vs dense attention (n x n scores)"),
              ("time_vs_transformers", 1.0, "forward time vs transformers' LongformerModel")]
    out = []
    for key, goal, what in checks:
        if key in row:
            met = row[key] <= goal if key != "time_vs_transformers" else row[key] < goal
            out.append({"name": f"longformer_{key}", "value": row[key], "target": goal, "met": met,
                        "text": f"{TARGET_AT} tokens, {what}: {row[key]:.3g} (target {'<=' if key != 'time_vs_transformers' else '<'} "
                                f"{goal:g}): {'met' if met else 'NOT met'}"})
    return out


def run(a: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_folder(a, Path(tmp) / "longformer")
        curve = bench(a, hf_dir)
    shape = {k: a[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "window")}
    return {"shape": dict(shape, mlp_hidden=4 * a["n_embd"], batch=1, global_tokens=1),
            "threads": torch.get_num_threads(), "repeats": a["repeats"], "curve": curve, "targets": targets(curve)}


# ---- the long-document task ----------------------------------------------------------------------

def play_passages(plays_dir: Path, tokenizer: Any, passage_tokens: int) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "test": [...]} rows {"text", "label", "play"}: each play of GENRES cut at line ends
    into passages of about `passage_tokens` tokens (a last piece under half of that is dropped)."""
    out: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for genre, plays in GENRES.items():
        for play in plays:
            lines = (plays_dir / f"{play}_gut.txt").read_text(encoding="utf-8").splitlines(keepends=True)
            counts = [len(ids) for ids in tokenizer.encode_batch(lines)]
            piece: list[str] = []
            n = 0
            split = "test" if play in TEST_PLAYS else "train"
            for line, k in zip(lines + [""], counts + [passage_tokens]):
                if n + k > passage_tokens and n >= passage_tokens // 2:
                    out[split].append({"text": "".join(piece), "label": genre, "play": play})
                    piece, n = [], 0
                piece.append(line)
                n += k
    return out


def run_task(t: dict[str, Any], plays_dir: Path, work: Path) -> dict[str, Any]:
    """Whole passages vs the same encoder truncated to `truncated_tokens` (module docstring)."""
    from lmforge.checkpoint import write_model_dir
    from lmforge.cli import main as lmforge_main
    from lmforge.models.encoder import Encoder, config_from_preset
    from lmforge.tokenizer import Tokenizer

    train_texts = [(plays_dir / f"{p}_gut.txt").read_text(encoding="utf-8")
                   for plays in GENRES.values() for p in plays if p not in TEST_PLAYS]
    tok = Tokenizer.train_wordpiece(train_texts, vocab_size=t["vocab_size"])
    tok.save(work / "tokenizer.json")
    rows = play_passages(plays_dir, tok, t["passage_tokens"])
    for split, r in rows.items():
        (work / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r), encoding="utf-8")
    torch.manual_seed(0)
    cfg = config_from_preset("encoder-small", **t["shape"], vocab_size=tok.vocab_size, local_window=None,
                             attention="longformer", attention_window=[t["window"]], block_size=t["passage_tokens"] + 2)
    write_model_dir(work / "base", Encoder(cfg), work / "tokenizer.json")
    budget = (["--train.max_minutes", str(t["minutes"]), "--train.max_steps", "1000000"] if t["minutes"]
              else ["--train.max_steps", str(t["max_steps"])])
    accuracy: dict[str, float] = {}
    for name, length in (("whole", t["passage_tokens"] + 2), ("truncated", t["truncated_tokens"])):
        run_dir = work / name
        rc = lmforge_main(["finetune", "classify", "--base", str(work / "base"), "--data", str(work / "train.jsonl"),
                           "--val-data", str(work / "test.jsonl"), "--out", str(run_dir), "--data.max_length", str(length),
                           "--train.micro_batch_size", str(t["micro_batch_size"]), "--train.grad_accum",
                           str(t["grad_accum"]), "--train.lr", str(t["lr"]), "--train.warmup_steps",
                           str(t["warmup_steps"]), "--train.eval_every", "0",
                           "--train.progress", "false", *budget])
        if rc != 0:
            raise RuntimeError(f"finetune classify ({name}) failed with exit code {rc}")
        accuracy[name] = json.loads((run_dir / "eval_metrics.json").read_text())["accuracy"]
    counts = {split: {g: sum(r["label"] == g for r in rs) for g in GENRES} for split, rs in rows.items()}
    return {"passages": counts, "test_plays": list(TEST_PLAYS), "accuracy": accuracy,
            "majority_baseline": max(counts["test"].values()) / max(sum(counts["test"].values()), 1),
            "settings": {k: v for k, v in t.items() if k != "shape"} | {"shape": t["shape"]}}


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny shape at 64 and 128 tokens (a smoke test)")
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 512,1024,2048,4096,8192)")
    p.add_argument("--window", type=int, help="attention window, two-sided (default 256)")
    p.add_argument("--repeats", type=int, help="timed passes per variant and length (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--task", action="store_true", help="also the long-document task (the built-in Shakespeare)")
    p.add_argument("--task-minutes", type=float, help="fine-tuning budget of each task run (default 15)")
    p.add_argument("--plays-dir", type=Path, help=argparse.SUPPRESS)  # the task's texts (default: the built-in corpus)
    p.add_argument("--probe", help=argparse.SUPPRESS)  # the memory probe's child process
    add_results_flag(p, "longformer")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.probe:
        probe(ns.probe)
        return 0
    a = dict(QUICK if ns.quick else FULL)
    if ns.lengths:
        a["lengths"] = [int(x) for x in ns.lengths.split(",")]
        if a["memory_lengths"] is not None:
            a["memory_lengths"] = a["lengths"][-1:]
    if ns.window:
        a["window"] = ns.window
    if ns.repeats:
        a["repeats"] = ns.repeats
    t0 = time.perf_counter()
    result = run(a)
    if ns.task:
        from lmforge.data.corpus import shakespeare_dir

        t = dict(QUICK_TASK if ns.quick else TASK)
        if ns.task_minutes:
            t["minutes"], t["max_steps"] = ns.task_minutes, None
        with tempfile.TemporaryDirectory() as tmp:
            result["task"] = run_task(t, ns.plays_dir or shakespeare_dir(), Path(tmp))
        acc = result["task"]["accuracy"]
        met = acc["whole"] > acc["truncated"]
        result["targets"].append({"name": "longformer_task_whole_beats_truncated", "value": acc["whole"],
                                  "target": acc["truncated"], "met": met,
                                  "text": f"play kind from {t['passage_tokens'] + 2} tokens: test accuracy "
                                          f"{acc['whole']:.3f} vs {acc['truncated']:.3f} truncated to "
                                          f"{t['truncated_tokens']}: {'met' if met else 'NOT met'}"})
    publish("longformer", result, json_path=ns.json, results=ns.results, wall_s=time.perf_counter() - t0)
    for t in result["targets"]:
        print(t["text"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
