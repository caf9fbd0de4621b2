"""GRPO and PPO through the one loop: rollouts, first-minibatch invariants, exact resume, reward errors."""

from __future__ import annotations

import json
import random
import struct
import types
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_tensors, write_model_dir
from lmforge.models.registry import load_model_dir
from lmforge.errors import LMForgeError
from lmforge.finetune import rl as R
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.tokenizer import Tokenizer

ALPHA = "abcdefghijklmnopqrstuvwxyz0123456789 +-=?:"
REWARDS = '''
def exact(prompts, completions, answer, **kw):
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]
def short(prompts, completions, **kw):
    return [-0.1 * len(c) for c in completions]
def boom(prompts, completions, **kw):
    return [1.0 / (len(c) - len(c)) if p.startswith("3+") else 0.0 for p, c in zip(prompts, completions)]
def wrong_len(prompts, completions, **kw):
    return [0.0]
def nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)
def broken(prompts, completions, **kw):
    raise KeyError("answer")
'''


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("rl")
    tok = Tokenizer.train_char([ALPHA])
    tok.save(d / "tok.json")
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    write_model_dir(d / "base", m, d / "tok.json")
    rng = random.Random(1)
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(30):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n")
    (d / "rw.py").write_text(REWARDS)
    return d


def _args(fx, out, reward=("exact", "short"), weights=(1.0, 0.5), **kw):
    a = dict(base=str(fx / "base"), data=str(fx / "prompts.jsonl"), out=str(out), val_data=None, val_fraction=None,
             config=None, recipe=None, resume=None, overwrite=False,
             reward=[f"{fx / 'rw.py'}:{r}" for r in reward], reward_weights=list(weights) if weights else None)
    return types.SimpleNamespace(**{**a, **kw})


COMMON = ["--train.lr", "3e-3", "--train.micro_batch_size", "4", "--train.log_every", "1", "--train.progress",
          "false", "--train.ckpt_every", "1", "--train.keep_checkpoints", "0", "--train.warmup_steps", "1"]


def _train(method, args, ov):
    from lmforge.finetune.scaffold import prepare
    from lmforge.train.loop import train_job

    job, cfg = prepare(method, args, ov)
    return train_job(job, cfg.train, args.out, resume=args.resume)


