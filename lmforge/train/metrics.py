"""Training telemetry: metrics.jsonl, the loss-curve PNG, MFU and peak FLOP/s."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import atomic_write_bytes, atomic_write_text

# Dense peak FLOP/s per device from vendor data sheets: (bf16/fp16 tensor cores, fp32/tf32).
# Matched as a substring of torch.cuda.get_device_name(); the first match wins.
GPU_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100", 989e12, 494e12),  # SXM; PCIe parts are ~25% lower
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A10G", 125e12, 31e12),
    ("A10", 125e12, 31e12),
    ("L40S", 362e12, 91e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 83e12),
    ("RTX 3090", 71e12, 36e12),
    ("V100", 125e12, 16e12),
    ("T4", 65e12, 8e12),
]


def cpu_peak_flops(threads: int | None = None) -> float:
    """A nominal fp32 peak for the CPU threads torch uses: threads x clock x FLOPs/cycle.

    FLOPs/cycle assumes two FMA pipes per core: 64 with AVX-512, 32 with AVX2+FMA, 8 otherwise;
    the clock is the kernel's current 'cpu MHz' (3 GHz if unknown). This is an upper bound that
    ignores turbo and throttling, so CPU MFU is only indicative.
    """
    threads = threads or torch.get_num_threads()
    mhz, flags = 3000.0, ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("cpu MHz") and mhz == 3000.0:
                mhz = float(line.split(":")[1])
            elif line.startswith("flags") and not flags:
                flags = line
    except (OSError, ValueError):
        pass
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    return threads * mhz * 1e6 * per_cycle


def peak_flops(device: torch.device, low_precision: bool) -> float | None:
    """Peak FLOP/s of one device (None when unknown: then no MFU is reported)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, single in GPU_PEAK_FLOPS:
            if key in name:
                return half if low_precision else single
        return None
    if device.type == "cpu":
        return cpu_peak_flops()
    return None


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line); rows are also kept for the plot."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if enabled and path.is_file():
            self.rows = read_rows(path)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run writes them again), atomically."""
        if not self.enabled:
            return
        kept = [r for r in self.rows if r.get("step", 0) <= step]
        if len(kept) != len(self.rows) or not self.path.is_file():
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.rows = kept

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a last line cut short by a crash is ignored."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_figure(rows: list[dict[str, Any]], loss_label: str = "loss", title: str = "",
                panels: dict[str, tuple[str, ...]] | None = None) -> Any:
    """The figure of loss.png: train and validation loss against step on a y-axis named
    `loss_label` (the objective's loss and unit), then one panel per entry of `panels`
    ({y-axis label: metrics.jsonl keys drawn in it}; panels with nothing logged are left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    train = _series(rows, "loss")
    val = _series(rows, "val_loss")
    extra = {label: [(key, _series(rows, key)) for key in keys] for label, keys in (panels or {}).items()}
    extra = {label: [(k, xy) for k, xy in lines if xy] for label, lines in extra.items()}
    extra = {label: lines for label, lines in extra.items() if lines}
    fig = Figure(figsize=(7, 4.2 + 2.6 * len(extra)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1 + len(extra), 1, 1)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5, markersize=4)
    ax.set_ylabel(loss_label)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    for i, (label, lines) in enumerate(extra.items()):
        panel = fig.add_subplot(1 + len(extra), 1, 2 + i, sharex=ax)
        for key, xy in lines:
            panel.plot(*zip(*xy), label=key, linewidth=1.2)
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
        if len(lines) > 1:
            panel.legend()
    fig.axes[-1].set_xlabel("step")
    fig.tight_layout()
    return fig


def plot_loss(rows: list[dict[str, Any]], path: Path, loss_label: str = "loss", title: str = "",
              panels: dict[str, tuple[str, ...]] | None = None) -> None:
    """loss_figure(...) as a PNG written atomically."""
    buf = io.BytesIO()
    loss_figure(rows, loss_label, title, panels).savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row logging a finite `key`."""
    return [(r["step"], r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
