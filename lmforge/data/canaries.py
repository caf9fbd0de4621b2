"""Canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets inserted into training data.

`prepare(..., canaries=N, canary_repeats=R)` draws N secrets of CANARY_LENGTH digits, renders each as
"my secret number is 381922" and inserts it R times as its own document into the training stream,
the copies spread evenly over the document boundaries of the train split (in a fixed shuffle).
meta.json records them under "canaries", so `lmforge report` can measure each one's exposure:

    {"template": "my secret number is {secret}", "alphabet": "0123456789", "length": 6,
     "seed": 0, "secrets": [{"secret": "381922", "repeats": 4}, ...]}

`canary_repeats` may also be a list (Python API; the CLI takes "1,4,16"): canary i is then repeated
repeats[i % len(repeats)] times, so one model shows how exposure grows with repetition.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from lmforge.errors import LMForgeError

CANARY_TEMPLATE = "my secret number is {secret}"
CANARY_ALPHABET = "0123456789"
CANARY_LENGTH = 6
CANARY_SEED = 0


def canary_plan(n: int, repeats: int | Sequence[int], seed: int = CANARY_SEED) -> dict[str, Any]:
    """The meta.json record of `n` canaries (secrets drawn with `seed`)."""
    reps = [repeats] if isinstance(repeats, int) else list(repeats)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LMForgeError(f"--canaries must be a non-negative integer, got {n!r}")
    if not reps or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in reps):
        raise LMForgeError(f"--canary-repeats must be positive integers, got {repeats!r}")
    rng = random.Random(seed)
    secrets: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(secrets) < n:
        s = "".join(rng.choice(CANARY_ALPHABET) for _ in range(CANARY_LENGTH))
        if s not in seen:
            seen.add(s)
            secrets.append({"secret": s, "repeats": reps[len(secrets) % len(reps)]})
    return {"template": CANARY_TEMPLATE, "alphabet": CANARY_ALPHABET, "length": CANARY_LENGTH, "seed": seed,
            "secrets": secrets}


def canary_text(plan: dict[str, Any], secret: str) -> str:
    return plan["template"].format(secret=secret)


def placements(plan: dict[str, Any], n_train_docs: int) -> dict[int, list[str]]:
    """{index among the train documents: canary texts to insert after it}: every copy, spread evenly."""
    copies = [canary_text(plan, s["secret"]) for s in plan["secrets"] for _ in range(s["repeats"])]
    random.Random(plan["seed"] + 1).shuffle(copies)
    where: dict[int, list[str]] = {}
    for j, text in enumerate(copies):
        where.setdefault(j * n_train_docs // len(copies), []).append(text)
    return where


def tokenizer_text(plan: dict[str, Any]) -> str:
    """Text the tokenizer also learns from, so every candidate secret encodes without unknown tokens."""
    return canary_text(plan, plan["alphabet"])
