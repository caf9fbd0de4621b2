"""What every report section reads: the model, its prepared data, where to write, options, randomness."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.infer.llm import LLM


@dataclass
class ReportContext:
    llm: LLM
    data: Path | None
    out: Path
    options: dict[str, Any]
    generator: torch.Generator
