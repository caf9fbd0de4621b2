"""Demo shape: the `demo` recipe's MLP as ReLU^2 (no Hugging Face equivalent) against SwiGLU (Qwen3).

    python benchmarks/demo_shape.py [--data DIR] [--out DIR] [--threads N] [--results docs/results/]

Trains the `demo` recipe twice on the prepared Shakespeare data (BPE vocab 4096, prepared into DIR
if it holds none), one after the other, same seed and the recipe's fixed steps: once with the MLP
of the old demo shape (relu2, hidden 1024) and once with the shape the recipe now has (swiglu,
hidden 688: three matrices of 688 hold about the parameters of two of 1024). Both models are then
scored on the whole validation split exactly as `make demo`'s `lmforge eval` scores them, and the
relative change of bits per byte is printed as JSON:

    change = (bpb_swiglu - bpb_relu2) / bpb_relu2        condition: |change| <= 0.02 or lower

The runs are sequential, so load from other processes slows them (the step count is fixed, so it
changes the wall time, not the result); `machine.load_average_1m` is in the output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from lmforge.bench.results import add_results_flag, record  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.runtime import THREADS_HELP, set_threads  # noqa: E402
from speedrun import ensure_data, report  # noqa: E402  (benchmarks/speedrun.py: the same data and output)

MAX_RELATIVE_LOSS = 0.02
SHAPES = {  # name -> model overrides on top of the demo recipe
    "relu2": ["--model.mlp", "relu2", "--model.mlp_hidden", "1024"],
    "swiglu": ["--model.mlp", "swiglu", "--model.mlp_hidden", "688"],
}


def run(data: Path | None = None, out: Path | None = None, shapes: tuple[str, ...] = tuple(SHAPES)) -> dict[str, Any]:
    from lmforge.bench.machine import machine_info
    from lmforge.eval.perplexity import evaluate
    from lmforge.infer.llm import LLM
    from lmforge.train.pretrain import run_training

    t0 = time.perf_counter()
    machine_before = machine_info()
    out = out or Path(tempfile.mkdtemp(prefix="lmforge-demo-shape-"))
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_data(data or out / "data")
    runs: dict[str, Any] = {}
    for name in shapes:
        overrides = [*SHAPES[name], "--train.progress", "false"]
        summary = run_training(str(data), str(out / name), recipe="demo", overrides=overrides)
        llm = LLM.load(summary["run_dir"])
        full = evaluate(llm, str(data))  # `lmforge eval`'s defaults
        runs[name] = {"overrides": SHAPES[name], "val_bpb": full["bits_per_byte"], "val_loss": full["loss"],
                      "val_tokens": full["tokens"], "steps": summary["steps"], "seconds": summary["seconds"],
                      "params": llm.config.num_params(), "run_dir": summary["run_dir"]}
    import torch

    result: dict[str, Any] = {"benchmark": "demo_shape", "recipe": "demo", "data": str(data), "runs": runs,
                              "torch_threads": torch.get_num_threads(),
                              "machine": machine_info(), "load_average_1m_before": machine_before["load_average_1m"]}
    if "relu2" in runs and "swiglu" in runs:
        old, new = runs["relu2"]["val_bpb"], runs["swiglu"]["val_bpb"]
        change = (new - old) / old
        met = change <= MAX_RELATIVE_LOSS
        result["target"] = {
            "name": "demo_swiglu_val_bpb_change", "value": round(change, 4), "target": MAX_RELATIVE_LOSS, "met": met,
            "text": (f"demo val bpb: swiglu {new:.4f} vs relu2 {old:.4f} ({100 * change:+.2f}%; condition: at most "
                     f"+{100 * MAX_RELATIVE_LOSS:.0f}%): {'met' if met else 'NOT met'}")}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="prepared data dir (default OUT/data, prepared if missing)")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (default a new temp dir); "
                                                           "OUT/relu2 and OUT/swiglu must not hold runs yet")
    p.add_argument("--json", type=Path, default=None, help="also write the result JSON here")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes (default relu2,swiglu)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    add_results_flag(p, "demo-shape")
    args = p.parse_args(argv)
    set_threads(args.threads)
    try:
        result = run(args.data, args.out, tuple(s for s in args.shapes.split(",") if s))
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, args.json)
    if args.results:
        record("demo-shape", {k: v for k, v in result.items() if k != "machine"}, out=args.results,
               wall_s=result["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
