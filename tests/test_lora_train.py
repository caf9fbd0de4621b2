"""LoRA / QLoRA in the one loop: every method trains adapters only, checkpoints hold the adapter, the
run loads as base + adapter, DPO / GRPO / PPO use the base as reference, exact resume, bad input."""

from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_tensors, resolve_checkpoint, write_model_dir
from lmforge.cli import main as cli
from lmforge.errors import LMForgeError
from lmforge.infer.llm import LLM
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.nn.linear import Linear
from lmforge.nn.lora import LoRALinear, adapter_state_dict, base_state_dict, disabled, lora_modules
from lmforge.nn.quant import QuantizedLinear
from lmforge.tokenizer import Tokenizer
from sft_fixtures import task_rows, write_jsonl
from train_fixtures import TINY, make_data_dir, read_metrics, run_python, train_rows, training_code

ALPHA = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-=?.,:'\n"
WORDS = ("good great fine bad awful poor the a film plot was is").split()
LORA = ["--lora.r", "4", "--lora.alpha", "8"]
STEPS = ["--train.max_steps", "2", "--train.warmup_steps", "1", "--train.lr", "1e-2", "--train.micro_batch_size", "4",
         "--train.log_every", "1", "--train.progress", "false", "--train.device", "cpu", "--train.ckpt_every", "1",
         "--train.keep_checkpoints", "0", "--train.eval_every", "0"]
REWARD = "def spread(prompts, completions, **kw):\n    return [float(sum(map(ord, c)) % 7) for c in completions]\n"


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("lora")
    tok = Tokenizer.train_char([ALPHA])
    tok.save(d / "tok.json")
    torch.manual_seed(0)
    write_model_dir(d / "base", Decoder(config_from_preset("tiny", vocab_size=tok.vocab_size, block_size=64)),
                    d / "tok.json")
    rng = random.Random(0)
    write_jsonl(d / "chat.jsonl", task_rows(24, seed=1))
    write_jsonl(d / "pairs.jsonl", [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
                                    for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(16))])
    write_jsonl(d / "prompts.jsonl", [{"prompt": f"{a}+{b}=", "answer": a + b}
                                      for a, b in ((rng.randint(0, 4), rng.randint(0, 4)) for _ in range(16))])
    write_jsonl(d / "labels.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(5)), "label": rng.choice("pn")}
                                     for _ in range(24)])
    write_jsonl(d / "s2s.jsonl", [{"source": w, "target": w[::-1]} for w in (rng.choice(WORDS) for _ in range(24))])
    (d / "rw.py").write_text(REWARD)
    return d


DATA = {"sft": "chat.jsonl", "classify": "labels.jsonl", "seq2seq": "s2s.jsonl", "reward": "pairs.jsonl",
        "dpo": "pairs.jsonl", "grpo": "prompts.jsonl", "ppo": "prompts.jsonl"}
EXTRA = {"sft": ["--train.seq_len", "64"], "grpo": ["--grpo.num_generations", "2", "--grpo.max_new_tokens", "3",
                                                    "--grpo.beta", "0.1"],
         "ppo": ["--ppo.max_new_tokens", "3"], "seq2seq": ["--generate.max_examples", "0"]}


def _args(fx, method, out, **kw):
    a = dict(base=str(fx / "base"), data=str(fx / DATA[method]), out=str(out), val_data=None, val_fraction=None,
             config=None, recipe=None, resume=None, overwrite=False, help_config=False,
             reward=[f"{fx / 'rw.py'}:spread"] if method in ("grpo", "ppo") else [], reward_weights=None)
    return types.SimpleNamespace(**{**a, **kw})


def _train(fx, method, out, flags, **kw):
    """Train `method` as the CLI does; returns (the trained model, summary)."""
    from lmforge.finetune.scaffold import prepare
    from lmforge.train.loop import train_job

    args = _args(fx, method, out, **kw)
    job, cfg = prepare(method, args, flags)
    build, held = job.build_model, {}
    job.build_model = lambda: held.setdefault("model", build())
    summary = train_job(job, cfg.train, out, resume=args.resume)
    return held["model"], summary


