"""Heads on the decoder: sequence classification / reward model, and a value head for PPO.

    DecoderClassifier (family "decoder_classifier"): the decoder's final hidden state at the LAST
        REAL TOKEN of each row -> Linear(n_embd, num_labels). num_labels = 1 is a reward model
        (a scalar score); > 1 a classifier with `id2label` names (Hugging Face's
        *ForSequenceClassification layout: `score.weight`, no bias).
    DecoderWithValueHead (family "decoder_value"): the decoder (its LM head unchanged, so it
        generates like any decoder) plus `value_head` Linear(n_embd, 1) on every position.

Which token is read (explicit, never guessed from token ids): with `pad_mask_BT` (True = real
token) the last True position of each row, so left padding, right padding, or none give the same
score for the same tokens; without a mask the last position. Hugging Face instead finds the first
`pad_token_id`, which silently reads the wrong token when pad == EOS; here an EOS inside the text is
just a token. The data side decides what the last token is: lmforge renders a scored reply
through the chat template, so it ends with the end-of-turn token (`<|im_end|>`), or, for plain
text, appends the tokenizer's EOS (`alignment_data.encode_scored`), so the score reads the
position that has seen the whole reply and its ending.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from lmforge.models.decoder import PRESETS, Decoder, DecoderConfig
from lmforge.models.decoder import config_from_preset as _decoder_preset


@dataclass
class DecoderClassifierConfig(DecoderConfig):
    """DecoderConfig plus the head: num_labels outputs read at the last real token."""

    num_labels: int = field(default=1, metadata={"help": "outputs of the score head (1 = reward model)"})
    id2label: Optional[dict] = field(default=None, metadata={"help": "label names by index (classification)"})

    def validate(self) -> None:
        super().validate()
        if self.num_labels < 1:
            from lmforge.errors import LMForgeError

            raise LMForgeError(f"model.num_labels must be positive, got {self.num_labels}")


def last_token_index(pad_mask_BT: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """Index of the last real token per row, (B,): the last True of the mask (any padding side)."""
    if pad_mask_BT is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=device)
    pos_BT = torch.arange(T, device=device)[None].expand(B, T)
    return torch.where(pad_mask_BT.bool(), pos_BT, torch.full_like(pos_BT, -1)).max(-1).values.clamp(min=0)


def _attention_pad_mask(pad_mask_BT: torch.Tensor | None) -> torch.Tensor | None:
    """The decoder's pad mask handles left padding (positions counted over real tokens). Right
    padding needs no mask at all: causal attention never lets a real token see a later pad."""
    if pad_mask_BT is None:
        return None
    m = pad_mask_BT.bool()
    right_padded = bool((m[:, :-1] >= m[:, 1:]).all()) if m.shape[1] > 1 else True
    return None if right_padded else m


class DecoderClassifier(Decoder):
    """Decoder body + score head. `forward(idx_BT, pad_mask_BT=None)` -> (B, num_labels)."""

    family = "decoder_classifier"

    def __init__(self, cfg: DecoderClassifierConfig):
        super().__init__(cfg)
        del self.lm_head  # a classifier has no LM head (HF's *ForSequenceClassification neither)
        self.score = nn.Linear(cfg.n_embd, cfg.num_labels, bias=False)
        nn.init.normal_(self.score.weight, 0.0, cfg.init_std)

    def tied_state_keys(self) -> list[str]:
        return []

    def retie(self) -> None:
        pass

    def head(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.score(x_BTC)

    def forward(self, idx_BT: torch.Tensor, *, pad_mask_BT: torch.Tensor | None = None,
                per_token: bool = False, **kwargs: Any) -> torch.Tensor:
        """Scores at the last real token, (B, num_labels); `per_token` gives (B, T, num_labels)."""
        B, T = idx_BT.shape
        h_BTC = super().forward(idx_BT, pad_mask_BT=_attention_pad_mask(pad_mask_BT), hidden=True, **kwargs)
        if per_token:
            return self.score(h_BTC)
        last_B = last_token_index(pad_mask_BT, B, T, idx_BT.device)
        h_BC = h_BTC[torch.arange(B, device=idx_BT.device), last_B]
        return self.score(h_BC)

    @classmethod
    def from_decoder(cls, decoder: Decoder, num_labels: int = 1, id2label: dict | None = None) -> "DecoderClassifier":
        """A classifier whose body is a copy of `decoder`'s weights and whose head is freshly initialised."""
        cfg = DecoderClassifierConfig(**{**dataclasses.asdict(decoder.cfg), "num_labels": num_labels,
                                         "id2label": id2label})
        model = cls(cfg)
        state = {k: v for k, v in decoder.state_dict().items()
                 if not k.startswith(("lm_head.", "value_head.")) and not (k == "score.weight" and
                                                                           v.shape[0] != num_labels)}
        missing, unexpected = model.load_state_dict(state, strict=False)  # a reward model keeps its head
        assert not unexpected and set(missing) <= {"score.weight"}, (missing, unexpected)
        return model.to(decoder.tok_emb.weight.device)


@dataclass
class DecoderValueConfig(DecoderConfig):
    """DecoderConfig of a policy that carries a value head (PPO)."""


class DecoderWithValueHead(Decoder):
    """A decoder (generates as usual) plus a per-position value head.
    `forward(..., values=True)` returns (logits_BTV, values_BT)."""

    family = "decoder_value"

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.value_head.weight, 0.0, cfg.init_std)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx_BT: torch.Tensor, *, values: bool = False, **kwargs: Any) -> Any:
        if not values:
            return super().forward(idx_BT, **kwargs)
        h_BTC = super().forward(idx_BT, hidden=True, **kwargs)
        return self.head(h_BTC), self.value_head(h_BTC)[..., 0]

    @classmethod
    def from_decoder(cls, decoder: Decoder, value_init: Optional[nn.Module] = None) -> "DecoderWithValueHead":
        cfg = DecoderValueConfig(**dataclasses.asdict(decoder.cfg))
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(decoder.state_dict(), strict=False)  # a PPO run keeps its head
        assert not unexpected and set(missing) <= {"value_head.weight", "value_head.bias"}, (missing, unexpected)
        return model.to(decoder.tok_emb.weight.device)

    def to_decoder(self) -> Decoder:
        """The policy alone (drops the value head): what a chat model needs."""
        cfg = DecoderConfig(**dataclasses.asdict(self.cfg))
        dec = Decoder(cfg)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("value_head.")}
        dec.load_state_dict(state)
        return dec.to(self.tok_emb.weight.device)


def _preset(cls: type) -> Any:
    def make(name: Optional[str], **overrides: Any) -> Any:
        head_keys = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(DecoderConfig)}
        head = {k: overrides.pop(k) for k in list(overrides) if k in head_keys}
        base = _decoder_preset(name, **overrides)
        return cls(**{**dataclasses.asdict(base), **head})
    return make


def as_classifier(model: Decoder, labels: list[str], **_: Any) -> DecoderClassifier:
    """A decoder classifier for `labels` on `model`'s body (itself when it is one for these labels).
    Pooling and dropout options are an encoder head's: a decoder classifier reads its last token."""
    if isinstance(model, DecoderClassifier) and [str(v) for v in (model.cfg.id2label or {}).values()] == labels:
        return model
    return DecoderClassifier.from_decoder(model, num_labels=len(labels), id2label={str(i): n for i, n in enumerate(labels)})


classifier_from_preset = _preset(DecoderClassifierConfig)
value_from_preset = _preset(DecoderValueConfig)
