"""Serving benchmark: `lmforge serve` under 1, 8 and 32 concurrent streaming clients over HTTP, next
to a sequential loop of the same requests through transformers' `generate` on the same weights.

    python benchmarks/serve.py [--model DIR] [--clients 1,8,32] [--rounds 2] [--max-tokens 128]
                               [--prompt-len 32] [--threads 1] [--hf-requests 8] [--repeats 3] [--json OUT]
                               [--results PATH]

Model: by default a GPT-2-architecture model with the shape of `make demo`'s model (4 blocks x 256
wide, 4 heads, context 256, vocab 4096), randomly initialised by transformers and saved as a
Hugging Face folder, which `lmforge serve` loads (identical weights on both sides). The demo run
itself (runs/demo: rotary, QK-norm, ReLU^2) has no transformers architecture, so `--model runs/demo`
measures lmforge alone. Weights do not change the speed: every request generates exactly
`max_tokens` tokens (ignore_eos, greedy).

Workload: each client sends `rounds` requests one after another; a request is a token-id prompt of
`prompt_len` tokens (fixed pseudo-random ids) and streams `max_tokens` tokens (`logprobs: 0`, so
every token is visible in the stream even when its text is an incomplete character).
Measured per client count: aggregate generated tokens/s (all tokens / wall time of the run), time to
first token (request sent -> first token received) and inter-token latency (gap between stream
chunks; a chunk may carry more than one token when the client reads slower than tokens come), p50
and p99. `engine_only`: the scheduler alone in this process (no HTTP), 1 and the largest number of
sequences at once. transformers: `model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)`
for `hf_requests` of the same prompts in a loop, in this process, while the server is idle. The
server rows and the transformers loop take turns `repeats` times; each figure is the median
repeat (all samples in the JSON). `--results` records the result for docs/results/ (serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_SHAPE = dict(vocab_size=4096, n_positions=256, n_layer=4, n_head=4, n_embd=256)
SHAPES = {"demo": DEMO_SHAPE,
          "gpt2": dict(vocab_size=50257, n_positions=1024, n_layer=12, n_head=12, n_embd=768)}  # GPT-2 124M


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def make_model(directory: Path, shape: str = "demo") -> Path:
    from lmforge.bench.train import hf_gpt2_config, save_hf_model

    save_hf_model(hf_gpt2_config(**SHAPES[shape]), directory, seed=0)
    tok = ROOT / "runs" / "demo" / "tokenizer.json"
    if tok.is_file() and shape == "demo":
        shutil.copy(tok, directory / "tokenizer.json")
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, threads: int, max_batch: int, device: str = "cpu",
                 kv_cache_dtype: str = "auto", quantize: str | None = None) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "4096", "--device", device,
                             "--kv-cache-dtype", kv_cache_dtype] + (["--quantize", quantize] if quantize else []),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


async def one_request(http: Any, url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            n = sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in chunk["choices"])
            if n:
                times.append(time.perf_counter())
                tokens += n
    return {"ttft": times[0] - t0 if times else float("nan"), "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens}


async def drive(url: str, clients: int, rounds: int, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one_request(http, url, prompts[0], 4)  # warm-up

        async def client(c: int) -> list[dict[str, Any]]:
            return [await one_request(http, url, prompts[(c * rounds + r) % len(prompts)], max_tokens)
                    for r in range(rounds)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * pct(ttfts, 50), 1), "ttft_p99_ms": round(1000 * pct(ttfts, 99), 1),
            "itl_p50_ms": round(1000 * pct(gaps, 50), 2), "itl_p99_ms": round(1000 * pct(gaps, 99), 2),
            "tokens_per_chunk": round(tokens / max(1, len(gaps) + len(results)), 2)}


def engine_only(model: Path, prompts: list[list[int]], clients: list[int], max_tokens: int, threads: int,
                device: str = "cpu", kv_cache_dtype: str = "auto", quantize: str | None = None) -> list[dict]:
    """The scheduler in this process without HTTP: the same requests submitted together (the
    ceiling the server can reach; the difference to the HTTP rows is the serving overhead)."""
    import torch

    from lmforge.infer.llm import LLM
    from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all

    torch.set_num_threads(threads)
    llm = LLM.load(model, device=device, quantize=quantize)
    rows = []
    for c in clients:
        sched = Scheduler(llm.model, llm.tokenizer, max_batch=max(clients), kv_cache_dtype=kv_cache_dtype).start()
        try:
            reqs = [GenerationRequest(prompts[i % len(prompts)], max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                      logprobs=0) for i in range(c)]
            run_all(sched, reqs[:1])  # warm-up
            t0 = time.perf_counter()
            res = run_all(sched, reqs)
            wall = time.perf_counter() - t0
        finally:
            sched.stop()
        tokens = sum(len(r.token_ids) for r in res)
        rows.append({"sequences": c, "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)})
    return rows


def load_transformers(model: Path, threads: int, device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.bench.train import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(model, attn_implementation="sdpa", dtype=torch.float32)
    return hf.to(device).eval()


def transformers_loop(hf: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    import torch

    gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    dev = hf.device
    with torch.inference_mode():
        hf.generate(torch.tensor([prompts[0]], device=dev), **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
        t0 = time.perf_counter()
        tokens = 0
        for p in prompts:
            out = hf.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, len(p), dtype=torch.long,
                                                                                        device=dev), **gen)
            tokens += out.shape[1] - len(p)
        wall = time.perf_counter() - t0
    return {"requests": len(prompts), "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)}


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median throughput (its latencies come with it), plus every repeat's tokens/s."""
    ranked = sorted(rows, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "tokens_per_s_samples": [r["tokens_per_s"] for r in rows]}


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model to serve (default: a GPT-2 model of the demo's shape)")
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server's model and of transformers (default 1: the client needs a core)")
    p.add_argument("--repeats", type=int, default=3, help="rounds in which lmforge and transformers take turns")
    p.add_argument("--hf-requests", type=int, default=8, help="requests in the sequential transformers loop")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where the server, the engine and transformers run")
    p.add_argument("--shape", default="demo", choices=sorted(SHAPES),
                   help="shape of the default model: demo (make demo's, 5M) or gpt2 (124M)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the server's KV cache storage (recorded as config.kv_cache_dtype)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="the server's weights, quantised as they load (recorded as config.quantize)")
    p.add_argument("--json", type=Path)
    add_results_flag(p, "serve")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    from lmforge.bench.machine import machine_info

    clients = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-serve-bench-"))
    try:
        model = args.model or make_model(tmp / f"{args.shape}-shape-gpt2", args.shape)
        hf_ok = (model / "config.json").is_file()
        cfg = json.loads((model / "config.json").read_text()) if hf_ok else {}
        vocab = int(cfg.get("vocab_size", SHAPES[args.shape]["vocab_size"]))
        rng = random.Random(0)
        prompts = [[rng.randrange(5, vocab) for _ in range(args.prompt_len)] for _ in range(64)]
        result: dict[str, Any] = {"benchmark": "serve", "machine": machine_info(), "model": str(model),
                                  "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                  "lmforge": []}
        # the server rows and the transformers loop take turns, `repeats` times; medians are reported
        hf = load_transformers(model, args.threads, args.device) if hf_ok else None
        samples: dict[int, list[dict[str, Any]]] = {c: [] for c in clients}
        hf_samples: list[dict[str, Any]] = []
        proc, url = start_server(model, args.threads, max(clients), args.device, args.kv_cache_dtype,
                                 args.quantize)
        try:
            for rep in range(args.repeats):
                for c in clients:
                    row = asyncio.run(drive(url, c, args.rounds, prompts, args.max_tokens))
                    samples[c].append(row)
                    print(json.dumps(row), file=sys.stderr)
                if hf is not None:
                    hf_samples.append(transformers_loop(hf, prompts[:args.hf_requests], args.max_tokens))
                    print(json.dumps(hf_samples[-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(30)
        result["lmforge"] = [median_row(samples[c]) for c in clients]
        if hf_samples:
            result["transformers_sequential"] = median_row(hf_samples)
        result["engine_only"] = engine_only(model, prompts, sorted({1, max(clients)}), args.max_tokens, args.threads,
                                            args.device, args.kv_cache_dtype, args.quantize)
        print(json.dumps(result["engine_only"]), file=sys.stderr)
        result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
        rows = {r["clients"]: r for r in result["lmforge"]}
        top = rows[max(clients)]
        ratios = {}
        if 1 in rows:
            ratios[f"lmforge_{max(clients)}_vs_own_1"] = round(top["tokens_per_s"] / rows[1]["tokens_per_s"], 2)
        if "transformers_sequential" in result:
            ratios[f"lmforge_{max(clients)}_vs_transformers_sequential"] = round(
                top["tokens_per_s"] / result["transformers_sequential"]["tokens_per_s"], 2)
        result["ratios"] = ratios
        publish("serve", result, json_path=args.json, results=args.results, wall_s=time.perf_counter() - t0)
        for k, v in ratios.items():
            goal = 10 if "transformers" in k else 4
            print(f"{k}: {v}x (target {goal}x: {'met' if v >= goal else 'NOT met'})", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
