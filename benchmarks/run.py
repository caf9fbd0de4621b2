"""lmforge vs Hugging Face transformers, side by side in one process: training and decoding speed.

    python benchmarks/run.py [train|decode|all] [--quick] [--json OUT] [--results PATH] [--opt KEY=VALUE ...]

Prints one JSON document: {"machine": ..., "train": <lmforge.bench.train.run result>,
"decode": <lmforge.bench.decode.run result>, "targets": [every verdict]}, then one line per target
on stderr ("met" / "NOT met" and by how much). `--opt` sets a benchmark option (see DEFAULTS in
lmforge/bench/train.py and lmforge/bench/decode.py), for the benchmark(s) that have it, e.g.
`--opt iters=10 --opt models=small --opt variants=lmforge,lmforge_fast,transformers`.
`--results` records the result for docs/results/ (bench.json; bench-train.json or bench-decode.json
for one of the two) with lmforge.bench.results.
The same benchmarks run as `lmforge bench train|decode [--quick] [--json OUT]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from lmforge.errors import LMForgeError  # noqa: E402


def _parse_opts(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise LMForgeError(f"--opt takes KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value else None
    return out


def run(which: str, quick: bool, opts: dict[str, Any]) -> dict[str, Any]:
    from lmforge.bench import decode, train
    from lmforge.bench.machine import machine_info

    modules = {"train": train, "decode": decode}
    names = list(modules) if which == "all" else [which]
    known = set().union(*(set(modules[n].DEFAULTS) for n in names))
    unknown = sorted(set(opts) - known)
    if unknown:
        raise LMForgeError(f"unknown --opt key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    result: dict[str, Any] = {"machine": machine_info()}
    targets = []
    for n in names:
        mod = modules[n]
        args = {k: v for k, v in opts.items() if k in mod.DEFAULTS}
        args["quick"] = quick
        result[n] = mod.run(args)
        targets += result[n]["targets"]
    result["targets"] = targets
    return result


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", nargs="?", default="all", choices=("train", "decode", "all"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds not minutes (a smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="benchmark option (repeatable)")
    add_results_flag(p, "bench")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = run(args.which, args.quick, _parse_opts(args.opt))
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    publish("bench" if args.which == "all" else f"bench-{args.which}", result, json_path=args.json,
            results=args.results, wall_s=time.perf_counter() - t0)
    for t in result["targets"]:
        print(t["text"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
