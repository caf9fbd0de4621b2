"""Structured output benchmark: what a JSON-Schema token mask costs next to a decode step.

    python benchmarks/structured.py [--chat runs/chat-demo] [--tokens 64] [--threads 1]
                                    [--tokenizer-cache runs/structured/bpe50k.json] [--json OUT]
                                    [--results PATH] [--quick]

Two models: the chat demo (`--chat`, `make chat-demo`'s model; a random model of its shape and
vocabulary size when the run is missing) and a GPT-2-124M-shaped decoder with random weights over a
50,257-token byte-level BPE (GPT-2's vocabulary size; the real GPT-2 merges are not available
offline, so a tokenizer of that size is trained once on the Python standard library's sources and
cached at `--tokenizer-cache`). For each, at batch 1 and 8, greedy:
- `decode_step_ms`: unconstrained generation of `--tokens` tokens per row (no stop), per step;
- `json_schema_step_ms`: the same with `response_format` json_schema (rows end when their JSON is
  complete or at `--tokens`), per step;
- `mask_ms_per_token`: the mask alone (llguidance computes the allowed set, lmforge turns it into
  a logits mask, the matcher advances), replayed over the tokens the constrained run produced:
  mean / p50 / p99 per row and token, and `mask_share_of_step` = mean mask cost x batch / decode step;
- `compile_ms`: compiling the schema; `tokenizer_build_s`: the engine's view of the vocabulary
  (once per tokenizer).
`--quick`: a tiny random model and a small vocabulary, a few tokens (a smoke test of the script).
`--results` records structured.json. The choice of engine (llguidance over xgrammar, outlines-core
and lm-format-enforcer) is measured in docs/results/structured-engines.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
CHAT_SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, pos_encoding="rope", norm="rmsnorm",
                  qk_norm=True, mlp="swiglu", mlp_hidden=688, bias=False, tie_embeddings=False)


def stdlib_texts(limit: int | None = None):
    files = sorted((Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}").rglob("*.py"))
    for f in files[:limit]:
        try:
            yield f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def bpe(vocab_size: int, cache: Path | None, limit: int | None = None) -> Any:
    import warnings

    from lmforge.tokenizer import Tokenizer

    if cache is not None and cache.exists():
        return Tokenizer.from_file(cache)
    print(f"training a {vocab_size}-token byte-level BPE on the Python standard library", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus pads the vocabulary (quick mode)
        tok = Tokenizer.train_bpe(stdlib_texts(limit), vocab_size)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tok.save(cache)
    return tok


def models(args: argparse.Namespace) -> list[tuple[str, Any]]:
    import torch

    from lmforge.infer.llm import LLM
    from lmforge.models.decoder import Decoder, config_from_preset
    from lmforge.tokenizer import CHATML_TEMPLATE

    def random_llm(tok: Any, preset: str, **shape: Any) -> LLM:
        torch.manual_seed(0)
        cfg = config_from_preset(preset, vocab_size=tok.vocab_size, **shape)
        tok.chat_template = CHATML_TEMPLATE
        return LLM(Decoder(cfg).eval(), cfg, tok)

    if args.quick:
        return [("tiny", random_llm(bpe(512, None, limit=40), "tiny", block_size=256))]
    chat = Path(args.chat)
    chat_llm = LLM.load(chat) if chat.exists() else random_llm(bpe(4096, None, limit=2000), "small", **CHAT_SHAPE)
    gpt2 = random_llm(bpe(50257, Path(args.tokenizer_cache)), "gpt2", block_size=1024)
    return [("chat_demo" if chat.exists() else "chat_demo_shape_random", chat_llm), ("gpt2_124m_shape", gpt2)]


def measure(llm: Any, batch: int, n_tokens: int) -> dict[str, Any]:
    import torch

    from lmforge.infer.generate import generate

    messages = [{"role": "user", "content": f"Describe person number {i} as JSON."} for i in range(batch)]
    prompts = [llm.chat_prompt([m]) for m in messages]
    t0 = time.perf_counter()
    grammar = llm.grammar(response_format=RESPONSE_FORMAT)
    compile_ms = 1e3 * (time.perf_counter() - t0)

    generate(llm.model, prompts, max_new_tokens=4, temperature=0, pad_id=llm.pad_id)  # warm-up
    t0 = time.perf_counter()
    plain = generate(llm.model, prompts, max_new_tokens=n_tokens, temperature=0, pad_id=llm.pad_id)
    decode_step_ms = 1e3 * (time.perf_counter() - t0) / n_tokens
    t0 = time.perf_counter()
    constrained = generate(llm.model, prompts, max_new_tokens=n_tokens, temperature=0, pad_id=llm.pad_id,
                           eos_id=llm.stop_ids, tokenizer=llm.tokenizer, grammar=grammar)
    steps = max(len(g.ids) + (g.finish_reason == "eos") for g in constrained)
    json_step_ms = 1e3 * (time.perf_counter() - t0) / steps
    assert all(len(g.ids) == n_tokens for g in plain)

    mask_s = []  # replay: the mask and the matcher's advance, per row and token
    vocab_row = torch.zeros(1, int(llm.config.vocab_size))
    from lmforge.infer.grammar import mask_logits

    for g in constrained:
        c = grammar.matcher(llm.stop_ids)
        for tok in g.ids:
            t = time.perf_counter()
            mask_logits(vocab_row, [c])
            c.accept(tok)
            mask_s.append(time.perf_counter() - t)
    mask_s.sort()
    mean_ms = 1e3 * statistics.mean(mask_s)
    complete = sum(g.finish_reason == "eos" for g in constrained)
    valid = sum(_parses(g.text) for g in constrained if g.finish_reason == "eos")
    return {"batch": batch, "decode_step_ms": round(decode_step_ms, 3), "json_schema_step_ms": round(json_step_ms, 3),
            "json_schema_slowdown": round(json_step_ms / decode_step_ms, 3),
            "mask_ms_per_token": {"mean": round(mean_ms, 4), "p50": round(1e3 * mask_s[len(mask_s) // 2], 4),
                                  "p99": round(1e3 * mask_s[int(0.99 * (len(mask_s) - 1))], 4)},
            "mask_share_of_step": round(mean_ms * batch / decode_step_ms, 4), "compile_ms": round(compile_ms, 3),
            "constrained_tokens": len(mask_s), "rows_complete": complete, "rows_complete_valid_json": valid}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lmforge.infer.grammar import engine_tokenizer

    import llguidance

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"engine": f"llguidance {llguidance.__version__}", "threads": args.threads,
                           "tokens": args.tokens, "models": {}}
    # how the engine was chosen: a recorded comparison (the other engines are not dependencies)
    out["engine_choice"] = json.loads((ROOT / "docs" / "results" / "structured-engines.json").read_text())
    for name, llm in models(args):
        t0 = time.perf_counter()
        engine_tokenizer(llm.tokenizer, int(llm.config.vocab_size))
        build_s = time.perf_counter() - t0
        entry = {"vocab_size": int(llm.config.vocab_size),
                 "parameters_m": round(sum(p.numel() for p in llm.model.parameters()) / 1e6, 2),
                 "tokenizer_build_s": round(build_s, 3),
                 "batches": [measure(llm, b, args.tokens) for b in ((1, 2) if args.quick else (1, 8))]}
        out["models"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chat", default="runs/chat-demo", help="the chat demo run (a random model of its shape if missing)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--tokenizer-cache", default="runs/structured/bpe50k.json",
                   help="the 50,257-token BPE (trained here once when missing)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--quick", action="store_true", help="a tiny random model, a few tokens (smoke test)")
    add_results_flag(p, "structured")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens = min(args.tokens, 24)
    t0 = time.perf_counter()
    result = run(args)
    publish("structured", result, json_path=args.json, results=None if args.quick else args.results,
            wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
