"""Report section 3, energy and CO2: what training the model used, and the same scaled to larger models.

Reads the training run the model was loaded from: its last checkpoint's train_state.json keeps the
run's energy entry (kWh, kg CO2e and how each was obtained: lmforge/train/energy.py), its token
count and config; metrics.jsonl gives the cumulative curve. FLOPs = the model's training FLOPs per
token (6N + 12·L·H·D·T, what `lmforge info` reports) times the tokens trained on.

Extrapolation (option `extrapolate_to`, presets, default gpt2 and llama2-7b): the energy per FLOP of
this run, times the preset's training FLOPs per token (at its own context length, as `lmforge info
--preset NAME` gives it) times (a) this run's tokens and (b) 20 tokens per parameter (the
compute-optimal budget of Hoffmann et al. 2022); CO2e at this run's grid intensity. It assumes the
same hardware at the same efficiency: a GPU runs a large model at a far higher share of its peak
than a CPU runs a tiny one, so these are upper bounds of a sort, not forecasts.

A model that was not loaded from a training run (a model directory, a Hugging Face folder) has no
training figures: the section says so.
"""

from __future__ import annotations

import json
from typing import Any

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.eval.report.plots import esc, figure_img, table
from lmforge.eval.report.context import ReportContext

DEFAULT_TARGETS = ("gpt2", "llama2-7b")
TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022 (Chinchilla)
CURVE_POINTS = 200


def _absent(reason: str) -> dict[str, Any]:
    return {"applies": False, "reason": reason, "kwh": None, "kg_co2e": None, "method": None}


def _presets(option: Any) -> list[str]:
    if option is None:
        return list(DEFAULT_TARGETS)
    names = option.split(",") if isinstance(option, str) else list(option)
    return [n.strip() for n in names if n.strip()]


def extrapolate(kwh: float, kg_co2e: float, flops: float, tokens: int, preset: str) -> dict[str, Any]:
    """This run's energy per FLOP applied to `preset` trained on this run's tokens and on 20 tokens
    per parameter."""
    from lmforge.models.registry import family_of_preset

    cfg = family_of_preset(preset).config_from_preset(preset)
    per_token = cfg.flops_per_token()
    params = cfg.num_params()
    kwh_per_flop = kwh / flops
    kg_per_kwh = kg_co2e / kwh if kwh > 0 else 0.0
    same = per_token * tokens
    optimal_tokens = TOKENS_PER_PARAM * params
    optimal = per_token * optimal_tokens
    return {"preset": preset, "parameters": params, "flops_per_token": per_token, "seq_len": cfg.block_size,
            "same_tokens": {"tokens": tokens, "flops": same, "kwh": same * kwh_per_flop,
                            "kg_co2e": same * kwh_per_flop * kg_per_kwh},
            "compute_optimal": {"tokens": optimal_tokens, "flops": optimal, "kwh": optimal * kwh_per_flop,
                                "kg_co2e": optimal * kwh_per_flop * kg_per_kwh}}


