"""A model fine-tuned with `lmforge finetune seq2seq` records its format (generation_format.json:
prefix, separator) and generates targets from sources: `LLM.generate`, `lmforge generate` and the
server's /v1/completions give exactly what the fine-tune's `predict` gives; models without a
recorded format keep continuing their prompts."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import httpx
import pytest

from lmforge.errors import LMForgeError
from lmforge.finetune.seq2seq import Seq2SeqGenerateConfig, predict
from lmforge.infer.llm import LLM
from lmforge.infer.prompt import GenerationFormat
from serve_fixtures import ServerThread

WORDS = "the king and queen of a far land rode out to see what night would bring".split()
PREFIX = "modernize: "
NEW = 12  # max new tokens everywhere


def lmforge(*args: str) -> subprocess.CompletedProcess:
    """The real `lmforge` command line."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny decoder and a tiny T5, each fine-tuned a few steps on word-reversal pairs with --prefix."""
    import torch

    from lmforge.checkpoint import write_model_dir
    from lmforge.cli import main
    from lmforge.models.decoder import Decoder
    from lmforge.models.decoder import config_from_preset as decoder_preset
    from lmforge.models.seq2seq import Seq2Seq, config_from_preset
    from lmforge.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("format")
    rng = random.Random(0)

    def pair() -> dict[str, str]:
        w = rng.sample(WORDS, 3)
        return {"source": " ".join(w), "target": " ".join(reversed(w))}

    (d / "train.jsonl").write_text("\n".join(json.dumps(pair()) for _ in range(96)))
    (d / "val.jsonl").write_text("\n".join(json.dumps(pair()) for _ in range(4)))
    tok = Tokenizer.train_char([" ".join(WORDS) + ":"])
    tok.save(d / "tok.json")
    torch.manual_seed(0)
    write_model_dir(d / "gpt", Decoder(decoder_preset("tiny", vocab_size=tok.vocab_size)), tokenizer_path=d / "tok.json")
    write_model_dir(d / "t5", Seq2Seq(config_from_preset("t5-tiny", vocab_size=tok.vocab_size)),
                    tokenizer_path=d / "tok.json")
    for base in ("gpt", "t5"):
        assert main(["finetune", "seq2seq", "--base", str(d / base), "--data", str(d / "train.jsonl"), "--val-data",
                     str(d / "val.jsonl"), "--out", str(d / f"{base}-ft"), "--prefix", PREFIX,
                     "--train.max_steps", "8", "--train.eval_every", "8", "--train.micro_batch_size", "8",
                     "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.progress", "false",
                     "--generate.max_examples", "4", "--generate.max_new_tokens", str(NEW)]) == 0
    return d


def predictions(run) -> tuple[list[str], list[str]]:
    """(sources, predictions) of the fine-tune's last evaluation (made by `predict` with the final weights)."""
    rows = [json.loads(x) for x in (run / "eval_predictions.jsonl").read_text().splitlines()]
    return [r["source"] for r in rows], [r["prediction"] for r in rows]


@pytest.mark.parametrize("base, separator", [("gpt", "\n"), ("t5", "")])
def test_the_run_and_every_checkpoint_record_the_format(runs, base, separator):
    run = runs / f"{base}-ft"
    want = {"prefix": PREFIX, "separator": separator}
    assert json.loads((run / "generation_format.json").read_text()) == want
    assert json.loads((run / "checkpoints" / "step_00000008" / "generation_format.json").read_text()) == want
    llm = LLM.load(run)
    assert llm.generation_format == GenerationFormat(PREFIX, separator)
    assert llm.continues_prompt is False


