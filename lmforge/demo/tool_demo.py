"""`make tool-demo`: teach the `make chat-demo` model to call tools, and measure what they buy.

    python -m lmforge.demo.tool_demo [--chat runs/chat-demo] [--out runs/tool-demo] [--steps N]
                                     [--quick] [--results PATH]

1. tool-use conversations (lmforge.data.tasks, tools=True): arithmetic calls `calculator`, counting
   `count(word, words)`, sorting `sort(words)`, each followed by the tool's result and the answer;
   reverse and sequence keep their worked replies. The held-out prompts are chat-demo's 1,000.
   The demo model's context (256 tokens) cannot hold the tools' JSON schemas (about 690 tokens in
   its Shakespeare BPE), so the conversations are rendered without `tools`: the model learns the
   three tools' names and arguments from the calls in its training data.
2. `lmforge finetune sft` of the chat-demo model on them (the chat-demo recipe, a fixed --steps);
3. held-out exact match: the chat-demo model without tools, then the tool model with them — its
   reply, each tool call executed (lmforge.infer.agent.execute), the results sent back, its answer
   (at most two replies per prompt, batched). tool_call_valid_rate: the share of replies that
   write a `<tool_call>` whose calls all parse and fit the tools' schemas.
Last line: one JSON object with accuracy_without_tools, accuracy_with_tools, tool_call_valid_rate
and minutes (and per-task figures). --quick: a few steps on a small split (a smoke test).
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
from lmforge.data.tasks import TASK_TYPES, TOOLS, check, write_split
from lmforge.demo.chat_demo import evaluate, load_chat_llm, read_jsonl, sft_command, trained_steps
from lmforge.runtime import THREADS_HELP, set_threads

STEPS = 600  # about 4.5 minutes on 2 CPU cores (chat-demo's 1,057 steps take about 8)


def _generate(llm: Any, prompts: list[list[int]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy replies, each ended by the end-of-turn token (or another stop token)."""
    from lmforge.infer.generate import generate

    out = []
    for i in range(0, len(prompts), batch_size):
        gens = generate(llm.model, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.0,
                        eos_id=llm.stop_ids, pad_id=llm.pad_id, decode_text=False)
        for g in gens:
            ids = list(g.ids)
            cut = next((n for n, t in enumerate(ids) if t in llm.stop_ids), len(ids))
            out.append(llm.tokenizer.decode(ids[:cut]))
    return out


