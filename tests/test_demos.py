"""The demos train fixed compute: the recipes' step counts are what trains, a wall-clock budget is
only an explicit option; the chat demo's stop rate counts replies that end with <|im_end|>."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.config import load_yaml
from lmforge.demo import align_demo, chat_demo
from lmforge.train.config import recipe_path
from lmforge.train.pretrain import run_training
from sft_fixtures import make_base, task_rows, write_jsonl
from train_fixtures import REPO, make_data_dir

SMALL_MODEL = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
               "--train.seq_len", "32", "--train.micro_batch_size", "2", "--train.eval_iters", "1",
               "--train.progress", "false", "--train.device", "cpu"]


def test_demo_recipe_trains_exactly_450_steps(tmp_path, one_thread):
    recipe = load_yaml(recipe_path("demo"))["train"]
    assert recipe["max_steps"] == 450 and "max_minutes" not in recipe
    run = tmp_path / "demo"
    summary = run_training(str(make_data_dir(tmp_path / "data")), str(run), recipe="demo", overrides=SMALL_MODEL)
    assert (summary["steps"], summary["stopped_by"]) == (450, "max_steps")
    state = json.loads((run / "checkpoints" / "step_00000450" / "train_state.json").read_text())
    assert state["schedule"] == {"kind": "warmup_cosine", "lr": 4e-3, "min_lr": 4e-4, "warmup_steps": 20, "total_steps": 450}
    config = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (config["max_steps"], config["max_minutes"]) == (450, None)
    assert chat_demo.trained_steps(run) == 450


def test_chat_demo_sft_trains_fixed_steps_and_minutes_only_on_request(tmp_path):
    recipe = load_yaml(recipe_path("chat-demo"))["train"]
    assert recipe["max_steps"] == 1057 and "max_minutes" not in recipe
    base, data, out = make_base(tmp_path, block_size=256), tmp_path / "tasks", tmp_path / "sft"
    data.mkdir()
    write_jsonl(data / "train.jsonl", task_rows(120, seed=1))
    write_jsonl(data / "val.jsonl", task_rows(16, seed=2))
    cmd = chat_demo.sft_command(base, data, out, steps=None, minutes=None)
    assert "--train.max_steps" not in cmd and "--train.max_minutes" not in cmd  # the recipe's 1,057 steps
    assert chat_demo.sft_command(base, data, out, None, 8.0)[-4:] == ["--train.max_minutes", "8.0",
                                                                      "--train.max_steps", "100000"]
    cmd = chat_demo.sft_command(base, data, out, steps=3, minutes=None)
    assert cmd[-2:] == ["--train.max_steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert chat_demo.trained_steps(out) == 3
    config = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (config["max_steps"], config["max_minutes"], config["lr"]) == (3, None, 2e-3)


def test_reply_end_stops_at_the_first_stop_token():
    assert chat_demo.reply_end([7, 8, 0, 9], "eos", {0}) == ([7, 8], False)  # EOS first: no end of turn
    assert chat_demo.reply_end([7, 8, 0, 9], "length", {0}) == ([7, 8], False)
    assert chat_demo.reply_end([7, 8], "eos", {0}) == ([7, 8], True)  # generation stopped at <|im_end|>
    assert chat_demo.reply_end([7, 8], "length", {0}) == ([7, 8], False)


def _always(token: str, root: Path):
    """The chat demo's LLM on a tiny model whose greedy reply repeats `token` forever."""
    llm = chat_demo.load_chat_llm(make_base(root))
    token_id = llm.tokenizer.hf.token_to_id(token)
    model = llm.model
    with torch.no_grad():  # a constant final hidden state and a head that favours one token
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 1.0
    return llm, token_id


@pytest.mark.parametrize("token, stop_rate, reply", [("<|im_end|>", 1.0, ""), ("<|endoftext|>", 0.0, ""),
                                                     ("a", 0.0, "a" * 64)], ids=["im_end", "eos", "letter"])
def test_chat_demo_stop_rate_counts_replies_ending_with_im_end(tmp_path, token, stop_rate, reply):
    llm, token_id = _always(token, tmp_path)
    assert token_id in llm.stop_ids or token == "a"
    examples = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"}, {"role": "assistant", "content": ""}],
                 "task": "add", "answer": str(a + 1)} for a in range(3)]
    result = chat_demo.evaluate(llm, examples, batch_size=2)
    assert result["stop_rate"] == stop_rate
    assert result["replies"] == [reply] * 3 and result["accuracy"] == 0.0


def test_align_demo_stages_train_fixed_steps_unless_a_budget_is_asked_for():
    assert align_demo.stage_budget(473, None) == ["--train.max_steps", "473"]
    assert align_demo.stage_budget(12, 12.0) == ["--train.max_steps", "12", "--train.max_minutes", "12.0"]
    assert align_demo.rl_steps(None, align_demo.GRPO_STEPS, None) == 473
    assert align_demo.rl_steps(None, align_demo.PPO_STEPS, None) == 950
    assert align_demo.rl_steps(None, align_demo.GRPO_STEPS, 12.0) == 100000  # the budget decides
    assert align_demo.rl_steps(30, align_demo.GRPO_STEPS, 12.0) == 30


def test_align_demo_reward_model_stage_trains_its_steps(tmp_path, one_thread):
    base = make_base(tmp_path)
    pairs = [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "chosen": str(a + 1), "rejected": str(a)}
             for a in range(40)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    overrides = align_demo.stage_budget(3, None) + ["--train.progress", "false", "--train.micro_batch_size", "4",
                                                    "--train.eval_every", "0", "--train.device", "cpu"]
    align_demo.run_method("reward", base, tmp_path / "pairs.jsonl", tmp_path / "rm", overrides)
    assert chat_demo.trained_steps(tmp_path / "rm") == 3
