"""The agent loop: the model replies, its tool calls are executed, their results go back to it as
`tool` messages, until it answers without a call or `max_steps` model turns have passed.

A tool that raises does not end the loop: the model gets "error: <type>: <message>" as the result
(and may try again), as it gets "error: unknown tool ..." for a call of a tool it was not given.
`confirm(call)` may decline a call (the model is told so); `on_event(kind, payload)` reports each
"call" (a ToolCall) and "result" ((ToolCall, text)) and the final "reply" (text) as they happen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lmforge.errors import LMForgeError
from lmforge.tool_parser import ToolCall, parse_tool_calls
from lmforge.tools import tool_schemas

Reply = Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]  # (messages, tool schemas) -> text


@dataclass
class AgentResult:
    messages: list[dict[str, Any]]  # the whole conversation, the new turns appended
    steps: int  # model turns taken
    finished: bool  # the model answered without a call (False: max_steps ended the loop)

    @property
    def reply(self) -> str | None:
        """The final answer (None when the loop ended on tool results)."""
        last = self.messages[-1]
        return last.get("content") if self.finished and last["role"] == "assistant" else None


def run_agent(reply: Reply, family: str, messages: Sequence[dict[str, Any]], tools: dict[str, Callable[..., Any]],
              max_steps: int = 8, confirm: Callable[[ToolCall], bool] | None = None,
              on_event: Callable[[str, Any], None] | None = None) -> AgentResult:
    """Run the loop with `reply` (the model) writing in `family`'s tool-call format."""
    if max_steps < 1:
        raise LMForgeError(f"max_steps must be at least 1, got {max_steps}")
    if not isinstance(tools, dict) or not all(callable(f) for f in tools.values()):
        raise LMForgeError("tools must be a dict {name: function}")
    schemas = tool_schemas(list(tools.values()))
    for name, schema in zip(tools, schemas):  # the model calls a tool by the name it is given here
        schema["function"]["name"] = name
    events = on_event or (lambda kind, payload: None)
    msgs = [dict(m) for m in messages]
    for step in range(1, max_steps + 1):
        text = reply(msgs, schemas)
        content, calls = parse_tool_calls(text, family)
        if not calls:
            msgs.append({"role": "assistant", "content": text})
            events("reply", text)
            return AgentResult(msgs, step, True)
        msgs.append({"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]})
        for call in calls:
            events("call", call)
            result = execute(call, tools, confirm)
            events("result", (call, result))
            msgs.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return AgentResult(msgs, max_steps, False)


def execute(call: ToolCall, tools: dict[str, Callable[..., Any]],
            confirm: Callable[[ToolCall], bool] | None = None) -> str:
    """The result of one call as the text the model reads (errors included)."""
    if call.name not in tools:
        return f"error: unknown tool '{call.name}' (tools: {', '.join(tools)})"
    if confirm is not None and not confirm(call):
        return "error: the user declined this call"
    try:
        result = tools[call.name](**json.loads(call.arguments))
    except Exception as e:  # the model sees what went wrong and may call again
        return f"error: {type(e).__name__}: {e}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except TypeError:
        return str(result)
