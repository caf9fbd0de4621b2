"""Test fixtures for the training tests: a small prepared data directory built directly.

It follows the prepared-data format of docs/architecture.md (train.bin / val.bin uint16 memmaps,
meta.json, a `tokenizers` tokenizer.json) without depending on lmforge.data, so the training tests
stand on their own. The text is a deterministic pseudo-English (a fixed LCG picks words), tokenized
per character, so the token stream is identical on every machine and version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

WORDS = ("the king and queen of a far land rode out to see what the night would bring them "
         "while wind and rain fell on old stone walls and every lord spoke of love war and death").split()
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def synthetic_documents(n_chars: int, seed: int) -> list[str]:
    """Documents of a few sentences each until n_chars characters; the same for the same seed."""
    state = seed * 2654435761 % 2**32 or 1
    docs, total = [], 0
    while total < n_chars:
        sentences = []
        for _ in range(1 + state % 4):
            words = []
            for _ in range(4 + state % 7):
                state = (1103515245 * state + 12345) % 2**31
                words.append(WORDS[(state >> 8) % len(WORDS)])
            state = (1103515245 * state + 12345) % 2**31
            sentences.append(" ".join(words).capitalize() + ".")
        doc = " ".join(sentences)
        docs.append(doc)
        total += len(doc) + 1
    return docs


def make_tokenizer(chars: list[str], path: Path) -> dict[str, int]:
    """A character-level `tokenizers` tokenizer (ids: specials first, then chars sorted)."""
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(chars))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = Split(Regex("."), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return vocab


def make_data_dir(path: Path, train_chars: int = 40_000, val_chars: int = 6_000, seed: int = 0,
                  extra_vocab: int = 0) -> Path:
    """Write a prepared data directory at `path` and return it.

    extra_vocab pads the declared vocab_size (unused ids), to mimic BPE-sized vocabularies.
    """
    path.mkdir(parents=True, exist_ok=True)
    splits = {"train": synthetic_documents(train_chars, seed), "val": synthetic_documents(val_chars, seed + 1)}
    chars = sorted({c for docs in splits.values() for d in docs for c in d})
    vocab = make_tokenizer(chars, path / "tokenizer.json")
    eos = vocab["<|endoftext|>"]
    meta_splits = {}
    for name, docs in splits.items():
        ids: list[int] = []
        for d in docs:
            ids.extend(vocab[c] for c in d)
            ids.append(eos)
        np.array(ids, dtype=np.uint16).tofile(path / f"{name}.bin")
        meta_splits[name] = {"tokens": len(ids), "bytes": sum(len(d.encode("utf-8")) for d in docs),
                             "documents": len(docs)}
    vocab_size = len(vocab) + extra_vocab
    meta = {"dtype": "uint16", "vocab_size": vocab_size, "eos_id": eos, "pad_id": vocab["<|pad|>"],
            "tokenizer": {"kind": "char", "vocab_size": vocab_size}, "splits": meta_splits,
            "sources": [{"path": "synthetic", "sha256": "0" * 64, "split": "train+val"}]}
    (path / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return path


# Tiny, fast training settings shared by the tests (a 2-layer, 64-wide model, 32-token windows).
# metrics.jsonl row fields that depend on the clock and the machine (everything else reproduces exactly)
MEASURED = ("elapsed", "tok_per_s", "mfu", "energy_kwh", "kg_co2e", "energy_method")
TINY = ["--model.preset", "tiny", "--train.seq_len", "32", "--train.micro_batch_size", "4",
        "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.eval_iters", "2",
        "--train.log_every", "1", "--train.progress", "false", "--train.device", "cpu"]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -c code` in the repo with 1 torch thread (deterministic and light on the CPU)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([PYTHON, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def sigkill_after_step(step: int) -> str:
    """Python source that makes this process SIGKILL itself once `step` optimizer steps are done
    (their log rows, evaluations and checkpoints written as scheduled), as a crash or an OOM kill
    would. The trainer has no hook for it: the source wraps `Trainer._train_step` and fires when the
    next step begins."""
    return ("import os, signal\n"
            "from lmforge.train.loop import Trainer\n"
            "_train_step = Trainer._train_step\n"
            "def _killing_train_step(self, step):\n"
            f"    if step == {step}:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return _train_step(self, step)\n"
            "Trainer._train_step = _killing_train_step\n")


def killed_cli(step: int, argv: list[str]) -> list[str]:
    """The command line of `lmforge ARGV` in a process killed by SIGKILL after training step `step`."""
    return [PYTHON, "-c", sigkill_after_step(step) + "import sys\nfrom lmforge.cli import main\nsys.exit(main(sys.argv[1:]))\n",
            *argv]


def training_code(data: Path, out: Path, args: list[str], resume: str | None = None,
                  killed_after_step: int | None = None) -> str:
    """Python source that trains via run_training (so tests need not depend on the CLI); with
    killed_after_step the process SIGKILLs itself after that step."""
    return ((sigkill_after_step(killed_after_step) if killed_after_step is not None else "") +
            "import torch; torch.set_num_threads(1)\n"
            "from lmforge.train.pretrain import run_training\n"
            f"run_training({str(data)!r}, {str(out)!r}, overrides={args!r}, resume={resume!r})\n")
