"""Verifiable instruction tasks: a seeded generator of prompts whose answers a program checks.

Six task types, each with several phrasings (the expected answer after the arrow):
    add        "What is 47 + 385?"                 -> "432"
    subtract   "Compute 512 - 89."                 -> "423"
    reverse    "Reverse the order of: pear, apple, fig" -> "fig, apple, pear"
    count      "How many times does fig appear in: fig, pear, fig?" -> "2"
    sort       "Sort these words alphabetically: pear, apple, fig" -> "apple, fig, pear"
    sequence   "Continue the sequence: 3, 7, 11, 15," -> "19"
Numbers have 1 to 3 digits. The word tasks work on whole words, not letters: the demo model reads
byte-level BPE tokens, in which a word's letters are not visible as separate tokens.

The training replies of the four tasks that need several steps of computation (add, subtract,
count, sequence) show their working and end with "Answer: N" — a scratchpad (Nye et al. 2021,
"Show your work"), as GSM8K-style data does: a 5M-parameter model cannot carry digits from right to
left while writing the sum from left to right, but it can write one digit column at a time:
    "What is 347 + 285?" -> "7+5=12, 4+8+1=13, 3+2+1=6. Answer: 632"
    "Compute 512 - 89."  -> "12-9=3, 11-1-8=2, 5-1-0=4. Answer: 423"
    "How many times does fig appear in: fig, pear, fig?" -> "Counting fig: fig 1, pear 1, fig 2. Answer: 2"
    "Continue the sequence: 3, 7, 11, 15," -> "7-3: 7-3=4, so 4. 15+4: 5+4=9, 1+0=1, so 19. Answer: 19"
`check(reply, expected)` is the verifier: exact match of the final answer (the text after the last
"Answer:", or the whole reply when there is none) after trimming whitespace and a final period.

Tool use (`make_split(..., tools=True)`): arithmetic calls a calculator, counting calls
`count(word, words)`, sorting calls `sort(words)`, and the reply is the answer read from the result:
    user: "What is 47 + 385?"
    assistant: tool_calls [calculator({"expression": "47 + 385"})]
    tool: "432"
    assistant: "Answer: 432"
reverse and sequence have no tool and keep their replies. `TOOLS` are the functions (their
docstrings are the schemas, lmforge/tools.py), executed by the agent loop.

A task instance is (type, arguments); train and test instances are disjoint (a test instance never
occurs in training under any phrasing), and the split is a pure function of the seed. `write_split`
writes the `messages` JSONL format of `lmforge finetune sft`, with the task type and the expected
answer as extra fields.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable

TASK_TYPES = ("add", "subtract", "reverse", "count", "sort", "sequence")

WORDS = ("apple banana cherry garden river mountain window candle forest silver orange planet music "
         "winter summer castle dragon flower market pencil rocket school stone tiger violin yellow "
         "bridge butter camera desert engine farmer ginger hammer island jacket kettle lemon magnet "
         "needle ocean pepper rabbit saddle tunnel velvet wagon zebra anchor basket carpet doctor "
         "feather guitar harbor insect jungle kitten ladder meadow nickel oyster parrot quartz ribbon "
         "spider tomato walnut bottle cotton dinner eagle fabric goblet honey ivory jigsaw kernel "
         "lizard mirror noodle orchid puzzle quiver rattle salmon timber umbrella vessel walrus").split()

PHRASINGS = {
    "add": ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
            "{a} plus {b} equals what?"],
    "subtract": ["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
                 "What is {a} minus {b}?", "What is the difference {a} - {b}?"],
    "reverse": ["Reverse the order of: {ws}", "Write these words in reverse order: {ws}",
                "List backwards: {ws}", "What is the reverse of the list {ws}?"],
    # The word stands bare, as in the list: quoted, BPE would split it into other tokens.
    "count": ["How many times does {c} appear in: {ws}?", "Count the word {c} in: {ws}",
              "How often is {c} in this list: {ws}?"],
    "sort": ["Sort these words alphabetically: {ws}", "Put in alphabetical order: {ws}",
             "Arrange alphabetically: {ws}"],
    "sequence": ["Continue the sequence: {s},", "What number comes next: {s},", "Next number after {s}?"],
}


def _instance(kind: str, rng: random.Random) -> tuple:
    """A task instance: (kind, arguments...) — hashable, so train/test can be made disjoint."""
    def num() -> int:
        digits = rng.choice((1, 2, 2, 3, 3, 3))
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

    if kind == "add":
        return kind, num(), num()
    if kind == "subtract":
        a, b = num(), num()
        return (kind, a, b) if a >= b else (kind, b, a)  # answers stay non-negative
    if kind == "reverse":
        return (kind, *rng.sample(WORDS, rng.randint(3, 5)))
    if kind == "count":
        pool = rng.sample(WORDS, 3)
        target = pool[0] if rng.random() < 0.9 else rng.choice(WORDS)
        return (kind, target, *(rng.choice(pool) for _ in range(rng.randint(3, 7))))
    if kind == "sort":
        return (kind, *rng.sample(WORDS, rng.randint(3, 4)))
    if kind == "sequence":
        start, step = rng.randint(0, 50), rng.randint(1, 12)
        return kind, start, step, rng.randint(3, 5)
    raise ValueError(kind)


def answer(inst: tuple) -> str:
    kind = inst[0]
    if kind == "add":
        return str(inst[1] + inst[2])
    if kind == "subtract":
        return str(inst[1] - inst[2])
    if kind == "reverse":
        return ", ".join(reversed(inst[1:]))
    if kind == "count":
        return str(inst[2:].count(inst[1]))
    if kind == "sort":
        return ", ".join(sorted(inst[1:]))
    if kind == "sequence":
        _, start, step, n = inst
        return str(start + step * n)
    raise ValueError(kind)


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n, least significant first, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).rjust(width, "0"))]


def add_columns(a: int, b: int) -> list[str]:
    """Written addition, one digit column at a time from the right: ["7+5=12", "4+8+1=13", ...]."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        total = da + db + carry
        steps.append(f"{da}+{db}{'+1' if carry else ''}={total}")
        carry = total // 10
    return steps


