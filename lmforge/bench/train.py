"""Training throughput: lmforge against transformers' GPT2LMHeadModel, same shape, same weights.

Shape (defaults): nanoGPT's "baby GPT" -- 6 layers, 6 heads, width 384, sequence 256, micro-batch 12,
vocabulary 4096 (the size of lmforge's Shakespeare BPE tokenizer and the `small` preset; a 50257
vocabulary would make the LM head a third of the FLOPs and measure the head, not the transformer).
Dropout 0, fp32, GPT-2 flavour (learned positions, LayerNorm, tanh-GELU, biases, tied head).

Both models hold identical weights: a randomly initialised GPT2LMHeadModel (attn_implementation
"sdpa") is saved and read back into an lmforge `Decoder` with `lmforge.interop.hf.load_hf_dir`.
One timed step is a full optimizer step: forward, loss, backward, clip the gradient norm to 1,
AdamW step, zero the gradients.

Variants (`variants` arg):
    lmforge          exactly what `lmforge train` does on CPU: CausalLMObjective (full logits +
                     F.cross_entropy) and lmforge.train.optim.build_optimizer (AdamW, foreach)
    lmforge_fast     proposed fast paths: every Linear's matmuls on oneDNN (`OneDNNLinear`; on
                     AMD CPUs MKL runs its AVX2 path at about half oneDNN's speed), the loss fused
                     with the LM head in row chunks (`ChunkedCausalLMObjective`: no (B*T, V)
                     logits tensor, gradients computed in the same pass) and the fused AdamW kernel
    lmforge_compile  lmforge with torch.compile(model) (train.compile: true); compile time excluded,
                     reported as compile_s
    transformers     GPT2LMHeadModel(input_ids, labels) -> loss, AdamW(fused=True), its default
                     GPT-2 activation ("gelu_new", `hf_activation` arg)

FLOPs per token = DecoderConfig.flops_per_token(seq_len) = 6 * (non-embedding params + LM head)
+ 12 * layers * heads * head_dim * seq_len (PaLM appendix B), the same figure for both frameworks.

Result keys (besides those in lmforge.bench): "matmul_peak" (machine.matmul_peak), "model"
(params, flops_per_token, tokens_per_step, dtype, shape), "results" {variant: {"step_s" (median
seconds per optimizer step), "step_s_samples", "tokens_per_s", "gflops" (achieved), "fraction_of_peak"
(gflops / matmul peak), "minor_faults_per_step", "first_loss", ["compile_s"], ["memory":
{"peak_rss_bytes", "loaded_rss_bytes", "working_bytes"} of a fresh process running 3 steps]}}, "ratios"
{"<variant>_vs_transformers": tokens/s ratio}, "profile" {variant: {"step_ms", "ms": {category: ms
per step}, "share": {category: fraction}, "top_ops": [[op, ms per step], ...]}} (categories: see
op_category), "peak_rss_bytes" (this process, all variants resident).
"""

from __future__ import annotations

import gc
import inspect
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.bench import interleaved, median, resolve_args, run_against_transformers, sig, target
from lmforge.bench import machine as M
from lmforge.errors import LMForgeError

DEFAULTS: dict[str, Any] = {
    "n_layer": 6,            # baby GPT
    "n_head": 6,
    "n_embd": 384,
    "seq_len": 256,
    "micro_batch": 12,
    "vocab_size": 4096,      # see the module docstring
    "warmup": 2,             # untimed steps per variant (the first allocates optimizer state)
    "iters": 6,              # timed steps per variant (median reported)
    "variants": ["lmforge", "lmforge_fast", "transformers"],
    "threads": None,         # torch.set_num_threads; None keeps torch's default (one per core)
    "tune_malloc": True,     # machine.tune_malloc() for the whole process (both frameworks)
    "peak_n": 2048,          # size of the square matmul that measures the peak
    "peak_repeats": 7,
    "profile": True,         # torch.profiler breakdown of one step per variant
    "memory": True,          # peak RSS per variant, each in a fresh subprocess (3 steps)
    "hf_activation": "gelu_new",  # transformers' GPT-2 default; "gelu_pytorch_tanh" is its fused kernel
    "lr": 6e-4,
    "seed": 0,
}
QUICK: dict[str, Any] = {
    "n_layer": 2, "n_head": 2, "n_embd": 64, "seq_len": 32, "micro_batch": 2, "vocab_size": 256,
    "warmup": 1, "iters": 2, "peak_n": 256, "peak_repeats": 2,
    "threads": 1, "tune_malloc": False,  # robust on a shared machine; no process-wide side effects
    "memory": False,
}
VARIANTS = ("lmforge", "lmforge_fast", "lmforge_compile", "transformers")
TARGET_SPEEDUP = 1.1       # lmforge tokens/s >= 1.1 x transformers
TARGET_PEAK_FRACTION = 0.85  # achieved FLOP/s >= 85% of the measured matmul peak


