"""Every `lmforge finetune` method on a CUDA device against the same run on the CPU (fp32).

Each test runs twice, with the device under test `dev` = "cpu" and "cuda". The "cpu" case runs in
`make test` and checks this file's comparisons, demanding bit-equal runs (a run is deterministic
given its seed on one device). The "cuda" case is skipped where no CUDA device is present (CI: the
suite hides CUDA unless LMFORGE_TEST_CUDA=1, tests/conftest.py) and fails instead with
LMFORGE_REQUIRE_GPU=1; `make test-cuda` sets both. The CPU paths of the same code are covered by each
method's own tests. Across devices the fp32 kernels differ in summation order only, so logged losses
agree to ~1e-5 relative, and greedy rollouts (PPO at temperature 0) are the same tokens.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from reference_libs import reference_lib
from sft_fixtures import make_base, task_rows, write_jsonl
from test_alignment_pref import base  # noqa: F401  (tiny decoder + 40 preference pairs)
from test_alignment_rl import fx  # noqa: F401  (tiny decoder + 30 RL prompts + reward functions rw.py)
from test_encoder_classify import base_encoder, make_rows  # noqa: F401
from test_seq2seq_finetune import files  # noqa: F401


def cuda_missing_reason() -> str | None:
    """Why CUDA cannot be tested here, or None when it can."""
    if torch.cuda.is_available():
        return None
    if os.environ.get("LMFORGE_TEST_CUDA") != "1":
        return "the suite hides CUDA (tests/conftest.py); on a GPU machine run make test-cuda"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build; install a CUDA build, e.g. "
                "make TORCH_SPEC=\"torch --index-url https://download.pytorch.org/whl/cu124\"")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"


@pytest.fixture(params=["cpu", "cuda"])
def dev(request) -> str:
    """The device under test, compared with the CPU."""
    if request.param == "cuda" and (reason := cuda_missing_reason()) is not None:
        if os.environ.get("LMFORGE_REQUIRE_GPU") == "1":
            pytest.fail(f"LMFORGE_REQUIRE_GPU=1 but CUDA cannot be tested: {reason}", pytrace=False)
        pytest.skip(reason)
    return request.param


COMMON = {"train": {"max_steps": 3, "log_every": 1, "progress": False, "dtype": "float32", "warmup_steps": 1,
                    "ckpt_every": 1000, "micro_batch_size": 4, "lr": 1e-3}}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _run(method, device, base_dir, data, out, config=None, **kw) -> list[dict]:
    from lmforge.finetune.api import finetune

    cfg = {**COMMON, "train": {**COMMON["train"], "device": device, **(config or {}).get("train", {})},
           **{k: v for k, v in (config or {}).items() if k != "train"}}
    finetune(method, base_dir, data, out, config=cfg, **kw)
    return _rows(out)


def _on_both(dev, method, base_dir, data, tmp_path, config=None, **kw) -> tuple[list[dict], list[dict]]:
    """The logged rows of the CPU run and of the same run on `dev` (run directories by position: dev
    may be "cpu" too)."""
    return tuple(_run(method, d, base_dir, data, tmp_path / f"run{i}", config, **kw)
                 for i, d in enumerate(("cpu", dev)))


def _same_losses(dev, cpu: list[dict], got: list[dict], keys=("loss",)) -> None:
    """Step for step: equal on the CPU, within 1e-4 relative across devices (fp32 summation order)."""
    assert len(cpu) == len(got) == COMMON["train"]["max_steps"]
    for a, b in zip(cpu, got):
        for k in keys:
            want = a[k] if dev == "cpu" else pytest.approx(a[k], rel=1e-4, abs=1e-6)
            assert math.isfinite(b[k]) and b[k] == want, (k, a[k], b[k])


def test_sft_cuda_equals_cpu(dev, tmp_path):
    root = tmp_path / "fx"
    base_dir = make_base(root)
    data = write_jsonl(root / "train.jsonl", task_rows(60, seed=1))
    cpu, got = _on_both(dev, "sft", base_dir, data, tmp_path, {"train": {"seq_len": 64}})
    _same_losses(dev, cpu, got)


@pytest.mark.parametrize("method,keys", [("reward", ("loss", "accuracy")),
                                         ("dpo", ("loss", "rewards/margins", "logps/chosen"))])
def test_preference_methods_cuda_equal_cpu(dev, base, tmp_path, method, keys):  # noqa: F811
    cpu, got = _on_both(dev, method, base / "base", base / "pairs.jsonl", tmp_path)
    _same_losses(dev, cpu, got, keys)
    if method == "dpo":
        assert cpu[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 1


def test_ppo_greedy_rollouts_cuda_equal_cpu(dev, fx, tmp_path):  # noqa: F811
    """Greedy rollouts make PPO's whole step (rollout, GAE, clipped losses, value head) comparable."""
    cpu, got = _on_both(dev, "ppo", fx / "base", fx / "prompts.jsonl", tmp_path,
                        {"ppo": {"temperature": 0.0, "max_new_tokens": 6}}, reward=[f"{fx / 'rw.py'}:short"])
    _same_losses(dev, cpu, got, ("loss", "objective/scores", "loss/value"))
    assert got[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6) and got[0]["policy/approxkl"] == pytest.approx(0.0, abs=1e-6)


