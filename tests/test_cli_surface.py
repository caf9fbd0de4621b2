"""The command line surface every verb shares: MODEL (with --ckpt / --base as the older spellings),
--threads, a validated --device and --port, help text on every option, `lmforge chat` clipping
replies to the context, and the messages that say what to change."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge import runtime
from lmforge.cli import build_parser, finetune_parser, main, split_overrides
from lmforge.finetune.scaffold import METHODS
from lmforge.infer.llm import LLM
from sft_fixtures import make_base, task_rows, write_jsonl
from test_encoder_cli import hf_classifier  # noqa: F401  (the fixture: a tiny BERT classifier folder)
from train_fixtures import REPO, TINY, make_data_dir

pytestmark = pytest.mark.usefixtures("one_thread")

SFT = ["--train.max_steps", "2", "--train.seq_len", "64", "--train.micro_batch_size", "2", "--train.eval_every", "0",
       "--train.progress", "false", "--train.device", "cpu"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny chat model (SFT of a base model) whose context, 64 tokens, is shorter than chat's default
    --max-new-tokens (256); fine-tuned with the base given as MODEL."""
    root = tmp_path_factory.mktemp("chat")
    base = make_base(root, block_size=64)
    data = write_jsonl(root / "train.jsonl", task_rows(20, seed=1))
    assert main(["finetune", "sft", str(base), "--data", str(data), "--out", str(root / "run"), *SFT]) == 0
    return base, root / "run"


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def error_of(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


# ---- 1. chat clips --max-new-tokens to the context ------------------------------------------------

def test_chat_clips_replies_to_the_context_and_says_so_once(chat_run):
    run = chat_run[1]
    llm = LLM.load(run)
    assert llm.model.cfg.block_size == 64
    question = [{"role": "user", "content": "What is 1 + 1?"}]
    n_prompt = len(llm.tokenizer.apply_chat_template(question, add_generation_prompt=True))
    expected = llm.chat(question, max_new_tokens=64 - n_prompt, temperature=0)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", str(run), "--temperature", "0"],
                          input="What is 1 + 1?\nWhat is 2 + 2?\n", capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"note: --max-new-tokens 256 does not fit the model's context of 64 tokens with the "
                           f"conversation; each reply is clipped to what fits (this one: {64 - n_prompt} tokens)\n")
    assert f"> {expected}\n" in done.stdout and "error" not in done.stdout
    assert done.stdout.count("> ") == 3  # two replies, then the prompt that met the end of input


# ---- 2. --threads ------------------------------------------------------------------------------

def test_default_threads_honours_omp_num_threads_else_half_the_usable_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert runtime.default_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert runtime.default_threads() == 1
    before = torch.get_num_threads()
    assert runtime.set_threads(None) == before and torch.get_num_threads() == 1
    assert runtime.set_threads(before) == 1 and torch.get_num_threads() == before
    with pytest.raises(Exception, match=r"--threads must be a positive integer, got 0"):
        runtime.set_threads(0)


COMPUTING = ["train", "generate", "eval", "chat", "agent", "serve", "embed", "classify", "score", "bench", "quantize",
             "merge", "federated", "report", "explain"]


def test_every_verb_that_computes_takes_threads_with_its_help():
    def threads_help(parser):
        return next((a.help for a in parser._actions if "--threads" in a.option_strings), None)
    parsers = subparsers()
    assert {v for v, p in parsers.items() if threads_help(p)} == set(COMPUTING)
    for verb in COMPUTING:
        assert threads_help(parsers[verb]) == runtime.THREADS_HELP
    for method in METHODS:
        assert threads_help(finetune_parser(method)) == runtime.THREADS_HELP
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for demo in ("chat_demo", "align_demo"):
        shown = subprocess.run([sys.executable, "-m", f"lmforge.demo.{demo}", "--help"], capture_output=True,
                               text=True, env=env, cwd=REPO, timeout=120)
        assert shown.returncode == 0 and "--threads N" in shown.stdout
    from lmforge.demo.chat_demo import sft_command

    cmd = sft_command(REPO, REPO, REPO, steps=3, minutes=None, threads=2)
    assert cmd[cmd.index("--threads"):cmd.index("--threads") + 2] == ["--threads", "2"]
    assert cmd[-2:] == ["--train.max_steps", "3"]


