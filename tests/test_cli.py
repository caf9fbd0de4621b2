"""End to end through the `lmforge` command: prepare -> train -> generate -> eval, and the one-line
errors a user sees (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def lmforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"play{i}.txt").write_text(TEXT.replace("Citizen", f"Citizen{i}"), encoding="utf-8")
    prep = lmforge("prepare", str(corpus), "--out", str(root / "data"), "--vocab-size", "300", "--quiet")
    assert prep.returncode == 0, prep.stderr
    train = lmforge("train", "--data", str(root / "data"), "--out", str(root / "run"), "--model.preset", "tiny",
                    "--train.max_steps", "30", "--train.seq_len", "64", "--train.micro_batch_size", "4",
                    "--train.eval_every", "15", "--train.ckpt_every", "15", "--train.lr", "3e-3",
                    "--train.warmup_steps", "3", "--train.progress", "false")
    assert train.returncode == 0, train.stderr
    return root, prep, train


def test_prepare_train_generate_eval(pipeline):
    root, prep, train = pipeline
    assert prep.stdout.startswith(f"prepared {root / 'data'} (vocab 300, uint16)")
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 30
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "tokens", "tok_per_s"} <= set(train_rows[0])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0  # it learned the repeated text
    assert [r["step"] for r in rows if "val_bpb" in r] == [15, 30]
    assert (root / "run" / "loss.png").stat().st_size > 1000

    gen = lmforge("generate", "--ckpt", str(root / "run"), "--prompt", "First", "--max-new-tokens", "20",
                  "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("First") and len(gen.stdout) > len("First\n")
    again = lmforge("generate", "--ckpt", str(root / "run"), "--prompt", "First", "--max-new-tokens", "20",
                    "--temperature", "0", "--stream")
    assert again.stdout == gen.stdout  # streaming prints the same text, piece by piece

    ev = lmforge("eval", "--ckpt", str(root / "run"), "--data", str(root / "data"))
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    # a progress bar of the scored batches (8 windows each) on stderr
    batches = -(-result["windows"] // 8)
    assert re.search(rf"(?:^|[\r\n])eval: 100%\|[^|]*\| {batches}/{batches} \[", ev.stderr), ev.stderr
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)


def test_sampling_is_reproducible_with_a_seed(pipeline):
    root = pipeline[0]
    args = ("generate", "--ckpt", str(root / "run"), "--prompt", "All:", "--max-new-tokens", "15", "--top-k", "20",
            "--top-p", "0.9", "--temperature", "1.2")
    a = lmforge(*args, "--seed", "3").stdout
    b = lmforge(*args, "--seed", "3").stdout
    c = lmforge(*args, "--seed", "4", "--num-samples", "2").stdout
    assert a == b
    assert c.count("--- sample") == 2


@pytest.mark.parametrize("args, message", [
    (["prepare", "nowhere/*.txt", "--out", "{tmp}/d"], "error: glob 'nowhere/*.txt' matched no files"),
    (["train", "--data", "{tmp}/missing", "--out", "{tmp}/r"], "error: prepared data directory not found: {tmp}/missing"),
    (["train", "--data", "{root}/data", "--out", "{tmp}/r", "--train.lrr", "1"],
     "error: unknown config key 'train.lrr' (did you mean 'lr'?)"),
    (["train", "--data", "{root}/data", "--out", "{tmp}/r", "--train.max_steps", "ten"],
     "error: config key 'train.max_steps' must be an integer, got 'ten'"),
    (["train", "--data", "{root}/data", "--out", "{root}/run"], "error: {root}/run already holds a training run"),
    (["generate", "--ckpt", "{tmp}/nope", "--prompt", "x"], "error: checkpoint not found: {tmp}/nope"),
    (["generate", "--ckpt", "{root}/run", "--prompt", "x" * 400],
     "error: prompt has 400 tokens but the model's context is 128"),
    (["eval", "--ckpt", "{tmp}/nope", "--data", "{root}/data"], "error: checkpoint not found: {tmp}/nope"),
    (["convert", "--from-hf", "{tmp}", "--out", "{tmp}/o"], "error: "),
    (["info", "{root}/run", "--preset", "tiny"],
     "error: lmforge info describes a MODEL (run or model directory) or a --preset, not both"),
    (["info", "{tmp}/nope"], "error: checkpoint not found: {tmp}/nope"),
])
def test_user_errors_are_one_line_with_exit_2(pipeline, tmp_path, args, message):
    root = pipeline[0]
    fill = {"tmp": str(tmp_path), "root": str(root)}
    result = lmforge(*[a.format(**fill) for a in args])
    assert result.returncode == 2
    assert result.stderr.startswith(message.format(**fill)), result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [result.stderr.splitlines()[-1]]


def test_info_describes_the_model_a_run_trained(pipeline):
    from lmforge.models.decoder import config_from_preset

    root = pipeline[0]
    cfg = config_from_preset("tiny", vocab_size=300)
    n = cfg.num_params()
    summary = f"a decoder of {n:,} parameters ({n / 1e6:,.2f}M): preset tiny as it is."
    info = lmforge("info", str(root / "run"))
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert lines[:3] == [f"model                  {root / 'run' / 'checkpoints' / 'step_00000030'} (decoder)",
                         f"what                   {summary}",
                         f"parameters             {n:,}  ({n / 1e6:,.2f}M; non-embedding {cfg.num_params(non_embedding=True):,})"]
    # config.yaml says the same above the config
    assert (root / "run" / "config.yaml").read_text().replace("\n# ", " ").startswith(f"# What this run trains: {summary}")
    as_json = json.loads(lmforge("info", str(root / "run"), "--json").stdout)
    assert (as_json["family"], as_json["params"], as_json["summary"]) == ("decoder", n, summary)


def test_corrupt_checkpoint_is_named(pipeline, tmp_path):
    import shutil

    root = pipeline[0]
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    weights = run / "checkpoints" / latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = lmforge("generate", "--ckpt", str(run), "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: checkpoint file {weights} is truncated or corrupt")
