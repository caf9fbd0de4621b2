"""Corpora, `prepare` (sources -> tokenizer + train/val token files) and `TokenData` (reading them back)."""

from lmforge.data.dataset import TokenData
from lmforge.data.prepare import prepare

__all__ = ["TokenData", "prepare"]
