"""`LLM.score`, `lmforge score` and `lmforge finetune dpo` from the command line."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import write_model_dir
from lmforge.models.registry import load_model_dir
from lmforge.models.heads import DecoderClassifier
from test_alignment_pref import base  # noqa: F401  (the tiny base model + pairs fixture)


def test_llm_score_and_cli(base, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.infer.llm import LLM

    model, _, _ = load_model_dir(base / "base")
    torch.manual_seed(0)
    write_model_dir(tmp_path / "rm", DecoderClassifier.from_decoder(model), base / "tok.json")
    llm = LLM.load(tmp_path / "rm")
    one = llm.score("1+2=", "3")
    two = llm.score("1+2=", ["3", "45"])
    assert isinstance(one, float) and two[0] == pytest.approx(one, abs=1e-6) and two[1] != two[0]
    # the score reads the EOS that closes the reply: the same as the head on prompt + reply + EOS alone
    tok = llm.tokenizer
    ids = torch.tensor([tok.encode("1+2=") + tok.encode("3") + [tok.eos_id]])
    assert llm.model(ids)[0, 0].item() == pytest.approx(one, abs=1e-6)
    assert main(["score", "--ckpt", str(tmp_path / "rm"), "--prompt", "1+2=", "--completion", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(one, abs=1e-6)
    assert main(["score", "--ckpt", str(tmp_path / "rm"), "--file", str(base / "pairs.jsonl")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["pairs"] == 40 and 0.0 <= last["pair_accuracy"] <= 1.0
    assert main(["score", "--ckpt", str(base / "base"), "--prompt", "a", "--completion", "b"]) == 2
    assert "error: score needs a reward model" in capsys.readouterr().err


def test_finetune_cli_dpo_and_bad_data(base, tmp_path, capsys):
    from lmforge.cli import main

    rc = main(["finetune", "dpo", "--base", str(base / "base"), "--data", str(base / "pairs.jsonl"), "--out",
               str(tmp_path / "run"), "--train.max_steps", "1", "--train.progress", "false", "--dpo.beta", "0.2"])
    assert rc == 0 and (tmp_path / "run" / "reference_logps.safetensors").is_file()
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    rc = main(["finetune", "dpo", "--base", str(base / "base"), "--data", str(bad), "--out", str(tmp_path / "r2")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad}:2: a preference pair needs 'chosen' and 'rejected' "
                                                "(and optionally 'prompt'); found keys: chosen, prompt")


def test_python_api_finetune(base, tmp_path):
    from lmforge.finetune.api import finetune

    s = finetune("reward", base / "base", base / "pairs.jsonl", tmp_path / "rm",
                 config={"train": {"max_steps": 2, "progress": False}, "reward.center_coef": 0.01})
    assert s["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in rows[0]
    from lmforge.infer.llm import LLM

    assert isinstance(LLM.load(tmp_path / "rm").score("1+2=", "3"), float)
