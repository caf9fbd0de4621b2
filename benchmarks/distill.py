"""Distillation benchmark: a student trained by `lmforge distill` next to the same student trained
without its teacher for the same wall-clock time, both from the same initial weights.

    encoder  teacher: the MiniLM sentiment classifier of `make sentiment-bench` (runs/sentiment/minilm;
             data runs/sentiment/data). Student: the teacher's shape at --enc-layers blocks of
             --enc-width (default 4 x 128: ~21% of the parameters), random init. Rows: teacher,
             distilled (`lmforge distill --task classify`, --enc-loss, teacher logits cached for kd),
             control (`lmforge finetune classify`), each for --minutes of training; test accuracy and
             the student's speed over the teacher's (the test set classified in this process, same batch).
    decoder  teacher: the chat-demo SFT model (runs/chat-demo; data data/chat_tasks). Student: the
             teacher's depth at half its width (and heads), random init. Rows: distilled
             (`lmforge distill --task lm`, --dec-loss) and control (`lmforge finetune sft`), each with
             the chat-demo recipe for --minutes; held-out exact-match accuracy (chat_demo.evaluate).

    python benchmarks/distill.py [--out runs/distill] [--minutes 10] [--skip encoder,decoder]
                                 [--enc-teacher RUN] [--sentiment-data DIR] [--dec-teacher RUN] [--chat-data DIR]
                                 [--enc-loss kd|tinybert|...] [--dec-loss kd|gkd] [--results PATH] [--quick]

--quick builds tiny teachers and data of its own and trains a few steps (the smoke test of tests/).
The last line printed is one JSON object with every number; --results records it (distill.json).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.bench.results import add_results_flag, publish  # noqa: E402

LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def log(msg: str) -> None:
    print(f"distill-bench: {msg}", file=sys.stderr, flush=True)


def lmforge(*args: str) -> float:
    """Run `lmforge ARGS`; its wall-clock minutes."""
    log("lmforge " + " ".join(args))
    t0 = time.time()
    subprocess.run(LMFORGE + list(args), check=True)
    return round((time.time() - t0) / 60, 2)


def budget(minutes: float | None, steps: int | None) -> list[str]:
    if steps:
        return ["--train.max_steps", str(steps), "--train.eval_every", str(steps), "--train.ckpt_every", str(steps)]
    return ["--train.max_steps", "100000", "--train.max_minutes", str(minutes), "--train.eval_every", "100000",
            "--train.ckpt_every", "100000"]


def write_student(teacher_path: Path, out: Path, over: dict[str, int], chat: bool) -> tuple[Path, int, int]:
    """The student's initial weights as a model directory (both rows start from it): (dir, its
    parameters, the teacher's)."""
    from lmforge.checkpoint import write_model_dir
    from lmforge.finetune.base_model import TOKENIZER_FILES, chat_model_files, copied_files
    from lmforge.finetune.distill import StudentConfig, build_student
    from lmforge.infer.llm import LLM

    teacher = LLM.load(teacher_path)
    student, _ = build_student("teacher", teacher, StudentConfig(**over), "none", seed=0)
    files = chat_model_files(teacher, teacher_path) if chat else copied_files(teacher_path, TOKENIZER_FILES + ("vocab.txt",))
    files.pop("hf_config.json", None)  # the teacher's Hugging Face config does not describe the student
    tok = out / "student_tokenizer.json"
    out.mkdir(parents=True, exist_ok=True)
    teacher.tokenizer.save(tok)
    write_model_dir(out / "student_init", student.model, tok, extra_files=files)
    return out / "student_init", student.model.num_params(), teacher.model.num_params()


def timed_accuracy(run: Path, test: Path, repeats: int) -> tuple[float, float]:
    """(test accuracy, seconds to classify the test set: the best of `repeats`)."""
    from lmforge.eval.classification import evaluate_classifier

    best, acc = float("inf"), 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        acc = evaluate_classifier(run, [str(test)], batch_size=64)["accuracy"]
        best = min(best, time.perf_counter() - t0)
    return acc, best


