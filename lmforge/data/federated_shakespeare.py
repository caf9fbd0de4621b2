"""A LEAF-style federation from the built-in Shakespeare: one client per speaking role per play.

    lmforge data federated-shakespeare --out DIR
    -> DIR/train.bin, val.bin, tokenizer.json, meta.json  (a prepared data directory: `lmforge train` reads it)
       DIR/clients.json                                   (each client's play, role and slice of train.bin)
       DIR/histogram.png                                  (client sizes)

As LEAF's Shakespeare task does, each role of each play is one client holding that role's lines:
non-IID by construction (a client is one voice of one play). A client's text is its speeches as the
play prints them ("NAME." on its own line, then the speech; `folio.speaker_turns`), one document
(ending in EOS) per client. Roles with fewer than `min_tokens` tokens are dropped and counted;
poems (no speakers) hold no client. The held-out plays (corpus.SHAKESPEARE_VAL) are in no client:
val.bin and tokenizer.json are those of `lmforge prepare shakespeare` (run here into a temp
directory), so bits per byte compare with `make demo` and its model (`--base runs/demo`) reads this
data. Clients are listed in a fixed shuffle (`fixed_shuffle`): the first N of them are a fair
sample, which is what `lmforge federated --clients N` takes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.corpus import SHAKESPEARE_VAL, shakespeare_dir
from lmforge.data.folio import speaker_turns
from lmforge.data.prepare import OUTPUT_FILES, dtype_for, prepare
from lmforge.data.sampling import fixed_shuffle
from lmforge.errors import LMForgeError

CLIENTS_FILE = "clients.json"
HISTOGRAM_FILE = "histogram.png"
FILES = OUTPUT_FILES + (CLIENTS_FILE, HISTOGRAM_FILE)
DEFAULT_MIN_TOKENS = 1024


def role_texts(text: str) -> dict[str, str]:
    """{role: its speeches as printed in the play} of one play, roles in order of first appearance."""
    roles: dict[str, list[str]] = {}
    for speaker, body in speaker_turns(text):
        roles.setdefault(speaker.rstrip(".").strip(), []).append("\n".join([speaker, *body]) + "\n")
    return {role: "\n".join(speeches) for role, speeches in roles.items()}


def build_federated_shakespeare(out: str | Path, min_tokens: int = DEFAULT_MIN_TOKENS, overwrite: bool = False,
                                from_file: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the federation into `out` (see the module docstring); returns its meta.json dict."""
    out = Path(out)
    if min_tokens < 1:
        raise LMForgeError(f"--min-tokens must be positive, got {min_tokens}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES) if out.is_dir() else [out.name]
        if foreign:
            raise LMForgeError(f"--out {out} holds files that are not a federated data set ({', '.join(foreign[:3])}); "
                               "choose a new or empty directory")
        if not overwrite:
            raise LMForgeError(f"--out {out} already holds a federated data set; pass --overwrite to replace it")
    plays = shakespeare_dir(progress, from_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        meta = prepare(["shakespeare"], str(tmp / "prepared"), progress=progress, from_file=from_file)
        for name in ("val.bin", "tokenizer.json"):
            (tmp / "prepared" / name).rename(tmp / name)
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.from_file(tmp / "tokenizer.json")
        clients, dropped = [], 0
        for path in sorted(plays.glob("*_gut.txt")):
            if path.name in SHAKESPEARE_VAL:
                continue
            play = path.name[:-len("_gut.txt")]
            for role, text in role_texts(path.read_text(encoding="utf-8-sig")).items():
                ids = tok.encode(text) + [tok.eos_id]
                if len(ids) < min_tokens:
                    dropped += 1
                    continue
                clients.append({"play": play, "role": role, "ids": ids, "bytes": len(text.encode("utf-8"))})
        if not clients:
            raise LMForgeError(f"no role of the training plays has --min-tokens {min_tokens} tokens; lower it")
        clients = fixed_shuffle(clients, key=lambda c: f"{c['play']}/{c['role']}")
        dtype = dtype_for(tok.vocab_size)
        offset = 0
        with open(tmp / "train.bin", "wb") as f:
            for i, c in enumerate(clients):
                np.asarray(c["ids"], dtype=dtype).tofile(f)
                c.update(id=i, offset=offset, tokens=len(c.pop("ids")))
                offset += c["tokens"]
        rows = [{k: c[k] for k in ("id", "play", "role", "offset", "tokens", "bytes")} for c in clients]
        (tmp / CLIENTS_FILE).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        meta["splits"]["train"] = {"tokens": offset, "bytes": sum(c["bytes"] for c in rows), "documents": len(rows)}
        meta["federated"] = {"clients": len(rows), "dropped_roles": dropped, "min_tokens": min_tokens,
                             "held_out_plays": [p[:-len("_gut.txt")] for p in SHAKESPEARE_VAL],
                             "split_by": "speaking role per play (LEAF Shakespeare)"}
        _histogram([c["tokens"] for c in rows], tmp / HISTOGRAM_FILE)
        shutil.rmtree(tmp / "prepared")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")  # last: marks it complete
        from lmforge.checkpoint import replace_dir_atomically

        replace_dir_atomically(tmp, out.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_clients(data_dir: str | Path) -> list[dict[str, Any]]:
    """The clients of a federated data directory (clients.json), in their fixed order."""
    path = Path(data_dir) / CLIENTS_FILE
    if not path.is_file():
        raise LMForgeError(f"{path} is missing; {data_dir} is not a federated data set "
                           "(lmforge data federated-shakespeare --out DIR writes one)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [{**r, "offset": int(r["offset"]), "tokens": int(r["tokens"])} for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LMForgeError(f"{path} is corrupt ({e})") from None


def size_histogram(tokens: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, clients) per log-spaced bin of client sizes in tokens."""
    edges = np.unique(np.geomspace(min(tokens), max(tokens) + 1, bins + 1).astype(np.int64))
    counts, _ = np.histogram(tokens, bins=edges)
    return [(int(lo), int(hi), int(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts)]


def _histogram(tokens: list[int], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(tokens, bins=np.geomspace(min(tokens), max(tokens) + 1, 30))
    ax.set_xscale("log")
    ax.set_xlabel("tokens per client (one role of one play)")
    ax.set_ylabel("clients")
    ax.set_title(f"{len(tokens)} clients, {sum(tokens):,} tokens")
    fig.tight_layout()
    fig.savefig(path, format="png")
