"""A tiny lmforge base model with an lmforge character tokenizer (special ids 0-4), and task data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.checkpoint import write_model_dir
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.tokenizer import Tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-=?.,:'\n"


def make_base(root: Path, seed: int = 0, **overrides) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train_char([ALPHABET])
    tok.save(root / "tok.json")
    torch.manual_seed(seed)
    cfg = config_from_preset("tiny", vocab_size=tok.vocab_size, **overrides)
    return write_model_dir(root / "base", Decoder(cfg), root / "tok.json")


def conversation(a: int, b: int, system: bool = False) -> dict:
    msgs = [{"role": "system", "content": "Answer briefly."}] if system else []
    msgs += [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
    return {"messages": msgs}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def task_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    r = random.Random(seed)
    return [conversation(r.randint(0, 99), r.randint(0, 99), system=i % 3 == 0) for i in range(n)]