def encoder_rows(args: argparse.Namespace, out: Path) -> dict:
    teacher, data = Path(args.enc_teacher), Path(args.sentiment_data)
    over = {"n_layer": args.enc_layers, "n_embd": args.enc_width, "n_head": max(1, args.enc_width // 32)}
    init, n_student, n_teacher = write_student(teacher, out / "encoder", over, chat=False)
    common = ["--data", str(data / "train.jsonl"), "--val-data", str(data / "val.jsonl"), "--overwrite",
              "--train.micro_batch_size", "16", "--train.lr", str(args.enc_lr), "--train.warmup_steps", "30",
              "--data.max_length", "64", "--train.progress", "false", *budget(args.minutes, args.steps)]
    loss = ["--distill.loss", args.enc_loss] + (["--distill.cache_teacher", "true"] if args.enc_loss == "kd" else [])
    minutes = {"distilled": lmforge("distill", "--teacher", str(teacher), "--student", str(init), "--task", "classify",
                                    "--out", str(out / "encoder/distilled"), *loss, *common),
               "control": lmforge("finetune", "classify", "--base", str(init), "--out", str(out / "encoder/control"),
                                  *common)}
    test = data / "test.jsonl"
    t_acc, t_s = timed_accuracy(teacher, test, args.repeats)
    d_acc, d_s = timed_accuracy(out / "encoder/distilled", test, args.repeats)
    c_acc, _ = timed_accuracy(out / "encoder/control", test, 1)
    res = {"teacher_params": n_teacher, "student_params": n_student, "param_share": round(n_student / n_teacher, 4),
           "loss": args.enc_loss, "test_accuracy": {"teacher": round(t_acc, 4), "distilled": round(d_acc, 4),
                                                    "control": round(c_acc, 4)},
           "share_of_teacher_accuracy": round(d_acc / t_acc, 4) if t_acc else None,
           "speedup": round(t_s / d_s, 2), "classify_seconds": {"teacher": round(t_s, 3), "student": round(d_s, 3)},
           "minutes": minutes}
    log(f"encoder: teacher {100 * t_acc:.1f}%, distilled {100 * d_acc:.1f}% ({100 * res['share_of_teacher_accuracy']:.1f}% "
        f"of the teacher), without the teacher {100 * c_acc:.1f}%; student {100 * res['param_share']:.0f}% of the "
        f"parameters, {res['speedup']:.2f}x faster (same run)")
    return res


def decoder_rows(args: argparse.Namespace, out: Path) -> dict:
    from lmforge.demo.chat_demo import evaluate, load_chat_llm, read_jsonl
    from lmforge.infer.llm import LLM

    teacher, data = Path(args.dec_teacher), Path(args.chat_data)
    cfg = LLM.load(teacher).model.cfg
    over = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd // 2, "n_head": max(1, cfg.n_head // 2)}
    if hasattr(cfg, "n_kv_head"):
        over_kv = max(1, cfg.n_kv_head // 2)
        over = {**over, "n_kv_head": over_kv} if over["n_head"] % over_kv == 0 else over
    init, n_student, n_teacher = write_student(teacher, out / "decoder", over, chat=True)
    recipe = [] if args.quick else ["--recipe", "chat-demo"]
    common = ["--data", str(data / "train.jsonl"), "--val-data", str(data / "val.jsonl"), "--overwrite",
              "--train.progress", "false", *recipe, *budget(args.minutes, args.steps)]
    minutes = {"distilled": lmforge("distill", "--teacher", str(teacher), "--student", str(init), "--task", "lm",
                                    "--distill.loss", args.dec_loss, "--out", str(out / "decoder/distilled"), *common),
               "control": lmforge("finetune", "sft", "--base", str(init), "--out", str(out / "decoder/control"),
                                  *common)}
    test = read_jsonl(data / "test.jsonl")[:args.test_limit]
    acc = {name: round(evaluate(load_chat_llm(path), test)["accuracy"], 4)
           for name, path in (("teacher", teacher), ("distilled", out / "decoder/distilled"),
                              ("control", out / "decoder/control"))}
    res = {"teacher_params": n_teacher, "student_params": n_student, "param_share": round(n_student / n_teacher, 4),
           "loss": args.dec_loss, "test_examples": len(test), "test_accuracy": acc, "minutes": minutes}
    log(f"decoder: teacher {100 * acc['teacher']:.1f}%, distilled {100 * acc['distilled']:.1f}%, SFT alone "
        f"{100 * acc['control']:.1f}% (half-width student, {100 * res['param_share']:.0f}% of the parameters)")
    return res


# ---- --quick: tiny teachers and data of its own -------------------------------------------------

def quick_inputs(out: Path) -> dict[str, Path]:
    import torch

    from lmforge.checkpoint import write_model_dir
    from lmforge.models.decoder import Decoder, config_from_preset as decoder_preset
    from lmforge.models.encoder import Encoder, config_from_preset as encoder_preset
    from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

    rng = random.Random(0)
    pos, neg, filler = "great good loved".split(), "bad awful hated".split(), "the movie was a plot".split()
    sent = out / "quick/sentiment"
    sent.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split, n in (("train", 64), ("val", 16), ("test", 32)):
        rows[split] = []
        for _ in range(n):
            lab = rng.choice(["negative", "positive"])
            words = [rng.choice(filler) for _ in range(5)] + [rng.choice(pos if lab == "positive" else neg)]
            rows[split].append({"text": " ".join(words), "label": lab})
        (sent / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
    tok = Tokenizer.train_wordpiece([r["text"] for r in rows["train"]], vocab_size=64)
    tok.save(out / "quick/wordpiece.json")
    torch.manual_seed(0)
    enc = Encoder(encoder_preset("encoder-tiny", vocab_size=tok.vocab_size, n_layer=4, n_embd=128, n_head=4,
                                 head="sequence", labels=["negative", "positive"], num_labels=2))
    enc_dir = write_model_dir(out / "quick/encoder_teacher", enc, out / "quick/wordpiece.json")

    chat = out / "quick/chat"
    chat.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        exs = []
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            exs.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                     {"role": "assistant", "content": f"Answer: {a + b}"}], "task": "add",
                        "answer": str(a + b)})
        (chat / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in exs))
    ctok = Tokenizer.train_char(["0123456789+?: Answer"])
    ctok.add_chat_tokens()
    ctok.chat_template = CHATML_TEMPLATE
    ctok.save(out / "quick/char.json")
    dec = Decoder(decoder_preset("tiny", vocab_size=ctok.vocab_size, n_layer=2))
    conf = json.dumps({**ctok.tokenizer_config()}).encode()
    dec_dir = write_model_dir(out / "quick/decoder_teacher", dec, out / "quick/char.json",
                              extra_files={"tokenizer_config.json": conf, "chat_template.jinja": CHATML_TEMPLATE.encode()})
    return {"enc_teacher": enc_dir, "sentiment_data": sent, "dec_teacher": dec_dir, "chat_data": chat}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/distill")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes of every distilled / control row")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of --minutes")
    p.add_argument("--skip", default="", help="comma-separated: encoder, decoder")
    p.add_argument("--enc-teacher", default="runs/sentiment/minilm")
    p.add_argument("--sentiment-data", default="runs/sentiment/data")
    p.add_argument("--enc-layers", type=int, default=4)
    p.add_argument("--enc-width", type=int, default=128)
    p.add_argument("--enc-lr", type=float, default=5e-4)
    p.add_argument("--enc-loss", default="kd", help="distill.loss of the encoder student (kd caches the teacher)")
    p.add_argument("--dec-teacher", default="runs/chat-demo")
    p.add_argument("--chat-data", default="data/chat_tasks")
    p.add_argument("--dec-loss", default="kd", help="distill.loss of the decoder student: kd or gkd")
    p.add_argument("--test-limit", type=int, default=1000, help="decoder test examples")
    p.add_argument("--repeats", type=int, default=3, help="timings of the test-set classification (best kept)")
    p.add_argument("--quick", action="store_true", help="tiny teachers and data, a few steps (smoke test)")
    add_results_flag(p, "distill")
    args = p.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    if args.quick:
        args.steps, args.repeats, args.test_limit = args.steps or 4, 1, 8
        args.enc_layers, args.enc_width = 2, 64
        for key, value in quick_inputs(out).items():
            setattr(args, key, str(value))
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"quick": args.quick, "minutes_budget": None if args.steps else args.minutes, "steps": args.steps}
    if "encoder" not in skip:
        result["encoder"] = encoder_rows(args, out)
    if "decoder" not in skip:
        result["decoder"] = decoder_rows(args, out)
    publish("distill", result, results=args.results, wall_s=round(time.time() - start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
