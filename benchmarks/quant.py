"""Weight-only quantisation: decode speed, weight memory and quality of int8 / int4 against fp32.

    python benchmarks/quant.py [--quick] [--shapes small,gpt2] [--prompt-len 64] [--new-tokens 256]
                               [--repeats 3] [--demo runs/demo --demo-data data/shakespeare]
                               [--chat runs/chat-demo --chat-data data/chat_tasks/test.jsonl]
                               [--threads N] [--json OUT] [--results PATH]

Speed, per shape ("small": GPT-2 6 x 384, vocab 8192; "gpt2": the GPT-2 124M shape): a randomly
initialised GPT2LMHeadModel saved as a Hugging Face folder; transformers fp32 `generate` and lmforge
(fp32, and quantised as `LLM.load(..., quantize=...)` does) on the same weights, batch 1, a
`prompt_len`-token prompt, exactly `new_tokens` greedy tokens; the variants take turns `repeats`
times, figures are medians. Variants: int8 and int4 (groups of 128 and 64) with the embeddings and
the tied head quantised too (`--quantize-embeddings`), and int8 with them in fp32. `agreement`: the
share of greedy tokens equal to lmforge fp32's on that prompt (random weights: near-ties flip early).

Memory, per shape and variant: the model.safetensors bytes `lmforge quantize` writes, and the peak
RSS of a fresh process that loads that directory with `LLM.load` and runs one forward step on one
token, which reads every weight (fp32 weights are mapped from the file and resident only once read;
quantised ones are read into their modules as they load) (minus `baseline_rss_bytes`, the
same process before loading: Python, torch and lmforge imported, and torch's one-time costs paid by
building a tiny model on the meta device).

Quality (with --demo, --chat): bits per byte of make demo's model on its held-out split
(lmforge.eval.perplexity.evaluate) and greedy-token agreement with fp32 over `agreement_prompts`
held-out windows; exact-match accuracy of the chat demo's model on its test prompts (the chat
demo's scorer) and the share of replies identical to fp32's.

The quantised matmuls compute in bf16 (PyTorch's x86 weight-only kernels are vectorised for bf16
activations); lmforge fp32 and transformers compute in fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (vocab_size, n_positions, n_layer, n_head, n_embd)
SHAPES = {"tiny": (512, 256, 2, 2, 128), "small": (8192, 1024, 6, 6, 384), "gpt2": (50257, 1024, 12, 12, 768)}
# variant -> LLM.load quantisation options (None: fp32)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int8": dict(quantize="int8", quantize_embeddings=True),
    "int8_fp32_head": dict(quantize="int8"),
    "int4_g128": dict(quantize="int4", group_size=128, quantize_embeddings=True),
    "int4_g64": dict(quantize="int4", group_size=64, quantize_embeddings=True),
}
QUALITY_VARIANTS = ("fp32", "int8", "int4_g128", "int4_g64")


def verdict(name: str, variant: str, value: float, goal: float, at_most: bool, what: str) -> dict[str, Any]:
    """One target verdict (>= goal, or <= goal with at_most)."""
    met = value <= goal if at_most else value >= goal
    sign = "<=" if at_most else ">="
    text = f"{what} [{variant}]: {value:.3g} vs target {sign} {goal:g}: {'met' if met else 'NOT met'}"
    return {"name": name, "variant": variant, "value": round(value, 4), "target": goal, "at_most": at_most,
            "met": met, "text": text}


def load(directory: Path, variant: str) -> Any:
    from lmforge.infer.llm import LLM

    return LLM.load(directory, **(VARIANTS[variant] or {}))


def agreement(ids: list[int], ref: list[int]) -> float:
    return sum(a == b for a, b in zip(ids, ref)) / max(len(ref), 1)


# ---- speed -------------------------------------------------------------------------------------

def bench_speed(shape: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lmforge.bench import interleaved, median
    from lmforge.bench.train import hf_gpt2_config, load_transformers, save_hf_model
    from lmforge.infer.generate import generate

    V, ctx, L, H, C = SHAPES[shape]
    hf_dir = work / f"{shape}-hf"
    save_hf_model(hf_gpt2_config(vocab_size=V, n_positions=ctx, n_layer=L, n_head=H, n_embd=C), hf_dir, seed=0)
    prompt_BT = torch.randint(0, V, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt_BT[0].tolist()
    n_new = a.new_tokens
    hf = load_transformers(hf_dir).eval()

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT), max_new_tokens=n_new,
                              min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        return out[0, a.prompt_len:].tolist()

    models = {v: load(hf_dir, v).model for v in VARIANTS}
    fns: dict[str, Callable[[], list[int]]] = {"transformers": run_hf}
    for v, m in models.items():
        fns[v] = lambda m=m: generate(m, [prompt], max_new_tokens=n_new, temperature=0.0)[0].ids
    tokens = {v: fn() for v, fn in fns.items()}
    times = interleaved(fns, warmup=0, iters=a.repeats)
    tok_s = {v: n_new / median(ts) for v, ts in times.items()}
    ratios = {}
    for v in VARIANTS:
        ratios[f"{v}_vs_transformers"] = round(tok_s[v] / tok_s["transformers"], 3)
        if v != "fp32":
            ratios[f"{v}_vs_fp32"] = round(tok_s[v] / tok_s["fp32"], 3)
    return {"shape": {"vocab_size": V, "n_layer": L, "n_head": H, "n_embd": C},
            "prompt_len": a.prompt_len, "new_tokens": n_new,
            "tokens_per_s": {v: round(t, 2) for v, t in tok_s.items()},
            "samples_s": {v: [round(t, 4) for t in ts] for v, ts in times.items()},
            "ratios": ratios,
            "agreement_with_fp32": {v: round(agreement(tokens[v], tokens["fp32"]), 4) for v in fns},
            "memory": bench_memory(hf_dir, work / shape)}


# ---- memory ------------------------------------------------------------------------------------

def bench_memory(hf_dir: Path, work: Path) -> dict[str, Any]:
    """model.safetensors bytes and load RSS of fp32 and each quantised directory."""
    from lmforge.checkpoint import MODEL_WEIGHTS
    from lmforge.infer.quantize import quantize_model_dir
    from lmforge.interop.hf import convert_from_hf
    from lmforge.nn.quant import quant_config

    dirs = {"fp32": convert_from_hf(hf_dir, work / "fp32")}
    for v, opts in VARIANTS.items():
        if opts is not None:
            qc = quant_config(opts["quantize"], opts.get("group_size"), opts.get("quantize_embeddings", False))
            dirs[v] = quantize_model_dir(dirs["fp32"], work / v, qc)
    out: dict[str, Any] = {}
    for v, d in dirs.items():
        probe = subprocess.run([sys.executable, __file__, "--probe", str(d)], capture_output=True, text=True,
                               timeout=900, check=True)
        out[v] = {"file_bytes": (d / MODEL_WEIGHTS).stat().st_size, **json.loads(probe.stdout.splitlines()[-1])}
    for v in dirs:
        out[v]["file_vs_fp32"] = round(out[v]["file_bytes"] / out["fp32"]["file_bytes"], 4)
        out[v]["load_rss_vs_fp32"] = round(out[v]["load_rss_bytes"] / out["fp32"]["load_rss_bytes"], 4)
    return out


def probe(directory: str) -> None:
    """In a fresh process: RSS before and after `LLM.load(directory)` (printed as JSON)."""
    from lmforge.bench import machine as M
    from lmforge.infer.llm import LLM
    from lmforge.models.decoder import Decoder, config_from_preset
    from lmforge.nn.quant import state_bytes

    M.tune_malloc()
    with torch.device("meta"):  # pays torch's one-time costs (~75 MB, lazily imported ops) before the baseline
        Decoder(config_from_preset("tiny"))
    M.reset_peak_rss()
    before = M.rss_bytes()
    llm = LLM.load(directory)
    with torch.no_grad():  # reads every weight: an fp32 file's mapped pages are resident only once read
        llm.model(torch.zeros(1, 1, dtype=torch.long))
    peak = M.peak_rss_bytes()
    print(json.dumps({"baseline_rss_bytes": before, "peak_rss_after_load_bytes": peak,
                      "load_rss_bytes": peak - before, "rss_after_load_bytes": M.rss_bytes(),
                      "state_bytes": state_bytes(llm.model)}))


# ---- quality -----------------------------------------------------------------------------------

def bench_demo(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from lmforge.eval.perplexity import evaluate
    from lmforge.infer.generate import generate

    val = np.memmap(Path(a.demo_data) / "val.bin", dtype=np.uint16, mode="r")
    step = max(1, (len(val) - a.agreement_prompt_len) // a.agreement_prompts)
    prompts = [val[i * step:i * step + a.agreement_prompt_len].astype(int).tolist() for i in range(a.agreement_prompts)]
    out: dict[str, Any] = {"agreement_prompts": len(prompts), "agreement_new_tokens": a.agreement_new_tokens,
                           "bpb": {}, "agreement_with_fp32": {}}
    ref: list[list[int]] = []
    for v in QUALITY_VARIANTS:
        llm = load(Path(a.demo), v)
        out["bpb"][v] = round(evaluate(llm, a.demo_data, max_tokens=a.bpb_tokens)["bits_per_byte"], 5)
        gens = [g.ids for g in generate(llm.model, prompts, max_new_tokens=a.agreement_new_tokens, temperature=0.0)]
        ref = ref or gens
        out["agreement_with_fp32"][v] = round(sum(agreement(g, r) for g, r in zip(gens, ref)) / len(ref), 4)
    out["bpb_rise"] = {v: round(out["bpb"][v] / out["bpb"]["fp32"] - 1, 5) for v in QUALITY_VARIANTS}
    return out


def bench_chat(a: argparse.Namespace) -> dict[str, Any]:
    from lmforge.demo.chat_demo import evaluate, read_jsonl
    from lmforge.finetune.sft import prepare_chat_model

    examples = read_jsonl(Path(a.chat_data))[:a.chat_examples]
    out: dict[str, Any] = {"examples": len(examples), "accuracy": {}, "same_reply_as_fp32": {}}
    ref: list[str] = []
    for v in QUALITY_VARIANTS:
        llm = load(Path(a.chat), v)
        prepare_chat_model(llm, "auto")
        res = evaluate(llm, examples)
        ref = ref or res["replies"]
        out["accuracy"][v] = round(res["accuracy"], 4)
        out["same_reply_as_fp32"][v] = round(sum(r == f for r, f in zip(res["replies"], ref)) / len(ref), 4)
    out["accuracy_drop_points"] = {v: round(100 * (out["accuracy"]["fp32"] - out["accuracy"][v]), 2)
                                   for v in QUALITY_VARIANTS}
    return out


# ---- targets and main --------------------------------------------------------------------------

def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    t = []
    speed = result["speed"]
    if "small" in speed:
        r = speed["small"]["ratios"]
        t.append(verdict("quant_small_int8_vs_transformers", "int8", r["int8_vs_transformers"], 5.0, False,
                         "small shape, batch-1 decode, int8 vs transformers fp32"))
    if "gpt2" in speed:
        r, mem = speed["gpt2"]["ratios"], speed["gpt2"]["memory"]
        t.append(verdict("quant_gpt2_int8_vs_fp32", "int8", r["int8_vs_fp32"], 1.5, False,
                         "GPT-2 124M shape, batch-1 decode, int8 vs lmforge fp32"))
        best4 = max(("int4_g128", "int4_g64"), key=lambda v: r[f"{v}_vs_fp32"])
        t.append(verdict("quant_gpt2_int4_vs_fp32", best4, r[f"{best4}_vs_fp32"], 2.0, False,
                         "GPT-2 124M shape, batch-1 decode, int4 vs lmforge fp32"))
        for v, goal in (("int8", 0.30), ("int4_g128", 0.17), ("int4_g64", 0.17)):
            t.append(verdict(f"quant_gpt2_{v}_file_bytes", v, mem[v]["file_vs_fp32"], goal, True,
                             "GPT-2 124M shape, weight file vs fp32"))
            t.append(verdict(f"quant_gpt2_{v}_load_rss", v, mem[v]["load_rss_vs_fp32"], goal, True,
                             "GPT-2 124M shape, RSS after load vs fp32"))
    if "demo" in result:
        rise = result["demo"]["bpb_rise"]
        t.append(verdict("quant_demo_bpb_int8", "int8", rise["int8"], 0.01, True, "demo model, bits-per-byte rise"))
        best4 = min(("int4_g128", "int4_g64"), key=lambda v: rise[v])
        t.append(verdict("quant_demo_bpb_int4", best4, rise[best4], 0.05, True, "demo model, bits-per-byte rise"))
    if "chat" in result:
        drop = result["chat"]["accuracy_drop_points"]["int8"]
        t.append(verdict("quant_chat_int8_accuracy_drop", "int8", drop, 1.0, True,
                         "chat demo, exact-match accuracy drop in points"))
    return t


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish
    from lmforge.errors import LMForgeError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny shape, 16 tokens, one repeat (a smoke test)")
    p.add_argument("--shapes", default="small,gpt2", help="comma-separated: tiny, small, gpt2 (default small,gpt2)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--demo", help="make demo's run (runs/demo): bits per byte and greedy agreement")
    p.add_argument("--demo-data", default="data/shakespeare", help="its prepared data (the val split is scored)")
    p.add_argument("--bpb-tokens", type=int, default=None, help="cap on the tokens scored (default: all)")
    p.add_argument("--agreement-prompts", type=int, default=64)
    p.add_argument("--agreement-prompt-len", type=int, default=64)
    p.add_argument("--agreement-new-tokens", type=int, default=64)
    p.add_argument("--chat", help="the chat demo's run (runs/chat-demo): exact-match accuracy")
    p.add_argument("--chat-data", default="data/chat_tasks/test.jsonl")
    p.add_argument("--chat-examples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # the memory probe's child process
    add_results_flag(p, "quant")
    a = p.parse_args(argv)
    if a.probe:
        probe(a.probe)
        return 0
    if a.quick:
        a.shapes, a.prompt_len, a.new_tokens, a.repeats = "tiny", 8, 16, 1
        a.bpb_tokens, a.agreement_prompts, a.agreement_new_tokens, a.chat_examples = 2048, 4, 8, 8
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try:
        result: dict[str, Any] = {"compute_dtype": "bfloat16", "threads": torch.get_num_threads(), "speed": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for shape in a.shapes.split(","):
                result["speed"][shape] = bench_speed(shape, a, Path(tmp))
        if a.demo:
            result["demo"] = bench_demo(a)
        if a.chat:
            result["chat"] = bench_chat(a)
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["targets"] = targets(result)
    publish("quant", result, json_path=a.json, results=a.results, wall_s=time.perf_counter() - t0)
    for t in result["targets"]:
        print(t["text"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
