"""Labelled text for classification: CSV / TSV / JSONL files with a text column (an optional text-pair
column) and a label column, read with one-line errors that name the file, line and column, and the
token rows a decoder classifier reads.

    examples = read_labeled("train.csv", text="text", pair="text_pair", label="label")
    labels = label_set(examples)            # sorted names; ints sort as numbers
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lmforge.data.table import read_table
from lmforge.errors import LMForgeError


@dataclass
class Example:
    text: str
    pair: Optional[str]
    label: Optional[str]
    where: str  # "file:line"


def read_labeled(path: str | Path, text: str = "text", pair: Optional[str] = "text_pair", label: Optional[str] = "label",
                 need_label: bool = True) -> list[Example]:
    """Examples of a file; `pair` is used when the file has that column. Errors name file, line, column."""
    rows, columns = read_table(path)
    if not rows:
        raise LMForgeError(f"{path} holds no examples")
    for col in [text] + ([label] if need_label and label else []):
        if col not in columns:
            raise LMForgeError(f"{path}: no column '{col}'; columns present: {', '.join(columns) or 'none'}")
    use_pair = pair is not None and pair in columns
    out = []
    for where, row in rows:
        t = row.get(text)
        if not isinstance(t, str) or not t.strip():
            raise LMForgeError(f"{where}: empty text in column '{text}'")
        p = row.get(pair) if use_pair else None
        if p is not None and not isinstance(p, str):
            raise LMForgeError(f"{where}: column '{pair}' must be text")
        lab = row.get(label) if label else None
        if need_label:
            if lab is None or (isinstance(lab, str) and not lab.strip()) or isinstance(lab, (dict, list)):
                raise LMForgeError(f"{where}: missing label in column '{label}'")
            if isinstance(lab, float) and lab.is_integer():
                lab = int(lab)
            lab = str(lab).strip()
        out.append(Example(t, p or None, lab if need_label else (str(lab) if lab is not None else None), where))
    return out


def label_set(examples: list[Example]) -> list[str]:
    """Label names in a stable order (numeric when every label is an integer); warns about labels seen once."""
    counts = Counter(e.label for e in examples)
    names = list(counts)
    if all(n.lstrip("-").isdigit() for n in names):
        names.sort(key=int)
    else:
        names.sort()
    once = [n for n in names if counts[n] == 1]
    if once:
        warnings.warn(f"label{'s' if len(once) > 1 else ''} {', '.join(repr(n) for n in once[:5])} "
                      f"appear{'' if len(once) > 1 else 's'} only once in the training data", UserWarning, stacklevel=2)
    return names


def label_ids(examples: list[Example], labels: list[str]) -> list[int]:
    """Class ids; a label the model does not know is an error naming it and where it is."""
    index = {n: i for i, n in enumerate(labels)}
    out = []
    for e in examples:
        if e.label not in index:
            raise LMForgeError(f"{e.where}: label '{e.label}' is not one of the model's labels ({', '.join(labels)})")
        out.append(index[e.label])
    return out


def decoder_rows(tok: Any, texts: Sequence[str], pairs: Optional[Sequence[Optional[str]]], limit: int):
    """Right-padded (ids, mask, n_truncated) for a decoder classifier: text [+ newline + pair], cut to
    limit - 1 tokens, then the EOS, whose position the score head reads."""
    if tok is None:
        raise LMForgeError("this model has no tokenizer (tokenizer.json), so it cannot read text")
    rows, cut = [], 0
    eos = [tok.eos_id] if tok.eos_id is not None else []
    for i, t in enumerate(texts):
        ids = tok.encode(t if pairs is None or pairs[i] is None else f"{t}\n{pairs[i]}")
        if len(ids) + len(eos) > limit:
            ids, cut = ids[:limit - len(eos)], cut + 1
        rows.append(ids + eos)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return idx, mask, cut
