"""Held-out loss, perplexity and bits per byte of a checkpoint.

Scoring: the evaluated token stream t_0 .. t_{N-1} is cut into NON-OVERLAPPING windows of
block_size inputs: window w feeds t[wL : wL+L] and predicts t[wL+1 : wL+L+1], each token from its
own window's prefix only (no context carried over, no striding), so every token t_1 .. t_{N-1} is
predicted exactly once and the first token of each window is predicted from little context (this
makes the numbers slightly pessimistic next to a sliding-window evaluation, and cheap). The last
window may be shorter.

    loss          = total_nats / tokens                (mean cross entropy, nats per token)
    perplexity    = exp(loss)
    bits_per_byte = total_nats / ln 2 / bytes          (bytes = UTF-8 bytes of the evaluated text)

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError


@torch.inference_mode()
def score_tokens(model: torch.nn.Module, tokens: np.ndarray | Sequence[int], block_size: int,
                 batch_size: int = 8, progress: bool = False) -> tuple[float, int, int]:
    """(total nats, predicted tokens, windows) of `tokens` under `model`, windows as described above;
    `progress` shows a bar of the batches on stderr."""
    from tqdm import tqdm

    n = len(tokens)
    if n < 2:
        return 0.0, 0, 0
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    L = int(block_size)
    n_pred = n - 1
    n_full = n_pred // L
    rest = n_pred - n_full * L
    total = 0.0
    bar = tqdm(total=-(-n_full // batch_size) + (1 if rest else 0), desc="eval", unit="batch", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)
    try:
        # Full windows in batches; a batch is one contiguous slice of the (possibly memory-mapped) stream.
        for w0 in range(0, n_full, batch_size):
            b = min(batch_size, n_full - w0)
            chunk = torch.from_numpy(np.asarray(tokens[w0 * L: (w0 + b) * L + 1], dtype=np.int64)).to(device)
            x_BT = chunk[:-1].view(b, L)
            # Targets are the next tokens inside the same stretch: window i's last target is the
            # first input of window i+1, so shift the flat stream rather than each row.
            y_BT = chunk[1:].view(b, L)
            total += _nats(model, x_BT, y_BT)
            bar.update(1)
        if rest:
            chunk = torch.from_numpy(np.asarray(tokens[n_full * L: n], dtype=np.int64)).to(device)
            total += _nats(model, chunk[:-1][None], chunk[1:][None])
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return total, n_pred, n_full + (1 if rest else 0)


def _nats(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> float:
    logits_BTV = model(x_BT)
    return float(F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), reduction="sum"))


# ---- data --------------------------------------------------------------------------------------


def _canonical_tokenizer(tok: Any = None, path: Path | None = None) -> str:
    """The tokenizer's JSON with keys sorted and runtime settings (padding, truncation) dropped, so
    formatting differences do not count as a mismatch."""
    if tok is not None and hasattr(tok, "hf"):
        text = tok.hf.to_str()
    else:
        from lmforge.tokenizer import Tokenizer

        text = Tokenizer.from_file(path).hf.to_str()  # raises LMForgeError naming a bad file
    data = json.loads(text)
    for key in ("padding", "truncation", "encode_special_tokens"):
        data.pop(key, None)
    return json.dumps(data, sort_keys=True)


def _prepared_dir(data_dir: Path, llm: Any, max_tokens: int | None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """The val split of a prepared data directory, checked to be tokenized like the model's tokenizer."""
    from lmforge.data import TokenData

    td = TokenData(data_dir)  # validates meta.json against the .bin files
    if llm.tokenizer is not None:
        if _canonical_tokenizer(path=td.tokenizer_path) != _canonical_tokenizer(tok=llm.tokenizer):
            raise LMForgeError(f"data {data_dir} was tokenized with a different tokenizer than the model "
                               f"{llm.path} ({td.tokenizer_path} differs from the model's tokenizer.json); "
                               "prepare the data with the model's tokenizer")
    else:
        warnings.warn(f"the model {llm.path} has no tokenizer, so it cannot be checked that {data_dir} was "
                      "tokenized the same way; the numbers are meaningless if it was not", stacklevel=3)
    if td.vocab_size > int(llm.config.vocab_size):
        raise LMForgeError(f"data {data_dir} has a vocabulary of {td.vocab_size} tokens but the model's is "
                           f"{llm.config.vocab_size}")
    tokens = td.split("val")
    if len(tokens) < 2:
        raise LMForgeError(f"the validation split of {data_dir} has {len(tokens)} tokens; need at least 2 "
                           "(prepare it with val_fraction > 0)")
    if max_tokens is None or max_tokens + 1 >= len(tokens):
        n_bytes = td.bytes("val")
    else:
        # Scoring a prefix: count the bytes of exactly the text scored.
        tokens = tokens[:max_tokens + 1]
        tok = llm.tokenizer if llm.tokenizer is not None else td.tokenizer()
        n_bytes = len(tok.decode([int(t) for t in tokens], skip_special=True).encode("utf-8"))
    return tokens, int(n_bytes), {"split": "val", "source": str(data_dir)}


