"""What every report section reads: the model, its data, the output directory and its options.

    ReportContext(llm, data, out, options, generator)

`data` is the prepared data directory the model was trained on: the one given, else the one the
run recorded in its last checkpoint (`recorded_data_dir`), else None (a section that needs it says
so). `generator` is seeded from options["seed"] (default 0), so a report is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge import checkpoint as ckpt_io


@dataclass
class ReportContext:
    llm: Any  # lmforge.infer.llm.LLM
    data: Path | None
    out: Path
    options: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def option(self, name: str, default: Any) -> Any:
        """A section's option (`build_report(..., name=value)`), or its default."""
        value = self.options.get(name)
        return default if value is None else value

    @property
    def run_dir(self) -> Path | None:
        """The training run the model was loaded from (None: a model directory or HF folder)."""
        path = self.llm.path
        return path if path is not None and ckpt_io.is_run_dir(path) else None


def recorded_data_dir(model_path: Path | None) -> Path | None:
    """The data directory a run trained on, as its latest checkpoint recorded it (None if unknown)."""
    if model_path is None or not ckpt_io.is_run_dir(model_path):
        return None
    ckpt = ckpt_io.latest_checkpoint(model_path)
    if ckpt is None:
        return None
    state, _ = ckpt_io.load_train_state(ckpt, with_tensors=False)
    recorded = (state.get("data") or {}).get("dir")
    return Path(recorded).resolve() if recorded and Path(recorded).is_dir() else None
