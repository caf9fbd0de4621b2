"""Preference pairs and RL prompts: reading JSONL, checking it, and turning it into token ids.

Preference pairs (one JSON object per line), the two formats TRL reads:
    explicit prompt:  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
    implicit prompt:  {"chosen": messages, "rejected": messages}   the prompt = their common leading turns
An optional numeric "margin" is used by the reward model's loss. RL prompts: {"prompt": str | messages,
...}; every other column travels with the prompt to the reward functions.

Rendering. With a chat template the prompt is rendered with the generation prompt and the
completion is what the full conversation adds after it, cut right after its end-of-turn token;
without one the prompt is plain text and the completion is its text plus EOS. So every completion
ends with the token that ends a reply, which is the token the reward model reads (models/heads.py).

Problems name the file and line: invalid JSON, a missing or mistyped field, an empty completion, a
conversation whose chosen and rejected share everything. Pairs whose chosen and rejected are
identical carry no preference: they are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmforge.data.table import read_table
from lmforge.errors import LMForgeError

ROLES = ("system", "user", "assistant")


@dataclass
class PreferencePair:
    prompt: str | list[dict]           # text, or the prompt's messages
    chosen: str | list[dict]           # text, or the completion's messages
    rejected: str | list[dict]
    where: str                         # "file:line"
    margin: float | None = None


@dataclass
class PromptExample:
    prompt: str | list[dict]
    columns: dict[str, Any]
    where: str


@dataclass
class ReadStats:
    identical_skipped: int = 0
    too_long_skipped: int = 0
    notes: list[str] = field(default_factory=list)


def _check_messages(msgs: Any, where: str, key: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise LMForgeError(f"{where}: '{key}' must be a string or a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LMForgeError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise LMForgeError(f"{where}: {key}[{i}] has unknown role '{m['role']}' (roles: {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _field(obj: dict, key: str, where: str) -> str | list[dict]:
    v = obj.get(key)
    if isinstance(v, str):
        return v
    return _check_messages(v, where, key)


def _completion_is_empty(c: str | list[dict]) -> bool:
    if isinstance(c, str):
        return not c.strip()
    return not any(m["role"] == "assistant" and m["content"].strip() for m in c)


def read_preferences(path: str | Path, stats: ReadStats | None = None) -> list[PreferencePair]:
    """Preference pairs of a JSONL file (explicit or implicit prompt format)."""
    stats = stats if stats is not None else ReadStats()
    pairs: list[PreferencePair] = []
    for where, obj in read_table(path, jsonl=True)[0]:
        if "chosen" not in obj or "rejected" not in obj:
            raise LMForgeError(f"{where}: a preference pair needs 'chosen' and 'rejected' (and optionally 'prompt'); "
                               f"found keys: {', '.join(sorted(obj)) or 'none'}")
        chosen, rejected = _field(obj, "chosen", where), _field(obj, "rejected", where)
        if "prompt" in obj:
            prompt = _field(obj, "prompt", where)
            if isinstance(prompt, str) and not prompt.strip():
                raise LMForgeError(f"{where}: 'prompt' is empty")
        else:
            if isinstance(chosen, str) or isinstance(rejected, str):
                raise LMForgeError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be message lists "
                                   "sharing their leading turns")
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            if k == len(chosen) and k == len(rejected):
                stats.identical_skipped += 1
                continue
            if k == 0:
                raise LMForgeError(f"{where}: 'chosen' and 'rejected' share no leading turn, so there is no prompt; "
                                   "add a 'prompt' field")
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        for key, c in (("chosen", chosen), ("rejected", rejected)):
            if _completion_is_empty(c):
                raise LMForgeError(f"{where}: '{key}' completion is empty")
            if isinstance(c, list) and c[0]["role"] != "assistant":
                raise LMForgeError(f"{where}: the '{key}' completion must start with an assistant turn, "
                                   f"got '{c[0]['role']}'")
        if chosen == rejected:
            stats.identical_skipped += 1
            continue
        margin = obj.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise LMForgeError(f"{where}: 'margin' must be a number, got {margin!r}")
        pairs.append(PreferencePair(prompt, chosen, rejected, where, None if margin is None else float(margin)))
    if not pairs:
        raise LMForgeError(f"{path}: no usable preference pairs" +
                           (f" ({stats.identical_skipped} had identical chosen and rejected)" if stats.identical_skipped else ""))
    if stats.identical_skipped:
        stats.notes.append(f"skipped {stats.identical_skipped} pair(s) whose chosen and rejected are identical")
    return pairs


def read_prompts(path: str | Path) -> list[PromptExample]:
    """RL prompts: {"prompt": str | messages, ...other columns}."""
    out = []
    for where, obj in read_table(path, jsonl=True)[0]:
        key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
        if key is None:
            raise LMForgeError(f"{where}: an RL example needs a 'prompt' field (string or messages); "
                               f"found keys: {', '.join(sorted(obj)) or 'none'}")
        prompt = _field(obj, key, where)
        if isinstance(prompt, str) and not prompt.strip():
            raise LMForgeError(f"{where}: 'prompt' is empty")
        if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]  # a conversations file: the reference answer stays a column
            if not prompt:
                raise LMForgeError(f"{where}: 'prompt' has no user turn")
        out.append(PromptExample(prompt, {k: v for k, v in obj.items() if k != key}, where))
    if not out:
        raise LMForgeError(f"{path}: no prompts")
    return out


# ---- token ids -------------------------------------------------------------------------------

def has_chat_template(tokenizer: Any) -> bool:
    return callable(getattr(tokenizer, "apply_chat_template", None)) and bool(getattr(tokenizer, "chat_template", None))


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def reply_stop_ids(tokenizer: Any) -> list[int]:
    """Ids that end a reply, the primary one first: the chat template's end-of-turn token when there
    is one, else EOS."""
    eot = getattr(tokenizer, "end_of_turn_id", None) if has_chat_template(tokenizer) else None
    eos = getattr(tokenizer, "eos_id", None)
    primary = eot if eot is not None else eos
    rest = sorted(set(getattr(tokenizer, "stop_ids", None) or []) | ({eos} if eos is not None else set()))
    return ([primary] if primary is not None else []) + [i for i in rest if i != primary]


def encode_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    """Prompt ids that end where the reply starts (the chat template's generation prompt)."""
    if has_chat_template(tokenizer):
        return list(tokenizer.apply_chat_template(_as_messages(prompt), add_generation_prompt=True, tokenize=True))
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    ids = list(tokenizer.encode_prompt(text)) if hasattr(tokenizer, "encode_prompt") else list(tokenizer.encode(text))
    if not ids and getattr(tokenizer, "eos_id", None) is not None:
        ids = [tokenizer.eos_id]
    return ids


def encode_completion(tokenizer: Any, prompt: str | list[dict], prompt_ids: Sequence[int],
                      completion: str | list[dict]) -> list[int]:
    """Completion ids after `prompt_ids`, ending with the end-of-turn token (or EOS)."""
    if has_chat_template(tokenizer):
        # Text-level split, then the completion tokenized on its own: prompt ids + completion ids is
        # exactly what generation produces (prompt tokens, then new tokens), as TRL does it.
        reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        msgs = _as_messages(prompt)
        before = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs + reply, add_generation_prompt=False, tokenize=False)
        if not full.startswith(before):
            raise LMForgeError("the chat template does not render the prompt as a prefix of the conversation")
        # The reply ends with its end-of-turn marker; the template's trailing newline is not part of it.
        rest = full[len(before):].rstrip()
        return list(tokenizer.encode_with_offsets(rest)[0]) if hasattr(tokenizer, "encode_with_offsets") \
            else list(tokenizer.encode(rest, allow_special=True))
    text = completion if isinstance(completion, str) else "\n".join(m["content"] for m in completion)
    ids = list(tokenizer.encode(text))
    eos = getattr(tokenizer, "eos_id", None)
    return ids + ([eos] if eos is not None else [])