def _text_files(sources: Sequence[str], llm: Any, max_tokens: int | None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Tokenize text sources (files, globs, directories; read by `lmforge.data.corpus`, so the same
    documents `prepare` would see) with the model's tokenizer, each document followed by EOS."""
    from lmforge.data.corpus import iter_documents, resolve_sources

    tok = llm.tokenizer
    if tok is None:
        raise LMForgeError(f"the model at {llm.path} has no tokenizer (no tokenizer.json), so it cannot evaluate text files")
    files = resolve_sources(sources)
    limit = None if max_tokens is None else max_tokens + 1
    ids: list[int] = []
    n_bytes = 0
    for sf in files:
        try:
            for chunks in iter_documents(sf):
                for chunk in chunks:
                    ids.extend(tok.encode(chunk))
                    n_bytes += len(chunk.encode("utf-8"))
                if tok.eos_id is not None:
                    ids.append(tok.eos_id)
                if limit is not None and len(ids) >= limit:
                    break
        except UnicodeDecodeError as e:
            raise LMForgeError(f"{sf.path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if limit is not None and len(ids) >= limit:
            break
    if limit is not None and len(ids) > limit:
        ids = ids[:limit]
        n_bytes = len(tok.decode(ids, skip_special=True).encode("utf-8"))
    names = ", ".join(str(sf.path) for sf in files)
    if len(ids) < 2:
        raise LMForgeError(f"the data ({names}) has fewer than 2 tokens to evaluate on")
    return np.asarray(ids, dtype=np.int64), n_bytes, {"split": None, "source": [str(sf.path) for sf in files]}


def evaluate(ckpt: Any, data: str | Sequence[str], batch_size: int = 8, max_tokens: int | None = None,
             device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Loss / perplexity / bits per byte of a model (an LLM, or a run, model or HF dir) on `data`.

    `data` is one prepared data directory (its val split is scored; byte count from meta.json) or
    text files (.txt, .jsonl, directories of them, globs). `max_tokens` caps the tokens scored
    (default: all); `progress` shows a bar of the batches on stderr. Returns a JSON-ready dict.
    """
    from lmforge.infer.llm import LLM

    if isinstance(data, (str, Path)):
        data = [str(data)]
    data = [str(d) for d in data]
    if not data:
        raise LMForgeError("no evaluation data given")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LMForgeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise LMForgeError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    llm = LLM.of(ckpt, device=device)
    if len(data) == 1 and Path(data[0]).is_dir() and (Path(data[0]) / "meta.json").is_file():
        tokens, n_bytes, info = _prepared_dir(Path(data[0]), llm, max_tokens)
    else:
        tokens, n_bytes, info = _text_files(data, llm, max_tokens)
    block = int(llm.config.block_size)
    nats, n_tok, windows = score_tokens(llm.model, tokens, block, batch_size, progress=progress)
    loss = nats / n_tok
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else None,
        "tokens": n_tok,
        "bytes": n_bytes,
        **info,
        "checkpoint": str(llm.path),
        "block_size": block,
        "windows": windows,
    }
