"""`lmforge report`: one model card of a trained model, as report.json (every figure, with its
method and parameters) and report.html (self-contained: plots inline as base64 PNG, no external
assets).

    build_report(model, out, data=None, sections=ALL, **options) -> the report dict

Sections, one module each, imported by name when asked for (SECTIONS): bias, memorisation,
energy, explanations. A section module has `run(ctx: ReportContext) -> dict` (its JSON; a family
it does not apply to gives {"applies": False, "reason": ...}) and `html(result) -> str` (its HTML
fragment). A section whose module is not in this build is reported as unavailable.

report.json top level: model (path, family, parameters, config), data, compute, then one key per
section. Options are passed to every section (`ctx.option(name, default)`); each section
documents its own (docs/report.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.checkpoint import atomic_write_text
from lmforge.errors import LMForgeError
from lmforge.eval.report.context import ReportContext, recorded_data_dir
from lmforge.eval.report.plots import esc, table

SECTIONS = {"bias": "lmforge.eval.report.bias", "memorisation": "lmforge.eval.report.memorisation",
            "energy": "lmforge.eval.report.energy", "explanations": "lmforge.eval.report.explain"}
ALL = tuple(SECTIONS)
# The CLI spelling of a section -> its JSON key (`--sections explain` is the explanations section).
ALIASES = {"explain": "explanations"}
REPORT_JSON, REPORT_HTML = "report.json", "report.html"

__all__ = ["ALL", "SECTIONS", "ReportContext", "build_report", "section_keys"]


def section_keys(names: Sequence[str] | str) -> list[str]:
    """The JSON keys of the sections named (CLI or JSON spelling; a comma-separated string too), in
    report order, each once."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    keys = []
    for name in names:
        key = ALIASES.get(name.strip(), name.strip())
        if key not in SECTIONS:
            valid = ", ".join(sorted(set(SECTIONS) | set(ALIASES)))
            raise LMForgeError(f"unknown report section '{name.strip()}'; sections: {valid}")
        keys.append(key)
    if not keys:
        raise LMForgeError("--sections names no section")
    return [k for k in SECTIONS if k in keys]


def build_report(model: Any, out: str | Path, data: str | Path | None = None, sections: Sequence[str] | str = ALL,
                 **options: Any) -> dict[str, Any]:
    """Write `out`/report.json and `out`/report.html for `model` (an LLM or a path) and return the
    report. `data`: the prepared data directory the model was trained on (default: the one its run
    recorded)."""
    from lmforge.infer.llm import LLM

    keys = section_keys(sections)
    if data is not None and not Path(data).is_dir():
        raise LMForgeError(f"--data {data} is not a directory (give the prepared data directory the model "
                           "was trained on)")
    llm = LLM.of(model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    data_dir = Path(data) if data is not None else recorded_data_dir(llm.path)
    seed = int(options.get("seed") or 0)
    ctx = ReportContext(llm, data_dir, out, dict(options), torch.Generator().manual_seed(seed))
    report: dict[str, Any] = {"model": _model_card(llm), "data": _data_card(data_dir, data is not None),
                              "compute": _compute_card()}
    modules = {}
    for key in keys:
        started = time.perf_counter()
        module = _section_module(key)
        if module is None:
            report[key] = {"applies": False, "available": False,
                           "reason": f"the {key} section ({SECTIONS[key]}) is not in this build of lmforge"}
        else:
            modules[key] = module
            report[key] = module.run(ctx)
        report[key]["seconds"] = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write_text(out / REPORT_HTML, _page(report, modules))
    return report


def _section_module(key: str) -> Any:
    try:
        return importlib.import_module(SECTIONS[key])
    except ModuleNotFoundError as e:
        if e.name != SECTIONS[key]:  # the module exists but something it imports is missing: a bug
            raise
        return None


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _model_card(llm: Any) -> dict[str, Any]:
    cfg = llm.config
    return {"path": str(llm.path) if llm.path is not None else None, "family": llm.family.name,
            "parameters": sum(p.numel() for p in llm.model.parameters()),
            "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))}


def _data_card(data_dir: Path | None, given: bool) -> dict[str, Any]:
    if data_dir is None:
        return {"dir": None, "source": "none: no --data given and the model is not a run that recorded its data"}
    card: dict[str, Any] = {"dir": str(data_dir), "source": "--data" if given else "the run's recorded data directory"}
    meta = data_dir / "meta.json"
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            recorded = None
        if isinstance(recorded, dict):  # what the data is, not every source file's record
            card["meta"] = {k: v for k, v in recorded.items() if isinstance(v, (str, int, float, bool, dict))}
            if isinstance(recorded.get("sources"), list):
                card["meta"]["n_sources"] = len(recorded["sources"])
    return card


def _compute_card() -> dict[str, Any]:
    """Where the report itself ran (a section's own figures say where the training ran)."""
    from lmforge import __version__

    return {"lmforge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---- HTML ---------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f6}img{max-width:100%;height:auto}code{background:#f4f4f6;padding:0 .2em}
.note{color:#555;font-size:.92em}.na{color:#8a5a00;background:#fff6e0;padding:.5em .8em;border-radius:4px}
"""


def not_applicable(result: dict[str, Any]) -> str:
    return f'<p class="na">Does not apply: {esc(result.get("reason", ""))}</p>'


_TITLES = {"bias": "1. Bias", "memorisation": "2. Memorisation and privacy", "energy": "3. Energy and CO2",
           "explanations": "4. Explanations"}


def _page(report: dict[str, Any], modules: dict[str, Any]) -> str:
    m, d, c = report["model"], report["data"], report["compute"]
    name = Path(m["path"]).name if m["path"] else "in-memory model"
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Model card: {esc(name)}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Model card: {esc(name)}</h1>",
             "<h2>Model</h2>" + table([("path", m["path"]), ("family", m["family"]),
                                       ("parameters", f"{m['parameters']:,}")]),
             "<details><summary>config</summary><pre>" + esc(json.dumps(m["config"], indent=1)) + "</pre></details>",
             "<h2>Data</h2>" + table([("directory", d["dir"]), ("source", d["source"])]),
             "<h2>Compute (this report)</h2>" + table([(k, v) for k, v in c.items()])]
    for key in SECTIONS:
        if key not in report:
            continue
        result = report[key]
        parts.append(f'<section id="{key}"><h2>{_TITLES[key]}</h2>')
        if key in modules and result.get("applies", True):
            parts.append(modules[key].html(result))
        else:
            parts.append(not_applicable(result))
        parts.append(f'<p class="note">{result.get("seconds", 0):.1f} s</p></section>')
    parts.append("</body></html>\n")
    return "\n".join(parts)
