"""Speedrun: train the `baseline` and `speedrun` recipes for the same wall-clock budget, compare val bpb.

    python benchmarks/speedrun.py [--minutes 5] [--data DIR] [--out DIR] [--json OUT] [--results PATH]

Both recipes train on the same prepared data (the built-in Shakespeare corpus, BPE vocab 4096,
prepared into DIR/ if it holds no prepared data yet), one after the other, each with
train.max_minutes = --minutes (the loop fits its cosine schedule to that budget). Both final
models are then scored on the whole validation split with `lmforge.eval.perplexity.evaluate`
(identical windows), and the relative improvement of the speedrun recipe is printed as JSON:

    improvement = (bpb_baseline - bpb_speedrun) / bpb_baseline      target: >= 0.10

The runs are sequential, so load from other processes during one of them biases the result;
check `machine.load_average_1m` in the output (taken before and after). `--results` records the
result for docs/results/ (speedrun.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from lmforge.errors import LMForgeError  # noqa: E402

TARGET_IMPROVEMENT = 0.10
RECIPES = ("baseline", "speedrun")


def ensure_data(data: Path) -> Path:
    """A prepared Shakespeare directory at `data` (prepared now if it holds none)."""
    if (data / "meta.json").is_file():
        return data
    from lmforge.data.prepare import prepare

    prepare(["shakespeare"], str(data), vocab_size=4096, progress=False)
    return data


def train_recipe(name: str, data: Path, out: Path, minutes: float, extra: list[str]) -> dict[str, Any]:
    """Train recipe `name` for `minutes` into out/name; returns the loop's summary."""
    from lmforge.train.pretrain import run_training

    overrides = ["--train.max_minutes", str(minutes), "--train.progress", "false", *extra]
    return run_training(str(data), str(out / name), recipe=name, overrides=overrides)


def run(minutes: float, data: Path | None = None, out: Path | None = None, extra: list[str] | None = None,
        recipes: tuple[str, ...] = RECIPES) -> dict[str, Any]:
    from lmforge.bench.machine import machine_info
    from lmforge.eval.perplexity import evaluate

    if minutes <= 0:
        raise LMForgeError(f"--minutes must be positive, got {minutes}")
    t0 = time.perf_counter()
    machine_before = machine_info()
    out = out or Path(tempfile.mkdtemp(prefix="lmforge-speedrun-"))
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_data(data or out / "data")
    runs: dict[str, Any] = {}
    for name in recipes:
        summary = train_recipe(name, data, out, minutes, list(extra or []))
        full = evaluate(summary["run_dir"], str(data), batch_size=16)
        runs[name] = {"val_bpb": full["bits_per_byte"], "val_loss": full["loss"], "val_tokens": full["tokens"],
                      "loop_val_bpb": summary["val_bpb"], "steps": summary["steps"], "tokens": summary["tokens"],
                      "seconds": summary["seconds"], "stopped_by": summary["stopped_by"], "run_dir": summary["run_dir"]}
    result: dict[str, Any] = {"benchmark": "speedrun", "minutes": minutes, "data": str(data), "runs": runs,
                              "machine": machine_info(), "load_average_1m_before": machine_before["load_average_1m"]}
    if "baseline" in runs and "speedrun" in runs:
        base, fast = runs["baseline"]["val_bpb"], runs["speedrun"]["val_bpb"]
        imp = (base - fast) / base
        met = imp >= TARGET_IMPROVEMENT
        result["improvement"] = round(imp, 4)
        result["target"] = {
            "name": "speedrun_val_bpb_improvement", "value": round(imp, 4), "target": TARGET_IMPROVEMENT, "met": met,
            "margin": round(imp - TARGET_IMPROVEMENT, 4),
            "text": (f"speedrun val bpb {fast:.4f} vs baseline {base:.4f} after {minutes:g} min each: "
                     f"{100 * imp:.1f}% lower vs target >= {100 * TARGET_IMPROVEMENT:.0f}%: "
                     f"{'met' if met else 'NOT met'} ({100 * abs(imp - TARGET_IMPROVEMENT):.1f} points "
                     f"{'above' if met else 'below'})")}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, record

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per recipe (default 5)")
    p.add_argument("--data", type=Path, default=None, help="prepared data dir (default OUT/data, prepared if missing)")
    p.add_argument("--out", type=Path, default=None, help="where the two runs go (default a new temp dir); "
                                                           "OUT/baseline and OUT/speedrun must not hold runs yet")
    p.add_argument("--json", type=Path, default=None, help="also write the result JSON here")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default baseline,speedrun)")
    add_results_flag(p, "speedrun")
    args, extra = p.parse_known_args(argv)  # extra --train.key VALUE overrides apply to every recipe
    try:
        result = run(args.minutes, args.data, args.out, extra, tuple(r for r in args.recipes.split(",") if r))
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, args.json)
    if args.results:
        record("speedrun", {k: v for k, v in result.items() if k != "machine"}, out=args.results,
               wall_s=result["wall_s"])
    return 0


def report(result: dict[str, Any], json_path: Path | None) -> None:
    """Print the result JSON (and its target's sentence on stderr); also write it to `json_path`."""
    text = json.dumps(result, indent=2)
    print(text)
    if "target" in result:
        print(result["target"]["text"], file=sys.stderr)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
