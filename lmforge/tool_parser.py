"""Tool calls in generated text: the calls a model wrote, per template family, whole or as the
text streams in.

Families (`template_family` tells them from the chat template):
    hermes   <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>, any number, text around
             them is the reply's content (Hermes, Qwen2.5, lmforge's ChatML)
    llama3   the whole reply is {"name": "f", "parameters": {...}} (optionally after <|python_tag|>;
             several joined by ";")
A call that does not parse (broken JSON, no name, arguments that are not an object) stays in the
content as text, as vLLM's parsers leave it. Each call gets an id `call_` + 24 random characters,
as OpenAI's ids look.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("hermes", "llama3")
_ALPHABET = string.ascii_letters + string.digits
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict[str, Any]:
        """The call as an OpenAI message's tool_calls item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_family(template: str | None) -> str | None:
    """The tool-call format a chat template teaches (None: the template renders no tools)."""
    if not template or "tools" not in template:
        return None
    if _OPEN in template:
        return "hermes"
    if '"parameters"' in template and "<|start_header_id|>" in template:
        return "llama3"
    return None


def _call(obj: Any, args_key: str) -> ToolCall | None:
    """A ToolCall from a decoded {"name": ..., args_key: {...}} object (None when it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _hermes_body(body: str) -> ToolCall | None:
    return _call(_loads(body.strip()), "arguments")


def _llama3_calls(text: str) -> list[ToolCall] | None:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None
    obj = _loads(body)
    parts = [obj] if obj is not None else [_loads(p) for p in body.split(";") if p.strip()]
    calls = [_call(p, "parameters") for p in parts]
    return calls if calls and all(c is not None for c in calls) else None


def parse_tool_calls(text: str, family: str) -> tuple[str, list[ToolCall]]:
    """(the content, the tool calls) of a whole reply in `family`'s format."""
    if family == "llama3":
        calls = _llama3_calls(text)
        return ("", calls) if calls else (text, [])
    if family != "hermes":
        raise ValueError(f"unknown tool-call family {family!r} (known: {', '.join(FAMILIES)})")
    content, calls, pos = [], [], 0
    while True:
        start = text.find(_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        end = text.find(_CLOSE, start)
        body = text[start + len(_OPEN):end if end >= 0 else len(text)]
        stop = end + len(_CLOSE) if end >= 0 else len(text)
        call = _hermes_body(body)
        content.append(text[pos:start] if call else text[pos:stop])
        if call:
            calls.append(call)
        pos = stop
    joined = "".join(content)
    return (joined.strip() if calls else joined), calls


def parse_forced_calls(text: str, tool_choice: Any) -> list[ToolCall]:
    """The calls of a reply constrained by `lmforge.tools.tool_call_schema`: "required" -> a JSON
    array of {"name", "parameters"}; a named function ({"type": "function", "function": {"name"}})
    -> its arguments object. Empty when the text does not parse (constrained decoding cut short)."""
    obj = _loads(text.strip())
    if tool_choice == "required":
        calls = [_call(item, "parameters") for item in obj] if isinstance(obj, list) else []
        return [c for c in calls if c is not None]
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not isinstance(obj, dict):
        return []
    return [ToolCall(name, json.dumps(obj, ensure_ascii=False))]


class ForcedCallStream:
    """The stream form of `parse_forced_calls`: a constrained reply is only calls, read once complete."""

    def __init__(self, tool_choice: Any):
        self.tool_choice, self.buffer = tool_choice, ""

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        self.buffer += piece
        return []

    def finish(self) -> list[tuple[str, Any]]:
        return [("call", c) for c in parse_forced_calls(self.buffer, self.tool_choice)]


class ToolCallStream:
    """`parse_tool_calls` for text that arrives in pieces: `feed(piece)` and, at the end, `finish()`
    return events — ("content", text) for reply text that is certainly not part of a call, and
    ("call", ToolCall) once a call is complete. Text that may still turn into a call (a partial
    `<tool_call>`, an open call, a llama3 reply starting with "{") is held back until it is decided."""

    def __init__(self, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown tool-call family {family!r} (known: {', '.join(FAMILIES)})")
        self.family = family
        self.buffer = ""
        self.mode: str | None = None  # llama3: "content" or "call" once the first character decides
        self.calls = 0

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        self.buffer += piece
        return self._hermes(final=False) if self.family == "hermes" else self._llama3(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._hermes(final=True) if self.family == "hermes" else self._llama3(final=True)

    def _emit_call(self, call: ToolCall) -> tuple[str, Any]:
        self.calls += 1
        return ("call", call)

    def _hermes(self, final: bool) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while self.buffer:
            start = self.buffer.find(_OPEN)
            if start < 0:
                # keep a tail that could be the start of "<tool_call>"
                keep = 0 if final else next((k for k in range(min(len(_OPEN) - 1, len(self.buffer)), 0, -1)
                                             if _OPEN.startswith(self.buffer[-k:])), 0)
                text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if text:
                    events.append(("content", text))
                break
            if start:
                events.append(("content", self.buffer[:start]))
                self.buffer = self.buffer[start:]
            end = self.buffer.find(_CLOSE)
            if end < 0 and not final:
                break
            stop = end + len(_CLOSE) if end >= 0 else len(self.buffer)
            call = _hermes_body(self.buffer[len(_OPEN):end if end >= 0 else len(self.buffer)])
            events.append(self._emit_call(call) if call else ("content", self.buffer[:stop]))
            self.buffer = self.buffer[stop:]
        return self._strip_around_calls(events)

    def _strip_around_calls(self, events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Whitespace-only content between or after calls is the template's layout, not the reply."""
        if not self.calls:
            return events
        return [e for e in events if e[0] != "content" or e[1].strip()]

    def _llama3(self, final: bool) -> list[tuple[str, Any]]:
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head or (_PYTHON_TAG.startswith(head) and not final):
                return []
            self.mode = "call" if head.startswith("{") or head.startswith(_PYTHON_TAG) else "content"
        if self.mode == "content":
            text, self.buffer = self.buffer, ""
            return [("content", text)] if text else []
        if not final:
            return []
        calls = _llama3_calls(self.buffer)
        text, self.buffer = self.buffer, ""
        if not calls:
            return [("content", text)]
        return [self._emit_call(c) for c in calls]