def evaluate_with_tools(llm: Any, examples: list[dict[str, Any]], batch_size: int = 50, call_tokens: int = 128,
                        answer_tokens: int = 32) -> dict[str, Any]:
    """Exact match when the model may call the tools: its first reply (up to `call_tokens`: a count
    call repeats the list, up to 117 tokens); when that calls tools, they run and their results go
    back for a second reply, the answer (up to `answer_tokens`). Also how many first replies called
    a tool and how many of those calls were valid."""
    from lmforge.infer.agent import execute
    from lmforge.tool_parser import parse_tool_calls
    from lmforge.tools import argument_error, tool_schemas

    schemas = tool_schemas(list(TOOLS.values()))
    users = [ex["messages"][:1] for ex in examples]
    first = _generate(llm, [llm.chat_prompt(m) for m in users], batch_size, call_tokens)
    finals, follow, follow_at = list(first), [], []
    attempted, valid = 0, 0
    for i, (user, text) in enumerate(zip(users, first)):
        _, calls = parse_tool_calls(text, "hermes")
        if "<tool_call>" in text:
            attempted += 1
            valid += bool(calls) and all(argument_error(schemas, c.name, json.loads(c.arguments)) is None
                                         for c in calls)
        if calls:
            msgs = user + [{"role": "assistant", "content": None, "tool_calls": [c.openai() for c in calls]}]
            msgs += [{"role": "tool", "tool_call_id": c.id, "content": execute(c, TOOLS)} for c in calls]
            follow.append(llm.chat_prompt(msgs))
            follow_at.append(i)
    limit = llm.model.cfg.block_size - answer_tokens
    keep = [(i, p) for i, p in zip(follow_at, follow) if len(p) <= limit]  # a prompt too long answers wrong
    for i in follow_at:
        finals[i] = ""
    for (i, _), text in zip(keep, _generate(llm, [p for _, p in keep], batch_size, answer_tokens)):
        finals[i] = text
    per: dict[str, list[bool]] = defaultdict(list)
    for ex, reply in zip(examples, finals):
        per[ex["task"]].append(check(reply, ex["answer"]))
    ok = [c for v in per.values() for c in v]
    acc = sum(ok) / len(ok)
    return {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(ok)),
            "per_task": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "tool_call_valid_rate": valid / attempted if attempted else 0.0, "tool_calls": attempted,
            "first_replies": first, "replies": finals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tool-demo")
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--chat", default="runs/chat-demo", help="the make chat-demo model (the SFT base and the anchor)")
    p.add_argument("--out", default="runs/tool-demo")
    p.add_argument("--data", default="data/tool_tasks")
    p.add_argument("--steps", type=int, default=None, help=f"SFT steps (default {STEPS})")
    p.add_argument("--quick", action="store_true", help="a smoke test: 3 steps, 60 training and 12 test conversations")
    add_results_flag(p, "tool-demo")
    args = p.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    chat, out, data = Path(args.chat), Path(args.out), Path(args.data)
    # chat-demo's split sizes: the same seed and sizes give the same 1,000 held-out prompts
    n_train, n_test, n_val = (60, 12, 8) if args.quick else (50000 + 200, 1000, 200)
    steps = args.steps or (3 if args.quick else STEPS)
    paths = write_split(data, n_train=n_train, n_test=n_test, seed=0, tools=True)
    rows = read_jsonl(paths["train"])
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_val]), encoding="utf-8")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_val:]), encoding="utf-8")
    test = read_jsonl(paths["test"])
    print(f"tool-demo: {len(rows) - n_val} training conversations (calculator, count, sort), {len(test)} held-out "
          "prompts", flush=True)

    plain = [{**ex, "messages": ex["messages"][:1] + [{"role": "assistant", "content": ex["answer"]}]} for ex in test]
    without = evaluate(load_chat_llm(chat), plain)  # reads each prompt, messages[:-1]
    print(f"tool-demo: chat-demo model without tools: exact match {100 * without['accuracy']:.1f}%", flush=True)

    sft_start = time.perf_counter()
    subprocess.run(sft_command(chat, data, out, steps, None, args.threads), check=True)
    sft_minutes = (time.perf_counter() - sft_start) / 60
    print(f"tool-demo: SFT trained {trained_steps(out)} steps in {sft_minutes:.1f} minutes", flush=True)

    from lmforge.infer.llm import LLM

    with_tools = evaluate_with_tools(LLM.load(out), test)
    print(f"\nheld-out exact match ({len(test)} prompts)    without tools   with tools")
    for kind in TASK_TYPES:
        print(f"  {kind:<34} {100 * without['per_task'].get(kind, 0):>12.1f}%  "
              f"{100 * with_tools['per_task'].get(kind, 0):>10.1f}%")
    print(f"  {'all':<34} {100 * without['accuracy']:>12.1f}%  {100 * with_tools['accuracy']:>10.1f}%")
    print(f"  tool calls written: {with_tools['tool_calls']}, valid: {100 * with_tools['tool_call_valid_rate']:.1f}%")
    print("\nsample conversations with tools:")
    for ex, first, reply in list(zip(test, with_tools["first_replies"], with_tools["replies"]))[:6]:
        mark = "ok" if check(reply, ex["answer"]) else f"expected {ex['answer']}"
        print(f"  user: {ex['messages'][0]['content']}\n  assistant: {first!r}\n  answer: {reply!r}   [{mark}]")
    result = {"accuracy_without_tools": round(without["accuracy"], 4),
              "accuracy_with_tools": round(with_tools["accuracy"], 4),
              "tool_call_valid_rate": round(with_tools["tool_call_valid_rate"], 4),
              "per_task_without_tools": {k: round(v, 4) for k, v in without["per_task"].items()},
              "per_task_with_tools": {k: round(v, 4) for k, v in with_tools["per_task"].items()},
              "sft_steps": trained_steps(out), "sft_minutes": round(sft_minutes, 2),
              "minutes": round((time.perf_counter() - t0) / 60, 2)}
    if args.results:
        record("tool-demo", {**result, "test_prompts": len(test), "train_conversations": len(rows) - n_val},
               out=args.results, wall_s=time.perf_counter() - t0)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
