"""FSDP2 and QLoRA on one GPU (written for one H100 / H200; any CUDA device works):

    python benchmarks/fsdp_gpu.py [--data data/shakespeare] [--steps 40] [--skip equality,qlora] [--results PATH]
    python benchmarks/fsdp_gpu.py --quick --data DIR      (CPU smoke mode: tiny shapes, seconds)

1. equality -- `lmforge train` under `torchrun --standalone --nproc_per_node 1` twice, identical but for
               --train.parallelism ddp | fsdp: the "small" decoder preset (6 layers, width 384), micro-batch
               16 x 256 tokens, dropout 0, on the prepared data (`make demo` makes data/shakespeare). Once
               in fp32 (FSDP then only shards, so the losses agree to rounding: max relative difference
               expected ~1e-6) and once in bf16 (DDP: fp32 weights under bf16 autocast; FSDP: the
               MixedPrecisionPolicy's bf16 gathered weights, so embeddings and norms also run in bf16 and
               the losses differ by bf16 rounding, ~1e-3). Prints per-run MFU (the trainer's figure: 6N +
               12LHDT FLOPs per token x tokens/s / the device's dense peak), median after step 10.
2. qlora    -- one QLoRA training step at the Llama 3.2 1B shape (16 layers, width 2048, 32 heads / 8 KV
               heads, SwiGLU 8192, vocabulary 128256, tied head; random weights): every linear but the
               head int8 weight-only (the int kernel PyTorch ships for CUDA; int4's is x86-only), LoRA r 16
               all-linear in fp32, bf16 autocast, AdamW on the adapters, batch 4 x 2048 tokens. Reports
               peak GPU memory, tokens/s (median of 5 steps after 2 warm-up steps), trainable
               parameters and MFU counted as 4N + 8LHDT FLOPs per token (forward plus the backward to the
               activations: the frozen base gets no weight gradient).
Prints the JSON; `--json PATH` also writes it, `--results` records it for docs/results/ (e.g. fsdp-gpu-h200.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lmforge.bench.results import add_results_flag, publish  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192,
                pos_encoding="rope", mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, bias=False, tie_embeddings=True,
                rope_theta=500000.0, dropout=0.0)
LLAMA_QUICK = dict(LLAMA_1B, vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=128)


def train_run(data: Path, parallelism: str, dtype: str, quick: bool, steps: int) -> dict[str, Any]:
    """`lmforge train` under torchrun with one process; its per-step losses and median MFU."""
    run = Path(tempfile.mkdtemp(prefix=f"lmforge-fsdp-{parallelism}-"))
    device = "cpu" if quick else "cuda"
    shape = ["--model.preset", "tiny", "--train.seq_len", "32", "--train.micro_batch_size", "4"] if quick else \
        ["--model.preset", "small", "--train.seq_len", "256", "--train.micro_batch_size", "16"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "lmforge.cli", "train", "--data", str(data), "--out", str(run), "--overwrite", *shape,
           "--model.dropout", "0", "--train.parallelism", parallelism, "--train.dtype", dtype,
           "--train.device", device, "--train.max_steps", str(steps), "--train.warmup_steps", "5",
           "--train.eval_every", "0", "--train.eval_iters", "1", "--train.ckpt_every", "0", "--train.log_every", "1",
           "--train.progress", "false"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    late = [r["mfu"] for r in rows if r.get("mfu") is not None and r["step"] > min(10, steps // 2)]
    return {"wall_s": round(time.time() - t0, 1), "losses": [r["loss"] for r in rows],
            "mfu": round(statistics.median(late), 4) if late else None}


def equality(data: Path, quick: bool, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in (["float32"] if quick else ["float32", "bfloat16"]):
        ddp, fsdp = train_run(data, "ddp", dtype, quick, steps), train_run(data, "fsdp", dtype, quick, steps)
        if "error" in ddp or "error" in fsdp:
            out[dtype] = {"ddp": ddp, "fsdp": fsdp}
            continue
        rel = [abs(b - a) / abs(a) for a, b in zip(ddp["losses"], fsdp["losses"])]
        out[dtype] = {"steps": len(rel), "loss_max_rel_diff": max(rel), "loss_last": [ddp["losses"][-1], fsdp["losses"][-1]],
                      "mfu": {"ddp": ddp["mfu"], "fsdp": fsdp["mfu"]},
                      "wall_s": {"ddp": ddp["wall_s"], "fsdp": fsdp["wall_s"]}}
    return out


def qlora_step(quick: bool, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    from lmforge.models.decoder import Decoder, DecoderConfig
    from lmforge.nn.lora import LoRASettings, add_lora, trainable_parameters
    from lmforge.nn.quant import quant_config, quantize_model
    from lmforge.train.metrics import peak_flops

    device = torch.device("cpu" if quick else "cuda")
    cfg = DecoderConfig(**(LLAMA_QUICK if quick else LLAMA_1B))
    batch, seq = (2, 32) if quick else (4, 2048)
    torch.manual_seed(0)
    with device:
        model = Decoder(cfg)
    quantize_model(model, quant_config("int8"))
    add_lora(model, LoRASettings(r=16, alpha=32, targets="all-linear"))
    trainable, _ = trainable_parameters(model)
    total = cfg.num_params() + trainable  # the quantised base weights are buffers, not parameters
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    low = device.type == "cuda"

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    if low:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        if low:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(step())
        if low:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tok_per_s = batch * seq / statistics.median(times)
    flops_per_token = 2 * cfg.flops_per_token(seq) / 3  # 4N + 8LHDT: no weight gradients for the frozen base
    peak = peak_flops(device, low_precision=low)
    return {"shape": "llama-3.2-1b" if not quick else "quick", "params": total, "trainable_params": trainable,
            "trainable_share": round(trainable / total, 5), "batch": batch, "seq_len": seq,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if low else None,
            "tok_per_s": round(tok_per_s, 1), "mfu": round(flops_per_token * tok_per_s / peak, 4) if peak else None,
            "losses": losses, "finite": all(math.isfinite(x) for x in losses)}


def run(opts: dict[str, Any]) -> dict[str, Any]:
    quick = bool(opts.get("quick"))
    if not quick and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --quick for the CPU smoke mode")
    skip = set(opts.get("skip") or ())
    steps = opts.get("steps") or (4 if quick else 40)
    result: dict[str, Any] = {"device": "cpu" if quick else torch.cuda.get_device_name(0), "quick": quick,
                              "torch": torch.__version__}
    if "equality" not in skip:
        result["equality"] = equality(Path(opts["data"]), quick, steps)
    if "qlora" not in skip:
        result["qlora"] = qlora_step(quick)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke mode: tiny shapes, a few steps")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare"), help="prepared data directory (equality)")
    p.add_argument("--steps", type=int, default=None, help="training steps per equality run (default 40; quick 4)")
    p.add_argument("--skip", default="", help="comma list of parts to leave out: equality, qlora")
    p.add_argument("--json", help="also write the JSON here")
    add_results_flag(p, "fsdp-gpu")
    args = p.parse_args(argv)
    t0 = time.time()
    result = run({"quick": args.quick, "data": args.data, "steps": args.steps,
                  "skip": [s for s in args.skip.split(",") if s]})
    publish("fsdp-gpu", result, json_path=args.json, results=args.results, wall_s=time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