@pytest.mark.parametrize("method", list(DATA))
def test_every_method_trains_only_the_adapter_and_loads_as_base_plus_adapter(fx, tmp_path, method):
    out = tmp_path / method
    model, summary = _train(fx, method, out, STEPS + LORA + EXTRA.get(method, []))
    assert summary["steps"] == 2
    base = load_tensors(fx / "base" / "model.safetensors")
    after = base_state_dict(model)
    shared = [k for k in base if k in after and after[k].shape == base[k].shape]
    assert len(shared) >= len(base) - 1  # every body tensor (a head may be replaced)
    for k in shared:
        assert torch.equal(after[k], base[k]), k  # the base is bit-identical after training
    trained = adapter_state_dict(model)
    assert any(k.endswith(".lora_B.all.weight") for k in trained)  # all-linear: one pair per linear, as PEFT
    assert all(t.abs().sum() > 0 for k, t in trained.items() if ".lora_B." in k)  # every adapter moved
    heads = {"classify": "score.weight", "reward": "score.weight", "ppo": "value_head.weight"}
    if method in heads:
        assert heads[method] in trained  # the fresh head is trained in full and saved with the adapter
    ckpt = out / "checkpoints" / "step_00000002"
    assert not (ckpt / "model.safetensors").exists()
    saved = load_tensors(ckpt / "adapter_model.safetensors")  # PEFT's format: its key names
    assert all(k.startswith("base_model.model.") for k in saved)
    assert sum(".lora_A." in k for k in saved) >= sum(".lora_A." in k for k in trained)
    assert json.loads((ckpt / "lora_base.json").read_text())["base"] == str((fx / "base").resolve())
    llm = LLM.load(out)
    x = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(llm.model(x), model(x), atol=1e-5, rtol=0)  # base + adapter, as trained


def test_cli_flags_targets_rslora_and_load_from_elsewhere(fx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(fx)  # a relative --base is recorded absolute
    out = tmp_path / "run"
    assert cli(["finetune", "sft", "--base", "base", "--data", "chat.jsonl", "--out", str(out), *STEPS,
                "--train.seq_len", "64", "--lora.r", "2", "--lora.alpha", "4", "--lora.dropout", "0.05",
                "--lora.targets", "q,v,down", "--lora.use_rslora", "true", "--lora.modules_to_save", "norm_f"]) == 0
    err = capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    llm = LLM.load(out)
    mods = lora_modules(llm.model)
    # the base has GPT-2's layout: PEFT's c_attn holds q and v stacked (one module, rank 4), so the
    # adapter comes back as one segment over q|k|v (k rows zero) and one on down
    assert sorted({s for m in mods.values() for s in m.adapters["default"].segments}) == ["all", "down"]
    down = next(m for n, m in mods.items() if n.endswith("fc_out")).adapters["default"]
    assert down.scaling["down"] == pytest.approx(4 / 2 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert "norm_f.weight" in adapter_state_dict(llm.model)
    # trained in the run: r=2 pairs on q and v (64 -> 64 rows each), down (256 -> 64), norm_f in full (2 layers)
    trained = 2 * (2 * 2 * (64 + 64) + 2 * (256 + 64)) + 2 * 64
    assert f": {trained:,} of" in err
    assert cli(["generate", str(out), "--prompt", "What", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    capsys.readouterr()
    assert cli(["info", str(out)]) == 0
    assert f"LoRA adapter on        {(fx / 'base').resolve()}" in capsys.readouterr().out



def test_cli_targets_accept_peft_module_names(fx, tmp_path):
    """The base has GPT-2's layout, so PEFT's names for it (c_attn: q|k|v, c_fc: the MLP's input) work."""
    out = tmp_path / "run"
    assert cli(["finetune", "sft", "--base", str(fx / "base"), "--data", str(fx / "chat.jsonl"), "--out", str(out),
                *STEPS, "--train.seq_len", "64", "--lora.r", "2", "--lora.targets", "c_attn,c_fc"]) == 0
    latest = resolve_checkpoint(out)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the run's top holds the latest adapter too
        assert (out / name).read_bytes() == (latest / name).read_bytes(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    segments = {n: sorted(m.adapters["default"].segments) for n, m in lora_modules(LLM.load(out).model).items()}
    assert segments == {f"blocks.{i}.{m}": [seg] for i in range(2) for m, seg in (("attn.qkv", "all"), ("mlp.fc_in", "up"))}

def test_a_lora_run_as_base_is_merged_and_the_chain_loads(fx, tmp_path):
    sft, _ = _train(fx, "sft", tmp_path / "sft", STEPS + LORA + EXTRA["sft"])
    dpo, _ = _train(fx, "dpo", tmp_path / "dpo", STEPS + LORA, base=str(tmp_path / "sft"))
    assert json.loads((tmp_path / "dpo" / "checkpoints" / "step_00000002" / "lora_base.json").read_text())["base"] \
        == str((tmp_path / "sft" / "checkpoints" / "step_00000002").resolve())
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(LLM.load(tmp_path / "dpo").model(x), dpo.eval()(x), atol=1e-5)
        with disabled(dpo):  # the DPO run's base is the SFT run with its adapter merged
            assert torch.allclose(dpo(x), sft.eval()(x), atol=1e-5)


def test_dpo_reference_is_the_base_with_adapters_off(fx, tmp_path):
    from lmforge.finetune.dpo import REF_FILE
    from lmforge.finetune.preference import reference_logps, training_pairs

    out = tmp_path / "dpo"
    _train(fx, "dpo", out, STEPS + LORA)
    ref = load_tensors(out / REF_FILE)["ref_logps"]
    llm = LLM.load(fx / "base")
    train, val = training_pairs("dpo", _args(fx, "dpo", out), llm.tokenizer, 64, 1337)
    assert torch.equal(ref, reference_logps(llm.model, train + val, 0))
    rows = train_rows(out)
    assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference at step 1: ln 2


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_rl_reference_is_the_policy_with_adapters_off(fx, tmp_path, monkeypatch, method):
    from lmforge.finetune import base_model

    loads = []
    load_base = base_model.load_base
    monkeypatch.setattr(base_model, "load_base", lambda *a, **k: loads.append(a) or load_base(*a, **k))
    out = tmp_path / method
    _train(fx, method, out, STEPS + LORA + EXTRA[method] + [f"--{method}.epochs", "2"])
    assert len(loads) == 1  # the policy only: no second copy of the base as the reference
    rows = train_rows(out)
    kl = "kl" if method == "grpo" else "objective/kl"
    assert rows[0][kl] == pytest.approx(0.0, abs=1e-7)  # the policy starts as the base
    if method == "grpo":  # GRPO's KL is the live policy's: the second step sees the moved policy vs the fixed base
        assert rows[1][kl] > 0


def _stop_after(step):
    from lmforge.train.loop import Trainer

    original = Trainer._train_step

    class Stop(Exception):
        pass

    def stepping(self, s):
        if s == step:
            raise Stop
        return original(self, s)
    return Stop, stepping


def test_qlora_trains_adapters_over_a_frozen_int4_base_and_resumes_exactly(fx, tmp_path, monkeypatch):
    from lmforge.train.loop import Trainer

    flags = ["--train.max_steps", "4", "--train.warmup_steps", "1", "--train.lr", "1e-2", "--train.micro_batch_size", "4",
             "--train.log_every", "1", "--train.progress", "false", "--train.ckpt_every", "2", "--train.eval_every", "0",
             "--train.seq_len", "64", "--lora.r", "4", "--lora.dropout", "0.1", "--lora.quantize", "int4",
             "--lora.group_size", "32"]
    whole, model = tmp_path / "whole", None
    model, _ = _train(fx, "sft", whole, flags)
    q = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert q and all(isinstance(m.base, QuantizedLinear) for m in lora_modules(model).values())
    rows = train_rows(whole)
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["grad_norm"] > 0 for r in rows)
    assert all(".adapters." in n for n, p in model.named_parameters() if p.requires_grad)

    Stop, stepping = _stop_after(3)
    monkeypatch.setattr(Trainer, "_train_step", stepping)
    with pytest.raises(Stop):
        _train(fx, "sft", tmp_path / "killed", flags)
    monkeypatch.undo()
    _train(fx, "sft", tmp_path / "killed", flags, resume="auto")
    a, b = read_metrics(whole), read_metrics(tmp_path / "killed")
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == [(r["step"], r["loss"], r["grad_norm"]) for r in b]
    for name in ("adapter_model.safetensors", "train_state.safetensors"):
        x = load_tensors(whole / "checkpoints" / "step_00000004" / name)
        y = load_tensors(tmp_path / "killed" / "checkpoints" / "step_00000004" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    llm = LLM.load(whole)
    assert llm.model.quantization.scheme == "int4"


def test_quantized_linear_passes_gradients_to_its_input():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128)
    for scheme, group in (("int8", None), ("int4", 32)):
        q = QuantizedLinear.from_linear(lin, scheme, group)
        x = torch.randn(3, 64, requires_grad=True)
        (q(x) * torch.arange(128.0)).sum().backward()
        ref = torch.arange(128.0) @ q.dequantize()  # d/dx of sum(c * (x W^T)) = c W
        assert torch.allclose(x.grad, ref.expand(3, -1), atol=1e-5, rtol=1e-5), scheme  # fp32 dx



def _segmented_lora(base, dtype):
    """A LoRA linear over `base` (64 -> 96) with segments q (rows 0-32, r 4) and v (rows 64-96, r 8): rows
    32-64 have none, as k does when only q,v are targeted. B is random (a fresh one is zero)."""
    m = LoRALinear(base)
    m.add_adapter("default", {"q": (0, 32), "v": (64, 96)}, {"q": 4, "v": 8}, {"q": 2.0, "v": 0.5}, 0.0)
    m.adapters.to(dtype)
    for b in m.adapters["default"].lora_B.values():
        torch.nn.init.normal_(b.weight)
    return m


@pytest.mark.parametrize("base_kind", ["linear", "int4"])
def test_training_forward_of_a_lora_linear_is_the_formula_with_its_gradients(base_kind):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True)
    base = lin if base_kind == "linear" else QuantizedLinear.from_linear(lin, "int4", 32)
    for p in base.parameters():
        p.requires_grad = False
    m = _segmented_lora(base, torch.float32)
    a = m.adapters["default"]
    W = lin.weight.detach() if base_kind == "linear" else base.dequantize()
    x = torch.randn(3, 5, 64, requires_grad=True)
    c = torch.randn(3, 5, 96)
    y = m(x)
    assert type(y.grad_fn).__name__ == "_LoRALinearFnBackward"  # training takes the fused function
    (y * c).sum().backward()
    # the reference: plain autograd over the formula y = x W.T + b + s_q (x A_q.T) B_q.T on q's rows, ...
    x2 = x.detach().clone().requires_grad_(True)
    ws = {f"{ab}{seg}": getattr(a, f"lora_{ab}")[seg].weight.detach().clone().requires_grad_(True)
          for ab in "AB" for seg in ("q", "v")}
    ref = x2 @ W.t() + base.bias.detach()
    if base_kind == "int4":  # the kernel multiplies in bf16: its values, the fp32 weight's gradient
        ref = ref + (base(x2) - ref).detach()
    delta_q = 2.0 * (x2 @ ws["Aq"].t()) @ ws["Bq"].t()
    delta_v = 0.5 * (x2 @ ws["Av"].t()) @ ws["Bv"].t()
    ref = ref + torch.cat([delta_q, torch.zeros(3, 5, 32), delta_v], dim=-1)
    (ref * c).sum().backward()
    assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4), (x.grad - x2.grad).abs().max()
    for seg in ("q", "v"):
        assert torch.allclose(a.lora_A[seg].weight.grad, ws[f"A{seg}"].grad, atol=1e-4), seg
        assert torch.allclose(a.lora_B[seg].weight.grad, ws[f"B{seg}"].grad, atol=1e-4), seg
    assert lin.weight.grad is None
    with torch.no_grad():  # inference keeps the plain graph (what serving and parity tests compare)
        assert torch.allclose(m(x), y, atol=1e-5)


def test_fused_lora_linear_passes_gradcheck_and_leaves_dropout_to_the_plain_graph():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 96, bias=False).double().requires_grad_(False)
    m = _segmented_lora(base, torch.float64)
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    weights = [p for p in m.adapters.parameters()]
    assert torch.autograd.gradcheck(lambda x, *w: m(x), (x, *weights))
    m.adapters["default"].dropout = torch.nn.Dropout(0.1)
    assert type(m(x).grad_fn).__name__ != "_LoRALinearFnBackward"  # its mask lives in the plain graph
    m.eval()
    assert type(m(x).grad_fn).__name__ == "_LoRALinearFnBackward"  # dropout off: fused again


def test_lmforge_train_with_lora_resumes_after_sigkill_exactly(tmp_path):
    data = make_data_dir(tmp_path / "data", train_chars=8_000, val_chars=2_000)
    args = TINY + ["--train.max_steps", "4", "--train.ckpt_every", "2", "--train.eval_every", "2",
                   "--train.keep_checkpoints", "0", "--model.dropout", "0.1", "--lora.r", "4", "--lora.dropout", "0.1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_python(training_code(data, whole, args)).returncode == 0
    crash = run_python(training_code(data, killed, args, killed_after_step=3))
    assert crash.returncode == -9, crash.stderr
    done = run_python(training_code(data, killed, args, resume="auto"))
    assert done.returncode == 0, done.stderr
    assert [{k: r.get(k) for k in ("step", "loss", "grad_norm", "val_loss")} for r in read_metrics(whole)] == \
        [{k: r.get(k) for k in ("step", "loss", "grad_norm", "val_loss")} for r in read_metrics(killed)]
    x = load_tensors(whole / "checkpoints" / "step_00000004" / "train_state.safetensors")
    y = load_tensors(killed / "checkpoints" / "step_00000004" / "train_state.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert (whole / "base" / "model.safetensors").is_file()  # the random init the adapter goes on
    llm = LLM.load(killed)
    assert sum(1 for _ in lora_modules(llm.model)) > 0


@pytest.mark.parametrize("flags, message", [
    (["--lora.r", "0"], "lora.r must be a positive integer, got 0"),
    (["--lora.r", "4", "--lora.targets", "q,wq"], "lora.targets: 'wq' matches no linear layer of this model; "
                                                  "available: all-linear, roles q,k,v,o,up,down, modules "),
    (["--lora.quantize", "int4"], "lora.quantize int4 trains adapters over a quantised base; set lora.r "
                                  "(e.g. --lora.r 16) or remove lora.quantize"),
    (["--lora.r", "4", "--lora.modules_to_save", "nope"], "lora.modules_to_save: 'nope' names no module of this model"),
])
def test_bad_input_is_one_error_and_nothing_is_written(fx, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    rc = cli(["finetune", "sft", "--base", str(fx / "base"), "--data", str(fx / "chat.jsonl"), "--out", str(out),
              *STEPS, "--train.seq_len", "64", *flags])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(LMForgeError, match="lora.r must be a positive integer"):
        from lmforge.train.adapters import LoRAConfig, lora_settings

        lora_settings(LoRAConfig(r=-1))


def test_torch_compile_trains_the_same_step_as_eager():
    """`--train.compile true` on the CPU: under torch.compile the oneDNN linears (a frozen base's, the
    fused LoRA function's, the head loss's) give way to plain matmuls that inductor lowers; the loss
    and every gradient equal eager mode's. Before, inductor failed on the oneDNN op."""
    from lmforge.finetune.sft import SFTObjective
    from lmforge.train.adapters import LoRAConfig, prepare_lora

    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny"))
    prepare_lora(model, LoRAConfig(r=4, targets="q,v", modules_to_save="norm_f"), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()  # a fresh B is zero: the adapters would not act
    x = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x.roll(-1, 1), "segment_ids": torch.zeros_like(x)}
    grads = []
    for m in (model, torch.compile(model)):
        loss, _ = SFTObjective()(m, batch)
        loss.backward()
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (eager_loss, eager), (compiled_loss, compiled) = grads
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
    assert eager.keys() == compiled.keys() and len(eager) == 2 * 2 * 2 + 2  # A, B of q and v in 2 layers; norm_f
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=1e-4), name
