"""GPU figures in one run (written for one H100 / H200; any CUDA device works):

    python benchmarks/gpu.py --out DIR [--skip train,decode,serve,check] [--train-steps 60] [--results PATH]

1. train   -- MFU of GPT-2 124M (12 layers, width 768, context 1024; vocabulary padded to 50304 as
              in nanoGPT) trained by `lmforge train` in bf16 autocast with torch.compile, micro-batch 32
              x 1024 tokens, on the prepared Shakespeare data (data/shakespeare, `make demo` makes it).
              MFU = 6N + 12LHDT FLOPs per token x tokens/s / the device's dense bf16 peak (989 TFLOP/s
              on H100 SXM and H200); the median over the logged intervals after step 20 (compilation
              and warm-up excluded).
2. decode  -- greedy decoding of the same GPT-2 124M shape (random weights, vocabulary 50257) in
              bf16: lmforge's engine (`lmforge.infer.generate.generate`), the fixed-shape compiled
              step (`lmforge.bench.decode.StaticGreedy`), and transformers' `generate`, identical
              weights, batch 1 and 32, 64-token prompts, 256 new tokens, frameworks taking turns
              (median of 3). Batch-1 weight bandwidth = bf16 weight bytes x tokens/s.
3. serve   -- benchmarks/serve.py --device cuda --shape gpt2 (the HTTP server under 1/8/32
              streaming clients next to a sequential transformers loop).
4. check   -- the generative families on CUDA agree with the CPU: greedy decoder tokens (engine and
              scheduler), T5 and BART greedy and beam tokens, fp32, random tiny models.
Writes DIR/gpu.json and prints it; `--results` records it for docs/results/ (e.g. gpu-h200.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve import SHAPES  # noqa: E402  (benchmarks/serve.py: the model shapes of the serving benchmark)

GPT2 = SHAPES["gpt2"]


def train_mfu(steps: int, micro_batch: int, preset: str = "gpt2", device: str = "cuda", seq_len: int = 1024,
              compile_model: bool = True) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(prefix="lmforge-gpu-train-"))  # checkpoints stay out of --out
    cmd = [sys.executable, "-m", "lmforge.cli", "train", "--data", str(ROOT / "data" / "shakespeare"), "--out", str(run),
           "--overwrite", "--model.preset", preset, "--model.vocab_size", "50304", "--model.dropout", "0",
           "--train.compile", str(compile_model).lower(), "--train.dtype", "bfloat16", "--train.device", device,
           "--train.micro_batch_size", str(micro_batch), "--train.seq_len", str(seq_len), "--train.max_steps", str(steps),
           "--train.warmup_steps", "10", "--train.eval_every", "0", "--train.eval_iters", "1",
           "--train.ckpt_every", "0", "--train.log_every", "5", "--train.progress", "false"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "tok_per_s" in r]
    late = [r for r in rows if r.get("mfu") is not None and r["step"] > min(20, steps // 2)]
    return {"steps": steps, "micro_batch": micro_batch, "seq_len": seq_len, "wall_s": round(time.time() - t0, 1),
            "tok_per_s": round(statistics.median(r["tok_per_s"] for r in late)),
            "mfu": round(statistics.median(r["mfu"] for r in late), 4),
            "loss_first_last": [rows[0]["loss"], rows[-1]["loss"]]}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def decode(batch_sizes: list[int], n_new: int = 256, prompt_len: int = 64, repeats: int = 3, device: str = "cuda",
           compile_step: bool = True) -> dict[str, Any]:
    from lmforge.bench.decode import StaticGreedy
    from lmforge.bench.train import hf_gpt2_config, load_lmforge, load_transformers, save_hf_model
    from lmforge.infer.generate import generate

    dev, dt = torch.device(device), torch.bfloat16
    with tempfile.TemporaryDirectory() as d:
        save_hf_model(hf_gpt2_config(**GPT2), d, seed=0)
        lm = load_lmforge(d).to(dev, dt).eval()
        hf = load_transformers(d).to(dev, dt).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    static = StaticGreedy(lm, max_len=prompt_len + n_new, compile_step=compile_step)
    out: dict[str, Any] = {"params": sum(p.numel() for p in lm.parameters()), "weight_bytes": weight_bytes,
                           "new_tokens": n_new, "prompt_len": prompt_len, "batches": {}}
    g = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        p_BT = torch.randint(0, GPT2["vocab_size"], (b, prompt_len), generator=g).to(dev)
        prompts = p_BT.tolist()
        fns = {
            "lmforge": lambda: generate(lm, prompts, max_new_tokens=n_new, temperature=0.0, decode_text=False),
            "lmforge_static_compiled": lambda: static.generate(p_BT, n_new),
            "transformers": lambda: hf.generate(p_BT, attention_mask=torch.ones_like(p_BT), max_new_tokens=n_new,
                                                min_new_tokens=n_new, do_sample=False, pad_token_id=0),
        }
        for fn in fns.values():  # warm-up: kernels, allocator, compilation
            with torch.inference_mode():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                with torch.inference_mode():
                    times[k].append(_timed(fn))
        row = {k: {"tokens_per_s": round(b * n_new / statistics.median(ts), 1),
                   "samples_s": [round(t, 4) for t in ts]} for k, ts in times.items()}
        for k in ("lmforge", "lmforge_static_compiled"):
            row[f"{k}_vs_transformers"] = round(row[k]["tokens_per_s"] / row["transformers"]["tokens_per_s"], 2)
            if b == 1:
                row[f"{k}_weight_GBps"] = round(weight_bytes * row[k]["tokens_per_s"] / 1e9, 1)
        out["batches"][str(b)] = row
        print(json.dumps({f"decode_batch{b}": row}), file=sys.stderr, flush=True)
    return out


def serve(out: Path) -> dict[str, Any]:
    j = out / "serve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--device", "cuda", "--shape", "gpt2",
           "--threads", "4", "--repeats", "2", "--hf-requests", "8", "--json", str(j)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    r = json.loads(j.read_text())
    return {"lmforge": r["lmforge"], "transformers_sequential": r.get("transformers_sequential"),
            "engine_only": r.get("engine_only"), "ratios": r.get("ratios")}


def check() -> dict[str, Any]:
    """CUDA vs CPU token equality (fp32) for the decoder engine, the scheduler and both seq2seq arches."""
    from lmforge.infer.generate import generate_ids
    from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all
    from lmforge.infer.seq2seq import generate_seq2seq
    from lmforge.models.decoder import Decoder, config_from_preset as dec_preset
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset as s2s_preset

    res: dict[str, Any] = {}
    torch.manual_seed(0)
    dec = Decoder(dec_preset("tiny", vocab_size=256)).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    cpu = generate_ids(dec, prompts, max_new_tokens=24, temperature=0.0)
    gpu_dec = Decoder(dec.cfg).eval()
    gpu_dec.load_state_dict(dec.state_dict())
    gpu_dec = gpu_dec.cuda()
    res["decoder_engine_equal"] = generate_ids(gpu_dec, prompts, max_new_tokens=24, temperature=0.0) == cpu
    sched = Scheduler(gpu_dec, None, max_batch=4).start()
    try:
        got = run_all(sched, [GenerationRequest(p, max_tokens=24, temperature=0, ignore_eos=True) for p in prompts])
    finally:
        sched.stop()
    res["scheduler_equal"] = [r.token_ids for r in got] == cpu
    for arch in ("t5", "bart"):
        torch.manual_seed(0)
        m = Seq2Seq(s2s_preset(f"{arch}-cpu", vocab_size=256, d_model=64, n_head=2, head_dim=32, d_ff=128,
                               n_encoder_layer=2, n_decoder_layer=2)).eval()
        srcs = [[5, 6, 7, 8, 1], [9, 10, 11, 1]] if arch == "t5" else [[0, 5, 6, 7, 2], [0, 9, 10, 2]]
        for beams in (1, 3):
            a = generate_seq2seq(m, srcs, max_new_tokens=16, num_beams=beams, temperature=0.0)
            m_gpu = Seq2Seq(m.cfg).eval()
            m_gpu.load_state_dict(m.state_dict())
            b = generate_seq2seq(m_gpu.cuda(), srcs, max_new_tokens=16, num_beams=beams,
                                 temperature=0.0)
            res[f"{arch}_{'greedy' if beams == 1 else 'beam3'}_equal"] = [x.ids for x in a] == [x.ids for x in b]
    return res


def main() -> int:
    from lmforge.bench.results import add_results_flag, record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: train, decode, serve, check")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--micro-batch", type=int, default=32)
    add_results_flag(ap, "gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: benchmarks/gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = {"check": check, "decode": lambda: decode([1, 32]), "train": lambda: train_mfu(args.train_steps, args.micro_batch),
             "serve": lambda: serve(args.out)}
    for name, fn in parts.items():
        if name in skip:
            continue
        t0 = time.time()
        try:
            result[name] = fn()
        except Exception as e:  # one part failing must not lose the others' figures
            import traceback

            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result[name + "_wall_s"] = round(time.time() - t0, 1)
        print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
        (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.results:
        record("gpu", result, out=args.results, wall_s=sum(v for k, v in result.items() if k.endswith("_wall_s")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
