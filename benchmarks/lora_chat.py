"""LoRA against full fine-tuning at equal wall time: the chat demo's SFT both ways, side by side.

    python benchmarks/lora_chat.py [--base runs/demo] [--data data/chat_tasks] [--minutes 8] [--lora-r 64]
                                   [--lora-lr 2e-3] [--quick] [--results PATH]

Both runs are `lmforge finetune sft` with the chat-demo recipe and the same wall-clock budget
(`--train.max_minutes`: the schedule is fitted to the time, so each run ends with its learning rate
decayed), one after the other on this machine; the LoRA run adds `--lora.r R --lora.alpha 2R
--lora.targets all-linear`. Each model is then scored on the same held-out prompts (exact match,
greedy), as `make chat-demo` scores its model. Reported: accuracy ± standard error per run, steps
reached, trainable parameters, the gap in points (issue target: LoRA within 10 points of full SFT).
Run it on a quiet machine: the budgets are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lmforge.bench.results import add_results_flag, publish
from lmforge.demo.chat_demo import evaluate, load_chat_llm, read_jsonl, sft_command, trained_steps


def lora_flags(r: int, lr: float, modules_to_save: str = "") -> list[str]:
    saved = ["--lora.modules_to_save", modules_to_save] if modules_to_save else []
    return ["--lora.r", str(r), "--lora.alpha", str(2 * r), "--lora.targets", "all-linear", "--train.lr", str(lr)] + saved


def trainable_share(base: Path, lora: list[str]) -> dict:
    """Trainable parameters of the run as trained: the base, with the run's adapter added the way
    training adds it (a reloaded PEFT file can hold more: shared A matrices split per module)."""
    from lmforge.infer.llm import LLM
    from lmforge.nn.lora import LoRASettings, add_lora, trainable_parameters

    model = LLM.load(base).model
    if not lora:
        n = sum(p.numel() for p in model.parameters())
        return {"trainable": n, "total": n, "share": 1.0}
    flags = dict(zip(lora[::2], lora[1::2]))
    add_lora(model, LoRASettings(r=int(flags["--lora.r"]), alpha=float(flags["--lora.alpha"]),
                                 targets=flags["--lora.targets"],
                                 modules_to_save=flags.get("--lora.modules_to_save", "")))
    trainable, total = trainable_parameters(model)
    return {"trainable": trainable, "total": total, "share": trainable / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lora_chat", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/demo")
    p.add_argument("--data", default="data/chat_tasks")
    p.add_argument("--out", default="runs/lora-chat")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of each SFT run (default 8)")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-lr", type=float, default=2e-3, help="peak lr of the LoRA run (the recipe's full-SFT lr: 2e-3)")
    p.add_argument("--lora-modules-to-save", default="",
                   help="also train these modules in full, e.g. tok_emb,lm_head (the chat tokens' rows are "
                        "untrained in the demo base)")
    p.add_argument("--runs", default="full,lora", help="which runs: full,lora (default both, side by side)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="tiny budgets and 40 test prompts: checks the chain runs")
    add_results_flag(p, "lora-chat")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    base, data, out = Path(a.base), Path(a.data), Path(a.out)
    if not (data / "train.jsonl").is_file():
        raise SystemExit(f"{data}/train.jsonl is missing: run `make chat-demo` first")
    n_test = 40 if a.quick else a.n_test
    test = read_jsonl(data / "test.jsonl")[:n_test]  # make chat-demo's held-out prompts
    chosen = [r.strip() for r in a.runs.split(",") if r.strip()]
    runs = {name: flags for name, flags in (("full", []), ("lora", lora_flags(a.lora_r, a.lora_lr,
                                                                               a.lora_modules_to_save)))
            if name in chosen}
    result: dict = {"minutes_each": a.minutes, "lora_r": a.lora_r, "lora_alpha": 2 * a.lora_r,
                    "lora_lr": a.lora_lr, "full_lr": 2e-3, "lora_modules_to_save": a.lora_modules_to_save,
                    "test_prompts": len(test), "runs": {}}
    for name, extra in runs.items():
        cmd = sft_command(base, data, out / name, 6 if a.quick else None, None if a.quick else a.minutes) + extra
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        minutes = (time.perf_counter() - start) / 60
        scores = evaluate(load_chat_llm(out / name), test)
        result["runs"][name] = {"accuracy": scores["accuracy"], "stderr": scores["stderr"],
                                "stop_rate": scores["stop_rate"],
                                "per_task": scores["per_task"], "steps": trained_steps(out / name),
                                "train_minutes": round(minutes, 2), **trainable_share(base, extra)}
        print(f"lora_chat: {name}: exact match {100 * scores['accuracy']:.1f}% in {minutes:.1f} min, "
              f"{result['runs'][name]['steps']} steps", file=sys.stderr, flush=True)
    if {"full", "lora"} <= set(result["runs"]):
        full, lora = result["runs"]["full"]["accuracy"], result["runs"]["lora"]["accuracy"]
        result["gap_points"] = round(100 * (full - lora), 2)
        result["target_met"] = result["gap_points"] <= 10
    publish("lora-chat", result, results=a.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
