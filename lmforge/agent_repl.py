"""`lmforge agent MODEL --tools module.py`: a terminal chat whose model can call Python functions.

The tools are the public functions defined in module.py (or its `TOOLS` list), each with type
hints and a Google-style docstring (lmforge/tools.py turns them into schemas). Each turn runs the
agent loop (lmforge/infer/agent.py): every call is shown, and run after a y/N confirmation unless
--yes, then its result is shown and sent back to the model; at most --max-steps model replies per
turn. Commands: /reset (forget the conversation), /exit (or Ctrl-D).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from lmforge.errors import LMForgeError


def load_tools(path: str | Path) -> dict[str, Callable[..., Any]]:
    """{name: function} of a Python file: its `TOOLS` list, else its public functions defined there."""
    from lmforge.tools import function_schema

    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"--tools: {path} is not a file")
    spec = importlib.util.spec_from_file_location(f"lmforge_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: one line naming it
        raise LMForgeError(f"--tools: {path} failed to import: {type(e).__name__}: {e}") from None
    funcs = getattr(module, "TOOLS", None)
    if funcs is None:
        funcs = [f for name, f in vars(module).items() if inspect.isfunction(f) and not name.startswith("_")
                 and f.__module__ == module.__name__]
    if not funcs:
        raise LMForgeError(f"--tools: {path} defines no functions")
    for f in funcs:
        try:
            function_schema(f)
        except LMForgeError as e:
            raise LMForgeError(f"--tools: {path}: {e}") from None
    return {f.__name__: f for f in funcs}


def agent_repl(llm: Any, tools: dict[str, Callable[..., Any]], sampling: dict[str, Any], max_steps: int = 8,
               yes: bool = False, system: str | None = None, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    llm.tool_family()  # a template without tools: say so before the first prompt
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    def ask(prompt: str) -> str | None:
        out.write(prompt)
        out.flush()
        line = stdin.readline()
        return None if not line else line.rstrip("\n")

    def confirm(call: Any) -> bool:
        answer = ask(f"run {call.name}({call.arguments})? [y/N] ")
        return answer is not None and answer.strip().lower() in ("y", "yes")

    def on_event(kind: str, payload: Any) -> None:
        if kind == "call":
            say(f"-> {payload.name}({payload.arguments})")
        elif kind == "result":
            say(f"<- {payload[1]}")
        else:
            say(payload)

    say(f"lmforge agent — tools: {', '.join(tools)}; /reset, /exit; calls run "
        + ("without asking (--yes)" if yes else "after you confirm them"))
    while True:
        line = ask("> ")
        if line is None:
            say("")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = [m for m in history if m["role"] == "system"]
            say("(conversation cleared)")
            continue
        try:
            result = llm.run_agent(history + [{"role": "user", "content": line}], tools, max_steps=max_steps,
                                   confirm=None if yes else confirm, on_event=on_event, **sampling)
        except LMForgeError as e:
            say(f"error: {e}")
            continue
        history = result.messages
        if not result.finished:
            say(f"(stopped after {max_steps} replies with tool calls: --max-steps)")
