"""Every `lmforge finetune` method on a CUDA device against the same run on the CPU (fp32).

Skipped where no CUDA device is present (CI); run on a GPU machine with `make test-cuda`
(LMFORGE_TEST_CUDA=1: tests/conftest.py hides CUDA from the rest of the suite, a CPU reference).
The CPU paths of the same code are covered by each method's own tests. A run is deterministic given
its seed on one device; across devices the fp32 kernels differ in summation order only, so logged
losses agree to ~1e-5 relative, and greedy rollouts (PPO at temperature 0) are the same tokens.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from sft_fixtures import make_base, task_rows, write_jsonl
from test_alignment_pref import base  # noqa: F401  (tiny decoder + 40 preference pairs)
from test_alignment_rl import fx  # noqa: F401  (tiny decoder + 30 RL prompts + reward functions rw.py)
from test_encoder_classify import base_encoder, make_rows  # noqa: F401
from test_seq2seq_finetune import files  # noqa: F401

DEV = os.environ.get("LMFORGE_TEST_DEVICE", "cuda")  # "cpu" checks this file's own logic without a GPU
pytestmark = pytest.mark.skipif(
    DEV == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device on this machine" if os.environ.get("LMFORGE_TEST_CUDA") == "1"
    else "the suite hides CUDA; on a GPU machine run make test-cuda")

COMMON = {"train": {"max_steps": 3, "log_every": 1, "progress": False, "dtype": "float32", "warmup_steps": 1,
                    "ckpt_every": 1000, "micro_batch_size": 4, "lr": 1e-3}}


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _on_both(method, base_dir, data, tmp_path, config=None, **kw) -> tuple[list[dict], list[dict]]:
    from lmforge.finetune.api import finetune

    got = []
    for i, dev in enumerate(("cpu", DEV)):  # run directories by position: DEV may be "cpu" too
        cfg = {**COMMON, "train": {**COMMON["train"], "device": dev, **(config or {}).get("train", {})},
               **{k: v for k, v in (config or {}).items() if k != "train"}}
        finetune(method, base_dir, data, tmp_path / f"run{i}", config=cfg, **kw)
        got.append(_rows(tmp_path / f"run{i}"))
    return got[0], got[1]


def _same_losses(cpu: list[dict], gpu: list[dict], keys=("loss",), rel=1e-4) -> None:
    assert len(cpu) == len(gpu) == COMMON["train"]["max_steps"]
    for a, b in zip(cpu, gpu):
        for k in keys:
            assert math.isfinite(b[k]) and b[k] == pytest.approx(a[k], rel=rel, abs=1e-6), (k, a[k], b[k])


def test_sft_cuda_equals_cpu(tmp_path):
    root = tmp_path / "fx"
    base_dir = make_base(root)
    data = write_jsonl(root / "train.jsonl", task_rows(60, seed=1))
    cpu, gpu = _on_both("sft", base_dir, data, tmp_path, {"train": {"seq_len": 64}})
    _same_losses(cpu, gpu)


@pytest.mark.parametrize("method,keys", [("reward", ("loss", "accuracy")),
                                         ("dpo", ("loss", "rewards/margins", "logps/chosen"))])
def test_preference_methods_cuda_equal_cpu(base, tmp_path, method, keys):  # noqa: F811
    cpu, gpu = _on_both(method, base / "base", base / "pairs.jsonl", tmp_path)
    _same_losses(cpu, gpu, keys)
    if method == "dpo":
        assert cpu[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 1


def test_ppo_greedy_rollouts_cuda_equal_cpu(fx, tmp_path):  # noqa: F811
    """Greedy rollouts make PPO's whole step (rollout, GAE, clipped losses, value head) comparable."""
    cpu, gpu = _on_both("ppo", fx / "base", fx / "prompts.jsonl", tmp_path,
                        {"ppo": {"temperature": 0.0, "max_new_tokens": 6}}, reward=[f"{fx / 'rw.py'}:short"])
    _same_losses(cpu, gpu, ("loss", "objective/scores", "loss/value"))
    assert gpu[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6) and gpu[0]["policy/approxkl"] == pytest.approx(0.0, abs=1e-6)


def test_grpo_samples_and_trains_on_cuda_in_bf16(fx, tmp_path):  # noqa: F811
    """Sampled rollouts use the device's generator, so only invariants are compared; bf16 autocast."""
    from lmforge.finetune.api import finetune

    cfg = {"train": {**COMMON["train"], "device": DEV, "dtype": "bfloat16"},
           "grpo": {"num_generations": 4, "max_new_tokens": 6}}
    finetune("grpo", fx / "base", fx / "prompts.jsonl", tmp_path / "g", config=cfg, reward=[f"{fx / 'rw.py'}:short"])
    rows = _rows(tmp_path / "g")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["completion_length"] > 0 and rows[0]["rollout_tok_per_s"] > 0
    from lmforge.infer.llm import LLM

    llm = LLM.load(tmp_path / "g", device=DEV)
    assert next(llm.model.parameters()).device.type == DEV and isinstance(llm.generate("1+2=", max_new_tokens=4), str)


def test_classify_cuda_equals_cpu(base_encoder, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "t.jsonl", make_rows(64, 1))
    cpu, gpu = _on_both("classify", base_encoder, data, tmp_path)
    _same_losses(cpu, gpu)


def test_seq2seq_cuda_equals_cpu(files, tmp_path):  # noqa: F811
    cpu, gpu = _on_both("seq2seq", files / "t5", files / "train.jsonl", tmp_path,
                        {"generate": {"max_examples": 2, "max_new_tokens": 8}})
    _same_losses(cpu, gpu)


def test_bf16_first_step_is_on_policy_on_cuda(base, fx, tmp_path):  # noqa: F811
    """bf16 autocast (the default on CUDA): DPO's reference pass and PPO's old log-probs run in bf16
    on the GPU too, so step 1 is ln 2 and ratio 1 up to the kernels' summation order."""
    from lmforge.finetune.api import finetune

    cfg = {"train": {**COMMON["train"], "device": DEV, "dtype": "bfloat16", "max_steps": 1}}
    finetune("dpo", base / "base", base / "pairs.jsonl", tmp_path / "d", config=cfg)
    dpo_first = _rows(tmp_path / "d")[0]
    finetune("ppo", fx / "base", fx / "prompts.jsonl", tmp_path / "p", config={**cfg, "ppo": {"max_new_tokens": 6}},
             reward=[f"{fx / 'rw.py'}:short"])
    ppo_first = _rows(tmp_path / "p")[0]
    print(json.dumps({"dpo_step1_minus_ln2": dpo_first["loss"] - math.log(2),
                      "ppo_step1_ratio_minus_1": ppo_first["policy/ratio"] - 1.0,
                      "ppo_step1_approxkl": ppo_first["policy/approxkl"]}))
    assert dpo_first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert ppo_first["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and ppo_first["objective/kl"] == 0.0


def test_llm_load_on_cuda_runs_there_and_agrees_with_the_cpu(tmp_path):
    """LLM.load(path, device): an lmforge model directory, a BERT folder and a T5 folder land on the
    device (their weights were once left on the CPU) and give the CPU's greedy tokens / embeddings."""
    transformers = pytest.importorskip("transformers")
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
        cpu, gpu = LLM.load(path), LLM.load(path, device=DEV)
        assert {t.device.type for t in gpu.model.parameters()} == {DEV}, path
        a, b = run(cpu), run(gpu)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        else:
            assert a == b and len(a) > 0, path
