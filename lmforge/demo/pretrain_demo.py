"""`make demo`: pretrain the demo model on the built-in Shakespeare corpus, sample it, evaluate it.

    python -m lmforge.demo.pretrain_demo [--data data/shakespeare] [--out runs/demo] [--baseline] [--results PATH]

Runs the `lmforge` commands a user would type, each printed before it runs, its output passed through:

    lmforge prepare shakespeare --out DATA --overwrite
    lmforge train --data DATA --out RUN --recipe demo --overwrite          (a fixed 450 steps)
    lmforge generate --ckpt RUN --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1 --num-samples 2
    lmforge eval --ckpt RUN --data DATA

`--baseline` then trains the GPT-2-style `baseline` recipe (the same shape with learned positions,
LayerNorm, GELU and AdamW) into RUN-baseline for as long as the demo's training took in this run,
and evaluates it the same way: the same-run anchor of the demo's validation bits per byte.
Prints one JSON line with the figures; `--results` records them (docs/results/demo.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.bench.results import add_results_flag, record
from lmforge.runtime import THREADS_HELP

SAMPLE = ["--prompt", "ROMEO:", "--max-new-tokens", "200", "--temperature", "0.8", "--top-k", "50", "--seed", "1",
          "--num-samples", "2"]


def lmforge(*args: str) -> str:
    """Run `lmforge ARGS` in a fresh process, print the command and its output as it comes; return the output."""
    print(f"$ lmforge {shlex.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if proc.wait():
        raise SystemExit(f"lmforge {args[0]} failed (exit {proc.returncode})")
    return "".join(lines)


def last_json(output: str) -> dict[str, Any]:
    """The JSON object a verb prints last (`lmforge train` / `lmforge eval`: one line; indented ones too):
    from the last line that starts with '{' to the end."""
    lines = output.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


def train_base(data: Path, run: Path, quiet: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Prepare the built-in corpus into `data` and train the demo recipe into `run` (on `threads` CPU
    threads; None: lmforge's default); the train summary."""
    lmforge("prepare", "shakespeare", "--out", str(data), "--overwrite", *(["--quiet"] if quiet else []))
    return last_json(lmforge("train", "--data", str(data), "--out", str(run), "--recipe", "demo", "--overwrite",
                             *(["--train.progress", "false"] if quiet else []),
                             *(["--threads", str(threads)] if threads is not None else [])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.demo.pretrain_demo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shakespeare", help="where the prepared corpus goes")
    p.add_argument("--out", default="runs/demo", help="the run directory")
    p.add_argument("--baseline", action="store_true",
                   help="also train the GPT-2-style baseline recipe for the same time (into OUT-baseline) and evaluate it")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    add_results_flag(p, "demo")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data, run = Path(args.data), Path(args.out)
    threads = ["--threads", str(args.threads)] if args.threads is not None else []
    train = train_base(data, run, threads=args.threads)
    lmforge("generate", "--ckpt", str(run), *SAMPLE, *threads)
    val = last_json(lmforge("eval", "--ckpt", str(run), "--data", str(data), *threads))
    from lmforge.models.registry import load_model_dir

    figures: dict[str, Any] = {
        "params": load_model_dir(run)[0].num_params(), "steps": train["steps"], "tokens": train["tokens"],
        "train_seconds": train["seconds"], "val_loss": val["loss"], "val_bpb": val["bits_per_byte"],
        "val_tokens": val["tokens"], "demo_seconds": round(time.perf_counter() - t0, 1)}  # what `make demo` takes
    if args.baseline:
        base_run = run.with_name(run.name + "-baseline")
        minutes = f"{train['seconds'] / 60:.4f}"
        base = last_json(lmforge("train", "--data", str(data), "--out", str(base_run), "--recipe", "baseline",
                                 "--overwrite", "--train.max_minutes", minutes, *threads))
        base_val = last_json(lmforge("eval", "--ckpt", str(base_run), "--data", str(data), *threads))
        figures.update({"baseline_steps": base["steps"], "baseline_tokens": base["tokens"],
                        "baseline_train_seconds": base["seconds"], "baseline_val_loss": base_val["loss"],
                        "baseline_val_bpb": base_val["bits_per_byte"],
                        "val_bpb_vs_baseline": round(val["bits_per_byte"] / base_val["bits_per_byte"], 4)})
    wall_s = time.perf_counter() - t0
    figures["seconds"] = round(wall_s, 1)
    print(json.dumps(figures))
    if args.results:
        record("demo", figures, out=args.results, wall_s=wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
