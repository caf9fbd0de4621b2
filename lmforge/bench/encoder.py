"""Encoder speed against transformers on identical weights: forward throughput and MLM training.

    lmforge bench encoder [--quick] [--json OUT]

One process, the frameworks taking turns (see lmforge.bench.interleaved). The model is a
transformers `BertForMaskedLM` built from a config (random weights, seed 0); lmforge's Encoder
gets the same tensors through the interop name map, so both compute the same function.

    forward   sequences/s of the encoder body (BertModel vs Encoder, head none), batch 32 x seq 128,
              eval mode, no grad
    mlm       training tokens/s of one AdamW step on batches masked 15% (80/10/10): transformers
              computes BertForMaskedLM's loss from logits at every position, lmforge runs the
              vocabulary head on the masked positions only (lmforge.train.mlm.MLMObjective)

DEFAULTS: shape of all-MiniLM-L6-v2 (6 layers, width 384, 12 heads, vocab 30522); targets >= 1.3x.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lmforge.bench import interleaved, median, resolve_args, run_against_transformers, sig, target

DEFAULTS: dict[str, Any] = {"n_layer": 6, "n_embd": 384, "n_head": 12, "mlp_hidden": 1536, "vocab_size": 30522,
                            "batch": 32, "seq_len": 128, "warmup": 2, "iters": 5, "threads": None, "lr": 1e-4,
                            "target": 1.3}
QUICK: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "n_head": 4, "mlp_hidden": 128, "vocab_size": 1000, "batch": 4,
                         "seq_len": 32, "warmup": 1, "iters": 2}


def make_pair(a: dict[str, Any], seed: int = 0):
    """(transformers BertForMaskedLM, lmforge Encoder with an MLM head) holding the same weights."""
    import transformers as tf

    from lmforge.interop.encoder import config_from_hf, state_from_hf
    from lmforge.models.encoder import Encoder

    cfg = tf.BertConfig(vocab_size=a["vocab_size"], hidden_size=a["n_embd"], num_hidden_layers=a["n_layer"],
                        num_attention_heads=a["n_head"], intermediate_size=a["mlp_hidden"],
                        max_position_embeddings=max(512, a["seq_len"]), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, architectures=["BertForMaskedLM"])
    torch.manual_seed(seed)
    hf = tf.BertForMaskedLM(cfg)
    lm_cfg, _ = config_from_hf(cfg.to_dict())
    state = hf.state_dict()
    lm = Encoder(lm_cfg)
    lm.load_state_dict(state_from_hf(list(state), state.__getitem__, lm_cfg, "bert", "benchmark"))
    return hf, lm


def _batches(a: dict[str, Any], n: int) -> list[dict[str, torch.Tensor]]:
    from lmforge.data.masking import Masker, mask_generator

    masker = Masker(a["vocab_size"], 103 % a["vocab_size"], [0, 100, 101, 102, 103], 0.15)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(1000 % a["vocab_size"], a["vocab_size"], (a["batch"], a["seq_len"]), generator=g)
        inp, labels = masker(x, mask_generator(0, i, 0))
        out.append({"input_ids": inp, "labels": labels, "attention_mask": torch.ones_like(inp)})
    return out


def run(args: dict[str, Any] | None = None) -> dict[str, Any]:
    a = resolve_args(args, DEFAULTS, QUICK, "encoder")
    return run_against_transformers("encoder", a["threads"], lambda: _run(a))


def _run(a: dict[str, Any]) -> dict[str, Any]:
    from lmforge.bench.machine import machine_info
    from lmforge.train.mlm import MLMObjective

    wall0 = time.time()
    hf, lm = make_pair(a)
    batches = _batches(a, a["warmup"] + a["iters"])
    B, T = a["batch"], a["seq_len"]
    # ---- forward (encoder body) ----
    hf_body, lm_body = hf.bert.eval(), lm.eval()
    x0, m0 = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad():
        diff = (hf_body(input_ids=x0, attention_mask=m0).last_hidden_state - lm_body.encode(x0, m0.bool())).abs().max()

    def fwd_hf() -> None:
        with torch.no_grad():
            hf_body(input_ids=x0, attention_mask=m0)

    def fwd_lm() -> None:
        with torch.no_grad():
            lm_body.encode(x0, m0.bool())

    t_fwd = interleaved({"transformers": fwd_hf, "lmforge": fwd_lm}, a["warmup"], a["iters"])
    # ---- MLM training step ----
    hf.train()
    lm.train()
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=a["lr"])
    opt_lm = torch.optim.AdamW(lm.parameters(), lr=a["lr"])
    objective = MLMObjective()
    state = {"hf": 0, "lm": 0}

    def step_hf() -> None:
        b = batches[state["hf"] % len(batches)]
        state["hf"] += 1
        loss = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    def step_lm() -> None:
        b = batches[state["lm"] % len(batches)]
        state["lm"] += 1
        loss, _ = objective(lm, b)
        loss.backward()
        opt_lm.step()
        opt_lm.zero_grad(set_to_none=True)

    t_mlm = interleaved({"transformers": step_hf, "lmforge": step_lm}, a["warmup"], a["iters"])
    fwd = {k: B / median(v) for k, v in t_fwd.items()}
    mlm = {k: B * T / median(v) for k, v in t_mlm.items()}
    r_fwd, r_mlm = fwd["lmforge"] / fwd["transformers"], mlm["lmforge"] / mlm["transformers"]
    return {
        "benchmark": "encoder", "machine": machine_info(), "config": a,
        "max_abs_diff_hidden": float(diff),
        "forward_seq_per_s": {k: sig(v) for k, v in fwd.items()},
        "mlm_train_tok_per_s": {k: sig(v) for k, v in mlm.items()},
        "speedup": {"forward": sig(r_fwd, 4), "mlm_train": sig(r_mlm, 4)},
        "samples_s": {"forward": t_fwd, "mlm_train": t_mlm},
        "targets": [target("forward", f"batch {B} x seq {T}", r_fwd, a["target"], "x",
                           "encoder forward throughput vs transformers BertModel"),
                    target("mlm_train", f"batch {B} x seq {T}", r_mlm, a["target"], "x",
                           "MLM training tokens/s vs transformers BertForMaskedLM")],
        "wall_s": round(time.time() - wall0, 2),
    }