@pytest.mark.parametrize("verb", ["generate", "eval", "chat", "embed", "classify", "score", "train", "finetune",
                                  "serve", "bench"])
def test_threads_reach_torch_before_the_work_and_are_restored(verb, monkeypatch, tmp_path, capsys):
    """Each verb runs its work with torch on --threads threads; main() puts the count back after."""
    seen: dict[str, object] = {}

    def record(*args, **kwargs):
        seen["threads"], seen["kwargs"] = torch.get_num_threads(), kwargs
        raise runtime.LMForgeError("stop here")

    model = str(tmp_path)
    argv = {"generate": ["generate", model, "--prompt", "x"], "eval": ["eval", model, "--data", model],
            "chat": ["chat", model], "embed": ["embed", model, "a text"], "classify": ["classify", model, "a text"],
            "score": ["score", model, "--prompt", "p", "--completion", "c"],
            "train": ["train", "--data", model, "--out", model], "finetune": ["finetune", "sft", model, "--data",
                                                                             model, "--out", model],
            "serve": ["serve", model], "bench": ["bench", "train"]}[verb]
    target = {"train": ("lmforge.train.pretrain", "run_training"), "finetune": ("lmforge.finetune.scaffold", "run"),
              "serve": ("lmforge.serve", "serve"), "bench": ("lmforge.bench.train", "run")}
    module, name = target.get(verb, ("lmforge.infer.llm", None))
    import importlib

    if name is None:
        monkeypatch.setattr(LLM, "load", classmethod(lambda cls, *a, **k: record(*a, **k)))
    else:
        monkeypatch.setattr(importlib.import_module(module), name, record)
    before = torch.get_num_threads()
    assert error_of(capsys, argv + ["--threads", "3"]) == "error: stop here"
    assert seen["threads"] == 3 and torch.get_num_threads() == before
    if verb == "serve":
        assert seen["kwargs"]["threads"] == 3
    if verb == "bench":
        assert error_of(capsys, argv) == "error: stop here"
        assert seen["threads"] == runtime.default_threads()


# ---- 3. --device and --port ----------------------------------------------------------------------

def no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    return "no CUDA device is visible (CUDA_VISIBLE_DEVICES='')"  # tests/conftest.py hides CUDA


@pytest.mark.parametrize("verb", ["generate", "chat", "embed", "classify", "score", "serve", "eval"])
def test_a_device_this_machine_lacks_is_one_line(verb, chat_run, capsys):
    model = str(chat_run[1])
    rest = {"generate": ["--prompt", "x"], "embed": ["text"], "classify": ["text"], "eval": ["--data", model],
            "score": ["--prompt", "p", "--completion", "c"]}.get(verb, [])
    for device, message in [("cuda", f"error: --device cuda: {no_cuda()}; available here: cpu"),
                            ("cuda:1", f"error: --device cuda:1: {no_cuda()}; available here: cpu"),
                            ("tpu", "error: --device tpu: not a device lmforge runs on (auto, cpu, cuda, cuda:N, mps); "
                                    "available here: cpu")]:
        assert error_of(capsys, [verb, model, *rest, "--device", device]) == message


def test_device_errors_from_the_python_api_and_train(chat_run, tmp_path, capsys):
    with pytest.raises(runtime.LMForgeError) as e:
        LLM.load(chat_run[1], device="cuda")
    assert str(e.value) == f"device cuda: {no_cuda()}; available here: cpu"
    assert runtime.resolve_device("auto") == torch.device("cpu")
    data = make_data_dir(tmp_path / "data")
    assert error_of(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY,
                             "--train.device", "cuda"]) == f"error: --train.device cuda: {no_cuda()}; available here: cpu"


def test_serve_port_out_of_range(chat_run, capsys):
    for port in ("99999", "0"):
        assert error_of(capsys, ["serve", str(chat_run[1]), "--port", port]) == \
            f"error: --port must be 1..65535, got {port}"


# ---- 4. messages that say what to change ---------------------------------------------------------

