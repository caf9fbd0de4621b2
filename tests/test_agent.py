"""The agent loop with a scripted (fake) model: calls run, results and tool errors go back to the
model, loops are bounded; `lmforge agent`'s REPL confirms, shows calls and results."""

from __future__ import annotations

import io
import json

import pytest

from lmforge.agent_repl import agent_repl, load_tools
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.infer.agent import run_agent
from lmforge.tokenizer import CHATML_TEMPLATE

from serve_fixtures import make_llm


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def call(name: str, **args) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


class Scripted:
    """A model that replies with the given texts in turn, recording what it was shown."""

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.seen: list[tuple[list, list]] = []

    def __call__(self, messages, schemas):
        self.seen.append(([dict(m) for m in messages], schemas))
        return self.replies.pop(0) if self.replies else call("add", a=1, b=1)


USER = [{"role": "user", "content": "What is 2 + 3?"}]


def test_calls_run_and_results_go_back():
    model = Scripted(call("add", a=2, b=3), "Answer: 5")
    events = []
    r = run_agent(model, "hermes", USER, {"add": add}, on_event=lambda k, p: events.append(k))
    assert (r.finished, r.steps, r.reply) == (True, 2, "Answer: 5")
    calls = r.messages[1]["tool_calls"]
    assert r.messages[1]["content"] is None and calls[0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert r.messages[2] == {"role": "tool", "tool_call_id": calls[0]["id"], "content": "5"}
    assert model.seen[1][0] == r.messages[:3]  # the second reply saw the call and its result
    assert [s["function"]["name"] for s in model.seen[0][1]] == ["add"]
    assert events == ["call", "result", "reply"]


def test_tool_errors_go_back_to_the_model():
    model = Scripted(call("divide", a=1.0, b=0.0) + call("nope") + call("add", a=1), "gave up")
    r = run_agent(model, "hermes", USER, {"add": add, "divide": divide})
    results = [m["content"] for m in r.messages if m["role"] == "tool"]
    assert results == ["error: ZeroDivisionError: float division by zero",
                       "error: unknown tool 'nope' (tools: add, divide)",
                       "error: TypeError: add() missing 1 required positional argument: 'b'"]
    assert r.reply == "gave up"


def test_loops_are_bounded_and_confirm_can_decline():
    model = Scripted()  # calls a tool forever
    r = run_agent(model, "hermes", USER, {"add": add}, max_steps=3, confirm=lambda c: False)
    assert (r.finished, r.steps, r.reply, len(model.seen)) == (False, 3, None, 3)
    assert [m["content"] for m in r.messages if m["role"] == "tool"] == ["error: the user declined this call"] * 3
    with pytest.raises(LMForgeError, match="max_steps must be at least 1"):
        run_agent(model, "hermes", USER, {"add": add}, max_steps=0)


def test_llm_run_agent_renders_tools_and_results():
    llm = make_llm(chat_template=CHATML_TEMPLATE)
    model = Scripted(call("add", a=2, b=3), "Answer: 5")
    prompts = []

    def chat(messages, tools=None, **sampling):
        prompts.append(llm.chat_prompt(messages, tools))  # the real rendering of what the model would read
        return model(messages, tools)
    llm.chat = chat
    r = llm.run_agent(USER, {"add": add}, max_steps=4)
    assert r.reply == "Answer: 5"
    text = llm.tokenizer.decode(prompts[1])
    assert "<tools>" in text and '"name": "add"' in text and "<tool_response>\n5\n</tool_response>" in text
    llm.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(LMForgeError, match="does not render tools"):
        llm.run_agent(USER, {"add": add})


def test_llm_run_agent_with_a_random_model_is_bounded():
    llm = make_llm(block_size=1024, chat_template=CHATML_TEMPLATE)
    r = llm.run_agent(USER, {"add": add}, max_steps=2, max_new_tokens=8, temperature=0.0)
    assert r.finished and r.steps == 1 and r.messages[:1] == USER  # a random model writes no call


def test_repl_confirms_and_shows_calls(tmp_path):
    llm = make_llm(chat_template=CHATML_TEMPLATE)
    model = Scripted(call("add", a=2, b=3), "Answer: 5", call("add", a=1, b=1), "declined")
    llm.chat = lambda messages, tools=None, **kw: model(messages, tools)
    stdin = io.StringIO("What is 2 + 3?\ny\nAnd 1 + 1?\nn\n/exit\n")
    out = io.StringIO()
    assert agent_repl(llm, {"add": add}, {}, stdin=stdin, out=out) == 0
    text = out.getvalue()
    assert '-> add({"a": 2, "b": 3})\n<- 5\nAnswer: 5\n' in text.replace("run add({\"a\": 2, \"b\": 3})? [y/N] ", "")
    assert "<- error: the user declined this call" in text


def test_load_tools_and_cli_errors(tmp_path, capsys):
    f = tmp_path / "mytools.py"
    f.write_text("import math\n\ndef square(x: float) -> float:\n    '''Square.\n\n    Args:\n        x: A number.\n"
                 "    '''\n    return x * x\n\ndef _private():\n    pass\n")
    tools = load_tools(f)
    assert list(tools) == ["square"] and tools["square"](3) == 9
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x):\n    return x\n")
    with pytest.raises(LMForgeError, match="--tools: .*bad.py: tool f: a function given as a tool needs a docstring"):
        load_tools(bad)
    assert main(["agent", str(tmp_path), "--tools", str(tmp_path / "missing.py")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --tools: {tmp_path / 'missing.py'} is not a file"
