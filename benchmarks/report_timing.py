"""How long `lmforge report` takes with every section, on make demo's model and the sentiment MiniLM.

    python benchmarks/report_timing.py [--demo runs/demo] [--sentiment runs/sentiment/minilm]
                                       [--out runs/report-timing] [--results PATH]

Each report runs as the user runs it (`lmforge report MODEL --out DIR`, every section, default
options) in a fresh process, one after the other; the figure is that process's wall time, with the
seconds each section recorded in its report.json beside it. A model whose directory is missing is
skipped and says so. Issue target: <= 5 minutes each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.bench.results import add_results_flag, publish  # noqa: E402

TARGET_S = 300.0


def timed_report(model: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lmforge.cli", "report", str(model), "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"report-timing: `{' '.join(cmd)}` failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    sections = {k: {"seconds": v.get("seconds"), "applies": v.get("applies", True)}
                for k, v in report.items() if isinstance(v, dict) and "seconds" in v}
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "sections": sections,
            "target_s": TARGET_S, "met": seconds <= TARGET_S}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo", help="make demo's run")
    p.add_argument("--sentiment", default="runs/sentiment/minilm", help="make sentiment-bench's MiniLM classifier")
    p.add_argument("--out", default="runs/report-timing")
    add_results_flag(p, "report-timing")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    result: dict = {"models": {}}
    for name, model in (("demo", Path(a.demo)), ("sentiment_minilm", Path(a.sentiment))):
        if not model.is_dir():
            print(f"report-timing: {model} is missing; skipped", file=sys.stderr)
            continue
        row = timed_report(model, Path(a.out) / name)
        result["models"][name] = row
        print(f"report-timing: {name}: {row['seconds']:.0f} s ("
              + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in row["sections"].items() if v["seconds"] is not None)
              + ")", file=sys.stderr, flush=True)
    publish("report-timing", result, results=a.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