def _rows(run):
    return [json.loads(line) for line in open(Path(run) / "metrics.jsonl") if '"loss"' in line]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_grpo_trains_logs_and_resumes_exactly_mid_rollout(fx, tmp_path):
    ov = COMMON + ["--train.max_steps", "4", "--grpo.num_generations", "4", "--grpo.max_new_tokens", "5",
                   "--grpo.beta", "0.1", "--grpo.epochs", "2"]
    run = tmp_path / "g"
    _train("grpo", _args(fx, run), ov)
    rows = _rows(run)
    # first minibatch of a rollout: the policy is the one that sampled: ratio 1, no clipping, KL 0
    assert rows[0]["clip_ratio"] == 0.0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-6)  # group advantages sum to zero, ratio 1
    for r in rows:  # the logged statistics agree with one another
        weighted = r["rewards/exact/mean"] + 0.5 * r["rewards/short/mean"]  # --reward-weights 1.0 0.5
        assert r["reward"] == pytest.approx(weighted, abs=1e-6)
        assert r["clip_ratio"] == pytest.approx(r["clip_ratio/low"] + r["clip_ratio/high"], abs=1e-6)
        assert 0 < r["completion_length"] <= 5 and 0 <= r["frac_reward_zero_std"] <= 1  # max_new_tokens 5
        assert r["reward_std"] >= 0 and r["rewards/exact/std"] >= 0
    # two epochs per rollout: steps 1-2 and 3-4 report the same rollout
    assert [r["reward"] for r in rows[::2]] == [r["reward"] for r in rows[1::2]]
    assert [r["completion_length"] for r in rows[::2]] == [r["completion_length"] for r in rows[1::2]]
    assert rows[1]["kl"] > 0  # the second epoch on the same rollout sees a moved policy
    # loss.png (drawn at checkpoints: GRPO has no validation) shows the loss, then reward, KL and reply length
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (700, 1200)  # 4 panels
    _assert_rl_panels(run, R.GRPOObjective.loss_label, "kl")
    # resume from step 3 = in the middle of the second rollout (2 steps per rollout): same weights at 4
    resumed = tmp_path / "g2"
    _train("grpo", _args(fx, resumed, resume=str(run / "checkpoints" / "step_00000003")), ov)
    assert _same_weights(run / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    assert _rows(resumed)[-1]["loss"] == rows[-1]["loss"]


def test_ppo_first_minibatch_kl_zero_ratio_one_and_resume(fx, tmp_path):
    ov = COMMON + ["--train.max_steps", "4", "--ppo.max_new_tokens", "5", "--ppo.epochs", "2",
                   "--ppo.kl_estimator", "k3", "--ppo.target_kl", "0.01", "--ppo.missing_eos_penalty", "1.0"]
    run = tmp_path / "p"
    _train("ppo", _args(fx, run), ov)
    rows = _rows(run)
    first = rows[0]
    assert first["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/approxkl"] == pytest.approx(0.0, abs=1e-10) and first["policy/clipfrac"] == 0.0
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first rollout
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"], abs=1e-6)
    for key in ("objective/entropy", "loss/policy", "loss/value", "val/clipfrac", "completion_length"):
        assert key in first
    assert rows[2]["objective/kl"] != 0.0  # second rollout: the policy has moved away from the reference
    assert rows[2]["objective/kl_coef"] != rows[0]["objective/kl_coef"]  # adaptive controller moved
    _assert_rl_panels(run, R.PPOObjective.loss_label, "objective/kl")
    model, cfg, _ = load_model_dir(run)
    assert type(model).__name__ == "DecoderWithValueHead"
    resumed = tmp_path / "p2"
    _train("ppo", _args(fx, resumed, resume=str(run / "checkpoints" / "step_00000003")), ov)
    assert _same_weights(run / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")


def _assert_rl_panels(run: Path, loss_label: str, kl_key: str) -> None:
    from lmforge.train.metrics import loss_figure, read_rows

    rows = read_rows(run / "metrics.jsonl")
    fig = loss_figure(rows, loss_label, panels=R.RL_PANELS)
    assert [ax.get_ylabel() for ax in fig.axes] == [loss_label, "reward (mean per completion)", "KL to the reference",
                                                     "reply length (tokens)"]
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes[1:]] == \
        [["reward"], [kl_key], ["completion_length"]]
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [r["completion_length"] for r in rows if "loss" in r]


def test_reward_function_error_prints_on_its_own_line_after_the_progress_bar(fx, tmp_path, capsys):
    from lmforge.cli import main

    rc = main(["finetune", "grpo", "--base", str(fx / "base"), "--data", str(fx / "prompts.jsonl"),
               "--out", str(tmp_path / "run"), "--reward", f"{fx / 'rw.py'}:broken", "--train.max_steps", "2",
               "--train.micro_batch_size", "4", "--grpo.num_generations", "2", "--grpo.max_new_tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "train:" in err  # the bar was drawn
    lines = err.split("\n")
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and error[0].startswith("error: reward function broken raised KeyError: 'answer' on example "
                                                   f"{fx / 'prompts.jsonl'}:"), err
    assert lines[lines.index(error[0]) - 1].startswith("\rtrain:")  # the bar's line ended before the message


def test_ppo_last_token_rewards():
    from lmforge.finetune.ppo import last_token_rewards

    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    out = last_token_rewards(torch.tensor([2.0, 5.0, -1.0]), mask)
    assert out.tolist() == [[0, 0, 2.0, 0], [0, 0, 0, 0], [0, 0, 0, -1.0]]


def test_reward_function_errors_name_function_and_example(fx):
    fns = R.load_rewards([f"{fx / 'rw.py'}:exact"], None, 50)
    total, per = R.compute_rewards(fns, ["1+1=", "2+2="], ["2", "5"], {"answer": [2, 4]}, ["f:1", "f:2"])
    assert total.tolist() == [1.0, 0.0]

    def err(name):
        fns = R.load_rewards([f"{fx / 'rw.py'}:{name}"], None, 50)
        with pytest.raises(LMForgeError) as e:
            R.compute_rewards(fns, ["1+1=", "3+1="], ["2", "4"], {"answer": [2, 4]}, ["p.jsonl:1", "p.jsonl:2"])
        return str(e.value)

    assert err("boom") == ("reward function boom raised ZeroDivisionError: float division by zero on example "
                           "p.jsonl:2 (prompt '3+1=', completion '4')")
    assert err("wrong_len").startswith("reward function wrong_len returned 1 values for 2 completions")
    assert err("nan") == "reward function nan returned nan for example p.jsonl:1 (prompt '1+1=', completion '2')"
    with pytest.raises(LMForgeError, match="has no function 'missing'"):
        R.load_rewards([f"{fx / 'rw.py'}:missing"], None, 50)
    with pytest.raises(LMForgeError, match="--reward-weights has 1 values for 2 --reward functions"):
        R.load_rewards([f"{fx / 'rw.py'}:exact", f"{fx / 'rw.py'}:short"], [1.0], 50)


def test_grpo_with_reward_model_directory(fx, tmp_path):
    from lmforge.models.heads import DecoderClassifier

    base, _, _ = load_model_dir(fx / "base")
    torch.manual_seed(3)
    write_model_dir(tmp_path / "rm", DecoderClassifier.from_decoder(base))
    args = _args(fx, tmp_path / "g", reward=(), weights=None)
    args.reward = [str(tmp_path / "rm")]
    _train("grpo", args, COMMON + ["--train.max_steps", "1", "--grpo.num_generations", "4", "--grpo.max_new_tokens", "4"])
    row = _rows(tmp_path / "g")[0]
    assert row["rewards/reward_model:rm/std"] > 0 and row["frac_reward_zero_std"] == 0.0


DDP_RUNNER = '''
import os, sys, types
from lmforge.finetune.scaffold import run
out, resume, rw = sys.argv[1], (sys.argv[2] or None), sys.argv[3]
args = types.SimpleNamespace(base=sys.argv[4], data=sys.argv[5], out=out, val_data=None, val_fraction=None, config=None,
                             recipe=None, resume=resume, overwrite=False, reward=[rw + ":exact"], reward_weights=None,
                             ptx_data=os.environ.get("PTX_DATA"))
run("grpo", args, sys.argv[6:])
'''


def test_grpo_ddp_shards_rollouts_and_resumes_exactly(fx, tmp_path):
    """torchrun, 2 processes: each rank samples its own prompts; rank 0's checkpoint written in the
    middle of a rollout block holds every rank's buffer, and each resumed rank takes its own. With
    the ptx term (two forward passes before one backward under DDP)."""
    import os
    import subprocess
    import sys

    from train_fixtures import REPO

    runner = tmp_path / "runner.py"
    runner.write_text(DDP_RUNNER)
    ov = COMMON + ["--train.max_steps", "4", "--grpo.num_generations", "2", "--grpo.max_new_tokens", "4",
                   "--grpo.epochs", "2", "--train.micro_batch_size", "2", "--grpo.ptx_coef", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PTX_DATA=str(_ptx_data(fx, tmp_path)))

    def launch(out, resume=""):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(runner),
               str(out), resume, str(fx / "rw.py"), str(fx / "base"), str(fx / "prompts.jsonl"), *ov]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]

    launch(tmp_path / "a")
    st = load_tensors(tmp_path / "a" / "checkpoints" / "step_00000003" / "train_state.safetensors")
    r0, r1 = st["batches.r0.ids"], st["batches.r1.ids"]
    assert not (r0.shape == r1.shape and torch.equal(r0, r1))  # the ranks rolled out different prompts
    assert all(r["loss/ptx"] > 0 for r in _rows(tmp_path / "a"))
    # a resumed rank 1 takes rank 1's buffer from rank 0's checkpoint
    src = R.RolloutSource([], [], None, [], R.RolloutSpec(group_size=2), 2, 1, 0, 1, 2, lambda b: b, 0, 0)
    src.load_state_dict({k[len("batches."):]: v for k, v in st.items() if k.startswith("batches.")})
    assert torch.equal(src.buffer["ids"], r1) and src.buffer_id == 1
    with pytest.raises(LMForgeError, match="resume with the same number of processes"):
        R.RolloutSource([], [], None, [], R.RolloutSpec(group_size=2), 2, 1, 0, 2, 3, lambda b: b, 0, 0).load_state_dict(
            {k[len("batches."):]: v for k, v in st.items() if k.startswith("batches.")})


def test_prompt_that_leaves_no_room_to_generate(fx, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=" * 8, "answer": 2}) + "\n")  # 32 tokens = the whole context
    with pytest.raises(LMForgeError, match="a prompt of 32 tokens leaves no room to generate in the model's "
                                           "context of 32"):
        _train("grpo", _args(fx, tmp_path / "g", data=str(data)), COMMON + ["--train.max_steps", "1",
                                                                          "--grpo.num_generations", "2"])


def _ptx_data(fx, tmp_path):
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as f:
        for a in range(5):
            for b in range(5):
                f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
    return data


def test_grpo_ptx_adds_the_sft_loss_of_its_rows(fx, tmp_path):
    """InstructGPT's PPO-ptx: loss = RL loss + ptx_coef x SFT loss on the ptx rows of that step. At the
    first minibatch the GRPO term is 0 (ratio 1, group advantages sum to zero), so the logged loss is
    exactly ptx_coef x the SFT loss of the base model on the first packed rows."""
    from lmforge.data.chat import read_examples
    from lmforge.finetune.sft import PackedRows, SFTObjective, render_examples

    data = _ptx_data(fx, tmp_path)
    ov = COMMON + ["--train.max_steps", "2", "--grpo.num_generations", "4", "--grpo.max_new_tokens", "5",
                   "--grpo.ptx_coef", "0.5", "--grpo.ptx_micro_batch_size", "3"]
    run = tmp_path / "g"
    _train("grpo", _args(fx, run, ptx_data=str(data)), ov)
    rows = _rows(run)
    from lmforge.infer.llm import LLM

    base = LLM.load(fx / "base")  # what the run starts from (model and tokenizer)
    model, tok = base.model, base.tokenizer
    ptx_rows = PackedRows(render_examples(read_examples(data), tok, "completion", 32, "truncate"), 32, 3, 1,
                          1337 + 1, True, 0)
    with torch.no_grad():
        expected = float(SFTObjective()(model.train(), ptx_rows.micro_batch(0, 0))[0])
    assert rows[0]["loss/ptx"] == pytest.approx(expected, rel=1e-5)
    assert rows[0]["loss"] == pytest.approx(0.5 * expected, rel=1e-5, abs=1e-6)
    weighted = rows[0]["rewards/exact/mean"] + 0.5 * rows[0]["rewards/short/mean"]  # --reward-weights 1.0 0.5
    assert rows[0]["reward"] == pytest.approx(weighted, abs=1e-6)
    assert rows[1]["loss/ptx"] != rows[0]["loss/ptx"]  # the next step reads the next rows
    with pytest.raises(LMForgeError, match=r"--ptx-data needs grpo.ptx_coef > 0, got 0.0"):
        _train("grpo", _args(fx, tmp_path / "z", ptx_data=str(data)), ov + ["--grpo.ptx_coef", "0"])


def test_ppo_ptx_resumes_exactly_mid_rollout(fx, tmp_path):
    data = _ptx_data(fx, tmp_path)
    ov = COMMON + ["--train.max_steps", "4", "--ppo.max_new_tokens", "5", "--ppo.epochs", "2", "--ppo.ptx_coef", "1.0"]
    run = tmp_path / "p"
    _train("ppo", _args(fx, run, ptx_data=str(data)), ov)
    for r in _rows(run):  # PPO's loss (policy + vf_coef 0.1 x value) plus ptx_coef 1.0 x the SFT loss
        parts = r["loss/policy"] + 0.1 * r["loss/value"] + 1.0 * r["loss/ptx"]
        assert r["loss"] == pytest.approx(parts, rel=1e-5, abs=1e-6)
    resumed = tmp_path / "p2"
    _train("ppo", _args(fx, resumed, ptx_data=str(data), resume=str(run / "checkpoints" / "step_00000003")), ov)
    assert _same_weights(run / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")


def test_bf16_training_computes_rollout_logps_in_bf16_too(fx, tmp_path):
    """Under bf16 autocast the old and reference log-probs come from the same bf16 forward as the
    update, so the first minibatch is exactly on-policy (they were fp32 once: ratio 1.00003)."""
    bf16 = COMMON + ["--train.max_steps", "1", "--train.dtype", "bfloat16"]
    _train("ppo", _args(fx, tmp_path / "p"), bf16 + ["--ppo.max_new_tokens", "5"])
    first = _rows(tmp_path / "p")[0]
    assert first["policy/ratio"] == 1.0 and first["policy/approxkl"] == 0.0 and first["objective/kl"] == 0.0
    _train("grpo", _args(fx, tmp_path / "g"), bf16 + ["--grpo.num_generations", "4", "--grpo.max_new_tokens", "5",
                                                    "--grpo.beta", "0.1"])
    first = _rows(tmp_path / "g")[0]
    assert first["kl"] == 0.0 and first["loss"] == pytest.approx(0.0, abs=1e-6)