def run(ctx: ReportContext) -> dict[str, Any]:
    run_dir = ctx.run_dir
    if run_dir is None:
        return _absent("the model was not loaded from a training run directory, so there are no training energy "
                       "figures (lmforge train and lmforge finetune log them in the run)")
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    if ckpt is None:
        return _absent(f"the run {run_dir} has no checkpoint yet")
    state, _ = ckpt_io.load_train_state(ckpt, with_tensors=False)
    energy = state.get("energy")
    if not energy:
        return _absent(f"the run {run_dir} has no energy figures: it was trained before lmforge logged them")
    if energy.get("kwh") is None:
        return _absent(f"the run {run_dir} has no energy figures: codecarbon was unavailable ({energy.get('error')})")
    tokens = int(state.get("tokens") or 0)
    seq_len = ((state.get("config") or {}).get("train") or {}).get("seq_len")
    per_token = ctx.llm.config.flops_per_token(seq_len)
    flops = float(per_token) * tokens
    targets = _presets(ctx.option("extrapolate_to", None))
    if flops <= 0:
        extrapolated = []
    else:
        try:
            extrapolated = [extrapolate(energy["kwh"], energy["kg_co2e"], flops, tokens, p) for p in targets]
        except LMForgeError as e:
            raise LMForgeError(f"option extrapolate_to: {e}") from None
    rows = _metrics_rows(run_dir)
    curve = [(r["step"], r["energy_kwh"]) for r in rows if r.get("energy_kwh") is not None and "loss" in r]
    stride = max(1, len(curve) // CURVE_POINTS)
    return {
        "applies": True, "run": str(run_dir), "checkpoint": str(ckpt),
        "kwh": energy["kwh"], "kg_co2e": energy["kg_co2e"], "method": energy["method"],
        "details": {k: v for k, v in energy.items() if k not in ("kwh", "kg_co2e", "method")},
        "tokens": tokens, "flops_per_token": per_token, "seq_len": seq_len, "flops": flops,
        "training_seconds": state.get("elapsed_seconds"),
        "kwh_per_pflop": energy["kwh"] / flops * 1e15 if flops > 0 else None,
        "extrapolated": extrapolated,
        "extrapolation_method": "this run's kWh per FLOP x the preset's training FLOPs per token x tokens (this "
                                f"run's, and {TOKENS_PER_PARAM} per parameter); same hardware and efficiency assumed",
        "curve": {"step": [s for s, _ in curve[::stride]], "kwh": [k for _, k in curve[::stride]]},
    }


def _metrics_rows(run_dir: Any) -> list[dict[str, Any]]:
    """metrics.jsonl rows of the run (none when it has no metrics file)."""
    path = run_dir / ckpt_io.RUN_METRICS
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return rows


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}{unit}"


def html(result: dict[str, Any]) -> str:
    d = result["details"]
    parts = [table([("energy", _fmt(result["kwh"], " kWh")), ("emissions", _fmt(result["kg_co2e"], " kg CO2e")),
                    ("method", result["method"]),
                    ("grid", f"{d.get('region')} ({_fmt(d.get('carbon_intensity_g_per_kwh'), ' g CO2e/kWh')})"),
                    ("tokens trained", f"{result['tokens']:,}"),
                    ("FLOPs", f"{result['flops']:.4g} ({result['flops_per_token']:,} per token at "
                              f"T={result['seq_len']})"),
                    ("training time", _fmt(result.get("training_seconds"), " s")),
                    ("kWh per PFLOP", _fmt(result.get("kwh_per_pflop")))])]
    methods = d.get("component_methods") or {}
    if methods:
        parts.append(table([(k, v) for k, v in methods.items()], header=("component", "how")))
    parts.append(f'<p class="note">{esc(d.get("tool", ""))}; figures count over resumes.</p>')
    if result["extrapolated"]:
        rows = []
        for e in result["extrapolated"]:
            for label, key in (("this run's tokens", "same_tokens"),
                               (f"{TOKENS_PER_PARAM} tokens/param", "compute_optimal")):
                x = e[key]
                rows.append((e["preset"], f"{e['parameters']:,}", label, f"{x['tokens']:.3g}", f"{x['flops']:.3g}",
                             _fmt(x["kwh"]), _fmt(x["kg_co2e"])))
        parts.append("<h3>Extrapolated to larger models</h3>")
        parts.append(table(rows, header=("preset", "parameters", "trained on", "tokens", "FLOPs", "kWh", "kg CO2e")))
        parts.append(f'<p class="note">{esc(result["extrapolation_method"])}.</p>')
    if result["curve"]["step"]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 2.6))
        ax.plot(result["curve"]["step"], result["curve"]["kwh"], color="#2471a3")
        ax.set_xlabel("step")
        ax.set_ylabel("kWh (cumulative)")
        ax.set_title("energy during training", fontsize=9)
        parts.append(figure_img(fig, "cumulative energy during training"))
    return "\n".join(parts)
