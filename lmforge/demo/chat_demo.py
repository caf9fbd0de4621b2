"""`make chat-demo`: turn the `make demo` Shakespeare model into an assistant for verifiable tasks.

    python -m lmforge.demo.chat_demo [--base runs/demo] [--out runs/chat-demo] [--steps N | --minutes M]
                                     [--results PATH]

1. the base model (trained by `make demo` first when absent);
2. seeded task data (lmforge.data.tasks): 50,000 training conversations, 1,000 held-out test prompts
   whose task instances never occur in training, 200 validation conversations;
3. exact-match accuracy on the test prompts before SFT (the base model, prompted in ChatML);
4. `lmforge finetune sft` (recipe chat-demo: a fixed 1,057 steps, so every machine trains the same
   model; `--minutes` opts into a wall-clock budget instead) through the one training loop;
5. accuracy after SFT, per task type, the share of replies that end with `<|im_end|>` (stop_rate),
   a few sample conversations, the steps and wall time, and one JSON line with the figures
   (`--results` records them for docs/results/: chat-demo.json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from lmforge.bench.results import add_results_flag, record
from lmforge.data.tasks import TASK_TYPES, check, write_split
from lmforge.demo.pretrain_demo import train_base
from lmforge.runtime import THREADS_HELP, set_threads

REPO_DATA = Path("data")


def evaluate(llm: Any, examples: list[dict[str, Any]], batch_size: int = 50, max_new_tokens: int = 64) -> dict[str, Any]:
    """Greedy replies to every example's user turn; exact-match accuracy overall and per task type,
    the stop rate (replies ended by the end-of-turn token `<|im_end|>`) and the replies."""
    from lmforge.infer.generate import generate

    end_of_turn = llm.tokenizer.end_of_turn_id
    other_stops = llm.stop_ids - {end_of_turn}
    prompts = [llm.chat_prompt(ex["messages"][:-1]) for ex in examples]
    replies, at_end_of_turn = [], []
    for i in range(0, len(prompts), batch_size):
        # Only <|im_end|> stops generating, so a reply's end shows which stop token closed it.
        gens = generate(llm.model, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                        eos_id=end_of_turn, pad_id=llm.pad_id, decode_text=False)
        for g in gens:
            ids, ended = reply_end(g.ids, g.finish_reason, other_stops)
            replies.append(llm.tokenizer.decode(ids))
            at_end_of_turn.append(ended)
    per: dict[str, list[bool]] = defaultdict(list)
    for ex, reply in zip(examples, replies):
        per[ex["task"]].append(check(reply, ex["answer"]))
    ok = [c for v in per.values() for c in v]
    acc = sum(ok) / len(ok)
    return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(ok)),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "stop_rate": sum(at_end_of_turn) / len(at_end_of_turn),
            "mean_reply_tokens": None, "replies": replies}


def reply_end(ids: list[int], finish_reason: str, other_stops: set[int]) -> tuple[list[int], bool]:
    """(the reply, whether <|im_end|> ended it) of a greedy generation that stopped only at <|im_end|>:
    a reply that emitted another stop token (EOS) first ends there, without an end of turn, as a
    generation stopping at every stop token would have ended it."""
    for n, i in enumerate(ids):
        if i in other_stops:
            return ids[:n], False
    return ids, finish_reason == "eos"


def sft_command(base: Path, data: Path, out: Path, steps: int | None, minutes: float | None,
                threads: int | None = None) -> list[str]:
    """`lmforge finetune sft` of the demo: the chat-demo recipe's fixed steps, or `steps`, or with
    `minutes` a wall-clock budget (the schedule fitted to it; steps then only cap the run); on
    `threads` CPU threads (None: lmforge's default)."""
    cmd = [sys.executable, "-m", "lmforge.cli", "finetune", "sft", "--base", str(base), "--data", str(data / "train.jsonl"),
           "--val-data", str(data / "val.jsonl"), "--out", str(out), "--recipe", "chat-demo", "--overwrite",
           "--train.progress", "false"] + threads_flag(threads)
    if minutes is not None:
        cmd += ["--train.max_minutes", str(minutes), "--train.max_steps", str(steps or 100000)]
    elif steps is not None:
        cmd += ["--train.max_steps", str(steps)]
    return cmd


def threads_flag(threads: int | None) -> list[str]:
    """--threads for a child `lmforge` command: the demo's own setting, when one was given."""
    return [] if threads is None else ["--threads", str(threads)]


def trained_steps(run: Path) -> int:
    """The step of `run`'s latest checkpoint: how many optimizer steps it trained."""
    from lmforge.checkpoint import latest_checkpoint, load_train_state

    state, _ = load_train_state(latest_checkpoint(run), with_tensors=False)
    return int(state["step"])


def load_chat_llm(path: str | Path) -> Any:
    """An LLM with ChatML rendering (the base model before SFT has the reserved tokens but no template)."""
    from lmforge.finetune.sft import prepare_chat_model
    from lmforge.infer.llm import LLM

    llm = LLM.load(path)
    prepare_chat_model(llm, "auto")
    return llm


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ensure_base(base: Path, threads: int | None = None) -> None:
    from lmforge.checkpoint import latest_checkpoint

    if base.is_dir() and latest_checkpoint(base) is not None:
        return
    print(f"chat-demo: no model in {base}; training it first (make demo's recipe: 450 steps, about 5 minutes)", flush=True)
    train_base(Path("data/shakespeare"), base, quiet=True, threads=threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chat-demo")
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--base", default="runs/demo")
    p.add_argument("--out", default="runs/chat-demo")
    p.add_argument("--data", default="data/chat_tasks")
    p.add_argument("--steps", type=int, default=None,
                   help="SFT steps (default: the chat-demo recipe's 1,057, about 8 minutes on 2 CPU cores)")
    p.add_argument("--minutes", type=float, default=None,
                   help="opt-in: an SFT wall-clock budget instead of fixed steps (the result then depends on the machine)")
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=1000)
    add_results_flag(p, "chat-demo")
    args = p.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base, out, data = Path(args.base), Path(args.out), Path(args.data)
    ensure_base(base, args.threads)
    paths = write_split(data, n_train=args.n_train + 200, n_test=args.n_test, seed=0)
    rows = read_jsonl(paths["train"])
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:200]), encoding="utf-8")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[200:]), encoding="utf-8")
    test = read_jsonl(paths["test"])
    print(f"chat-demo: {len(rows) - 200} training conversations, {len(test)} held-out test prompts "
          f"({', '.join(TASK_TYPES)})", flush=True)

    before = evaluate(load_chat_llm(base), test)
    print(f"chat-demo: before SFT: exact match {100 * before['accuracy']:.1f}% ± {100 * before['stderr']:.1f}, "
          f"stop rate {100 * before['stop_rate']:.1f}%", flush=True)

    sft_start = time.perf_counter()
    subprocess.run(sft_command(base, data, out, args.steps, args.minutes, args.threads), check=True)
    sft_minutes = (time.perf_counter() - sft_start) / 60
    sft_steps = trained_steps(out)
    print(f"chat-demo: SFT trained {sft_steps} steps in {sft_minutes:.1f} minutes", flush=True)

    from lmforge.infer.llm import LLM

    llm = LLM.load(out)
    after = evaluate(llm, test)
    print("\nheld-out exact match (1,000 prompts)      before SFT   after SFT")
    for kind in TASK_TYPES:
        print(f"  {kind:<38} {100 * before['per_task'].get(kind, 0):>9.1f}%  {100 * after['per_task'].get(kind, 0):>9.1f}%")
    print(f"  {'all':<38} {100 * before['accuracy']:>9.1f}%  {100 * after['accuracy']:>9.1f}%")
    print(f"  {'replies ending at <|im_end|>':<38} {100 * before['stop_rate']:>9.1f}%  {100 * after['stop_rate']:>9.1f}%")
    print("\nsample conversations after SFT:")
    for ex, reply in list(zip(test, after["replies"]))[:6]:
        mark = "ok" if check(reply, ex["answer"]) else f"expected {ex['answer']}"
        print(f"  user: {ex['messages'][0]['content']}\n  assistant: {reply}   [{mark}]")
    result = {"accuracy_before": round(before["accuracy"], 4), "accuracy_after": round(after["accuracy"], 4),
              "accuracy_after_stderr": round(after["stderr"], 4), "stop_rate": round(after["stop_rate"], 4),
              "per_task_after": {k: round(v, 4) for k, v in after["per_task"].items()},
              "sft_steps": sft_steps, "sft_minutes": round(sft_minutes, 2),
              "minutes": round((time.perf_counter() - t0) / 60, 2)}
    print(f"chat-demo: done in {result['minutes']:.1f} minutes")
    print(json.dumps(result))
    if args.results:
        record("chat-demo", {**result, "stop_rate_before": round(before["stop_rate"], 4),
                             "per_task_before": {k: round(v, 4) for k, v in before["per_task"].items()},
                             "test_prompts": len(test), "train_conversations": len(rows) - 200},
               out=args.results, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
