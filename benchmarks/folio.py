"""Spelling normalisation of Shakespeare (First Folio -> modern), one run, anchors beside the models.

    python benchmarks/folio.py --minutes 15 --out runs/folio

1. `lmforge data folio` pairs (whole plays held out: Hamlet and Macbeth are the test set).
2. Anchors on the test plays: copying the source unchanged, and a word-substitution table learned
   from the training pairs (most frequent modern form of each Folio word, words paired by a
   spelling-insensitive alignment inside each pair; unknown words copied).
3. A T5-style and a BART-style encoder-decoder (t5-cpu / bart-cpu flavours at width 128, 3+3 layers, random init, a
   byte-level BPE trained on the training pairs) fine-tuned with `lmforge finetune seq2seq` for
   `--minutes` each on the CPU, then greedy decoding of every test source.
Prints one table (BLEU, chrF, ROUGE-L, exact match) and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmforge.data.folio import build_folio, skeleton  # noqa: E402
from lmforge.eval.generation import generation_metrics  # noqa: E402

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def substitution_table(pairs: list[dict]) -> dict[str, str]:
    """Folio word -> its most frequent modern form, from words paired inside each training pair."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for p in pairs:
        a, b = words(p["source"]), words(p["target"])
        sm = difflib.SequenceMatcher(a=[skeleton(w) or w for w in a], b=[skeleton(w) or w for w in b], autojunk=False)
        for tag, i1, i2, j1, j2 in sm.get_opcodes():
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                for i, j in zip(range(i1, i2), range(j1, j2)):
                    counts[a[i]][b[j]] += 1
    return {w: c.most_common(1)[0][0] for w, c in counts.items()}


def detok(tokens: list[str]) -> str:
    out = ""
    for t in tokens:
        if out and (t[0].isalnum() or t[0] in "'‘(&") and not out.endswith(("(", "'")):
            out += " "
        out += t
    return out


def apply_table(table: dict[str, str], text: str) -> str:
    return detok([table.get(w, w) for w in words(text)])


def train_model(kind: str, data: Path, out: Path, minutes: float, tok_path: Path) -> Path:
    from lmforge.checkpoint import write_model_dir
    from lmforge.finetune.seq2seq import build_config, build_task
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.loop import train_task

    tok = Tokenizer.from_file(tok_path)
    torch.manual_seed(0)
    base = out / f"{kind}-init"
    # CPU-budget shape: 3+3 layers, width 128 (about 1.7M parameters with a 2048-token BPE)
    shape = dict(vocab_size=tok.vocab_size, n_encoder_layer=3, n_decoder_layer=3, d_model=128, n_head=4, head_dim=32,
                 d_ff=384 if kind == "t5" else 512)
    write_model_dir(base, Seq2Seq(config_from_preset(f"{kind}-cpu", **shape)), tokenizer_path=tok_path)
    args = argparse.Namespace(base=str(base), data=str(data / "train.jsonl"), val_data=str(data / "val.jsonl"),
                              out=str(out / kind), resume=None, overwrite=True, config=None, recipe=None,
                              val_fraction=None, source_column=None, target_column=None, prefix=None)
    over = ["--train.max_steps", "100000", "--train.max_minutes", str(minutes), "--train.micro_batch_size", "32",
            "--train.lr", "2e-3", "--train.warmup_steps", "100", "--train.eval_every", "400",
            "--train.ckpt_every", "400", "--train.eval_iters", "10", "--train.log_every", "50",
            "--data.max_source_length", "160", "--data.max_target_length", "160",
            "--generate.max_examples", "50", "--generate.max_new_tokens", "160", "--generate.batch_size", "50"]
    cfg = build_config(args, over)
    task = build_task(cfg, args.base, args.data, args.val_data, args.out)
    train_task(task, cfg.train, args.out, overwrite=True)
    return out / kind


def predict_run(run: Path, sources: list[str]) -> tuple[list[str], float]:
    from lmforge.finetune.seq2seq import Seq2SeqGenerateConfig, predict
    from lmforge.infer.llm import LLM

    llm = LLM.load(run)
    ids = [llm.tokenizer.encode(s)[:159] + [llm.model.cfg.eos_id] for s in sources]
    t0 = time.time()
    preds = predict(llm.model, llm.tokenizer, ids, "seq2seq", llm.model.cfg.eos_id, llm.model.cfg.pad_id,
                    Seq2SeqGenerateConfig(max_new_tokens=200, num_beams=1, batch_size=64))
    return preds, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/folio")
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per model")
    ap.add_argument("--models", default="t5,bart", help="which models to train (t5, bart, or none)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "test.jsonl").is_file():
        build_folio(data, overwrite=True)
    load = lambda name: [json.loads(x) for x in (data / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    train, test = load("train"), load("test")
    sources, refs = [p["source"] for p in test], [p["target"] for p in test]
    results: dict[str, dict] = {}
    results["copy source"] = generation_metrics(sources, refs)
    table = substitution_table(train)
    results["word substitution table"] = generation_metrics([apply_table(table, s) for s in sources], refs)

    tok_path = out / "tokenizer.json"
    if not tok_path.is_file():
        from lmforge.tokenizer import Tokenizer

        texts = [p["source"] for p in train] + [p["target"] for p in train]
        Tokenizer.train_bpe(texts, args.vocab_size).save(tok_path)
    for kind in [m for m in args.models.split(",") if m in ("t5", "bart")]:
        t0 = time.time()
        run = train_model(kind, data, out, args.minutes, tok_path)
        train_s = time.time() - t0
        preds, gen_s = predict_run(run, sources)
        from lmforge.checkpoint import load_model_dir

        n = load_model_dir(run)[0].num_params()
        label = f"{'T5' if kind == 't5' else 'BART'}-style ({n / 1e6:.1f}M)"
        results[label] = {**generation_metrics(preds, refs), "train_seconds": round(train_s),
                          "generate_seconds": round(gen_s)}
        (out / f"{kind}_test_predictions.jsonl").write_text(
            "".join(json.dumps({"source": s, "target": r, "prediction": p}, ensure_ascii=False) + "\n"
                    for s, r, p in zip(sources, refs, preds)))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nFolio -> modern spelling, test plays Hamlet + Macbeth ({len(test)} speeches), {len(train)} training pairs")
    print(f"{'system':<30} {'BLEU':>6} {'chrF':>6} {'ROUGE-L':>8} {'exact':>6}")
    for name, m in results.items():
        print(f"{name:<30} {m['bleu']:>6.1f} {m['chrf']:>6.1f} {m['rougeL']:>8.1f} {m['exact_match']:>6.1f}")


if __name__ == "__main__":
    main()
