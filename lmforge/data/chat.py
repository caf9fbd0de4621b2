"""Conversations for supervised fine-tuning: reading JSONL files and rendering with a loss mask.

Formats (one JSON object per line; a file, a directory of *.jsonl or a glob):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   conversational
        tool use: an assistant message may carry "tool_calls" (OpenAI's [{"type": "function",
        "function": {"name", "arguments"}}], content then optional), a "tool" message the result
        (content, optional "tool_call_id"); the row's "tools" (OpenAI function schemas) are
        rendered by the template (lmforge/tools.py)
    {"prompt": str, "completion": str}                                           prompt / completion
    {"instruction": str, "input": str (optional), "output": str}                 Alpaca
Prompt/completion and Alpaca rows become one user turn and one assistant turn (Alpaca's input is
appended to the instruction after a blank line). Every problem names the file and line.

`render_with_mask` renders a conversation with the tokenizer's chat template and marks which
tokens are trained: each assistant turn's content and its end-of-turn token (labels = ids there,
-100 elsewhere: system and user turns, role headers, the generation prompt). It works for any
template that renders a conversation's prefix as a prefix of the whole (ChatML, Llama-3, Qwen2,
Mistral): the assistant spans are found by rendering the conversation up to each assistant turn,
and tokens are assigned to spans by their character offsets in the fully rendered text.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmforge.data.table import read_table
from lmforge.errors import LMForgeError

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100


@dataclass
class Example:
    messages: list[dict[str, Any]]
    where: str  # "file:line", for messages about this example
    tools: list[dict[str, Any]] | None = None  # the tool schemas the conversation may call


def expand_paths(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """A file, a directory (its *.jsonl files, sorted) or a glob -> the JSONL files, in a fixed order."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path] = []
    for item in specs:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.glob("*.jsonl"))
            if not files:
                raise LMForgeError(f"directory {p} holds no .jsonl files")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        elif any(ch in str(item) for ch in "*?["):
            files = sorted(Path(f) for f in glob.glob(str(item)))
            if not files:
                raise LMForgeError(f"no files match {item}")
            out.extend(files)
        else:
            raise LMForgeError(f"data file not found: {p}")
    return out


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise LMForgeError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise LMForgeError(f"{where}: field '{field}' is empty")
    return value


def to_messages(row: Any, where: str) -> list[dict[str, str]]:
    """One JSON row in any supported format -> a validated list of messages."""
    if not isinstance(row, dict):
        raise LMForgeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LMForgeError(f"{where}: 'messages' must be a non-empty list")
        out = [_message(m, i, where) for i, m in enumerate(msgs, 1)]
        if not any(m["role"] == "assistant" for m in out):
            raise LMForgeError(f"{where}: the conversation has no assistant turn")
        return out
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": _text(row["prompt"], where, "prompt")},
                {"role": "assistant", "content": _text(row["completion"], where, "completion")}]
    if "instruction" in row and "output" in row:
        prompt = _text(row["instruction"], where, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise LMForgeError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row["output"], where, "output")}]
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise LMForgeError(f"{where}: unknown format (expected 'messages', 'prompt' + 'completion', or 'instruction' + "
                       f"'output' keys; got {keys})")


def _message(m: Any, i: int, where: str) -> dict[str, Any]:
    """Message i of a conversation, checked: a role, string content (optional on an assistant turn
    that calls tools), well-formed tool calls."""
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
        raise LMForgeError(f"{where}: message {i} must be an object with 'role' and 'content'")
    role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
    if role not in ROLES:
        raise LMForgeError(f"{where}: message {i} has unknown role {role!r} (expected system, user, assistant or tool)")
    if calls is not None:
        if role != "assistant":
            raise LMForgeError(f"{where}: message {i} ({role}) has tool_calls; only assistant messages call tools")
        if not isinstance(calls, list) or not calls or not all(_is_call(c) for c in calls):
            raise LMForgeError(f"{where}: message {i} tool_calls must be a non-empty list of {{\"type\": \"function\", "
                               "\"function\": {\"name\": str, \"arguments\": object or JSON string}}")
        if content is None:
            return {"role": role, "content": None, "tool_calls": calls}
    if not isinstance(content, str):
        raise LMForgeError(f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}")
    if not content.strip() and calls is None:
        raise LMForgeError(f"{where}: message {i} ({role}) has empty content")
    out: dict[str, Any] = {"role": role, "content": content}
    if calls is not None:
        out["tool_calls"] = calls
    if role == "tool" and isinstance(m.get("tool_call_id"), str):
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _is_call(call: Any) -> bool:
    fn = call.get("function") if isinstance(call, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), (dict, str))


def read_examples(spec: str | Path | Iterable[str | Path]) -> list[Example]:
    examples = [Example(to_messages(row, where), where, _tools(row, where)) for path in expand_paths(spec)
                for where, row in read_table(path, jsonl=True)[0]]
    if not examples:
        raise LMForgeError(f"no examples in {spec}")
    return examples


def _tools(row: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise LMForgeError(f"{where}: 'tools' must be a list of tool schemas (objects)")
    return tools or None


def render_with_mask(tokenizer: Any, messages: list[dict[str, Any]], loss_on: str = "completion",
                     template: str | None = None, tools: list[Any] | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation; labels are -100 outside assistant turns (loss_on="completion")
    or equal to ids everywhere (loss_on="prompt_and_completion"). Tool calls are assistant turns
    (trained); tool results are not."""
    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        return tokenizer.render_chat(msgs, add_generation_prompt=gen, template=template, tools=tools)

    text = render(messages, False)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if loss_on == "prompt_and_completion":
        return ids, list(ids)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[:i + 1], False)
        start = _common_prefix(before, upto)
        end = len(upto.rstrip())  # the end-of-turn token counts; the newline after it does not
        if not text.startswith(upto[:end]):
            raise LMForgeError("the chat template does not render a conversation's beginning as a prefix of the "
                               "whole conversation, so assistant turns cannot be located for the loss mask")
        spans.append((start, end))
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def render_plain(tokenizer: Any, messages: list[dict[str, str]], loss_on: str = "completion") -> tuple[list[int], list[int]]:
    """No chat template: the user text then the assistant text then EOS, as plain continuation
    (prompt/completion data on a base model). Only single-exchange conversations fit this."""
    if len(messages) != 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
        raise LMForgeError("without a chat template only prompt/completion examples (one user and one assistant "
                           "turn) can be trained; set sft.template chatml")
    prompt = tokenizer.encode(messages[0]["content"])
    completion = tokenizer.encode(messages[1]["content"]) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    ids = prompt + completion
    labels = ids if loss_on == "prompt_and_completion" else [IGNORE] * len(prompt) + completion
    return ids, list(labels)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
