"""Peak memory of one SFT training step: full fine-tuning vs LoRA vs QLoRA (issue 23's memory targets).

    python benchmarks/lora_memory.py [--quick] [--shape gpt2] [--batch 8] [--seq 512] [--r 16] [--group-size 128]
                                     [--json OUT] [--results PATH]

Per variant, a fresh process builds the model (random weights of the preset's shape; GPT-2 124M by
default), prepares it as the training loop does (`train.adapters.prepare_lora`: nothing for full
fine-tuning; LoRA r=16 all-linear; QLoRA: the base quantised int4, groups of 128, under the same
adapters), builds the loop's AdamW (`train.optim.build_optimizer`, trainable tensors only) and takes
two optimizer steps of the SFT objective on batch x seq tokens, every token labelled (the second step
holds the AdamW moments as every later one does). Its peak RSS is `getrusage` ru_maxrss of that
process (lmforge.bench.machine.peak_rss_bytes), reported with the RSS before the model was built
(Python, torch and lmforge imported). `trainable_share`: trained parameters / all parameters (the
base's full-precision count, QLoRA's too, plus the adapters').

Targets: peak RSS of LoRA <= 45% of full fine-tuning's, QLoRA <= 30%, trainable share < 2%.
`peak_above_start_vs_full` is the same ratio without the RSS every process starts with (Python and
torch imported, ~0.24 GB), for comparison; the verdicts use whole peak RSS.

`--mmap-threshold BYTES` runs the children with glibc's MALLOC_MMAP_THRESHOLD_ fixed (128 KiB is
glibc's starting value; fixing it turns off its dynamic raise): every larger tensor is then its own
mapping and goes back to the system when freed, so RSS follows the live tensors. With the default
dynamic threshold, freed activations of up to 32 MiB stay in the heap and peak RSS also counts
their fragments (about 1 GB more for LoRA at this shape, measured).
`--repeat N` measures every variant N times and reports the run with the median peak (all peaks are
kept in `peak_rss_bytes_runs`): with glibc's dynamic threshold, which freed blocks its heap keeps
depends on timing, and the same code's peak varied by up to 0.4 GB between runs; with the fixed
threshold it repeated to within 1 MB.
`--quick`: the tiny preset at batch 2 x 32, int4 groups of 32 (a smoke run for the tests; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

VARIANTS = ("full", "lora", "qlora")
TARGETS = {"lora": 0.45, "qlora": 0.30}  # peak RSS / full fine-tuning's, at most
TRAINABLE_TARGET = 0.02


def step_memory(variant: str, shape: str, batch: int, seq: int, r: int, group: int,
                checkpointing: bool = False) -> dict[str, Any]:
    """In this process: peak RSS of two SFT optimizer steps of `variant` (run in a fresh process)."""
    import torch

    from lmforge.bench.machine import peak_rss_bytes, rss_bytes
    from lmforge.finetune.sft import SFTObjective
    from lmforge.models.decoder import Decoder, config_from_preset
    from lmforge.nn.lora import trainable_parameters
    from lmforge.train.adapters import LoRAConfig, prepare_lora
    from lmforge.train.optim import build_optimizer

    torch.manual_seed(0)
    before = rss_bytes()
    model = Decoder(config_from_preset(shape, block_size=max(seq, 64)))
    qlora = variant == "qlora"
    lora = None if variant == "full" else LoRAConfig(r=r, alpha=2 * r, quantize="int4" if qlora else "none",
                                                     group_size=group if qlora else None)
    base_params = trainable_parameters(model)[1]  # counted before quantising: QLoRA's base holds buffers
    prepare_lora(model, lora, seed=0)
    if checkpointing:  # --train.activation_checkpointing: blocks recompute their activations in backward
        from lmforge.train.distributed import checkpoint_activations

        checkpoint_activations(model)
    model.train()
    trained = trainable_parameters(model)[0]
    total = base_params + sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    optimizer = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95), 1e-8, "cpu")
    V = model.cfg.vocab_size
    objective = SFTObjective()
    t0 = time.perf_counter()
    for step in range(2):
        x_BT = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(step))
        batch_ = {"input_ids": x_BT, "labels": x_BT.roll(-1, 1), "segment_ids": torch.zeros_like(x_BT)}
        loss, _ = objective(model, batch_)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"variant": variant, "peak_rss_bytes": peak_rss_bytes(), "rss_before_model_bytes": before,
            "trainable_params": trained, "total_params": total, "trainable_share": round(trained / total, 5),
            "loss": round(float(loss), 4), "step_seconds": round((time.perf_counter() - t0) / 2, 2)}


def measure(variant: str, shape: str, batch: int, seq: int, r: int, group: int,
            checkpointing: bool = False, mmap_threshold: int | None = None) -> dict[str, Any]:
    """`step_memory` in a fresh process (so each peak is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--shape", shape, "--batch", str(batch),
           "--seq", str(seq), "--r", str(r), "--group-size", str(group)] + \
        (["--activation-checkpointing"] if checkpointing else [])
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(shape: str, batch: int, seq: int, r: int, group: int, checkpointing: bool = False,
        mmap_threshold: int | None = None, repeat: int = 1) -> dict[str, Any]:
    runs = {v: [] for v in VARIANTS}
    for _ in range(repeat):  # interleaved, so that a slow drift of the machine touches every variant alike
        for v in VARIANTS:
            runs[v].append(measure(v, shape, batch, seq, r, group, checkpointing, mmap_threshold))
    rows = {}
    for v, done in runs.items():  # the run with the median peak stands for the variant; every peak is kept
        ranked = sorted(done, key=lambda row: row["peak_rss_bytes"])
        rows[v] = dict(ranked[(len(ranked) - 1) // 2])
        if repeat > 1:
            rows[v]["peak_rss_bytes_runs"] = [row["peak_rss_bytes"] for row in done]
    full = rows["full"]["peak_rss_bytes"]
    above = lambda row: row["peak_rss_bytes"] - row["rss_before_model_bytes"]  # noqa: E731
    verdicts = []
    for v, goal in TARGETS.items():
        share = rows[v]["peak_rss_bytes"] / full
        rows[v]["peak_rss_vs_full"] = round(share, 4)
        rows[v]["peak_above_start_vs_full"] = round(above(rows[v]) / above(rows["full"]), 4)
        verdicts.append({"name": f"{v}_peak_rss_vs_full", "value": round(share, 4), "target": goal, "at_most": True,
                         "met": share <= goal, "text": f"peak RSS {v} / full: {share:.3f} vs target <= {goal}"})
    share = rows["lora"]["trainable_share"]
    verdicts.append({"name": "lora_trainable_share", "value": share, "target": TRAINABLE_TARGET, "at_most": True,
                     "met": share < TRAINABLE_TARGET,
                     "text": f"trainable share LoRA r={r}: {share:.4f} vs target < {TRAINABLE_TARGET}"})
    from lmforge.bench.machine import machine_info

    return {"shape": shape, "batch": batch, "seq_len": seq, "r": r, "targets": "all-linear", "quantize": f"int4 g{group}",
            "activation_checkpointing": checkpointing, "malloc_mmap_threshold": mmap_threshold, "repeat": repeat,
            "variants": rows, "verdicts": verdicts, "machine": machine_info()}


def main() -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, batch 2 x 32 (a smoke run)")
    p.add_argument("--shape", default="gpt2", help="decoder preset (default gpt2: the GPT-2 124M shape)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--group-size", type=int, default=128, help="QLoRA's int4 group size")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="every variant with --train.activation_checkpointing (blocks recompute activations)")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the measured processes (e.g. 131072); default: glibc's dynamic one")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure every variant N times (fresh processes, interleaved) and report the median peak; "
                        "with glibc's dynamic threshold the peaks vary from run to run")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the JSON result here")
    add_results_flag(p, "lora-memory")
    args = p.parse_args()
    if args.quick:
        args.shape, args.batch, args.seq, args.group_size = "tiny", 2, 32, 32
    if args.child:
        print(json.dumps(step_memory(args.child, args.shape, args.batch, args.seq, args.r, args.group_size,
                                         args.activation_checkpointing)))
        return 0
    t0 = time.perf_counter()
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    result = run(args.shape, args.batch, args.seq, args.r, args.group_size, args.activation_checkpointing,
                 args.mmap_threshold, args.repeat)
    for v in result["verdicts"]:
        print(v["text"], "met" if v["met"] else "NOT met", file=sys.stderr)
    publish("lora-memory", result, json_path=args.json, results=args.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