def subtract_columns(a: int, b: int) -> list[str]:
    """Written subtraction (a >= b) from the right, borrowing ten: ["12-9=3", "11-1-8=2", ...]."""
    width = len(str(a))
    steps, borrow = [], 0
    for da, db in zip(_digits(a, width), _digits(b, width)):
        lend = da - borrow < db  # borrow ten from the next column
        left = da + 10 if lend else da
        steps.append(f"{left}{'-1' if borrow else ''}-{db}={left - borrow - db}")
        borrow = int(lend)
    return steps


def solution(inst: tuple) -> str:
    """The assistant's training reply: the working, where the task has steps, then the answer."""
    kind = inst[0]
    if kind == "add":
        return ", ".join(add_columns(inst[1], inst[2])) + f". Answer: {answer(inst)}"
    if kind == "subtract":
        return ", ".join(subtract_columns(inst[1], inst[2])) + f". Answer: {answer(inst)}"
    if kind == "count":
        target, running, parts = inst[1], 0, []
        for word in inst[2:]:
            running += word == target
            parts.append(f"{word} {running}")
        return f"Counting {target}: " + ", ".join(parts) + f". Answer: {answer(inst)}"
    if kind == "sequence":  # the step (second term - first), then the last term + the step
        _, start, step, n = inst
        last = start + step * (n - 1)
        return (f"{start + step}-{start}: " + ", ".join(subtract_columns(start + step, start)) + f", so {step}. "
                f"{last}+{step}: " + ", ".join(add_columns(last, step)) + f", so {last + step}. Answer: {answer(inst)}")
    return answer(inst)