from lmforge.nn.linear import OneDNNLinear, onednn_linear, onednn_available, use_onednn_linears  # noqa: E402,F401
from lmforge.nn.losses import linear_cross_entropy  # noqa: E402


def hidden_states(model: nn.Module, x_BT: torch.Tensor) -> torch.Tensor:
    """The final-norm output (B, T, C) of an lmforge Decoder: what the LM head would multiply.

    Uses `model(x, return_hidden=True)` when the Decoder offers it; otherwise runs forward with the
    head swapped for an identity (and no softcap) for the duration of the call.
    """
    if "return_hidden" in inspect.signature(model.forward).parameters:
        return model(x_BT, return_hidden=True)
    head, cap = model.lm_head, model.cfg.logit_softcap
    model.lm_head, model.cfg.logit_softcap = nn.Identity(), None
    try:
        return model(x_BT)
    finally:
        model.lm_head, model.cfg.logit_softcap = head, cap


class ChunkedCausalLMObjective:
    """Drop-in for lmforge.train.causal_lm.CausalLMObjective with the head and loss fused."""

    name = "causal_lm"

    def __init__(self, ignore_index: int = -100, rows: int | None = None):
        self.ignore_index = ignore_index
        self.rows = rows

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x_BT, y_BT = batch
        h_BTC = hidden_states(model, x_BT)
        loss = linear_cross_entropy(h_BTC.flatten(0, 1), model.lm_head.weight, y_BT.flatten(),
                                            rows=self.rows, ignore_index=self.ignore_index,
                                            softcap=model.cfg.logit_softcap)
        return loss, {"loss": loss.detach()}


# ---- the two models ---------------------------------------------------------------------------

def hf_gpt2_config(vocab_size: int, n_positions: int, n_layer: int, n_head: int, n_embd: int,
                   activation: str = "gelu_new") -> Any:
    from transformers import GPT2Config

    # bos/eos inside the vocabulary (transformers warns about 50256 in a small vocabulary).
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      activation_function=activation, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def quiet_transformers() -> None:
    """No warnings or progress bars from transformers in benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def save_hf_model(hf_config: Any, directory: str | Path, seed: int = 0) -> None:
    """A randomly initialised GPT2LMHeadModel (its own GPT-2 init, seeded) saved as safetensors."""
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(directory)


def load_lmforge(directory: str | Path) -> nn.Module:
    """The saved HF model read into an lmforge Decoder by lmforge's own HF loader (the real mapping)."""
    from lmforge.interop.hf import load_hf_dir

    return load_hf_dir(directory)[0]


def load_transformers(directory: str | Path) -> nn.Module:
    from transformers import GPT2LMHeadModel

    quiet_transformers()
    return GPT2LMHeadModel.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32)


def make_pair(hf_config: Any, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(lmforge Decoder, transformers GPT2LMHeadModel) holding identical weights, in train mode."""
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as d:
        save_hf_model(hf_config, d, seed)
        return load_lmforge(d).train(), load_transformers(d).train()


# ---- profile ----------------------------------------------------------------------------------

_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
               "aten::_addmm_activation", "mkldnn::_linear_pointwise"}
_MEMORY_OPS = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::empty", "aten::empty_strided",
               "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::resize_", "aten::index_put_",
               "aten::embedding_dense_backward", "aten::index_select", "aten::embedding",
               "aten::scatter_add_", "aten::gather", "aten::index_add_"}


def op_category(name: str) -> str:
    """Bucket of a profiler op name: matmul, attention, loss, optimizer (incl. gradient clipping),
    norm_activation, memory (copies, fills, concatenation, embedding gathers), other (element-wise
    adds/muls/reductions and framework overhead)."""
    n = name.lower()
    if "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n:
        return "attention"
    if n in _MATMUL_OPS:
        return "matmul"
    if "adam" in n or n.startswith("aten::_foreach") or "optimizer" in n or "clip_grad" in n:
        return "optimizer"
    if "softmax" in n or "nll_loss" in n or "cross_entropy" in n or "logsumexp" in n or "linearcrossentropy" in n:
        return "loss"
    if any(k in n for k in ("layer_norm", "rms_norm", "gelu", "tanh", "silu", "relu")):
        return "norm_activation"
    if n in _MEMORY_OPS:
        return "memory"
    return "other"


def profile_step(step: Callable[[], Any], n_steps: int = 1) -> dict[str, Any]:
    """Self CPU time of `step` by op category (ms per step) plus the ten most expensive ops."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    wall = (time.perf_counter() - t0) / n_steps
    ms: dict[str, float] = {}
    ops: list[tuple[str, float]] = []
    for ev in prof.key_averages():
        self_ms = ev.self_cpu_time_total / 1000.0 / n_steps
        if self_ms <= 0:
            continue
        cat = op_category(ev.key)
        ms[cat] = ms.get(cat, 0.0) + self_ms
        ops.append((ev.key, self_ms))
    total = sum(ms.values()) or 1.0
    ops.sort(key=lambda kv: -kv[1])
    return {"step_ms": sig(wall * 1000, 4),
            "ms": {k: sig(v, 4) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 4) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])},
            "top_ops": [[k, sig(v, 4)] for k, v in ops[:10]]}


