"""Prompts as token ids, one rule for every caller (`LLM` and the server): text prompts through the
tokenizer, where an empty one starts a new document, or through the model's `GenerationFormat`
when a source-to-target fine-tune recorded one; chat messages through the tokenizer's chat template."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from lmforge.errors import LMForgeError


@dataclass(frozen=True)
class GenerationFormat:
    """How a model fine-tuned on (source, target) pairs (`lmforge finetune seq2seq`) reads a source:
    the tokens of `prefix + source`, then those of `separator`. A decoder's prompt ends with the
    separator and its target follows, up to EOS; an encoder-decoder's source ends with EOS instead
    (separator ""). The fine-tune records it in the run and every checkpoint (GENERATION_FORMAT);
    with it a text prompt is a source, and the generated text is the target alone."""

    prefix: str = ""
    separator: str = ""

    def encode(self, tokenizer: Any, source: str) -> list[int]:
        """The source's token ids exactly as the fine-tune trained on them (no template, no BOS)."""
        ids = list(tokenizer.encode(self.prefix + source))
        return ids + list(tokenizer.encode(self.separator)) if self.separator else ids

    def text(self, source: str) -> str:
        """The text the model reads for `source`."""
        return self.prefix + source + self.separator

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "GenerationFormat":
        """The format of a generation_format.json object; `where` names the file in errors."""
        if not isinstance(data, dict) or set(data) != {"prefix", "separator"} \
                or not all(isinstance(v, str) for v in data.values()):
            raise LMForgeError(f"{where} must be a JSON object with the strings 'prefix' and 'separator', got "
                               f"{json.dumps(data)[:200]}")
        return cls(prefix=data["prefix"], separator=data["separator"])


def encode_text_prompts(tokenizer: Any, texts: Sequence[str],
                        generation_format: GenerationFormat | None = None) -> list[list[int]]:
    """Token ids of each text prompt; an empty prompt becomes [EOS] (training data separates
    documents with EOS, so generation starts a new document). With a `generation_format` each text
    is a source, encoded by that format."""
    if generation_format is not None:
        return [generation_format.encode(tokenizer, text) for text in texts]
    out = []
    for text in texts:
        row = list(tokenizer.encode_prompt(text))
        if not row:
            eos = getattr(tokenizer, "eos_id", None)
            if eos is None:
                raise LMForgeError("prompt is empty and the tokenizer has no end-of-text token to start from")
            row = [eos]
        out.append(row)
    return out


def render_chat_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]],
                       add_generation_prompt: bool = True, tools: Sequence[Any] | None = None) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template (with `tools`, schemas or
    functions, when given). OpenAI's "developer" role is the system role of newer models: a template
    that rejects it (most; ChatML among them) is given "system" instead. The template's own error
    propagates otherwise."""
    messages = list(messages)
    extra = {"tools": list(tools)} if tools else {}
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **extra))
    except Exception:
        if not any(m["role"] == "developer" for m in messages):
            raise
    as_system = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    return list(tokenizer.apply_chat_template(as_system, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              **extra))


def results_like(kind: str, per_prompt: Sequence[Any]) -> Any:
    """`LLM.generate`'s result in the shape of its prompt: one result for 'text' / 'ids', the list for
    'texts' (each result itself a list when several samples were asked for)."""
    return list(per_prompt) if kind == "texts" else per_prompt[0]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of the stop strings (generation that cannot stop mid-way: beams, seq2seq)."""
    for s in stops:
        if s in text:
            text = text[:text.index(s)]
    return text