def prompt(inst: tuple, rng: random.Random) -> str:
    kind = inst[0]
    template = rng.choice(PHRASINGS[kind])
    if kind in ("add", "subtract"):
        return template.format(a=inst[1], b=inst[2])
    if kind == "reverse":
        return template.format(ws=", ".join(inst[1:]))
    if kind == "count":
        return template.format(c=inst[1], ws=", ".join(inst[2:]))
    if kind == "sort":
        return template.format(ws=", ".join(inst[1:]))
    _, start, step, n = inst
    return template.format(s=", ".join(str(start + step * i) for i in range(n)))


def calculator(expression: str) -> str:
    """Evaluate a + b or a - b.

    Args:
        expression: Two whole numbers joined by + or -, e.g. 47 + 385.
    """
    m = re.fullmatch(r"\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*", expression)
    if m is None:
        raise ValueError(f"expected 'a + b' or 'a - b', got {expression!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b)


def count(word: str, words: list[str]) -> int:
    """Count a word in a list.

    Args:
        word: The word.
        words: The list.
    """
    return list(words).count(word)


def sort(words: list[str]) -> str:
    """Sort words alphabetically.

    Args:
        words: The words.
    """
    return ", ".join(sorted(words))


TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "count": count, "sort": sort}


def tool_call(inst: tuple) -> tuple[str, dict[str, Any]] | None:
    """The call that solves a task instance: (tool name, arguments); None for tasks without a tool."""
    kind = inst[0]
    if kind in ("add", "subtract"):
        return "calculator", {"expression": f"{inst[1]} {'+' if kind == 'add' else '-'} {inst[2]}"}
    if kind == "count":
        return "count", {"word": inst[1], "words": list(inst[2:])}
    if kind == "sort":
        return "sort", {"words": list(inst[1:])}
    return None


def tool_conversation(inst: tuple, user: str) -> list[dict[str, Any]]:
    """The training conversation of an instance with tools: the call, its result, the answer."""
    call = tool_call(inst)
    if call is None:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": solution(inst)}]
    name, args = call
    result = TOOLS[name](**args)
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "content": str(result)},
            {"role": "assistant", "content": f"Answer: {result}"}]


def final_answer(reply: str) -> str:
    """The reply's final answer: the text after its last "Answer:", or the whole reply."""
    head, sep, tail = reply.rpartition("Answer:")
    return tail if sep else reply


def check(reply: str, expected: str) -> bool:
    """Exact match of the final answer after trimming whitespace and one trailing period."""
    r = final_answer(reply).strip()
    if r.endswith("."):
        r = r[:-1].rstrip()
    return r == expected


def make_split(n_train: int, n_test: int, seed: int = 0,
               tools: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test examples (dicts with messages, task, answer); instances are disjoint. With
    `tools` the conversations call tools; the prompts are the same as without."""
    rng = random.Random(seed)
    test_inst: list[tuple] = []
    seen: set[tuple] = set()
    while len(test_inst) < n_test:  # the test set first: a fixed, balanced draw
        inst = _instance(TASK_TYPES[len(test_inst) % len(TASK_TYPES)], rng)
        if inst not in seen:
            seen.add(inst)
            test_inst.append(inst)
    train_inst: list[tuple] = []
    while len(train_inst) < n_train:
        inst = _instance(rng.choice(TASK_TYPES), rng)
        if inst not in seen:
            seen.add(inst)
            train_inst.append(inst)
    def example(inst: tuple) -> dict[str, Any]:
        user = prompt(inst, rng)
        messages = tool_conversation(inst, user) if tools else \
            [{"role": "user", "content": user}, {"role": "assistant", "content": solution(inst)}]
        return {"messages": messages, "task": inst[0], "answer": answer(inst)}
    return [example(i) for i in train_inst], [example(i) for i in test_inst]


def write_split(out: str | Path, n_train: int = 20000, n_test: int = 1000, seed: int = 0,
                tools: bool = False) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_split(n_train, n_test, seed, tools)
    paths = {}
    for name, rows in (("train", train), ("test", test)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths
