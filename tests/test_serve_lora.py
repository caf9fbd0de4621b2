"""Several LoRA adapters served on one base (`lmforge serve BASE --lora NAME=DIR ...`, as vLLM's
--lora-modules): the request's `model` picks the adapter, sequences of different adapters share one
continuous batch, and each gets, token for token, what `LLM.load(BASE, adapter=DIR)` gives alone.
Also `--adapter DIR` of generate / chat / eval."""

from __future__ import annotations

import io
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from lmforge.checkpoint import write_model_dir
from lmforge.cli import main
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM
from lmforge.infer.scheduler import GenerationRequest, Scheduler, run_all
from lmforge.interop.peft import save_adapter
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.nn import lora
from lmforge.serve.adapters import load_lora_modules, lora_modules
from serve_fixtures import NAME, REPO, free_port, lmforge, make_llm, offline_ids, start_server

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["hello world", "ROMEO: but soft", "the quick brown"]
MAX_TOKENS = 12


def randomize_(model: torch.nn.Module, name: str, seed: int) -> None:
    """Non-zero random weights for adapter `name` (a fresh adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".adapters.{name}.lora_" in pname:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny chat model directory and two adapters of it (different targets and ranks), in PEFT's format."""
    root = tmp_path_factory.mktemp("serve_lora")
    llm = make_llm()
    llm.tokenizer.save(root / "tok.json")
    conf = json.dumps(llm.tokenizer.tokenizer_config()).encode()
    base = write_model_dir(root / "base", llm.model, root / "tok.json", extra_files={"tokenizer_config.json": conf})
    lora.add_lora(llm.model, lora.LoRASettings(r=4, alpha=8), name="a")
    lora.add_lora(llm.model, lora.LoRASettings(r=2, targets="q,v,down"), name="b")
    randomize_(llm.model, "a", 1)
    randomize_(llm.model, "b", 2)
    out = {"base": base}
    for name in ("a", "b"):
        out[name] = save_adapter(llm.model, root / f"adapter-{name}", base=base, name=name)
    other = Decoder(config_from_preset("tiny", vocab_size=llm.config.vocab_size, block_size=64, n_embd=48)).eval()
    lora.add_lora(other, lora.LoRASettings(r=2))
    out["other"] = save_adapter(other, root / "adapter-other", base=root / "elsewhere")
    return out


@pytest.fixture(scope="module")
def alone(dirs) -> dict[str | None, LLM]:
    """The references: the base alone and each adapter alone (LLM.load(base, adapter=DIR))."""
    return {None: LLM.load(dirs["base"]), "ada": LLM.load(dirs["base"], adapter=dirs["a"]),
            "adb": LLM.load(dirs["base"], adapter=dirs["b"])}


def served_llm(dirs, **load) -> tuple[LLM, dict[str, str]]:
    modules = lora_modules([f"ada={dirs['a']}", f"adb={dirs['b']}"], NAME)
    llm = LLM.load(dirs["base"], **load)
    load_lora_modules(llm.model, modules)
    return llm, modules


@pytest.fixture(scope="module")
def server(dirs):
    llm, modules = served_llm(dirs)
    srv, engine = start_server(llm, max_batch=16, lora_modules=modules)
    yield srv, engine, modules
    engine.scheduler.stop()
    srv.stop()


def test_the_adapters_differ(alone):
    """Otherwise equality below would prove nothing."""
    ids = alone[None].tokenizer.encode_prompt(PROMPTS[0])
    outs = {k: tuple(offline_ids(v, ids, MAX_TOKENS, temperature=0)) for k, v in alone.items()}
    assert len(set(outs.values())) == 3, outs


def test_interleaved_requests_for_base_and_adapters_equal_each_alone(server, alone):
    srv, engine, _ = server
    tok = alone[None].tokenizer
    batches: list[list[str | None]] = []
    adapters = engine.scheduler._adapters
    engine.scheduler._adapters = lambda seqs: (batches.append([s.req.adapter for s in seqs]), adapters(seqs))[1]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    jobs = [(p, m) for p in PROMPTS for m in (NAME, "ada", "adb")]  # base, A, B, base, A, B, ...

    def ask(job: tuple[str, str]):
        return client.completions.create(model=job[1], prompt=job[0], max_tokens=MAX_TOKENS, temperature=0)

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(ask, jobs))
    finally:
        engine.scheduler._adapters = adapters
    for (prompt, model), r in zip(jobs, replies):
        ids = tok.encode_prompt(prompt)
        expected = offline_ids(alone[None if model == NAME else model], ids, MAX_TOKENS, temperature=0)
        assert r.model == model
        assert r.choices[0].text == tok.decode(expected, skip_special=True), (prompt, model)
        assert r.usage.completion_tokens == len(expected)
    assert any(len(set(b)) == 3 for b in batches)  # one decode step ran base, A and B rows together


def test_chat_with_an_adapter(server, alone):
    srv = server[0]
    msgs = [{"role": "user", "content": "hello"}]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "adb", "messages": msgs, "max_tokens": 8,
                                                           "temperature": 0}, timeout=60).json()
    ref = alone["adb"]
    ids = ref.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert r["model"] == "adb"
    assert r["choices"][0]["message"]["content"] == ref.tokenizer.decode(offline_ids(ref, ids, 8, temperature=0),
                                                                         skip_special=True)


def test_models_lists_the_base_and_each_adapter(server):
    srv, _, modules = server
    cards = httpx.get(srv.url + "/v1/models").json()["data"]
    created = cards[0]["created"]
    ctx = 128
    assert cards == [
        {"id": NAME, "object": "model", "created": created, "owned_by": "lmforge", "root": NAME, "parent": None,
         "max_model_len": ctx},
        {"id": "ada", "object": "model", "created": created, "owned_by": "lmforge", "root": modules["ada"],
         "parent": NAME, "max_model_len": ctx},
        {"id": "adb", "object": "model", "created": created, "owned_by": "lmforge", "root": modules["adb"],
         "parent": NAME, "max_model_len": ctx}]
    assert httpx.get(srv.url + "/v1/models/adb").json() == cards[2]


def test_an_unknown_model_is_a_404_naming_what_is_served(server):
    srv = server[0]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="adc", prompt="hi", max_tokens=2)
    assert e.value.body == {"message": f"The model `adc` does not exist. This server serves `{NAME}`, `ada`, `adb`.",
                            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    r = httpx.get(srv.url + "/v1/models/adc")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def scheduler_outputs(llm: LLM, jobs: list[tuple[list[int], str | None]],
                      **sched_kw) -> tuple[list[list[int]], Scheduler]:
    sched = Scheduler(llm.model, llm.tokenizer, max_batch=8, **sched_kw).start()
    try:
        reqs = [GenerationRequest(ids, max_tokens=MAX_TOKENS, temperature=0, adapter=a) for ids, a in jobs]
        return [r.token_ids for r in run_all(sched, reqs)], sched
    finally:
        sched.stop()


def test_adapters_over_a_quantised_base(dirs):
    """QLoRA-style serving: the base int8, the adapters fp32; each sequence as that adapter alone."""
    from lmforge.nn.quant import QuantizedLinear

    llm, _ = served_llm(dirs, quantize="int8")
    assert isinstance(llm.model.blocks[0].attn.qkv.base, QuantizedLinear)
    tok = llm.tokenizer
    jobs = [(tok.encode_prompt(p), a) for p in PROMPTS for a in (None, "ada", "adb")]
    got, _ = scheduler_outputs(llm, jobs)
    refs = {None: LLM.load(dirs["base"], quantize="int8")}
    refs.update({n: LLM.load(dirs["base"], quantize="int8", adapter=dirs[d]) for n, d in (("ada", "a"), ("adb", "b"))})
    for (ids, a), out in zip(jobs, got):
        assert out == offline_ids(refs[a], ids, MAX_TOKENS, temperature=0), (ids, a)


def test_adapters_with_speculative_decoding(dirs, alone):
    """The draft (the plain base) guesses, the model with each row's adapter checks: greedy output unchanged."""
    llm, _ = served_llm(dirs)
    tok = llm.tokenizer
    jobs = [(tok.encode_prompt(p), a) for p in PROMPTS for a in (None, "ada", "adb")]
    got, sched = scheduler_outputs(llm, jobs, draft=LLM.load(dirs["base"]).model, num_draft_tokens=3)
    assert sched.spec_stats.proposed > 0 and sched.spec_stats.accepted < sched.spec_stats.proposed
    for (ids, a), out in zip(jobs, got):
        assert out == offline_ids(alone[a], ids, MAX_TOKENS, temperature=0), (ids, a)


def test_a_model_loaded_with_an_adapter_keeps_it_for_requests_naming_none(dirs, alone):
    """LLM.load(base, adapter=DIR) served alone (no --lora): its adapter acts, as in LLM.generate."""
    llm = LLM.load(dirs["base"], adapter=dirs["a"])
    ids = llm.tokenizer.encode_prompt(PROMPTS[1])
    got, _ = scheduler_outputs(llm, [(ids, None), (ids, "default")])
    assert got == [offline_ids(alone["ada"], ids, MAX_TOKENS, temperature=0)] * 2


def test_the_scheduler_refuses_an_unknown_adapter(dirs):
    llm, _ = served_llm(dirs)
    sched = Scheduler(llm.model, llm.tokenizer)
    with pytest.raises(LMForgeError, match="^no LoRA adapter named 'x'; this model has ada, adb$"):
        sched.validate(GenerationRequest([1, 2], adapter="x"))


def test_lora_flag_errors(dirs, tmp_path):
    a = dirs["a"]
    cases = [
        (["ada"], "--lora expects NAME=DIR (the model name requests send, then the adapter directory), got 'ada'"),
        ([f"={a}"], f"--lora expects NAME=DIR (the model name requests send, then the adapter directory), got '={a}'"),
        ([f"x={a}", f"x={dirs['b']}"], "--lora: the name 'x' is given twice"),
        ([f"{NAME}={a}"], f"--lora: '{NAME}' is the base model's served name; give the adapter another name"),
        ([f"x={tmp_path / 'nope'}"], f"--lora x: adapter directory not found: {tmp_path / 'nope'}"),
        ([f"x={tmp_path}"], f"--lora x: {tmp_path} is not a LoRA adapter directory (no adapter_config.json)"),
    ]
    for specs, message in cases:
        with pytest.raises(LMForgeError) as e:
            lora_modules(specs, NAME)
        assert str(e.value) == message
    saved = tmp_path / "saved"
    saved.mkdir()
    config = json.loads((a / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps(dict(config, modules_to_save=["lm_head"])))
    with pytest.raises(LMForgeError) as e:
        lora_modules([f"x={saved}"], NAME)
    assert str(e.value) == ("--lora x: the adapter trains lm_head in full (modules_to_save), which cannot share the "
                            "base with other requests; merge it into the base and serve that")


def test_an_adapter_for_another_base(dirs):
    llm = LLM.load(dirs["base"])
    with pytest.raises(LMForgeError) as e:
        load_lora_modules(llm.model, lora_modules([f"x={dirs['other']}"], NAME))
    msg = str(e.value)
    assert msg.startswith(f"--lora x: {dirs['other'] / 'adapter_model.safetensors'}: '") and msg.endswith(
        "an adapter for another base?")


def test_serve_command_line_lora_errors(dirs):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(lmforge("serve", str(dirs["base"]), "--lora", "ada"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == ("error: --lora expects NAME=DIR (the model name requests send, then the "
                                              "adapter directory), got 'ada'\n")
    # an adapter for another base: found when the model loads; the server stops with the one-line error
    r = subprocess.run(lmforge("serve", str(dirs["base"]), "--port", str(free_port()), "--lora",
                               f"ada={dirs['a']}", "--lora", f"x={dirs['other']}"), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    last = r.stderr.splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert last.startswith("error: --lora x: ") and last.endswith("an adapter for another base?")


# ---- --adapter of generate / chat / eval ----------------------------------------------------------

def test_generate_with_adapter(dirs, alone, capsys):
    assert main(["generate", str(dirs["base"]), "--adapter", str(dirs["a"]), "--prompt", "hello world",
                 "--temperature", "0", "--max-new-tokens", "10"]) == 0
    expected = alone["ada"].generate("hello world", max_new_tokens=10, temperature=0)
    assert capsys.readouterr().out == "hello world" + expected + "\n"
    assert expected != alone[None].generate("hello world", max_new_tokens=10, temperature=0)


def test_chat_with_adapter(dirs, alone, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", str(dirs["base"]), "--adapter", str(dirs["b"]), "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    ref = alone["adb"]
    ids = ref.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    reply = ref.tokenizer.decode(offline_ids(ref, ids, 8, temperature=0), skip_special=True)
    assert "> " + reply + "\n" in capsys.readouterr().out
    assert main(["chat", "--url", "http://127.0.0.1:1", "--adapter", str(dirs["b"])]) == 2
    assert capsys.readouterr().err == ("error: --adapter goes with a MODEL; a server picks its adapter by name: "
                                       "--served-model NAME\n")


def test_eval_with_adapter(dirs, alone, capsys, tmp_path):
    from lmforge.eval.perplexity import evaluate

    text = tmp_path / "held_out.txt"
    text.write_text("ROMEO: but soft, what light through yonder window breaks? hello world. " * 4)
    assert main(["eval", str(dirs["base"]), "--adapter", str(dirs["a"]), "--data", str(text)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == evaluate(alone["ada"], str(text))
    assert got["loss"] != evaluate(alone[None], str(text))["loss"]