def encode_scored(tokenizer: Any, prompt: str | list[dict], completion: str | list[dict]) -> list[int]:
    """prompt + completion ids as the reward model reads them (ending with the end-of-turn token)."""
    p = encode_prompt(tokenizer, prompt)
    return p + encode_completion(tokenizer, prompt, p, completion)


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float
    where: str


def encode_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_len: int,
                 stats: ReadStats | None = None) -> list[EncodedPair]:
    """Token ids of every pair; pairs longer than `max_len` are dropped and counted."""
    stats = stats if stats is not None else ReadStats()
    out = []
    dropped = 0
    for p in pairs:
        prompt = encode_prompt(tokenizer, p.prompt)
        c = encode_completion(tokenizer, p.prompt, prompt, p.chosen)
        r = encode_completion(tokenizer, p.prompt, prompt, p.rejected)
        if not c or not r:
            raise LMForgeError(f"{p.where}: a completion renders to no tokens")
        if c == r:
            stats.identical_skipped += 1
            continue
        if len(prompt) + max(len(c), len(r)) > max_len:
            dropped += 1
            continue
        out.append(EncodedPair(prompt, c, r, p.margin or 0.0, p.where))
    if dropped:
        stats.too_long_skipped += dropped
        stats.notes.append(f"dropped {dropped} pair(s) longer than the context ({max_len} tokens)")
    if not out:
        raise LMForgeError(f"no preference pair fits the context of {max_len} tokens")
    return out


def read_scoring_file(path: str | Path) -> tuple[list[dict], list, list]:
    """For `lmforge score --file`: (rows, prompts, completions) from {prompt, completion} rows or
    preference pairs (chosen then rejected of each pair, flattened)."""
    rows, prompts, completions = [], [], []
    for where, obj in read_table(path, jsonl=True)[0]:
        if "prompt" not in obj:
            raise LMForgeError(f"{where}: a row to score needs 'prompt' and 'completion' (or 'chosen' and 'rejected')")
        prompt = _field(obj, "prompt", where)
        if "completion" in obj:
            completions.append(_field(obj, "completion", where))
            prompts.append(prompt)
        elif "chosen" in obj and "rejected" in obj:
            completions += [_field(obj, "chosen", where), _field(obj, "rejected", where)]
            prompts += [prompt, prompt]
        else:
            raise LMForgeError(f"{where}: a row to score needs 'completion' (or 'chosen' and 'rejected')")
        rows.append(obj)
    return rows, prompts, completions
