"""Example files: the rows of a CSV, TSV or JSONL file, read with one-line errors that name the file
and line, and the fingerprint a run stores to recognise its data on resume.

    rows, columns = read_table("train.csv")          # [("train.csv:2", {"text": ..., "label": ...}), ...]
    rows, _ = read_table("pairs.data", jsonl=True)    # JSON Lines whatever the suffix

Callers pick their columns and check their values; every row they report on carries its "file:line".
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import LMForgeError

FORMATS = (".csv", ".tsv", ".jsonl", ".json")

Row = tuple[str, dict[str, Any]]  # ("file:line", the row's columns)


def read_table(path: str | Path, jsonl: bool = False) -> tuple[list[Row], list[str]]:
    """(rows, column names in the order first seen) of a CSV, TSV or JSONL file; the suffix picks the
    format, or `jsonl=True` reads JSON Lines whatever the suffix. Blank JSONL lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if not jsonl and suffix not in FORMATS:
        raise LMForgeError(f"{path}: unsupported format '{suffix}'; use .csv, .tsv or .jsonl")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LMForgeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if jsonl or suffix in (".jsonl", ".json"):
        return _json_lines(path, text)
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    columns = list(reader.fieldnames or [])
    return [(f"{path}:{reader.line_num}", row) for row in reader], columns


def _json_lines(path: Path, text: str) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    columns: dict[str, None] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LMForgeError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise LMForgeError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
        rows.append((where, obj))
    return rows, list(columns)


def data_fingerprint(paths: Sequence[str | Path]) -> str:
    """sha256 of the files' contents in order: equal on resume means the same data."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()
