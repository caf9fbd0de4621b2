"""Every pretraining objective of `lmforge train`, by name (`train.objective`).

The loop knows nothing about language modelling: an objective's module builds its loss
(`job.Objective`) and batch sources from a `PretrainContext`. A new objective adds a module with
its `make(ctx) -> PretrainParts` and one row here; the loop stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmforge.data.dataset import TokenData
from lmforge.data.image_text import ImageTextData
from lmforge.errors import LMForgeError
from lmforge.train.causal_lm import make_causal_lm
from lmforge.train.clip import make_clip
from lmforge.train.denoise import make_span_corruption, make_text_infilling
from lmforge.train.job import PretrainContext, PretrainParts
from lmforge.train.mlm import make_mlm


@dataclass(frozen=True)
class PretrainSpec:
    family: str | None          # the model family it trains (None: any whose model maps ids to next-token logits)
    default_preset: str | None  # the preset used while model.preset is the decoder default (None: keep that)
    make: Callable[[PretrainContext], PretrainParts]
    # reads the data directory: its splits are what PretrainContext.train_tokens / val_tokens hold
    open_data: Callable[[Any], Any] = TokenData


PRETRAINING: dict[str, PretrainSpec] = {
    "causal_lm": PretrainSpec(family=None, default_preset=None, make=make_causal_lm),
    "mlm": PretrainSpec(family="encoder", default_preset="encoder-small", make=make_mlm),
    "span_corruption": PretrainSpec(family="seq2seq", default_preset="t5-cpu", make=make_span_corruption),
    "text_infilling": PretrainSpec(family="seq2seq", default_preset="bart-cpu", make=make_text_infilling),
    "clip": PretrainSpec(family="clip", default_preset="clip-emoji", make=make_clip, open_data=ImageTextData),
}


def pretraining_spec(name: str) -> PretrainSpec:
    if name not in PRETRAINING:
        raise LMForgeError(f"unknown objective '{name}' in train.objective; available: {', '.join(PRETRAINING)}")
    return PRETRAINING[name]
