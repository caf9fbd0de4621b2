"""Decoding speed: lmforge's generation engine against transformers' `generate`, same weights, greedy.

Models (`models` arg): "small" -- the baby-GPT shape with a 1024 context (6 layers, 6 heads, width
384, vocab 4096: 12.6M parameters, ~10M of them in the blocks) -- and "gpt2" -- the GPT-2 124M
shape (12 layers, 12 heads, width 768, vocab 50257). Each is a randomly initialised
GPT2LMHeadModel (attn_implementation "sdpa", fp32, eval mode), saved and read into an lmforge
Decoder with `lmforge.interop.hf.load_hf_dir`, so both hold identical weights.

Measurements, each repeated with the frameworks taking turns (lmforge.bench.interleaved):
    ttft          time to first token: a `prompt_len` (512) token prompt at batch 1, generating
                  exactly one token (prefill + one greedy pick)
    decode[b]     for each batch size b in `batch_sizes` (1, 8, 32): b prompts of
                  `batch_prompt_len` (64) tokens, `new_tokens` (256) new tokens each, greedy;
                  tokens_per_s = b * new_tokens / wall time of the whole call (prefill included)
    memory        (full mode) peak RSS of a fresh process that loads the model and runs the
                  largest batch, per framework; plus the KV-cache bytes of that batch
lmforge runs `lmforge.infer.generate.generate(model, prompts, max_new_tokens=N, temperature=0)`
(no EOS id, so exactly N tokens); transformers runs `model.generate(ids, attention_mask,
max_new_tokens=N, min_new_tokens=N, do_sample=False)`. `match` reports, per lmforge variant, the
fraction of batch-1 tokens on which it agrees with transformers (greedy on identical weights: 1.0
up to near-ties in fp32).

Variants: "lmforge" (the engine as shipped), "lmforge_fast" (the same engine with every Linear on
oneDNN, lmforge.bench.train.OneDNNLinear: the change proposed for lmforge/nn/layers.py),
"transformers", and optionally "lmforge_static" -- `StaticGreedy` below, a fixed-shape decode step
over a preallocated cache, torch.compile'd when `compile_step` is true (an experiment: on CPU the
compiled step is slower, see docs/benchmarks.md).

Result keys (besides those in lmforge.bench): "models" {name: {"params", "shape",
"kv_cache_bytes_per_token", "ttft_s" {variant: s}, "ttft_samples", "decode" {str(b): {variant:
{"tokens_per_s", "s", "samples", "kv_cache_bytes"}}}, "ratios" {"<variant>_batch1_vs_transformers",
"<variant>_batch<largest>_vs_own_batch1", "<variant>_ttft_speedup_vs_transformers",
"<variant>_batch<b>_vs_transformers"}, "match" {variant: fraction}, ["memory" {variant:
{"peak_rss_bytes", "loaded_rss_bytes", "working_bytes"}}], ["compile_s"]}}.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.bench import interleaved, median, resolve_args, run_against_transformers, sig, target
from lmforge.bench import machine as M
from lmforge.bench.train import hf_gpt2_config, save_hf_model
from lmforge.errors import LMForgeError
from lmforge.nn.layers import apply_rope

# (vocab_size, n_positions, n_layer, n_head, n_embd)
MODEL_SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 128, 2, 2, 64),
    "small": (4096, 1024, 6, 6, 384),
    "gpt2": (50257, 1024, 12, 12, 768),
}
DEFAULTS: dict[str, Any] = {
    "models": ["small", "gpt2"],
    "prompt_len": 512,        # time-to-first-token prompt
    "new_tokens": 256,
    "batch_sizes": [1, 8, 32],
    "batch_prompt_len": 64,   # prompt length of the throughput runs
    "repeats": 2,             # timed calls per variant and measurement (median reported)
    "ttft_repeats": 3,
    "variants": ["lmforge", "lmforge_fast", "transformers"],
    "compile_step": False,    # torch.compile the lmforge_static decode step (slower on CPU, see docs)
    "threads": None,
    "tune_malloc": True,
    "memory": True,           # peak RSS per framework, each in a fresh subprocess
    "seed": 0,
}
QUICK: dict[str, Any] = {
    "models": ["tiny"], "prompt_len": 32, "new_tokens": 12, "batch_sizes": [1, 4], "batch_prompt_len": 8,
    "repeats": 1, "ttft_repeats": 1, "memory": False,
    "threads": 1, "tune_malloc": False,  # robust on a shared machine; no process-wide side effects
}
VARIANTS = ("lmforge", "lmforge_fast", "lmforge_static", "transformers")
TARGET_B1_SPEEDUP = 5.0     # batch-1 tokens/s >= 5 x transformers
TARGET_BATCH_SCALING = 10.0  # largest-batch aggregate tokens/s >= 10 x our own batch 1


# ---- models -----------------------------------------------------------------------------------

def hf_config(name: str) -> Any:
    if name not in MODEL_SHAPES:
        raise LMForgeError(f"unknown decode benchmark model '{name}'; models: {', '.join(MODEL_SHAPES)}")
    V, P, L, H, C = MODEL_SHAPES[name]
    # gelu_new is GPT-2's activation; lmforge's tanh-GELU computes the same function.
    return hf_gpt2_config(V, P, L, H, C, "gelu_new")


# ---- the proposed fast path -------------------------------------------------------------------

class StaticGreedy:
    """Greedy decoding with a fixed-shape decode step (a proposal for lmforge.infer; see docs).

    The engine's step slices the cache to the current length and rebuilds validity/position
    bookkeeping every token, so its shapes change each step. Here every step has the same shapes:
    the new key/value is written at slot `pos` (a tensor) of the step's own preallocated keys and
    values (the prompt's are read from the engine's prefill cache), attention covers all of them
    with a `slot <= pos` mask, and the step ends in argmax. That makes it one graph for
    torch.compile (fused norms/residuals/activations, no Python per op) and replayable as a CUDA
    graph on GPU. Supports equal-length prompts, learned/sinusoidal/rope positions, no sliding window.
    """

    def __init__(self, model: nn.Module, max_len: int | None = None, compile_step: bool = False):
        cfg = model.cfg
        if cfg.sliding_window is not None:
            raise LMForgeError("StaticGreedy does not support sliding-window attention")
        self.model, self.cfg = model, cfg
        # One cache length for every call: the compiled step then specialises once (a second
        # compile makes the batch dimension dynamic), not once per prompt length.
        self.max_len = int(max_len or cfg.block_size)
        self.step_fn: Callable[..., torch.Tensor] = self._step
        if compile_step:
            self.step_fn = torch.compile(self._step, fullgraph=True)

    def _step(self, tok_B: torch.Tensor, pos: torch.Tensor, k_LBKSD: torch.Tensor,
              v_LBKSD: torch.Tensor) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        B = tok_B.shape[0]
        H, K, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        x_B1C = m.tok_emb(tok_B)[:, None]
        rope = None
        if cfg.pos_encoding == "learned":
            x_B1C = x_B1C + m.pos_emb(pos)[None, None]
        elif cfg.pos_encoding == "sinusoidal":
            x_B1C = x_B1C + m.pos_table[pos].to(x_B1C.dtype)[None, None]
        else:
            rope = (m.rope_cos[pos][None, None].expand(B, 1, -1), m.rope_sin[pos][None, None].expand(B, 1, -1))
        slots_S = torch.arange(k_LBKSD.shape[3], device=tok_B.device)
        mask_11S = (slots_S <= pos)[None, None, None]
        idx = pos.reshape(1)
        for i, blk in enumerate(m.blocks):
            att = blk.attn
            h_B1C = blk.norm1(x_B1C)
            q, k, v = att.qkv(h_B1C).split([H * D, K * D, K * D], dim=-1)
            q_BH1D = q.view(B, 1, H, D).transpose(1, 2)
            k_BK1D = k.view(B, 1, K, D).transpose(1, 2)
            v_BK1D = v.view(B, 1, K, D).transpose(1, 2)
            if att.q_norm is not None:
                q_BH1D, k_BK1D = att.q_norm(q_BH1D), att.k_norm(k_BK1D)
            if rope is not None:
                q_BH1D, k_BK1D = apply_rope(q_BH1D, *rope), apply_rope(k_BK1D, *rope)
            k_LBKSD[i].index_copy_(2, idx, k_BK1D)
            v_LBKSD[i].index_copy_(2, idx, v_BK1D)
            y_BH1D = F.scaled_dot_product_attention(q_BH1D, k_LBKSD[i], v_LBKSD[i], attn_mask=mask_11S,
                                                    enable_gqa=K != H)
            x_B1C = x_B1C + att.proj(y_BH1D.transpose(1, 2).reshape(B, 1, H * D))
            x_B1C = x_B1C + blk.mlp(blk.norm2(x_B1C))
        logits_BV = m.lm_head(m.norm_f(x_B1C)[:, 0])
        if cfg.logit_softcap:
            logits_BV = cfg.logit_softcap * torch.tanh(logits_BV / cfg.logit_softcap)
        return logits_BV.argmax(dim=-1)

    @torch.inference_mode()
    def generate(self, idx_BT: torch.Tensor, n_new: int) -> torch.Tensor:
        """(B, n_new) greedy continuation of equal-length prompts idx_BT."""
        B, T = idx_BT.shape
        if n_new > 1 and T + n_new > self.max_len:
            raise ValueError(f"prompt ({T}) + new tokens ({n_new}) exceed StaticGreedy's max_len ({self.max_len})")
        cache = self.model.new_cache(B, T)
        tok_B = self.model(idx_BT, cache=cache, last_only=True)[:, -1].argmax(dim=-1)
        # The step's own fixed-shape keys and values, starting with the prompt's from the prefill.
        cfg = self.cfg
        shape = (cfg.n_layer, B, cfg.n_kv_head, max(self.max_len, T + n_new), cfg.head_dim)
        k_LBKSD = torch.zeros(shape, dtype=cache.dtype, device=idx_BT.device)
        v_LBKSD = torch.zeros_like(k_LBKSD)
        for layer in range(cfg.n_layer):
            k_LBKSD[layer, :, :, :T], v_LBKSD[layer, :, :, :T] = cache.read(layer)
        out_BN = torch.empty(B, n_new, dtype=torch.long, device=idx_BT.device)
        out_BN[:, 0] = tok_B
        pos = torch.tensor(T, device=idx_BT.device)
        for n in range(1, n_new):
            tok_B = self.step_fn(tok_B, pos, k_LBKSD, v_LBKSD)
            out_BN[:, n] = tok_B
            pos += 1
        return out_BN


# ---- one measurement --------------------------------------------------------------------------

def _callers(models: dict[str, Any], prompts_BT: torch.Tensor, n_new: int) -> dict[str, Callable[[], torch.Tensor]]:
    """One zero-argument generate call per variant in `models` (variant -> model or StaticGreedy)."""
    from lmforge.infer.generate import generate

    prompts = prompts_BT.tolist()
    mask_BT = torch.ones_like(prompts_BT)

    def engine(lm: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: torch.tensor([g.ids for g in generate(lm, prompts, max_new_tokens=n_new, temperature=0.0)])

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            out = models["transformers"].generate(prompts_BT, attention_mask=mask_BT, max_new_tokens=n_new,
                                                  min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        return out[:, prompts_BT.shape[1]:]

    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for v, model in models.items():
        if v == "transformers":
            fns[v] = run_hf
        elif v == "lmforge_static":
            fns[v] = lambda m=model: m.generate(prompts_BT, n_new)
        else:
            fns[v] = engine(model)
    return fns


def _load_variant(v: str, directory: Path, max_len: int, compile_step: bool) -> Any:
    from lmforge.bench.train import load_lmforge, load_transformers, use_onednn_linears

    if v == "transformers":
        return load_transformers(directory).eval()
    lm = load_lmforge(directory).eval()
    if v == "lmforge_fast":
        use_onednn_linears(lm)
    if v == "lmforge_static":
        return StaticGreedy(lm, max_len=max_len, compile_step=compile_step)
    return lm


def _kv_bytes(cfg: Any, batch: int, length: int) -> int:
    return int(cfg.kv_cache_bytes_per_token(4) * batch * length)


def _memory(directory: Path, variant: str, batch: int, prompt_len: int, n_new: int, vocab: int) -> dict[str, int]:
    """Peak RSS of a fresh process that loads the model and runs one generation (see _memory_child)."""
    return M.run_probe("lmforge.bench.decode", {"dir": str(directory), "variant": variant, "batch": batch,
                                                "prompt_len": prompt_len, "new_tokens": n_new, "vocab": vocab},
                       "decode")

def _memory_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    M.tune_malloc()
    model = _load_variant(spec["variant"], Path(spec["dir"]), spec["prompt_len"] + spec["new_tokens"], False)
    loaded = M.rss_bytes()
    g = torch.Generator().manual_seed(0)
    prompts_BT = torch.randint(0, spec["vocab"], (spec["batch"], spec["prompt_len"]), generator=g)
    _callers({spec["variant"]: model}, prompts_BT, spec["new_tokens"])[spec["variant"]]()
    peak = M.peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": peak, "loaded_rss_bytes": loaded, "working_bytes": peak - loaded}))


# ---- benchmark --------------------------------------------------------------------------------

def _bench_model(name: str, a: dict[str, Any], variants: list[str], directory: Path) -> dict[str, Any]:
    n_new, P, Pb = int(a["new_tokens"]), int(a["prompt_len"]), int(a["batch_prompt_len"])
    models = {v: _load_variant(v, directory, Pb + n_new, bool(a["compile_step"])) for v in variants}
    lm = next(m for v, m in models.items() if v != "transformers")
    lm = lm.model if isinstance(lm, StaticGreedy) else lm
    cfg = lm.cfg
    V = cfg.vocab_size
    if P + 1 > cfg.block_size or Pb + n_new > cfg.block_size:
        raise LMForgeError(f"prompt_len/batch_prompt_len + new_tokens exceed the {name} model's context "
                           f"({cfg.block_size})")
    static = models.get("lmforge_static")
    compile_s = None
    g = torch.Generator().manual_seed(int(a["seed"]) + 7)
    out: dict[str, Any] = {"params": lm.num_params(),
                           "shape": f"{cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}C V{V} ctx{cfg.block_size}",
                           "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(4)}

    # Time to first token.
    prompt_1T = torch.randint(0, V, (1, P), generator=g)
    fns = _callers(models, prompt_1T, 1)
    ttft = interleaved(fns, 1, int(a["ttft_repeats"]))
    out["ttft_s"] = {v: sig(median(ts)) for v, ts in ttft.items()}
    out["ttft_samples"] = {v: [sig(x) for x in ts] for v, ts in ttft.items()}

    # Throughput per batch size; the warm-up round is a short generation (kernels, allocator).
    decode: dict[str, Any] = {}
    match = None
    for b in a["batch_sizes"]:
        b = int(b)
        prompts_BT = torch.randint(0, V, (b, Pb), generator=g)
        if static is not None and a["compile_step"]:
            t0 = time.perf_counter()
            static.generate(prompts_BT, 3)
            compile_s = (compile_s or 0.0) + time.perf_counter() - t0
        interleaved(_callers(models, prompts_BT, min(8, n_new)), 1, 0)
        fns = _callers(models, prompts_BT, n_new)
        outputs: dict[str, torch.Tensor] = {}

        def keep(fn: Callable[[], torch.Tensor], v: str) -> Callable[[], None]:
            def call() -> None:
                outputs[v] = fn()
            return call

        times = interleaved({v: keep(f, v) for v, f in fns.items()}, 0, int(a["repeats"]))
        for v, o in outputs.items():
            if tuple(o.shape) != (b, n_new):
                raise RuntimeError(f"{v} generated {tuple(o.shape)} tokens, expected {(b, n_new)}")
        decode[str(b)] = {v: {"tokens_per_s": sig(b * n_new / median(ts)), "s": sig(median(ts)),
                              "samples": [sig(x) for x in ts], "kv_cache_bytes": _kv_bytes(cfg, b, Pb + n_new)}
                          for v, ts in times.items()}
        if b == 1:
            match = {v: float((o == outputs["transformers"]).float().mean()) for v, o in outputs.items()
                     if v != "transformers"}
    out["decode"] = decode
    out["match"] = match
    if compile_s is not None:
        out["compile_s"] = round(compile_s, 2)

    bs = [str(int(b)) for b in a["batch_sizes"]]
    ratios: dict[str, float] = {}
    for v in variants:
        if v == "transformers":
            continue
        if "1" in decode:
            ratios[f"{v}_batch1_vs_transformers"] = sig(
                decode["1"][v]["tokens_per_s"] / decode["1"]["transformers"]["tokens_per_s"], 4)
            ratios[f"{v}_batch{bs[-1]}_vs_own_batch1"] = sig(
                decode[bs[-1]][v]["tokens_per_s"] / decode["1"][v]["tokens_per_s"], 4)
        ratios[f"{v}_ttft_speedup_vs_transformers"] = sig(out["ttft_s"]["transformers"] / out["ttft_s"][v], 4)
        for b in bs:
            ratios[f"{v}_batch{b}_vs_transformers"] = sig(
                decode[b][v]["tokens_per_s"] / decode[b]["transformers"]["tokens_per_s"], 4)
    out["ratios"] = ratios

    if a["memory"]:
        out["memory"] = {v: _memory(directory, v, int(bs[-1]), Pb, n_new, V) for v in variants}
    del models, lm, static
    return out


def run(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the decode benchmark; see the module docstring for the args and the result."""
    a = resolve_args(args, DEFAULTS, QUICK, "decode")
    variants = list(a["variants"]) if not isinstance(a["variants"], str) else a["variants"].split(",")
    models = list(a["models"]) if not isinstance(a["models"], str) else a["models"].split(",")
    if isinstance(a["batch_sizes"], str):
        a["batch_sizes"] = [int(x) for x in a["batch_sizes"].split(",") if x]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or "transformers" not in variants or not any(v.startswith("lmforge") for v in variants):
        raise LMForgeError(f"decode benchmark variants must include transformers and at least one lmforge "
                           f"variant, from {', '.join(VARIANTS)}; got {', '.join(variants)}")
    for m in models:
        if m not in MODEL_SHAPES:
            raise LMForgeError(f"unknown decode benchmark model '{m}'; models: {', '.join(MODEL_SHAPES)}")
    if 1 not in [int(b) for b in a["batch_sizes"]] or any(int(b) <= 0 for b in a["batch_sizes"]):
        raise LMForgeError(f"batch_sizes must be positive and include 1, got {a['batch_sizes']}")
    a["batch_sizes"] = sorted(int(b) for b in a["batch_sizes"])
    a["models"], a["variants"] = models, variants
    for key in ("prompt_len", "new_tokens", "batch_prompt_len", "repeats", "ttft_repeats"):
        if int(a[key]) <= 0:
            raise LMForgeError(f"decode benchmark option {key} must be positive, got {a[key]}")
    return run_against_transformers("decode", a["threads"], lambda: _run(a, variants, time.perf_counter()))


