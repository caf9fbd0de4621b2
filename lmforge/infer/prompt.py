"""Prompts as token ids, one rule for every caller (`LLM` and the server): text prompts through the
tokenizer, where an empty one starts a new document, and chat messages through the tokenizer's
chat template."""

from __future__ import annotations

from typing import Any, Sequence

from lmforge.errors import LMForgeError


def encode_text_prompts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text prompt; an empty prompt becomes [EOS] (training data separates
    documents with EOS, so generation starts a new document)."""
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
                       add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template. OpenAI's "developer" role is
    the system role of newer models: a template that rejects it (most; ChatML among them) is given
    "system" instead. The template's own error propagates otherwise."""
    messages = list(messages)
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True))
    except Exception:
        if not any(m["role"] == "developer" for m in messages):
            raise
    as_system = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    return list(tokenizer.apply_chat_template(as_system, add_generation_prompt=add_generation_prompt, tokenize=True))


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
