"""Tool-use tasks (lmforge.data.tasks with tools) and `make tool-demo --quick` end to end."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.data.tasks import TOOLS, answer, make_split, tool_conversation
from lmforge.demo import tool_demo
from lmforge.tools import argument_error, tool_schemas
from sft_fixtures import make_base
from train_fixtures import REPO


def test_tools_compute_the_answers():
    assert TOOLS["calculator"]("47 + 385") == "432" and TOOLS["calculator"](" 512 - 89 ") == "423"
    with pytest.raises(ValueError, match="expected 'a \\+ b' or 'a - b', got '2 \\* 3'"):
        TOOLS["calculator"]("2 * 3")
    assert TOOLS["count"]("fig", ["fig", "pear", "fig"]) == 2
    assert TOOLS["sort"](["pear", "apple", "fig"]) == "apple, fig, pear"
    assert [s["function"]["name"] for s in tool_schemas(list(TOOLS.values()))] == ["calculator", "count", "sort"]


def test_tool_conversations_call_validly_and_answer_from_the_result():
    train, test = make_split(300, 60, seed=0, tools=True)
    plain_train, plain_test = make_split(300, 60, seed=0)
    assert [ex["messages"][0] for ex in test] == [ex["messages"][0] for ex in plain_test]  # the same prompts
    schemas = tool_schemas(list(TOOLS.values()))
    for ex in train + test:
        msgs = ex["messages"]
        if ex["task"] in ("reverse", "sequence"):
            assert len(msgs) == 2
            continue
        call = msgs[1]["tool_calls"][0]["function"]
        assert argument_error(schemas, call["name"], call["arguments"]) is None
        assert msgs[2] == {"role": "tool", "content": ex["answer"]}
        assert msgs[3] == {"role": "assistant", "content": f"Answer: {ex['answer']}"}
    assert tool_conversation(("add", 2, 3), "What is 2 + 3?")[1]["tool_calls"][0]["function"] == \
        {"name": "calculator", "arguments": {"expression": "2 + 3"}}
    assert answer(("count", "fig", "fig", "pear", "fig")) == "2"


def test_tool_demo_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    chat = make_base(tmp_path, block_size=256)
    assert tool_demo.main(["--quick", "--chat", str(chat), "--out", str(tmp_path / "tool"),
                           "--data", str(tmp_path / "data"), "--threads", "1"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy_without_tools", "accuracy_with_tools", "tool_call_valid_rate", "minutes"} <= set(last)
    assert last["sft_steps"] == 3
    assert all(0.0 <= last[k] <= 1.0 for k in ("accuracy_without_tools", "accuracy_with_tools", "tool_call_valid_rate"))
    rows = [json.loads(l) for l in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 52 and any(m["role"] == "tool" for r in rows for m in r["messages"])
