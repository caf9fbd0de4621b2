"""Memorisation positive control: a model over-fit on one play leaks it; `make demo`'s model is reported beside it.

    python benchmarks/memorisation.py [--out runs/memorisation] [--steps 1000] [--canaries 12]
                                      [--demo-run runs/demo --demo-data data/shakespeare] [--results PATH] [--quick]

1. Data: Macbeth is the training text and The Comedy of Errors the held-out one (built-in Shakespeare;
   `lmforge prepare` with --val-fraction 0.5 holds out the smaller play), with `--canaries` secrets
   inserted 1, 4 and 16 times (`--canary-repeats 1,4,16`). The tokenizer is char-level, learnt from
   both plays: a BPE learnt from the training play alone cuts the held-out one into more, rarer
   tokens, and its higher loss would pass for membership (AUC 0.82 after 5 steps, zlib 0.96).
2. Over-fit: the demo recipe (4 x 256 SwiGLU decoder, Muon) for `--steps` steps on that one play
   (about 40 passes over its ~100k characters at 1000 steps).
3. The memorisation section of `lmforge report` (lmforge/eval/report/memorisation.py) on the over-fit
   model with its data, and on `make demo`'s model with the demo data when --demo-run exists.

Expected: the over-fit model reproduces a large share of 32-token continuations of its play and none of
the held-out play's, membership AUC >= 0.9, and canary exposure rising with repeats (1 < 4 < 16); the
demo model, trained on 34 plays for 450 steps, extracts little and has an AUC near 0.5.
--quick: 4,000 characters of each play, a tiny model, a few steps (the smoke test of tests/).
Prints one JSON object with every number; `--results` records it (docs/results/memorisation.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lmforge.bench.results import add_results_flag, publish  # noqa: E402
from lmforge.data.corpus import shakespeare_dir  # noqa: E402
from lmforge.data.prepare import prepare  # noqa: E402
from lmforge.eval.report import memorisation  # noqa: E402
from lmforge.eval.report.context import ReportContext  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402
from lmforge.train.pretrain import run_training  # noqa: E402

TRAIN_PLAY, HELDOUT_PLAY = "macbeth_gut.txt", "comedy_of_errors_gut.txt"
REPEATS = [1, 4, 16]
QUICK_TRAIN = ["--model.preset", "tiny", "--train.seq_len", "64", "--train.micro_batch_size", "8", "--train.lr", "3e-3",
               "--train.warmup_steps", "2", "--train.eval_iters", "1", "--train.progress", "false",
               "--train.device", "cpu"]
QUICK_OPTIONS = {"extraction_samples": 16, "membership_samples": 32, "membership_window": 32, "prefix_tokens": 16,
                 "suffix_tokens": 16, "canary_candidates": 256}


def log(msg: str) -> None:
    print(f"memorisation-bench: {msg}", file=sys.stderr, flush=True)


def section(run: Path, data: Path, options: dict) -> dict:
    """The report's memorisation figures, without the ROC points."""
    ctx = ReportContext(llm=LLM.load(run), data=data, out=run, options=options,
                        generator=torch.Generator().manual_seed(0))
    r = memorisation.run(ctx)
    attacks = {k: round(v["auc"], 4) for k, v in r["membership"]["attacks"].items()}
    return {"extraction_rate_train": r["extraction_rate_train"], "extraction_rate_heldout": r["extraction_rate_heldout"],
            "token_match_train": r["extraction"]["train"]["token_match"],
            "token_match_heldout": r["extraction"]["heldout"]["token_match"],
            "membership_auc": r["membership_auc"], "auc_by_attack": attacks,
            "mean_nll_train": r["membership"]["mean_nll_train"], "mean_nll_heldout": r["membership"]["mean_nll_heldout"],
            "canary_exposure_by_repeats": r["canaries"].get("mean_exposure_by_repeats")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/memorisation", help="work directory (data and the over-fit run)")
    p.add_argument("--steps", type=int, default=1000, help="training steps of the over-fit model")
    p.add_argument("--canaries", type=int, default=12, help="secrets inserted, cycling through 1, 4, 16 copies")
    p.add_argument("--demo-run", default="runs/demo", help="make demo's run, reported beside (skipped when absent)")
    p.add_argument("--demo-data", default="data/shakespeare", help="the prepared data make demo trained on")
    p.add_argument("--quick", action="store_true", help="tiny data and model, a few steps (smoke test)")
    add_results_flag(p, "memorisation")
    args = p.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    plays = shakespeare_dir(progress=not args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (TRAIN_PLAY, HELDOUT_PLAY):
            text = (plays / name).read_text(encoding="utf-8")
            cut = 4000 if args.quick else len(text)
            # the held-out play must be the smaller one (prepare holds out the documents that fit)
            (Path(tmp) / name).write_text(text[:cut if name == TRAIN_PLAY else cut * 9 // 10], encoding="utf-8")
        log(f"preparing {TRAIN_PLAY} (train) and {HELDOUT_PLAY} (held out) with {args.canaries} canaries")
        meta = prepare([tmp], str(out / "data"), tokenizer="char", val_fraction=0.5, overwrite=True, progress=False,
                       canaries=args.canaries, canary_repeats=REPEATS)
    held = [s["path"] for s in meta["sources"] if s["split"] == "val"]
    assert len(held) == 1 and held[0].endswith(HELDOUT_PLAY), meta["sources"]
    steps = 40 if args.quick else args.steps
    overrides = [*QUICK_TRAIN] if args.quick else ["--train.eval_every", "0", "--train.ckpt_every", "0"]
    log(f"training the over-fit model for {steps} steps")
    t0 = time.time()
    summary = run_training(str(out / "data"), str(out / "overfit"), recipe=None if args.quick else "demo",
                           overrides=[*overrides, "--train.max_steps", str(steps)], overwrite=True)
    train_minutes = (time.time() - t0) / 60
    options = QUICK_OPTIONS if args.quick else {}
    result = {"quick": args.quick, "train_play": TRAIN_PLAY, "heldout_play": HELDOUT_PLAY, "steps": steps,
              "train_minutes": round(train_minutes, 2), "train_tokens": meta["splits"]["train"]["tokens"],
              "final_train_loss": summary.get("train_loss"), "canaries": args.canaries, "canary_repeats": REPEATS,
              "options": {**memorisation.DEFAULTS, **options}}
    log("reporting the over-fit model")
    result["overfit"] = section(out / "overfit", out / "data", options)
    demo = Path(args.demo_run)
    if not args.quick and demo.is_dir():
        log(f"reporting {demo} on {args.demo_data}")
        result["demo"] = section(demo, Path(args.demo_data), options)
    else:
        result["demo"] = None
    publish("memorisation", result, results=args.results, wall_s=round(time.time() - start, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