def _run(a: dict[str, Any], variants: list[str], wall0: float) -> dict[str, Any]:
    if a["tune_malloc"]:
        M.tune_malloc()
    results: dict[str, Any] = {}
    targets = []
    largest = a["batch_sizes"][-1]
    for name in a["models"]:
        with tempfile.TemporaryDirectory(prefix=f"lmforge-bench-{name}-") as d:
            save_hf_model(hf_config(name), d, int(a["seed"]))
            res = _bench_model(name, a, variants, Path(d))
        results[name] = res
        for v in variants:
            if v == "transformers":
                continue
            targets.append(target(f"{name}_decode_batch1_vs_transformers", v,
                                  res["ratios"][f"{v}_batch1_vs_transformers"], TARGET_B1_SPEEDUP, "x",
                                  f"{name}: batch-1 decode tokens/s vs transformers generate"))
            targets.append(target(f"{name}_decode_batch{largest}_vs_own_batch1", v,
                                  res["ratios"][f"{v}_batch{largest}_vs_own_batch1"], TARGET_BATCH_SCALING, "x",
                                  f"{name}: batch-{largest} aggregate tokens/s vs our own batch 1"))
    return {
        "benchmark": "decode",
        "machine": M.machine_info(),
        "config": {k: a[k] for k in sorted(a)},
        "models": results,
        "targets": targets,
        "wall_s": round(time.perf_counter() - wall0, 2),
    }