@pytest.mark.parametrize("base", ["gpt", "t5"])
def test_llm_generate_returns_the_target_predict_returns(runs, base):
    run = runs / f"{base}-ft"
    sources, preds = predictions(run)
    llm = LLM.load(run)
    assert llm.generate(sources, temperature=0, max_new_tokens=NEW) == preds  # the same batch as the evaluation
    assert llm.generate(sources[0], temperature=0, max_new_tokens=NEW) == preds[0]
    # the source as the fine-tune encodes it by hand: prefix + source, then the decoder's newline or the EOS
    tok = llm.tokenizer
    if base == "gpt":
        ids = [tok.encode(PREFIX + s) + tok.encode("\n") for s in sources]
        eos, pad = tok.eos_id, tok.pad_id
    else:
        ids = [tok.encode(PREFIX + s) + [llm.model.cfg.eos_id] for s in sources]
        eos, pad = llm.model.cfg.eos_id, llm.model.cfg.pad_id
    assert predict(llm.model, tok, ids, eos, pad, Seq2SeqGenerateConfig(max_new_tokens=NEW)) == preds
    beams = predict(llm.model, tok, ids[:1], eos, pad, Seq2SeqGenerateConfig(max_new_tokens=NEW, num_beams=3))
    assert [llm.generate(sources[0], temperature=0, max_new_tokens=NEW, num_beams=3)] == beams
    # token-id prompts reach the model as they are: the format's ids give the target's ids
    new_ids = llm.generate(ids[0], temperature=0, max_new_tokens=NEW)
    assert tok.decode(new_ids, skip_special=base == "t5") == preds[0]


def test_cli_generate_prints_the_target_alone(runs):
    run = runs / "gpt-ft"
    sources, preds = predictions(run)
    done = lmforge("generate", "--ckpt", str(run), "--prompt", sources[0], "--temperature", "0",
                   "--max-new-tokens", str(NEW))
    assert (done.returncode, done.stdout, done.stderr) == (0, preds[0] + "\n", "")
    done = lmforge("generate", "--ckpt", str(run), "--prompt", sources[1], "--temperature", "0",
                   "--max-new-tokens", str(NEW), "--stream")
    assert (done.returncode, done.stdout) == (0, preds[1] + "\n")


def test_server_completion_is_the_target(runs):
    from lmforge.serve.app import create_app
    from lmforge.serve.config import ServerConfig
    from lmforge.serve.engine import Engine

    run = runs / "gpt-ft"
    sources, preds = predictions(run)
    cfg = ServerConfig(served_model_name="ft")
    engine = Engine.from_llm(LLM.load(run), cfg)
    srv = ServerThread(create_app(cfg, engine=engine))
    try:
        for source, pred in zip(sources[:2], preds):
            body = httpx.post(srv.url + "/v1/completions", json={
                "prompt": source, "temperature": 0, "max_tokens": NEW}, timeout=60).json()
            assert body["choices"][0]["text"] == pred
        raw = httpx.post(srv.url + "/v1/completions", json={
            "prompt": sources[2], "temperature": 0, "max_tokens": NEW, "stream": True}, timeout=60).text
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == preds[2]
        echo = httpx.post(srv.url + "/v1/completions", json={
            "prompt": sources[0], "temperature": 0, "max_tokens": NEW, "echo": True}, timeout=60).json()
        assert echo["choices"][0]["text"] == PREFIX + sources[0] + "\n" + preds[0]  # the text the model read
    finally:
        srv.stop()
        engine.scheduler.stop()


def test_a_model_without_a_format_continues_its_prompt(runs, tmp_path):
    llm = LLM.load(runs / "gpt")
    assert llm.generation_format is None and llm.continues_prompt is True
    ids = llm.tokenizer.encode("the king")
    assert llm.generate("the king", temperature=0, max_new_tokens=5) == llm.tokenizer.decode(
        llm.generate(ids, temperature=0, max_new_tokens=5))
    done = lmforge("generate", "--ckpt", str(runs / "gpt"), "--prompt", "the king", "--temperature", "0",
                   "--max-new-tokens", "5")
    assert (done.returncode, done.stdout) == (0, "the king" + llm.generate("the king", temperature=0,
                                                                           max_new_tokens=5) + "\n")


def test_a_bad_format_file_is_a_one_line_error(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "gpt-ft", run)
    ckpt = run / "checkpoints" / "step_00000008"
    (ckpt / "generation_format.json").write_text('{"prefix": 3, "separator": "\\n"}')
    with pytest.raises(LMForgeError) as e:
        LLM.load(run)
    assert str(e.value) == (f"generation_format.json of {run} must be a JSON object with the strings 'prefix' and "
                            "'separator', got {\"prefix\": 3, \"separator\": \"\\n\"}")
    done = lmforge("generate", "--ckpt", str(run), "--prompt", "the king")
    assert done.returncode == 2 and done.stderr.startswith(f"error: generation_format.json of {run} must be ")
    assert len(done.stderr.strip().splitlines()) == 1
