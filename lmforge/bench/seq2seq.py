"""Encoder-decoder speed: lmforge's Seq2Seq against transformers' T5ForConditionalGeneration, same weights.

A randomly initialised T5 (v1.1 flavour: gated GELU; shape "small": 4+4 layers, width 256, 4 heads
of 64, FFN 640, vocab 4096 -- the t5-cpu preset) is read into lmforge with
`lmforge.interop.seq2seq.state_from_hf`, so both hold identical weights (fp32, eval mode for
generation, dropout 0). Measurements, the frameworks taking turns (lmforge.bench.interleaved):

    train       tokens/s of one optimizer step (forward, backward, AdamW) on `batch` pairs of
                `src_len` source and `tgt_len` target tokens; tokens = source + target tokens
    generate[b] greedy generation of exactly `new_tokens` tokens for b sources of `src_len` tokens
                (b in `batch_sizes`, default 1 and 8); tokens/s = b * new_tokens / wall time
                (encoder included); lmforge: lmforge.infer.seq2seq.generate_seq2seq with no EOS
                stop, transformers: generate(min_new_tokens = max_new_tokens, do_sample=False)

Targets: lmforge >= 1.3 x transformers for training and for each generation batch size.
Result keys (besides lmforge.bench's): "params", "train" {variant: {"tokens_per_s", "samples"}},
"generate" {str(b): {variant: {"tokens_per_s", "samples"}}}, "match" (fraction of batch-1 greedy
tokens on which the two agree), "ratios".
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lmforge.bench import interleaved, median, resolve_args, run_against_transformers, sig, target
from lmforge.bench import machine as M

SHAPES = {  # vocab, layers (each stack), d_model, heads, d_kv, d_ff
    "tiny": (512, 2, 64, 4, 16, 128),
    "small": (4096, 4, 256, 4, 64, 640),
}
DEFAULTS: dict[str, Any] = {"model": "small", "batch": 16, "src_len": 64, "tgt_len": 64, "new_tokens": 64,
                            "batch_sizes": [1, 8], "repeats": 3, "threads": None, "seed": 0}
QUICK: dict[str, Any] = {"model": "tiny", "batch": 4, "src_len": 16, "tgt_len": 16, "new_tokens": 8,
                         "batch_sizes": [1, 2], "repeats": 1, "threads": 1}
TARGET_SPEEDUP = 1.3


def models(name: str, seed: int):
    import transformers

    from lmforge.interop.seq2seq import config_from_hf, state_from_hf
    from lmforge.models.seq2seq import Seq2Seq

    V, L, C, H, D, F = SHAPES[name]
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=C, d_kv=D, d_ff=F, num_layers=L, num_heads=H, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=False, attn_implementation="sdpa"))
    cfg = config_from_hf(hf.config.to_dict(), tied=True)
    ours = Seq2Seq(cfg)
    ours.load_state_dict(state_from_hf(hf.state_dict(), cfg), strict=False)
    return ours, hf


def _run(a: dict[str, Any], t_start: float) -> dict[str, Any]:
    from lmforge.infer.seq2seq import generate_seq2seq
    from lmforge.train.denoise import Seq2SeqLMObjective

    ours, hf = models(a["model"], a["seed"])
    V = ours.cfg.vocab_size
    g = torch.Generator().manual_seed(a["seed"])
    B, S, T = a["batch"], a["src_len"], a["tgt_len"]
    src = torch.randint(2, V, (B, S), generator=g)
    labels = torch.randint(2, V, (B, T), generator=g)
    dec = ours.shift_right(labels)
    ones_s, ones_t = torch.ones(B, S, dtype=torch.bool), torch.ones(B, T, dtype=torch.bool)
    batch = {"input_ids": src, "input_mask": ones_s, "decoder_input_ids": dec, "decoder_mask": ones_t, "labels": labels}
    objective = Seq2SeqLMObjective()
    opts = {"lmforge": torch.optim.AdamW(ours.parameters(), 1e-4), "transformers": torch.optim.AdamW(hf.parameters(), 1e-4)}
    ours.train()
    hf.train()

    def step_ours() -> None:
        loss, _ = objective(ours, batch)
        loss.backward()
        opts["lmforge"].step()
        opts["lmforge"].zero_grad(set_to_none=True)

    def step_hf() -> None:
        loss = hf(input_ids=src, attention_mask=ones_s.long(), decoder_input_ids=dec, labels=labels).loss
        loss.backward()
        opts["transformers"].step()
        opts["transformers"].zero_grad(set_to_none=True)

    times = interleaved({"lmforge": step_ours, "transformers": step_hf}, warmup=1, iters=a["repeats"])
    tokens = B * (S + T)
    result: dict[str, Any] = {"params": ours.num_params(), "train": {}, "generate": {}, "ratios": {}}
    for v, ts in times.items():
        result["train"][v] = {"tokens_per_s": sig(tokens / median(ts)), "samples": [sig(x) for x in ts]}
    result["ratios"]["train_vs_transformers"] = sig(result["train"]["lmforge"]["tokens_per_s"]
                                                    / result["train"]["transformers"]["tokens_per_s"], 4)

    ours.eval()
    hf.eval()
    n = a["new_tokens"]
    outs: dict[str, Any] = {}
    for b in a["batch_sizes"]:
        srcs = torch.randint(2, V, (b, S), generator=g)
        rows = srcs.tolist()

        def gen_ours(rows=rows, b=b):
            outs[("lmforge", b)] = [x.ids for x in generate_seq2seq(ours, rows, max_new_tokens=n, temperature=0,
                                                                       eos_id=-1)]

        def gen_hf(srcs=srcs, b=b):
            with torch.inference_mode():
                o = hf.generate(input_ids=srcs, attention_mask=torch.ones_like(srcs), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=None, forced_eos_token_id=None)
            outs[("transformers", b)] = o[:, 1:].tolist()

        ts = interleaved({"lmforge": gen_ours, "transformers": gen_hf}, warmup=1, iters=a["repeats"])
        result["generate"][str(b)] = {v: {"tokens_per_s": sig(b * n / median(x)), "samples": [sig(y) for y in x]}
                                      for v, x in ts.items()}
        result["ratios"][f"generate_batch{b}_vs_transformers"] = sig(
            result["generate"][str(b)]["lmforge"]["tokens_per_s"]
            / result["generate"][str(b)]["transformers"]["tokens_per_s"], 4)
    b1 = a["batch_sizes"][0]
    mine, theirs = outs[("lmforge", b1)], outs[("transformers", b1)]
    same = sum(x == y for r1, r2 in zip(mine, theirs) for x, y in zip(r1, r2))
    result["match"] = same / max(1, sum(len(r) for r in theirs))
    targets = [target("train_speedup", "lmforge", result["ratios"]["train_vs_transformers"], TARGET_SPEEDUP, "x",
                      "seq2seq training tokens/s vs transformers")]
    for b in a["batch_sizes"]:
        targets.append(target(f"generate_batch{b}_speedup", "lmforge", result["ratios"][f"generate_batch{b}_vs_transformers"],
                              TARGET_SPEEDUP, "x", f"seq2seq greedy generation at batch {b} vs transformers"))
    return {"benchmark": "seq2seq", "machine": M.machine_info(), "config": a, **result, "targets": targets,
            "wall_s": round(time.perf_counter() - t_start, 1)}


def run(args: dict[str, Any] | None = None) -> dict[str, Any]:
    a = resolve_args(args, DEFAULTS, QUICK, "seq2seq")
    return run_against_transformers("seq2seq", a["threads"], lambda: _run(a, time.perf_counter()))