def test_eval_of_a_classifier_on_a_directory_names_the_files_it_needs(hf_classifier, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "sentiment"
    data.mkdir()
    for name in ("train.jsonl", "test.jsonl", "val.jsonl"):
        (data / name).write_text('{"text": "good", "label": "pos"}\n')
    assert error_of(capsys, ["eval", str(hf_classifier), "--data", str(data)]) == (
        f"error: {data} is a directory; a classifier is evaluated on labelled CSV/TSV/JSONL files (a text and a label "
        f"column), e.g. --data {data / 'test.jsonl'}; it holds test.jsonl, train.jsonl, val.jsonl")


def test_an_odd_rope_head_dim_names_the_flags_to_change(capsys):
    argv = ["info", "--preset", "small", "--model.n_embd", "256", "--model.pos_encoding", "rope"]
    assert error_of(capsys, argv + ["--model.n_head", "3"]) == (
        "error: rope needs an even head_dim, got 85 = model.n_embd 256 // model.n_head 3; change --model.n_head or "
        "--model.n_embd so that n_embd / n_head is even (e.g. --model.n_head 4), or set --model.head_dim to an even "
        "number")
    assert error_of(capsys, argv + ["--model.head_dim", "33"]) == \
        "error: rope needs an even model.head_dim, got 33; set --model.head_dim to an even number"


# ---- 5. one way to name a model; help on every option ----------------------------------------------

def test_model_is_positional_and_the_older_flags_still_work(chat_run, tmp_path, capsys):
    base, run = chat_run
    gen = ["--prompt", "What", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(["generate", str(run), *gen]) == 0
    positional = capsys.readouterr().out
    assert main(["generate", "--ckpt", str(run), *gen]) == 0
    assert capsys.readouterr().out == positional and positional.startswith("What")
    assert error_of(capsys, ["generate", str(run), "--ckpt", str(run), *gen]) == (
        f"error: lmforge generate: give the model once, as MODEL or as --ckpt, not both (got {run} and --ckpt {run})")
    assert error_of(capsys, ["generate", *gen]) == ("error: lmforge generate needs a MODEL: a run directory (its "
                                                    "latest checkpoint), model directory or Hugging Face folder (or "
                                                    "--ckpt MODEL)")
    assert error_of(capsys, ["score", "--prompt", "p", "--completion", "c"]).startswith(
        "error: lmforge score needs a MODEL: ")
    assert error_of(capsys, ["finetune", "sft", str(base), "--base", str(base), "--data", "d", "--out", "o"]) == (
        f"error: lmforge finetune sft: give the model once, as MODEL or as --base, not both (got {base} and --base "
        f"{base})")
    # finetune: --base as before; an override's value is never taken for MODEL
    out = tmp_path / "sft"
    assert main(["finetune", "sft", "--train.lr", "1e-4", "--base", str(base), "--data",
                 str(write_jsonl(tmp_path / "d.jsonl", task_rows(8))), "--out", str(out), *SFT]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 2
    assert split_overrides(["--train.lr", "1e-4", "MODEL", "--train.seed=3", "--data", "d"]) == \
        (["--train.lr", "1e-4", "--train.seed=3"], ["MODEL", "--data", "d"])


def test_convert_takes_model_too(chat_run, tmp_path, capsys):
    run = chat_run[1]
    assert main(["convert", str(run), "--to-hf", "--out", str(tmp_path / "a")]) == 0
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.safetensors" in files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert error_of(capsys, ["convert", str(run), "--out", str(tmp_path / "c")]) == \
        "error: lmforge convert needs exactly one of --from-hf HF_DIR or --to-hf RUN"
    assert error_of(capsys, ["convert", "--to-hf", "--out", str(tmp_path / "c")]).startswith(
        "error: lmforge convert needs a MODEL: ")


def test_embed_and_classify_take_model_then_texts(hf_classifier, capsys):  # noqa: F811
    assert main(["classify", str(hf_classifier), "--json", "a cat", "a dog"]) == 0
    positional = capsys.readouterr().out
    assert main(["classify", "a cat", "a dog", "--json", "--ckpt", str(hf_classifier)]) == 0
    assert capsys.readouterr().out == positional and len(positional.splitlines()) == 2
    assert error_of(capsys, ["embed", "--file", "x.txt"]).startswith("error: lmforge embed needs a MODEL: ")


def test_every_option_of_every_verb_has_help(capsys):
    parsers = [("lmforge", build_parser())] + list(subparsers().items())
    parsers += [(f"finetune {m}", finetune_parser(m)) for m in METHODS]
    missing = [f"{name}: {a.option_strings or a.dest}" for name, p in parsers for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["--help"])
    assert ("train a model of any family: a decoder (causal LM), an encoder (masked LM) or T5 / BART (denoising)"
            in " ".join(capsys.readouterr().out.split()))