class ReplayedRollouts:
    """Stands in for lmforge.infer.generate.generate: the first run samples for real and is recorded,
    the second gets the same completions back (for the same prompts, call by call)."""

    def __init__(self, monkeypatch):
        import lmforge.infer.generate as G

        self.sample, self.calls, self.replaying = G.generate, [], False
        monkeypatch.setattr(G, "generate", self)

    def __call__(self, model, prompts, **kw):
        if not self.replaying:
            self.calls.append(([list(p) for p in prompts], self.sample(model, prompts, **kw)))
            return self.calls[-1][1]
        want, gens = self.calls.pop(0)
        assert [list(p) for p in prompts] == want
        return gens


def test_grpo_cuda_equals_cpu_on_the_same_rollouts(dev, fx, tmp_path, monkeypatch):  # noqa: F811
    """GRPO samples G completions per prompt with the device's generator, whose stream is not the
    CPU's; so the run on `dev` samples and the CPU run replays its completions. Everything after
    sampling is compared: rewards, group advantages, old and reference log-probs, the clipped ratio
    objective with the k3 KL (beta > 0), and the update: with 2 epochs per rollout, the second step
    scores the same rollout under the moved policy (ratio != 1, KL > 0), and the second rollout is
    sampled from the updated policy."""
    replay = ReplayedRollouts(monkeypatch)
    cfg = {"train": {"max_steps": 4}, "grpo": {"num_generations": 4, "max_new_tokens": 6, "beta": 0.1, "epochs": 2}}
    reward = [f"{fx / 'rw.py'}:exact", f"{fx / 'rw.py'}:short"]
    got = _run("grpo", dev, fx / "base", fx / "prompts.jsonl", tmp_path / "dev", cfg, reward=reward)
    assert len(replay.calls) == 2  # 4 steps, 2 per rollout
    replay.replaying = True
    cpu = _run("grpo", "cpu", fx / "base", fx / "prompts.jsonl", tmp_path / "cpu", cfg, reward=reward)
    assert replay.calls == []  # every rollout was replayed
    assert len(cpu) == len(got) == 4 and got[1]["kl"] > 0
    for a, b in zip(cpu, got):
        # the same completions: the same rewards and lengths, exactly
        for k in ("reward", "reward_std", "rewards/exact/mean", "rewards/short/mean", "completion_length"):
            assert b[k] == a[k], (k, a[k], b[k])
        # |advantage| <= sqrt(G - 1) = 1.7 and fp32 log-probs differ across devices by ~1e-6 in summation
        # order, so the loss (a mean of ratio x advantage) and the KL agree to 1e-5
        for k in ("loss", "kl"):
            want = a[k] if dev == "cpu" else pytest.approx(a[k], rel=1e-4, abs=1e-5)
            assert math.isfinite(b[k]) and b[k] == want, (k, a[k], b[k])


