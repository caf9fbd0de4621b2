"""Where a batch-1 decode step's time goes, fp32 against int8 / int4 weights (torch.profiler).

    python benchmarks/decode_profile.py [--shape small] [--new-tokens 64] [--threads 1] [--results PATH]

The same randomly initialised GPT-2 model as benchmarks/quant.py (saved as a Hugging Face folder,
loaded with `LLM.load(..., quantize=...)`), a 64-token prompt, `new_tokens` greedy tokens, profiled
after one warm-up run; the same run with one new token is subtracted, so the figures are per decode
step (the prompt's prefill excluded). Self CPU time of every operator, grouped: the weight matmuls (fp32 oneDNN /
mm, or the int8 / int4 weight-only kernels, with the bf16 casts of their inputs and outputs),
attention (SDPA), and everything else (norms, rotary / positions, residual adds, embedding, the KV
cache's writes, sampling); `python_overhead_ms_per_token` is the wall time per token that no
operator accounts for (Python, module calls, dispatch). The figures say how much a faster matmul can
still win: once the matmuls are cheap, the rest of the step sets the speed.

`kernels`: one weight's matmul alone, fp32 (oneDNN and MKL) against the int8 / int4 weight-only
kernels with bf16 and with fp32 activations (why `QuantizedLinear` computes in bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {"small": (8192, 1024, 6, 6, 384), "gpt2": (50257, 1024, 12, 12, 768)}
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "int8": dict(quantize="int8", quantize_embeddings=True),
    "int4_g128": dict(quantize="int4", group_size=128, quantize_embeddings=True),
}
MATMUL_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::_to_copy", "aten::copy_")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "aten::_flash_attention_forward")


def group_of(name: str) -> str:
    if name in ATTENTION_OPS:
        return "attention"
    if name in MATMUL_OPS:
        return "matmul"
    return "other_ops"


def profile_variant(hf_dir: Path, variant: str, prompt: list[int], n_new: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from lmforge.infer.generate import generate
    from lmforge.infer.llm import LLM

    model = LLM.load(hf_dir, **VARIANTS[variant]).model

    def run(n: int) -> None:
        generate(model, [prompt], max_new_tokens=n, temperature=0.0)

    def measure(n: int) -> tuple[float, float, dict[str, float], dict[str, float]]:
        t = time.perf_counter()
        run(n)
        plain_s = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            run(n)
            profiled_s = time.perf_counter() - t
        groups = {"matmul": 0.0, "attention": 0.0, "other_ops": 0.0}
        ops: dict[str, float] = {}
        for ev in prof.key_averages():
            groups[group_of(ev.key)] += ev.self_cpu_time_total / 1000
            ops[ev.key] = ops.get(ev.key, 0.0) + ev.self_cpu_time_total / 1000
        return plain_s * 1000, profiled_s * 1000, groups, ops

    run(n_new)  # warm-up: allocations, oneDNN primitive caches
    # The prompt's prefill and first token cost the same in both runs: their difference is n_new - 1 decode steps.
    long_ms, long_prof_ms, long_groups, long_ops = measure(n_new)
    short_ms, short_prof_ms, short_groups, short_ops = measure(1)
    steps = n_new - 1
    groups = {k: (long_groups[k] - short_groups[k]) / steps for k in long_groups}
    ops = {k: (v - short_ops.get(k, 0.0)) / steps for k, v in long_ops.items()}
    profiled = (long_prof_ms - short_prof_ms) / steps
    return {"ms_per_token": round((long_ms - short_ms) / steps, 4),
            "profiled_ms_per_token": round(profiled, 4),
            "op_ms_per_token": {k: round(v, 4) for k, v in groups.items()},
            "python_overhead_ms_per_token": round(max(profiled - sum(groups.values()), 0.0), 4),
            "top_ops_ms_per_token": {k: round(v, 4) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:12]}}


KERNEL_CASES = [(768, 768, 1), (3072, 768, 1), (768, 3072, 1), (3072, 768, 16), (3072, 768, 64)]  # (N, K, M)


def kernel_times(iters: int = 30) -> list[dict[str, Any]]:
    """Microseconds per call (median of `iters`) of one N x K weight at M rows: fp32 through lmforge's
    `Linear` (oneDNN) and through `F.linear` (MKL), and the int8 / int4 (group 128) weight-only kernels
    with bf16 activations (what `QuantizedLinear` does, casts included) and with fp32 activations."""
    import statistics

    import torch.nn.functional as F

    from lmforge.nn.linear import Linear
    from lmforge.nn.quant import QuantizedLinear

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return round(statistics.median(ts) * 1e6, 1)

    rows = []
    with torch.inference_mode():
        for N, K, M in KERNEL_CASES:
            lin = Linear(K, N, bias=False)
            x = torch.randn(M, K)
            q8 = QuantizedLinear.from_linear(lin, "int8")
            q4 = QuantizedLinear.from_linear(lin, "int4", 128)
            rows.append({"N": N, "K": K, "M": M,
                         "fp32_onednn_us": timed(lambda: lin(x)),
                         "fp32_mkl_us": timed(lambda: F.linear(x, lin.weight)),
                         "int8_bf16_x_us": timed(lambda: q8(x)),
                         "int8_fp32_x_us": timed(lambda: torch._weight_int8pack_mm(x, q8.qweight, q8.scales.float())),
                         "int4_g128_bf16_x_us": timed(lambda: q4(x)),
                         "int4_g128_fp32_x_us": timed(lambda: torch._weight_int4pack_mm_for_cpu(
                             x, q4.qweight, 128, q4.scales.float()))})
    return rows


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    add_results_flag(p, "decode-profile")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)

    from lmforge.bench.train import hf_gpt2_config, save_hf_model

    V, ctx, L, H, C = SHAPES[a.shape]
    with tempfile.TemporaryDirectory(prefix="lmforge-decode-profile-") as tmp:
        hf_dir = Path(tmp) / "hf"
        save_hf_model(hf_gpt2_config(vocab_size=V, n_positions=ctx, n_layer=L, n_head=H, n_embd=C), hf_dir, seed=0)
        prompt = torch.randint(0, V, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        result: dict[str, Any] = {"benchmark": "decode_profile", "shape": a.shape, "threads": a.threads,
                                  "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "variants": {}}
        for v in VARIANTS:
            result["variants"][v] = profile_variant(hf_dir, v, prompt, a.new_tokens)
            print(v, json.dumps(result["variants"][v]), file=sys.stderr)
    result["kernels"] = kernel_times()
    publish("decode-profile", result, results=a.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
