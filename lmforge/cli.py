"""`lmforge` command line: thin verbs that parse arguments and call one library function each.

    lmforge prepare SOURCE... --out DIR          corpus -> tokenizer + train/val token memmaps
    lmforge train --data DIR --out RUN           train a decoder (config: --recipe, --config, --section.key VALUE)
    lmforge generate --ckpt RUN --prompt TEXT    sample text (KV cache, temperature / top-k / top-p)
    lmforge eval --ckpt RUN --data DIR|FILES     loss, perplexity, bits per byte (JSON)
    lmforge info --preset NAME                   parameter count, FLOPs and KV-cache bytes per token
    lmforge convert --from-hf DIR | --to-hf RUN  Hugging Face checkpoint import / export
    lmforge bench train|decode                   side-by-side speed against transformers
    lmforge serve MODEL [--port 8000]            OpenAI-compatible HTTP server (continuous batching, web chat at /)

A user error prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, Sequence

from lmforge.errors import LMForgeError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 2GB or 500MB, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got '{text}'")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like LMForgeError
        self.exit(2, f"error: {self.prog}: {message}\n")


# ---- verbs -------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.prepare import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, overwrite=args.overwrite, progress=not args.quiet)
    splits = meta.get("splits", {})
    parts = [f"{name}: {s.get('tokens', 0):,} tokens / {s.get('bytes', 0):,} bytes / {s.get('documents', 0)} docs"
             for name, s in splits.items()]
    print(f"prepared {args.out} (vocab {meta.get('vocab_size')}, {meta.get('dtype')}) — " + "; ".join(parts))
    return 0


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.train.config import config_help
    from lmforge.train.pretrain import run_training

    if args.help_config:
        print(config_help())
        return 0
    if not args.data or not args.out:
        raise LMForgeError("lmforge train needs --data DIR and --out RUN")
    summary = run_training(args.data, args.out, config_file=args.config, overrides=extra, recipe=args.recipe,
                           resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=None, default=str))
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise LMForgeError("give either --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        from pathlib import Path

        path = Path(args.prompt_file)
        if not path.is_file():
            raise LMForgeError(f"prompt file not found: {path}")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LMForgeError(f"prompt file {path} is not UTF-8 text") from None
    if args.prompt is None:
        raise LMForgeError("lmforge generate needs --prompt TEXT or --prompt-file FILE")
    return args.prompt


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.infer.llm import LLM

    prompt = _read_prompt(args)
    llm = LLM.load(args.ckpt, device=args.device)
    opts: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or None)
    # Encoder-decoders and models with a generation format print the generated target only.
    shown = prompt if llm.continues_prompt else ""
    if "stream" not in llm.tasks or args.num_beams > 1:
        # Beam search prints the best N hypotheses.
        if args.stream:
            raise LMForgeError("--stream works with sampling from decoders; drop it for seq2seq models or --num-beams")
        beam = dict(num_beams=args.num_beams, length_penalty=args.length_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size)
        out = llm.generate(prompt, seed=args.seed, num_samples=args.num_samples, **beam, **opts)
        for i, text in enumerate(out if args.num_samples > 1 else [out]):
            if args.num_samples > 1:
                print(f"--- {'hypothesis' if args.num_beams > 1 else 'sample'} {i + 1}/{args.num_samples} ---")
            print(shown + text)
        return 0
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---")
        if args.stream:
            sys.stdout.write(shown)
            for piece in llm.stream(prompt, seed=seed, **opts):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(shown + llm.generate(prompt, seed=seed, **opts))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """What is measured follows what the model does: classifiers get accuracy / macro-F1 / confusion
    matrix, masked-LM encoders masked-token loss / accuracy, language models loss / perplexity / bits per byte."""
    from lmforge.infer.llm import LLM

    llm = LLM.load(args.ckpt)
    if "classify" in llm.tasks:
        from lmforge.eval.classification import evaluate_classifier

        cols = {k: getattr(args, f"{k}_column") for k in ("text", "pair", "label")}
        cols = None if all(v is None for v in cols.values()) else {"text": cols["text"] or "text",
                                                                   "pair": cols["pair"] or "text_pair",
                                                                   "label": cols["label"] or "label"}
        result = evaluate_classifier(llm, args.data, batch_size=args.batch_size, columns=cols)
    elif "masked_lm" in llm.tasks:
        from lmforge.eval.mlm import evaluate_mlm

        result = evaluate_mlm(llm, args.data[0], batch_size=args.batch_size)
    else:
        from lmforge.eval.perplexity import evaluate

        result = evaluate(llm, args.data, batch_size=args.batch_size, max_tokens=args.max_tokens)
    print(json.dumps(result))
    return 0


def cmd_info(args: argparse.Namespace, extra: list[str]) -> int:
    from dataclasses import asdict

    from lmforge.config import from_dict, parse_overrides
    from lmforge.models.registry import all_presets, family_of_preset

    if args.list or (args.preset is None and not extra):
        print(f"{'preset':<12} {'params':>18} {'layers':>6} {'heads':>5} {'kv':>3} {'width':>6} {'ctx':>6}  flavour")
        for name, fam in all_presets():
            print(fam.list_row(name, fam.config_from_preset(name)))
        return 0
    if args.preset is None:
        raise LMForgeError("lmforge info needs --preset NAME (or --list)")
    fam = family_of_preset(args.preset)
    overrides = parse_overrides(extra)
    model_over = overrides.pop("model", {})
    if overrides:
        raise LMForgeError(f"lmforge info takes only --model.KEY overrides, got: {', '.join('--' + k for k in overrides)}")
    cfg = from_dict(fam.config_cls, {**fam.presets[args.preset], **model_over, "preset": args.preset}, prefix="model.")
    info, lines = fam.describe(cfg, args.seq_len)
    info = {"preset": args.preset, "family": fam.name, **info, "config": asdict(cfg)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"preset                 {args.preset} ({fam.name})")
    for line in lines:
        print(line)
    return 0


def _read_lines(args: argparse.Namespace, what: str) -> list[str]:
    """Texts from positional arguments and/or --file (one per line; .jsonl: the "text" field)."""
    texts = list(args.texts or [])
    if args.file:
        from lmforge.finetune.classify import read_texts

        texts += read_texts(args.file)
    if not texts:
        raise LMForgeError(f"lmforge {what} needs TEXT arguments or --file FILE")
    return texts


def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.infer.llm import LLM

    texts = _read_lines(args, "embed")
    llm = LLM.load(args.ckpt, device=args.device)
    emb = llm.embed(texts, pooling=args.pooling, normalize=False if args.no_normalize else None,
                    batch_size=args.batch_size)
    for text, row in zip(texts, emb.tolist()):
        print(json.dumps({"text": text, "embedding": [round(v, 7) for v in row]}))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from lmforge.infer.llm import LLM

    texts = _read_lines(args, "classify")
    llm = LLM.load(args.ckpt, device=args.device)
    for text, r in zip(texts, llm.classify(texts, batch_size=args.batch_size)):
        if args.json:
            print(json.dumps({"text": text, **r}))
        else:
            probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probs"].items()) or f"value={r['score']:.4f}"
            print(f"{r['label']}\t{probs}\t{text}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Reward-model scores: --prompt/--completion pairs, or --file JSONL rows {"prompt", "completion"}
    (or preference pairs {"prompt", "chosen", "rejected"}: both scored, plus the pairwise accuracy)."""
    from lmforge.infer.llm import LLM

    llm = LLM.load(args.ckpt, device=args.device)
    if args.file:
        from lmforge.data.alignment_data import read_scoring_file

        rows, prompts, completions = read_scoring_file(args.file)
        scores = llm.score(prompts, completions) if completions else []
        it = iter(scores)
        wins = n_pairs = 0
        for row in rows:
            if "chosen" in row:
                c, r = next(it), next(it)
                wins, n_pairs = wins + (c > r), n_pairs + 1
                print(json.dumps({**row, "score_chosen": c, "score_rejected": r}))
            else:
                print(json.dumps({**row, "score": next(it)}))
        if n_pairs:
            print(json.dumps({"pairs": n_pairs, "pair_accuracy": wins / n_pairs}))
        return 0
    if not args.prompt or not args.completion:
        raise LMForgeError("lmforge score needs --prompt and --completion (repeatable), or --file")
    prompts = args.prompt if len(args.prompt) == len(args.completion) else args.prompt[:1] * len(args.completion)
    if len(args.prompt) not in (1, len(args.completion)):
        raise LMForgeError(f"{len(args.prompt)} --prompt for {len(args.completion)} --completion; give one or one each")
    for p, c, v in zip(prompts, args.completion, llm.score(prompts, args.completion)):
        print(json.dumps({"prompt": p, "completion": c, "score": v}) if args.json else f"{v:.6f}\t{c}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.name == "folio":  # First Folio -> modern spelling pairs from the built-in Shakespeare
        from lmforge.data.folio import build_folio

        meta = build_folio(args.out, overwrite=args.overwrite)
        sp = meta["splits"]
        print(f"wrote {args.out}: train {sp['train']:,}, val {sp['val']:,} ({', '.join(meta['val_plays'])}), "
              f"test {sp['test']:,} ({', '.join(meta['test_plays'])}) speech pairs; dropped "
              f"{meta['dropped_low_similarity']:,} misaligned, {meta['dropped_too_long']:,} longer than "
              f"{meta['max_chars']} characters, {meta['unmatched_folio']:,} Folio speeches unmatched")
        return 0
    from lmforge.data.sentiment import build_sentiment

    meta = build_sentiment(args.out, overwrite=args.overwrite)
    counts = ", ".join(f"{name} {f['examples']:,}" for name, f in meta["files"].items())
    print(f"wrote {args.out}: {counts} (from {meta['source']}, sha256 checked)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lmforge.interop import hf

    if bool(args.from_hf) == bool(args.to_hf):
        raise LMForgeError("lmforge convert needs exactly one of --from-hf HF_DIR or --to-hf RUN")
    if args.from_hf:
        out = hf.convert_from_hf(args.from_hf, args.out, overwrite=args.overwrite)
    else:
        out = hf.convert_to_hf(args.to_hf, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.chat import repl

    sampling: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if bool(args.model) == bool(args.url):
        raise LMForgeError("lmforge chat needs a MODEL directory or --url of a running `lmforge serve`")
    if args.url:
        from lmforge.chat import HTTPBackend  # noqa: F401  (added with the server)

        backend = HTTPBackend(args.url, api_key=args.api_key, model=args.served_model)
    else:
        from lmforge.chat import LocalBackend
        from lmforge.infer.llm import LLM

        backend = LocalBackend(LLM.load(args.model, device=args.device))
    return repl(backend, sampling, system=args.system)


def cmd_serve(args: argparse.Namespace) -> int:
    from lmforge.serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
          max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len, device=args.device,
          log_prompts=args.log_prompts)
    return 0


def finetune_parser(method: str) -> argparse.ArgumentParser:
    """The flags every method shares plus the method's own (its module's add_arguments)."""
    from lmforge.finetune.scaffold import method_module

    module = method_module(method)
    p = _Parser(prog=f"lmforge finetune {method}", description=(module.__doc__ or "").strip().splitlines()[0],
                epilog="Config keys: --section.key VALUE (e.g. --train.lr 1e-4); see docs/internals.md")
    p.add_argument("--base", required=True, help="model to start from: lmforge run / model dir or Hugging Face folder")
    p.add_argument("--data", required=True, help="training data: a JSONL/CSV/TSV file, a directory or a glob")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--val-data", help="validation data (default: --val-fraction of --data, or none)")
    p.add_argument("--val-fraction", type=float, default=None, help="hold out this share of whole examples")
    p.add_argument("--config", help="YAML config file (sections train, data, and the method's own)")
    p.add_argument("--recipe", help="a config shipped with lmforge")
    p.add_argument("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    if hasattr(module, "add_arguments"):
        module.add_arguments(p)
    return p


def finetune_config_help(method: str) -> str:
    """The method's config keys: its CONFIG dataclass, with the method's DEFAULTS."""
    from lmforge.finetune.scaffold import method_module
    from lmforge.train.config import config_help

    module = method_module(method)
    return config_help(module.CONFIG, command=f"lmforge finetune {method}", defaults=getattr(module, "DEFAULTS", None))


def cmd_finetune(argv: list[str]) -> int:
    from lmforge.finetune.scaffold import METHODS, run

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge finetune METHOD --base MODEL --data FILE --out RUN [options] [--section.key VALUE ...]\n"
              f"methods: {', '.join(METHODS)}\n`lmforge finetune METHOD --help` lists a method's options.")
        return 0 if argv else 2
    method, rest = argv[0], argv[1:]
    if "--help-config" in rest:
        print(finetune_config_help(method))
        return 0
    parser = finetune_parser(method)
    args, extra = parser.parse_known_args(rest)
    if args.resume and args.overwrite:
        raise LMForgeError("pass either --resume or --overwrite, not both")
    summary = run(method, args, extra)
    print(json.dumps(summary, indent=None, default=str))
    return 0


BENCHMARKS = ("train", "decode", "encoder", "seq2seq")  # each a module of lmforge.bench with run(opts)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from lmforge.bench import summary_lines

    result = importlib.import_module(f"lmforge.bench.{args.what}").run({"quick": args.quick})
    for line in summary_lines(result):
        print(line, file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        from lmforge.checkpoint import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    print(text)
    return 0


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmforge", description="Build, train, evaluate and run transformer language models.")
    from lmforge import __version__

    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("prepare", help="tokenize a corpus into train/val memmaps")
    s.add_argument("sources", nargs="+", metavar="SOURCE", help="'shakespeare', or .txt/.jsonl files, globs, directories")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--tokenizer", default="bpe", choices=["bpe", "char", "wordpiece"],
                   help="byte-level BPE, characters, or BERT-style WordPiece for encoders (default bpe)")
    s.add_argument("--vocab-size", type=_positive_int, default=4096, help="BPE vocabulary size (default 4096)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="share of bytes held out, as whole documents (default 0.1)")
    s.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("train", help="train a decoder; extra --section.key VALUE flags override the config",
                       epilog="Config keys: lmforge train --help-config")
    s.add_argument("--data", help="prepared data directory (lmforge prepare)")
    s.add_argument("--out", help="run directory")
    s.add_argument("--config", help="YAML config file with sections model, train, data")
    s.add_argument("--recipe", help="a config shipped with lmforge: demo, speedrun, baseline")
    s.add_argument("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint path")
    s.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    s.add_argument("--help-config", action="store_true", help="list every config key with its default")

    s = sub.add_parser("generate", help="generate text from a trained model")
    s.add_argument("--ckpt", required=True, help="run directory, model directory or Hugging Face folder")
    s.add_argument("--prompt", help="prompt text (for an encoder-decoder or a `finetune seq2seq` run: the source; "
                   "only the generated target is printed)")
    s.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    s.add_argument("--max-new-tokens", type=_positive_int, default=200)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-k", type=_positive_int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--num-samples", type=_positive_int, default=1)
    s.add_argument("--num-beams", type=_positive_int, default=1, help="beam search with N beams (1 = off); "
                   "--num-samples then prints the N best hypotheses")
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**penalty")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size (0 = off)")
    s.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    s.add_argument("--device", default="cpu")

    s = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out data")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--data", required=True, nargs="+", help="prepared data directory, or text files")
    s.add_argument("--batch-size", type=_positive_int, default=8)
    s.add_argument("--max-tokens", type=_positive_int, default=None)
    s.add_argument("--text-column", help="classifiers: column holding the text (default: the run's, else text)")
    s.add_argument("--text-pair-column", dest="pair_column", help="classifiers: column of the second text of pairs")
    s.add_argument("--label-column", help="classifiers: column holding the label (default: the run's, else label)")

    s = sub.add_parser("info", help="parameter count, FLOPs and KV-cache size of a preset (+ --model.KEY overrides)")
    s.add_argument("--preset", help="preset name; --list shows them all")
    s.add_argument("--list", action="store_true")
    s.add_argument("--seq-len", type=_positive_int, default=None, help="sequence length for attention FLOPs (default: context)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("data", help="built-in datasets: sentiment (VADER's human-rated sentences, from PyPI), "
                       "folio (First Folio -> modern spelling speech pairs from the built-in Shakespeare)")
    s.add_argument("name", choices=["sentiment", "folio"])
    s.add_argument("--out", required=True, help="output directory (train/val/test.jsonl + out-of-domain tests)")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("embed", help="sentence embeddings of an encoder (one JSON line per text)")
    s.add_argument("texts", nargs="*", metavar="TEXT")
    s.add_argument("--ckpt", required=True, help="encoder run / model directory, HF or sentence-transformers folder")
    s.add_argument("--file", help="texts, one per line (.jsonl: the 'text' field)")
    s.add_argument("--pooling", choices=["mean", "cls"], default=None, help="default: the model's own, else mean")
    s.add_argument("--no-normalize", action="store_true", help="keep the raw pooled vectors (default: unit length)")
    s.add_argument("--batch-size", type=_positive_int, default=32)
    s.add_argument("--device", default="cpu")

    s = sub.add_parser("classify", help="label + probabilities from a classifier (lmforge finetune classify)")
    s.add_argument("texts", nargs="*", metavar="TEXT")
    s.add_argument("--ckpt", required=True, help="classifier run / model directory or HF …ForSequenceClassification folder")
    s.add_argument("--file", help="texts, one per line (.jsonl: the 'text' field)")
    s.add_argument("--json", action="store_true", help="one JSON object per text")
    s.add_argument("--batch-size", type=_positive_int, default=32)
    s.add_argument("--device", default="cpu")

    s = sub.add_parser("score", help="reward-model scores of completions (lmforge finetune reward)")
    s.add_argument("--ckpt", required=True, help="reward model run / model directory")
    s.add_argument("--prompt", action="append", default=[], help="prompt (one for all completions, or one each)")
    s.add_argument("--completion", action="append", default=[], help="completion to score (repeatable)")
    s.add_argument("--file", help="JSONL: {prompt, completion} rows, or preference pairs {prompt, chosen, rejected}")
    s.add_argument("--json", action="store_true", help="one JSON object per completion")
    s.add_argument("--device", default="cpu")

    s = sub.add_parser("convert", help="import from / export to a Hugging Face checkpoint folder")
    s.add_argument("--from-hf", metavar="HF_DIR")
    s.add_argument("--to-hf", metavar="RUN")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--max-shard-size", type=_size, default=5 * 2**30, metavar="SIZE",
                   help="--to-hf: split safetensors above this size, e.g. 2GB, 500MB (default 5GB)")

    s = sub.add_parser("chat", help="talk to a chat model in the terminal (streams replies, keeps history)")
    s.add_argument("model", nargs="?", help="run directory, model directory or Hugging Face folder")
    s.add_argument("--url", help="talk to a running `lmforge serve` instead, e.g. http://127.0.0.1:8000")
    s.add_argument("--api-key", help="--url: the server's API key")
    s.add_argument("--served-model", help="--url: model name to request (default: the server's first)")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--max-new-tokens", type=_positive_int, default=256)
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    s.add_argument("--top-k", type=_positive_int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default="cpu")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat page")
    s.add_argument("model", help="run directory, model directory or Hugging Face folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API routes")
    s.add_argument("--served-model-name", help="the model name clients send (default: the MODEL folder name)")
    s.add_argument("--max-batch", type=_positive_int, default=32, help="sequences decoded together (default 32)")
    s.add_argument("--max-queue", type=_positive_int, default=256, help="requests allowed to wait; more get 429")
    s.add_argument("--max-model-len", type=_positive_int, default=None, help="prompt + completion limit (default: context)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--log-prompts", action="store_true", help="also log prompt text (off: only ids, sizes, timing)")

    sub.add_parser("finetune", help="post-train a model: sft, reward, dpo, grpo, ppo, classify, seq2seq "
                                    "(lmforge finetune METHOD --help)", add_help=False)

    s = sub.add_parser("bench", help="speed side by side with transformers")
    s.add_argument("what", choices=BENCHMARKS)
    s.add_argument("--quick", action="store_true", help="tiny sizes, a few iterations (smoke test)")
    s.add_argument("--json", help="also write the result to this file")
    return p


_TAKES_OVERRIDES = {"train", "info"}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning  # "warning: ..." lines, not file:line: UserWarning
    parser = build_parser()
    try:
        if argv and argv[0] == "finetune":  # each method has its own flags: parsed by its own parser
            return cmd_finetune(argv[1:])
        args, extra = parser.parse_known_args(argv)
        if extra and args.verb not in _TAKES_OVERRIDES:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        verb = args.verb
        if verb == "train":
            return cmd_train(args, extra)
        if verb == "info":
            return cmd_info(args, extra)
        return {"prepare": cmd_prepare, "generate": cmd_generate, "eval": cmd_eval, "chat": cmd_chat, "serve": cmd_serve,
                "convert": cmd_convert, "bench": cmd_bench,
                "embed": cmd_embed, "classify": cmd_classify, "score": cmd_score,
                "data": cmd_data}[verb](args)
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
