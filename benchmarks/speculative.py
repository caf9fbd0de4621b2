"""Speculative decoding benchmark: batch-1 greedy decode with and without a draft model, next to
transformers' plain and assisted generation (`assistant_model=`) on the same exported pair, and
prompt lookup (no draft) on a copy-heavy prompt.

    python benchmarks/speculative.py [--target runs/demo] [--draft runs/draft] [--data data/shakespeare]
                                     [--ks 2,3,4,5,6] [--prompts 4] [--prompt-len 64] [--max-new-tokens 256]
                                     [--threads 1] [--json OUT] [--results PATH] [--quick]

Target: `make demo`'s model (runs/demo, 5.2M parameters). Draft: `--draft`, else trained here with
`lmforge train --recipe draft` (0.9M parameters, the demo's data and tokenizer) into runs/draft.
Prompts: `--prompts` windows of `--prompt-len` tokens from the data's validation split; each row
generates exactly `--max-new-tokens` tokens (no end-of-text stop), greedy. Measured per row:
tokens/s of the target alone and with the draft for every k (the best k is reported with all of
them), acceptance rate and tokens per target forward, token identity with the target alone; the
same for transformers `generate` and assisted generation on the pair exported with `convert --to-hf`
(transformers' own schedule of assistant tokens). Prompt lookup: the target with
`prompt_lookup_num_tokens` on a copy-heavy prompt (a validation passage, then its first half again:
continuing it means copying), against the target alone on the same prompt; with `--folio-model`
(a decoder fine-tuned on Folio modernisation, e.g. by benchmarks/folio.py) also on `--folio-prompts`
sources of `--folio-data` (test.jsonl of `lmforge data folio`), where the modern text mostly copies
the source. `--quick`: random tiny models, a few tokens (a smoke test of the script). `--results`
records speculative.json.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], list[int]]) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def quick_pair(directory: Path) -> tuple[Path, Path, list[list[int]]]:
    """A random 2-layer target and its first layer as the draft, exportable (Qwen3 shape)."""
    import torch

    from lmforge.checkpoint import write_model_dir
    from lmforge.models.decoder import Decoder, config_from_preset
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ,.:;!?'\nABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    tok.save(directory / "tok.json")
    shape = dict(vocab_size=tok.vocab_size, block_size=128, pos_encoding="rope", norm="rmsnorm", qk_norm=True,
                 mlp="swiglu", bias=False, tie_embeddings=False, init_std=0.3)
    torch.manual_seed(0)
    target = Decoder(config_from_preset("tiny", n_layer=2, **shape))
    with torch.no_grad():  # a damped second layer: the first alone often guesses right
        for name in ("attn.proj", "mlp.fc_out"):
            target.get_submodule(f"blocks.1.{name}").weight.mul_(0.3)
    draft = Decoder(config_from_preset("tiny", n_layer=1, **shape))
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("blocks.1.")})
    ids = tok.encode("ROMEO: but soft, what light through yonder window breaks? It is the east.")
    return (write_model_dir(directory / "target", target, directory / "tok.json"),
            write_model_dir(directory / "draft", draft, directory / "tok.json"), [ids[:24], ids[10:34]])


def train_draft(data: str, out: Path, threads: int) -> Path:
    if (out / "checkpoints").is_dir():
        return out
    cmd = [sys.executable, "-m", "lmforge.cli", "train", "--recipe", "draft", "--data", data, "--out", str(out),
           "--threads", str(threads)]
    print("training the draft: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def data_prompts(data: str, n: int, length: int) -> list[list[int]]:
    from lmforge.data.dataset import TokenData

    val = TokenData(data).split("val")
    step = max(1, (len(val) - length) // n)
    return [[int(t) for t in val[i * step:i * step + length]] for i in range(n)]


def lmforge_rows(target: Any, draft: Any, prompts: list[list[int]], n_new: int, ks: list[int]) -> dict[str, Any]:
    from lmforge.infer.generate import generate
    from lmforge.infer.speculative import Speculation, generate_speculative

    def plain(p: list[int]) -> list[int]:
        return generate(target.model, [p], max_new_tokens=n_new, temperature=0)[0].ids

    def spec(p: list[int], speculation: Speculation, stats: list) -> list[int]:
        (g,), s = generate_speculative(target.model, [p], speculation, max_new_tokens=n_new, temperature=0)
        stats.append(s)
        return g.ids

    plain(prompts[0][:8])  # warm-up of both models (first calls set up their kernels)
    spec(prompts[0][:8], Speculation(draft.model, ks[0]), [])
    base = [timed(lambda p=p: plain(p)) for p in prompts]
    tokens = sum(len(ids) for ids, _ in base)
    out: dict[str, Any] = {"target_alone": {"tokens": tokens, "seconds": round(sum(s for _, s in base), 3),
                                            "tokens_per_s": round(tokens / sum(s for _, s in base), 1)},
                           "with_draft": []}
    for k in ks:
        stats: list = []
        runs = [timed(lambda p=p: spec(p, Speculation(draft.model, k), stats)) for p in prompts]
        secs = sum(s for _, s in runs)
        proposed, accepted = sum(s.proposed for s in stats), sum(s.accepted for s in stats)
        forwards, made = sum(s.target_forwards for s in stats), sum(s.tokens for s in stats)
        out["with_draft"].append({
            "k": k, "tokens_per_s": round(tokens / secs, 1), "seconds": round(secs, 3),
            "speedup": round(out["target_alone"]["seconds"] / secs, 2),
            "acceptance_rate": round(accepted / max(1, proposed), 3),
            "tokens_per_target_forward": round(made / max(1, forwards), 2),
            "token_identical": all(ids == b for (ids, _), (b, _) in zip(runs, base))})
    out["best"] = max(out["with_draft"], key=lambda r: r["speedup"])
    return out


def prompt_lookup_rows(target: Any, prompt: list[int], n_new: int, ks: list[int]) -> dict[str, Any]:
    from lmforge.infer.generate import generate
    from lmforge.infer.speculative import Speculation, generate_speculative

    base, secs = timed(lambda: generate(target.model, [prompt], max_new_tokens=n_new, temperature=0)[0].ids)
    rows = []
    for k in ks:
        def run(k: int = k) -> tuple[list[int], Any]:
            (g,), s = generate_speculative(target.model, [prompt], Speculation(None, k), max_new_tokens=n_new,
                                           temperature=0)
            return g.ids, s
        (ids, s), t = timed(run)
        rows.append({"k": k, "speedup": round(secs / t, 2), "tokens_per_s": round(len(ids) / t, 1),
                     "acceptance_rate": round(s.acceptance_rate, 3),
                     "tokens_per_target_forward": round(s.tokens_per_target_forward, 2), "token_identical": ids == base})
    return {"prompt_tokens": len(prompt), "target_alone_tokens_per_s": round(len(base) / secs, 1), "with_lookup": rows,
            "best": max(rows, key=lambda r: r["speedup"])}


def folio_lookup_rows(llm: Any, sources: list[str], n_new: int, ks: list[int]) -> dict[str, Any]:
    """Greedy modernisation of Folio sources with and without prompt lookup (the model's generation format)."""
    llm.generate(sources[0], max_new_tokens=4, temperature=0)  # warm-up
    base = [timed(lambda s=s: llm.generate(s, max_new_tokens=n_new, temperature=0)) for s in sources]
    secs = sum(t for _, t in base)
    rows = []
    for k in ks:
        runs, stats = [], []
        for s in sources:
            runs.append(timed(lambda s=s: llm.generate(s, max_new_tokens=n_new, temperature=0,
                                                       prompt_lookup_num_tokens=k)))
            stats.append(llm.last_stats)
        proposed, accepted = sum(x.proposed for x in stats), sum(x.accepted for x in stats)
        forwards, made = sum(x.target_forwards for x in stats), sum(x.tokens for x in stats)
        rows.append({"k": k, "speedup": round(secs / sum(t for _, t in runs), 2),
                     "acceptance_rate": round(accepted / max(1, proposed), 3),
                     "tokens_per_target_forward": round(made / max(1, forwards), 2),
                     "same_text": [o for o, _ in runs] == [o for o, _ in base]})
    return {"sources": len(sources), "with_lookup": rows, "best": max(rows, key=lambda r: r["speedup"])}


def transformers_rows(target_dir: Path, draft_dir: Path, work: Path, prompts: list[list[int]], n_new: int,
                      reference: list[list[int]]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.bench.train import quiet_transformers
    from lmforge.interop.hf import convert_to_hf

    quiet_transformers()
    hf_target = AutoModelForCausalLM.from_pretrained(convert_to_hf(target_dir, work / "hf-target"),
                                                     dtype=torch.float32).eval()
    hf_draft = AutoModelForCausalLM.from_pretrained(convert_to_hf(draft_dir, work / "hf-draft"),
                                                    dtype=torch.float32).eval()
    for m in (hf_target, hf_draft):
        m.generation_config.eos_token_id = None  # every row runs its whole budget, as lmforge's
    rows: dict[str, Any] = {}
    for name, extra in (("generate", {}), ("assisted", {"assistant_model": hf_draft})):
        outs = []
        with torch.inference_mode():
            warm = torch.tensor([prompts[0]])
            hf_target.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False,
                               pad_token_id=0, **extra)
            for p in prompts:
                ids = torch.tensor([p])
                out, secs = timed(lambda ids=ids: hf_target.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                    **extra)[0, len(p):].tolist())
                outs.append((out, secs))
        tokens, secs = sum(len(o) for o, _ in outs), sum(s for _, s in outs)
        rows[name] = {"tokens_per_s": round(tokens / secs, 1), "seconds": round(secs, 3),
                      "token_identical_to_lmforge": [o for o, _ in outs] == reference}
    rows["assisted_speedup"] = round(rows["generate"]["seconds"] / rows["assisted"]["seconds"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--draft", type=Path, help="draft model (default: train one with --recipe draft into runs/draft)")
    p.add_argument("--data", default=str(ROOT / "data" / "shakespeare"), help="prepared data (prompts, the draft's)")
    p.add_argument("--ks", default="2,3,4,5,6", help="guesses per step to measure")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--folio-model", type=Path, help="a decoder fine-tuned on Folio modernisation (prompt lookup)")
    p.add_argument("--folio-data", type=Path, help="Folio test.jsonl (default: runs/folio/data/test.jsonl)")
    p.add_argument("--folio-prompts", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="random tiny models, a few tokens (smoke test)")
    p.add_argument("--json", type=Path)
    add_results_flag(p, "speculative")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    import torch

    from lmforge.bench.machine import machine_info
    from lmforge.infer.llm import LLM

    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory(prefix="lmforge-spec-bench-") as tmp:
        work = Path(tmp)
        if args.quick:
            target_dir, draft_dir, prompts = quick_pair(work)
            n_new = 16
        else:
            target_dir = args.target
            draft_dir = args.draft or train_draft(args.data, ROOT / "runs" / "draft", args.threads)
            prompts = data_prompts(args.data, args.prompts, args.prompt_len)
            n_new = args.max_new_tokens
        target, draft = LLM.load(target_dir), LLM.load(draft_dir)
        params = {name: sum(p.numel() for p in m.model.parameters()) for name, m in (("target", target), ("draft", draft))}
        result: dict[str, Any] = {"benchmark": "speculative", "machine": machine_info(),
                                  "target": str(target_dir), "draft": str(draft_dir), "parameters": params,
                                  "draft_fraction": round(params["draft"] / params["target"], 3),
                                  "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        result["lmforge"] = lmforge_rows(target, draft, prompts, n_new, ks)
        from lmforge.infer.generate import generate

        reference = [generate(target.model, [q], max_new_tokens=n_new, temperature=0)[0].ids for q in prompts]
        result["transformers"] = transformers_rows(Path(target_dir), Path(draft_dir), work, prompts, n_new, reference)
        half = prompts[0][:len(prompts[0]) // 2]
        result["prompt_lookup"] = prompt_lookup_rows(target, prompts[0] + half, n_new, ks)
        folio_model = target_dir if args.quick else args.folio_model
        if folio_model is not None:
            data = args.folio_data or ROOT / "runs" / "folio" / "data" / "test.jsonl"
            if args.quick:
                data = work / "folio.jsonl"
                data.write_text('{"source": "Stand & vnfold your selfe"}\n{"source": "Long liue the King"}\n')
            rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
            sources = [r["source"] for r in rows[:args.folio_prompts]]
            result["prompt_lookup_folio"] = folio_lookup_rows(LLM.load(folio_model), sources, n_new, ks)
    best = result["lmforge"]["best"]
    result["targets"] = {"draft_speedup": best["speedup"], "goal": 1.8, "met": best["speedup"] >= 1.8,
                         "token_identical": all(r["token_identical"] for r in result["lmforge"]["with_draft"])}
    publish("speculative", result, json_path=args.json, results=args.results, wall_s=time.perf_counter() - t0)
    print(f"draft k={best['k']}: {best['speedup']}x the target alone (target 1.8x: "
          f"{'met' if best['speedup'] >= 1.8 else 'NOT met'}), acceptance {best['acceptance_rate']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
