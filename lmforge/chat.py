"""`lmforge chat MODEL`: talk to a model in the terminal.

The reply streams token by token; the history is kept and sent each turn. Commands:
    /system TEXT   set the system prompt (and start over)      /reset   forget the conversation
    /save FILE     write the conversation as JSONL {"messages": [...]}   /exit (or Ctrl-D)   quit
Ctrl-C stops the reply being written, not the program. When the history no longer fits the
model's context, the oldest turns are dropped (the system prompt stays) and the REPL says so; a
reply is clipped to the context left after the conversation (a note on stderr says so once). A
model without a chat template is used for plain continuation of what you type, with a note.

The REPL talks to a backend: `LocalBackend` (a model loaded in this process) here; a backend for
a running `lmforge serve` (`lmforge chat --url`) has the same three methods.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO

from lmforge.errors import LMForgeError


class ChatBackend(Protocol):
    has_template: bool

    def stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None: ...

    def context_length(self) -> int | None: ...


class LocalBackend:
    def __init__(self, llm: Any):
        self.llm = llm
        self.has_template = bool(getattr(llm.tokenizer, "chat_template", None))

    def stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        if self.has_template:
            return self.llm.chat_stream(messages, **sampling)
        return self.llm.stream(messages[-1]["content"], **sampling)  # plain continuation of the last input

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        if not self.has_template:
            return len(self.llm.tokenizer.encode_prompt(messages[-1]["content"]))
        return len(self.llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def context_length(self) -> int | None:
        return getattr(self.llm.model.cfg, "block_size", None)


def fit_history(backend: ChatBackend, messages: list[dict[str, str]],
                max_new_tokens: int) -> tuple[list[dict[str, str]], int, int]:
    """Fit a turn into the context: drop the oldest non-system turns until the prompt leaves the
    reply min(max_new_tokens, half the context), then clip the reply to what is left (as `LLM.chat`
    and the server do). Returns (messages that fit, number of messages dropped, the reply's token
    budget); one message too long for any reply is an LMForgeError."""
    limit = backend.context_length()
    if limit is None:
        return messages, 0, max_new_tokens
    reserve = min(max_new_tokens, limit // 2)
    msgs, dropped = list(messages), 0
    while True:
        n = backend.count_tokens(msgs)
        if n is None:
            return msgs, dropped, max_new_tokens
        if n + reserve <= limit:
            break
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        if first is None or first >= len(msgs) - 1:  # only the newest message is left
            break
        del msgs[first]
        dropped += 1
        # Drop a whole exchange: an assistant reply left without its user turn goes too.
        if first < len(msgs) - 1 and msgs[first]["role"] == "assistant":
            del msgs[first]
            dropped += 1
    if n >= limit:
        raise LMForgeError(f"the message is {n} tokens and does not fit the model's context of {limit} tokens "
                           "(a reply needs at least one more)")
    return msgs, dropped, min(max_new_tokens, limit - n)


def repl(backend: ChatBackend, sampling: dict[str, Any], system: str | None = None, stdin: TextIO | None = None,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
    max_new = int(sampling.get("max_new_tokens", 256))
    clipped_noted = False
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    if not backend.has_template:
        say("note: this model has no chat template; what you type is continued as plain text, without history")
    say("lmforge chat — /system TEXT, /reset, /save FILE, /exit; Ctrl-C stops a reply")
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                out.write("> ")
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
        except EOFError:
            say("")
            return 0
        except KeyboardInterrupt:
            say("")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                history = [m for m in history if m["role"] == "system"]
                say("(conversation cleared)")
            elif cmd == "/system":
                history = [{"role": "system", "content": arg.strip()}] if arg.strip() else []
                say("(system prompt set; conversation cleared)" if arg.strip() else "(system prompt removed)")
            elif cmd == "/save":
                if not arg.strip():
                    say("usage: /save FILE")
                    continue
                try:
                    with open(Path(arg.strip()).expanduser(), "a", encoding="utf-8") as f:
                        f.write(json.dumps({"messages": history}, ensure_ascii=False) + "\n")
                    say(f"(saved {len(history)} messages to {arg.strip()})")
                except OSError as e:
                    say(f"error: cannot write {arg.strip()}: {e.strerror}")
            else:
                say(f"unknown command {cmd}; commands: /system TEXT, /reset, /save FILE, /exit")
            continue
        history.append({"role": "user", "content": line})
        try:
            fitted, dropped, budget = fit_history(backend, history, max_new)
        except LMForgeError as e:
            say(f"error: {e}")
            history.pop()
            continue
        if dropped:
            say(f"(the conversation no longer fits the context: dropped the {dropped} oldest messages)")
            history = fitted
        if budget < max_new and not clipped_noted:  # once: the same holds for every later turn
            err.write(f"note: --max-new-tokens {max_new} does not fit the model's context of "
                      f"{backend.context_length()} tokens with the conversation; each reply is clipped to what "
                      f"fits (this one: {budget} tokens)\n")
            err.flush()
            clipped_noted = True
        reply: list[str] = []
        try:
            for piece in backend.stream(history, **{**sampling, "max_new_tokens": budget}):
                reply.append(piece)
                out.write(piece)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:
            out.write(" [stopped]\n")
        except LMForgeError as e:
            say(f"error: {e}")
            history.pop()
            continue
        if backend.has_template:
            history.append({"role": "assistant", "content": "".join(reply)})
        else:
            history = [m for m in history if m["role"] == "system"]


from lmforge.serve.client import HTTPBackend  # noqa: E402,F401  (`lmforge chat --url`: a running lmforge serve)
