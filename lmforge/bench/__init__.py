"""Benchmarks: lmforge against Hugging Face transformers, side by side in one process.

    lmforge.bench.train.run(args)  -> dict   training tokens/s and FLOP/s (baby-GPT shape)
    lmforge.bench.decode.run(args) -> dict   time to first token, decode tokens/s at batch 1/8/32

`args` is a plain dict (the CLI's `lmforge bench train|decode [--quick] [--json OUT]` passes
{"quick": bool} plus any keys the user sets); every key is optional and an unknown key raises
LMForgeError naming the valid ones. Each module documents its keys (DEFAULTS) and its result.

Every result is JSON-serialisable and holds at least:
    "benchmark"  "train" | "decode"
    "machine"    lmforge.bench.machine.machine_info() (CPU, cores, threads, versions, load)
    "config"     the resolved args
    "targets"    list of {"name", "variant", "value", "target", "met", "margin", "text"}:
                 margin = value / target - 1 (>= 0 when met), text one human sentence
    "wall_s"     seconds the benchmark took

Timing discipline (both modules): warm-up steps first; then the frameworks take turns
(A, B, A, B, ...; the order rotates each round) so drift from other processes or clock changes
hits both alike; the median of the timed repeats is reported, with every sample alongside.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from lmforge.errors import LMForgeError


def resolve_args(args: dict[str, Any] | None, defaults: dict[str, Any], quick: dict[str, Any],
                 what: str) -> dict[str, Any]:
    """defaults < quick (when args['quick']) < args; unknown keys raise naming the valid ones."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(defaults) - {"quick"})
    if unknown:
        raise LMForgeError(f"unknown {what} benchmark option(s) {', '.join(unknown)}; valid options: "
                           f"{', '.join(sorted(set(defaults) | {'quick'}))}")
    out = dict(defaults)
    if args.get("quick"):
        out.update(quick)
    out.update({k: v for k, v in args.items() if v is not None})
    out["quick"] = bool(args.get("quick", False))
    return out


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, iters: int,
                after: Callable[[str, float], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each fn: `warmup` untimed rounds, then `iters` timed rounds in
    which the fns take turns (the starting fn rotates every round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[n]()
            dt = time.perf_counter() - t0
            times[n].append(dt)
            if after is not None:
                after(n, dt)
    return times


def sig(x: float, digits: int = 6) -> float:
    """x rounded to `digits` significant digits (timings span microseconds to minutes)."""
    return float(f"{x:.{digits}g}")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def target(name: str, variant: str, value: float, goal: float, unit: str, what: str) -> dict[str, Any]:
    """One target verdict: met or not and by how much (margin = value/goal - 1)."""
    met = value >= goal
    margin = value / goal - 1.0
    verb = "met" if met else "NOT met"
    how = f"{abs(margin) * 100:.1f}% {'above' if met else 'below'} the target"
    text = f"{what} [{variant}]: {value:.3g}{unit} vs target >= {goal:g}{unit}: {verb} ({how})"
    return {"name": name, "variant": variant, "value": round(value, 4), "target": goal, "met": met,
            "margin": round(margin, 4), "text": text}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines: the machine, then each target's verdict."""
    m = result.get("machine", {})
    lines = [f"{result.get('benchmark')} benchmark on {m.get('cpu_model')} ({m.get('usable_cores')} cores, "
             f"{m.get('torch_threads')} torch threads, torch {m.get('torch_version')}, "
             f"transformers {m.get('transformers_version')}, load {m.get('load_average_1m')})"]
    lines += [t["text"] for t in result.get("targets", [])]
    return lines


def run_against_transformers(what: str, threads: Any, run: Callable[[], dict]) -> dict:
    """Check that transformers is importable, then `run()` with `threads` torch threads (if set),
    restoring the thread count afterwards."""
    import torch

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise LMForgeError(f"the {what} benchmark compares against transformers, which is not installed; "
                           "pip install transformers") from None
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return run()
    finally:
        torch.set_num_threads(threads_before)