# ---- benchmark --------------------------------------------------------------------------------

def _batches(n: int, B: int, T: int, V: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, V, (B, T + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def _lmforge_step(model: nn.Module, objective: Any, optimizer: torch.optim.Optimizer, params: list,
                  batches: list, state: dict) -> Callable[[], float]:
    """One optimizer step as lmforge.train.loop.Trainer._train_step does it in fp32 (grad_accum 1)."""

    def step() -> float:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _ = objective(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _hf_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, state: dict) -> Callable[[], float]:
    def step() -> float:
        x_BT, _ = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = model(input_ids=x_BT, labels=x_BT).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The same decay rule as lmforge.train.optim.param_groups (matrices decay; embeddings,
    norms and biases do not)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 and id(p) not in emb else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the training benchmark; see the module docstring for the args and the result."""
    a = resolve_args(args, DEFAULTS, QUICK, "train")
    variants = list(a["variants"]) if not isinstance(a["variants"], str) else a["variants"].split(",")
    a["variants"] = variants
    bad = [v for v in variants if v not in VARIANTS]
    if bad or "transformers" not in variants or not any(v.startswith("lmforge") for v in variants):
        raise LMForgeError(f"train benchmark variants must include transformers and at least one lmforge "
                           f"variant, from {', '.join(VARIANTS)}; got {', '.join(variants)}")
    for key in ("n_layer", "n_head", "n_embd", "seq_len", "micro_batch", "vocab_size", "iters", "peak_n"):
        if int(a[key]) <= 0:
            raise LMForgeError(f"train benchmark option {key} must be positive, got {a[key]}")
    if a["n_embd"] % a["n_head"]:
        raise LMForgeError(f"n_embd ({a['n_embd']}) must be a multiple of n_head ({a['n_head']})")
    return run_against_transformers("training", a["threads"], lambda: _run(a, variants, time.perf_counter()))


def build_variant(v: str, model_dir: str | Path, batches: list, lr: float) -> dict[str, Any]:
    """{"step": one-optimizer-step callable, ["cfg", "params"] for lmforge} for variant `v`."""
    from lmforge.train.causal_lm import CausalLMObjective
    from lmforge.train.optim import build_optimizer, param_groups

    wd, betas, eps = 0.1, (0.9, 0.95), 1e-8
    state = {"i": 0}
    if v == "transformers":
        hf = load_transformers(model_dir).train()
        opt = torch.optim.AdamW(_hf_param_groups(hf, wd), lr=lr, betas=betas, eps=eps, fused=True)
        return {"step": _hf_step(hf, opt, batches, state)}
    lm = load_lmforge(model_dir).train()
    out: dict[str, Any] = {"cfg": lm.cfg, "params": lm.num_params()}
    params = list(lm.parameters())
    if v == "lmforge_fast":
        use_onednn_linears(lm)
        opt = torch.optim.AdamW(param_groups(lm, wd), lr=lr, betas=betas, eps=eps, fused=True)
        out["step"] = _lmforge_step(lm, ChunkedCausalLMObjective(), opt, params, batches, state)
    else:
        opt = build_optimizer(lm, lr, wd, betas, eps, "cpu")
        model = torch.compile(lm) if v == "lmforge_compile" else lm
        out["step"] = _lmforge_step(model, CausalLMObjective(), opt, params, batches, state)
    return out


def _memory(model_dir: str | Path, variant: str, a: dict[str, Any]) -> dict[str, int]:
    """Peak RSS of a fresh process that loads the model and runs three training steps."""
    return M.run_probe("lmforge.bench.train", {"dir": str(model_dir), "variant": variant,
                                               "micro_batch": a["micro_batch"], "seq_len": a["seq_len"],
                                               "vocab_size": a["vocab_size"], "lr": a["lr"], "seed": a["seed"],
                                               "threads": a["threads"]}, "training")

def _memory_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    M.tune_malloc()
    batches = _batches(2, int(spec["micro_batch"]), int(spec["seq_len"]), int(spec["vocab_size"]),
                       int(spec["seed"]) + 1)
    step = build_variant(spec["variant"], spec["dir"], batches, float(spec["lr"]))["step"]
    loaded = M.rss_bytes()
    for _ in range(3):
        step()
    peak = M.peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": peak, "loaded_rss_bytes": loaded, "working_bytes": peak - loaded}))


def _run(a: dict[str, Any], variants: list[str], wall0: float) -> dict[str, Any]:
    if a["tune_malloc"]:
        M.tune_malloc()
    B, T, V = int(a["micro_batch"]), int(a["seq_len"]), int(a["vocab_size"])
    peak = M.matmul_peak(int(a["peak_n"]), int(a["peak_repeats"]))

    hf_cfg = hf_gpt2_config(V, T, int(a["n_layer"]), int(a["n_head"]), int(a["n_embd"]), a["hf_activation"])
    batches = _batches(4, B, T, V, int(a["seed"]) + 1)
    steps: dict[str, Callable[[], float]] = {}
    first_loss: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    cfg = None
    n_params = 0
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as model_dir:
        save_hf_model(hf_cfg, model_dir, int(a["seed"]))
        for v in variants:
            model = build_variant(v, model_dir, batches, float(a["lr"]))
            steps[v] = model["step"]
            if "cfg" in model:
                cfg, n_params = model["cfg"], model["params"]
            if v == "lmforge_compile":
                t0 = time.perf_counter()
                first_loss[v] = steps[v]()
                compile_s[v] = time.perf_counter() - t0
        memory = {v: _memory(model_dir, v, a) for v in variants} if a["memory"] else None
    assert cfg is not None
    flops_per_token = cfg.flops_per_token(T)
    tokens_per_step = B * T

    faults: dict[str, list[int]] = {v: [] for v in variants}

    def measured(v: str) -> Callable[[], None]:
        def call() -> None:
            f0 = M.minor_faults()
            loss = steps[v]()
            first_loss.setdefault(v, loss)
            faults[v].append(M.minor_faults() - f0)
        return call

    gc.collect()
    times = interleaved({v: measured(v) for v in variants}, int(a["warmup"]), int(a["iters"]))
    results: dict[str, Any] = {}
    for v in variants:
        s = median(times[v])
        tps = tokens_per_step / s
        gflops = flops_per_token * tps / 1e9
        n_timed = len(times[v])
        results[v] = {"step_s": sig(s), "step_s_samples": [sig(x) for x in times[v]],
                      "tokens_per_s": sig(tps), "gflops": sig(gflops),
                      "fraction_of_peak": sig(gflops / peak["gflops"], 4),
                      "minor_faults_per_step": int(median(faults[v][-n_timed:])),
                      "first_loss": sig(first_loss[v])}
        if v in compile_s:
            results[v]["compile_s"] = round(compile_s[v], 2)
        if memory is not None:
            results[v]["memory"] = memory[v]

    hf_tps = results["transformers"]["tokens_per_s"]
    ratios = {f"{v}_vs_transformers": sig(results[v]["tokens_per_s"] / hf_tps, 4)
              for v in variants if v != "transformers"}
    targets = []
    for v in variants:
        if v == "transformers":
            continue
        targets.append(target("train_tokens_per_s_vs_transformers", v, ratios[f"{v}_vs_transformers"],
                              TARGET_SPEEDUP, "x", "training tokens/s vs transformers"))
        targets.append(target("train_fraction_of_matmul_peak", v, results[v]["fraction_of_peak"],
                              TARGET_PEAK_FRACTION, "", "training FLOP/s as a fraction of the measured matmul peak"))

    profile = {}
    if a["profile"]:
        for v in variants:
            profile[v] = profile_step(steps[v])

    return {
        "benchmark": "train",
        "machine": M.machine_info(),
        "config": {k: a[k] for k in sorted(a)},
        "matmul_peak": {k: (sig(x) if isinstance(x, float) else x) for k, x in peak.items()},
        "model": {"params": n_params, "flops_per_token": flops_per_token, "tokens_per_step": tokens_per_step,
                  "dtype": "float32", "shape": f"{cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}C T{T} B{B} V{V}"},
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "profile": profile,
        "peak_rss_bytes": M.peak_rss_bytes(),
        "wall_s": round(time.perf_counter() - wall0, 2),
    }
