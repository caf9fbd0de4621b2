"""Alignment speed and memory on the chat demo's SFT model (docs/benchmarks.md, "Alignment").

    python benchmarks/align_bench.py [--sft runs/chat-demo] [--data data/chat_tasks] [--steps 20] [--device cuda]
                                     [--results PATH]

Each measurement runs in its own process (peak RSS = getrusage ru_maxrss of that process):
  dpo_precomputed  lmforge's DPO: reference log-probs computed once, no reference model while training
  dpo_live_ref     the same TrainJob with the usual alternative: a live reference model in memory whose
                   log-probs are recomputed for every batch (same losses, more memory and time)
  grpo, ppo        rollout tokens/s (batched KV-cache generation inside training) and optimizer steps/s
On a CUDA device (--device cuda) it also reports peak_cuda_train_mb: torch.cuda.max_memory_allocated
during training alone (reset after the task is built, so DPO's one reference pass is not in it).
Prints one JSON object per measurement and a summary table; `--results` records them for
docs/results/ (align-bench.json, one entry per measurement).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path


def _args(base: str, data: str, out: str, **kw):
    return types.SimpleNamespace(base=base, data=data, out=out, val_data=None, val_fraction=None, config=None,
                                 recipe=None, resume=None, overwrite=True, **kw)


def _pairs(sft: str, tasks: Path, out: Path, n: int) -> Path:
    """Pairs for the memory run: the correct answer over a wrong one (lengths like real pairs)."""
    rows = [json.loads(x) for x in (tasks / "train.jsonl").read_text().splitlines()[:n]]
    path = out / "bench_pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "chosen": r["answer"],
                                        "rejected": r["answer"][::-1] + "0"}) + "\n" for r in rows))
    return path


def _reset_cuda_peak(device: str) -> None:
    """CUDA peak memory counts the training phase alone (set-up passes such as DPO's reference
    log-probs excluded); what is resident then (a live reference model) is counted."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def child(mode: str, sft: str, tasks: str, steps: int, out: str, device: str = "cpu") -> dict:
    import torch

    from lmforge.finetune.scaffold import prepare
    from lmforge.train.loop import train_job

    torch.manual_seed(0)
    common = ["--train.max_steps", str(steps), "--train.progress", "false", "--train.log_every", "1",
              "--train.ckpt_every", "1000000", "--train.eval_every", "0", "--train.device", device]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode.startswith("dpo"):
        from lmforge.finetune.preference import DPOObjective, completion_logps

        pairs = _pairs(sft, Path(tasks), Path(out).parent, 512)
        task, cfg = prepare("dpo", _args(sft, str(pairs), out), common + ["--train.micro_batch_size", "16"])
        if mode == "dpo_live_ref":
            from lmforge.finetune.base_model import load_base

            ref = load_base(sft, "dpo").model.eval().to(device)

            class LiveReferenceDPO(DPOObjective):  # the reference's log-probs computed in every step
                def __call__(self, model, batch):
                    with torch.no_grad():
                        batch = {**batch, "ref_logps": completion_logps(ref, batch)}
                    return super().__call__(model, batch)

            task.objective = LiveReferenceDPO()
        _reset_cuda_peak(device)
        t0 = time.perf_counter()
        train_job(task, cfg.train, out)
    else:
        extra = (["--grpo.num_generations", "8", "--grpo.max_new_tokens", "24"] if mode == "grpo"
                 else ["--ppo.max_new_tokens", "24", "--ppo.epochs", "2"])
        task, cfg = prepare(mode, _args(sft, str(Path(tasks) / "train.jsonl"), out,
                                        reward=["lmforge.finetune.rewards:task_verifier"], reward_weights=None),
                            common + ["--train.micro_batch_size", "32"] + extra)
        _reset_cuda_peak(device)
        t0 = time.perf_counter()
        train_job(task, cfg.train, out)
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    res = {"mode": mode, "steps": steps, "seconds": round(seconds, 2), "steps_per_s": round(steps / seconds, 3),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "rss_before_mb": round(rss0, 1), "device": device}
    if device == "cuda":
        res["device_name"] = torch.cuda.get_device_name()
        res["peak_cuda_train_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)  # training only
    if "rollout_tok_per_s" in rows[0]:
        res["rollout_tok_per_s"] = round(sum(r["rollout_tok_per_s"] for r in rows) / len(rows), 1)
        res["completion_length"] = round(sum(r["completion_length"] for r in rows) / len(rows), 2)
    return res


def main() -> int:
    from lmforge.bench.results import add_results_flag, record

    p = argparse.ArgumentParser()
    p.add_argument("--sft", default="runs/chat-demo")
    p.add_argument("--data", default="data/chat_tasks")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default="dpo_precomputed,dpo_live_ref,grpo,ppo")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--child")
    p.add_argument("--out")
    add_results_flag(p, "align-bench")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.sft, a.data, a.steps, a.out, a.device)))
        return 0
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for mode in a.modes.split(","):
            r = subprocess.run([sys.executable, __file__, "--child", mode, "--sft", a.sft, "--data", a.data,
                                "--steps", str(a.steps), "--out", str(Path(d) / mode), "--device", a.device], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"{'mode':<16} {'steps/s':>8} {'peak RSS MB':>12} {'peak CUDA MB':>13} {'rollout tok/s':>14}")
    for r in results:
        print(f"{r['mode']:<16} {r['steps_per_s']:>8.3f} {r['peak_rss_mb']:>12.1f} {r.get('peak_cuda_train_mb', '-'):>13} "
              f"{r.get('rollout_tok_per_s', '-'):>14}")
    if a.results:
        record("align-bench", {r["mode"]: r for r in results}, out=a.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