def test_grpo_samples_and_trains_on_cuda_in_bf16(dev, fx, tmp_path):  # noqa: F811
    """Sampled rollouts on the device's generator and bf16 autocast: invariants, then the trained
    model on the device gives the CPU's greedy text and repeats a seeded sample."""
    from lmforge.infer.llm import LLM

    cfg = {"train": {"dtype": "bfloat16"}, "grpo": {"num_generations": 4, "max_new_tokens": 6}}
    rows = _run("grpo", dev, fx / "base", fx / "prompts.jsonl", tmp_path / "g", cfg, reward=[f"{fx / 'rw.py'}:short"])
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["completion_length"] > 0 and rows[0]["rollout_tok_per_s"] > 0

    llm = LLM.load(tmp_path / "g", device=dev)
    assert next(llm.model.parameters()).device.type == dev
    greedy = llm.generate("1+2=", max_new_tokens=4, temperature=0)
    assert greedy == LLM.load(tmp_path / "g").generate("1+2=", max_new_tokens=4, temperature=0)
    assert llm.generate("1+2=", max_new_tokens=4, seed=3) == llm.generate("1+2=", max_new_tokens=4, seed=3)


def test_classify_cuda_equals_cpu(dev, base_encoder, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "t.jsonl", make_rows(64, 1))
    cpu, got = _on_both(dev, "classify", base_encoder, data, tmp_path)
    _same_losses(dev, cpu, got)


def test_seq2seq_cuda_equals_cpu(dev, files, tmp_path):  # noqa: F811
    cpu, got = _on_both(dev, "seq2seq", files / "t5", files / "train.jsonl", tmp_path,
                        {"generate": {"max_examples": 2, "max_new_tokens": 8}})
    _same_losses(dev, cpu, got)


def test_bf16_first_step_is_on_policy_on_cuda(dev, base, fx, tmp_path):  # noqa: F811
    """bf16 autocast (the default on CUDA): DPO's reference pass and PPO's old log-probs run in bf16
    on the GPU too, so step 1 is ln 2 and ratio 1 up to the kernels' summation order."""
    cfg = {"train": {"dtype": "bfloat16", "max_steps": 1}}
    dpo_first = _run("dpo", dev, base / "base", base / "pairs.jsonl", tmp_path / "d", cfg)[0]
    ppo_first = _run("ppo", dev, fx / "base", fx / "prompts.jsonl", tmp_path / "p", {**cfg, "ppo": {"max_new_tokens": 6}},
                     reward=[f"{fx / 'rw.py'}:short"])[0]
    print(json.dumps({"dpo_step1_minus_ln2": dpo_first["loss"] - math.log(2),
                      "ppo_step1_ratio_minus_1": ppo_first["policy/ratio"] - 1.0,
                      "ppo_step1_approxkl": ppo_first["policy/approxkl"]}))
    assert dpo_first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert ppo_first["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and ppo_first["objective/kl"] == 0.0


def test_llm_load_on_cuda_runs_there_and_agrees_with_the_cpu(dev, tmp_path):
    """LLM.load(path, device): an lmforge model directory, a BERT folder and a T5 folder land on the
    device (their weights were once left on the CPU) and give the CPU's greedy tokens / embeddings."""
    transformers = reference_lib("transformers")
    from lmforge.checkpoint import write_model_dir
    from lmforge.infer.llm import LLM
    from lmforge.models.decoder import Decoder, config_from_preset
    from test_encoder_embed import TEXTS, hf_bert_folder
    from test_seq2seq_llm import t5_folder

    base_dir = make_base(tmp_path / "dec")
    bert = hf_bert_folder(tmp_path, transformers)
    t5_folder(tmp_path / "t5")
    torch.manual_seed(0)
    write_model_dir(tmp_path / "dec2", Decoder(config_from_preset("tiny", vocab_size=80, init_std=0.3)),
                    base_dir.parent / "tok.json")
    for path, run in ((tmp_path / "dec2", lambda m: m.generate("What is 2 + 2?", max_new_tokens=16, temperature=0)),
                      (tmp_path / "t5", lambda m: m.generate("the cat", max_new_tokens=12, temperature=0)),
                      (bert, lambda m: m.embed(TEXTS).cpu())):
        cpu, on_dev = LLM.load(path), LLM.load(path, device=dev)
        assert {t.device.type for t in on_dev.model.parameters()} == {dev}, path
        a, b = run(cpu), run(on_dev)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        else:
            assert a == b and len(a) > 0, path
