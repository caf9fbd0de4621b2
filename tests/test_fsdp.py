"""FSDP2 (--train.parallelism fsdp) on the CPU: 2 processes under torchrun with gloo.

- 2 processes x grad_accum 2 train like 1 process x grad_accum 4 (the same global batch of 8);
- a sharded run killed after its step-4 checkpoint and resumed ends exactly as the uninterrupted one;
- the last checkpoint's model.safetensors (weights gathered to rank 0) equals, bit for bit, what
  `lmforge convert CKPT --out DIR` consolidates offline from the shards; LLM.load reads both;
- LoRA (`--lora.r`): the adapters are sharded with their blocks, trained and checkpointed alone, and
  resume exactly;
- activation checkpointing recomputes the same losses (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import (MEASURED, PYTHON, REPO, TINY, make_data_dir, read_metrics, run_python,
                            sigkill_after_step, training_code)

STEPS = ["--train.max_steps", "6", "--train.eval_every", "2", "--train.ckpt_every", "2", "--train.keep_checkpoints", "0",
         "--train.micro_batch_size", "2", "--train.keep_best", "true"]
FSDP = ["--train.parallelism", "fsdp", "--train.grad_accum", "2"]


def torchrun(code: str, tmp_path, name: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`code` as a script under torchrun: 2 processes, gloo, 1 thread each."""
    script = tmp_path / f"{name}.py"
    script.write_text("import torch; torch.set_num_threads(1)\n" + code)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The data, a 1-process run (grad_accum 4) and an uninterrupted 2-process FSDP run (grad_accum 2)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = make_data_dir(tmp / "data")
    single, sharded = tmp / "single", tmp / "sharded"
    one = run_python(training_code(data, single, TINY + STEPS + ["--train.grad_accum", "4"]))
    assert one.returncode == 0, one.stderr
    two = torchrun(training_code(data, sharded, TINY + STEPS + FSDP), tmp, "sharded")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("lmforge train: done") == 1  # only rank 0 reports
    return {"tmp": tmp, "data": data, "single": single, "sharded": sharded}


def test_two_sharded_processes_equal_one_process_at_the_same_global_batch(runs):
    a, b = read_metrics(runs["single"]), read_metrics(runs["sharded"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    # Measured (torch 2.13 CPU): losses agree to 7e-8 relative, grad norms to 1.1e-7, val losses to 4e-8,
    # final weights to 3.6e-6 absolute (fp32 sums in another order: the reduce-scatter adds the two
    # processes' gradients, one process adds its micro-batches in turn); the bounds are DDP's test's.
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
            assert (rb["lr"], rb["tokens"]) == (ra["lr"], ra["tokens"])
        else:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
    for model in ("step_00000006", "best"):  # best: gathered from the shards at the evaluation that improved
        wa = load_file(str(runs["single"] / "checkpoints" / model / "model.safetensors"))
        wb = load_file(str(runs["sharded"] / "checkpoints" / model / "model.safetensors"))
        assert set(wa) == set(wb)
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5)
    state = json.loads((runs["sharded"] / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"]["global_batch"] == 8 and state["optimizer"] is None


def test_sharded_checkpoints_hold_shards_and_only_the_last_full_weights(runs):
    ckpts = runs["sharded"] / "checkpoints"
    for step in (2, 4, 6):
        shards = ckpts / f"step_{step:08d}" / "sharded"
        assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert (ckpts / f"step_{step:08d}" / "model.safetensors").is_file() == (step == 6)
    assert (ckpts / "latest").read_text().strip() == "step_00000006"


def test_kill_and_resume_of_a_sharded_run_is_exact(runs):
    tmp, data = runs["tmp"], runs["data"]
    resumed = tmp / "resumed"
    # Rank 0 kills itself as step 5 begins, its step-4 checkpoint renamed into place (the other rank,
    # had it been killed too, could die first, while rank 0 still writes); torchrun then ends the other.
    kill = sigkill_after_step(4).replace("if step == 4:", "if step == 4 and os.environ['RANK'] == '0':")
    killed = torchrun(kill + training_code(data, resumed, TINY + STEPS + FSDP), tmp, "killed")
    assert killed.returncode != 0
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    again = torchrun(training_code(data, resumed, TINY + STEPS + FSDP, resume="auto"), tmp, "resumed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    def untimed(run):
        return [{k: v for k, v in row.items() if k not in MEASURED} for row in read_metrics(run)]

    assert untimed(resumed) == untimed(runs["sharded"])  # every loss, grad norm and val loss to the last bit
    final = "checkpoints/step_00000006/model.safetensors"
    wa, wb = load_file(str(runs["sharded"] / final)), load_file(str(resumed / final))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and set(wa) == set(wb)


def test_consolidated_model_dir_equals_the_gathered_weights(runs, tmp_path):
    from lmforge import LLM
    from lmforge.cli import main
    from lmforge.errors import LMForgeError

    ckpts = runs["sharded"] / "checkpoints"
    out6, out4 = tmp_path / "step6", tmp_path / "step4"
    assert main(["convert", str(ckpts / "step_00000006"), "--out", str(out6)]) == 0
    gathered, consolidated = load_file(str(ckpts / "step_00000006" / "model.safetensors")), load_file(str(out6 / "model.safetensors"))
    assert set(gathered) == set(consolidated) and "lm_head.weight" not in consolidated  # tied head stored once
    for name in gathered:
        assert torch.equal(gathered[name], consolidated[name]), name
    assert sorted(p.name for p in out6.iterdir()) == ["model.safetensors", "model_config.json", "tokenizer.json"]

    idx = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        ref = LLM.load(str(runs["sharded"])).model(idx)  # the run's last checkpoint
        torch.testing.assert_close(LLM.load(str(out6)).model(idx), ref, rtol=0, atol=0)
    with pytest.raises(LMForgeError) as e:
        LLM.load(str(ckpts / "step_00000004"))
    assert str(e.value) == (f"{ckpts / 'step_00000004'} is a sharded (FSDP) checkpoint without consolidated weights; "
                            f"`lmforge convert {ckpts / 'step_00000004'} --out DIR` writes them as a model directory")
    assert main(["convert", str(ckpts / "step_00000004"), "--out", str(out4)]) == 0
    step4 = LLM.load(str(out4))
    assert not torch.equal(step4.model.tok_emb.weight, LLM.load(str(out6)).model.tok_emb.weight)  # an earlier model


LORA = ["--lora.r", "4", "--lora.alpha", "8", "--lora.targets", "q,v,down"]


def test_a_lora_run_shards_its_adapters_and_resumes_exactly(runs, tmp_path):
    """`--lora.r` under FSDP: frozen base and adapters share each block's group; 2 sharded processes
    train as 1 process does at the same global batch; the shards hold only the adapters and their
    AdamW moments, every checkpoint's model directory is the adapter in PEFT's format (gathered from
    the shards), and a run killed after its step-2 checkpoint resumes to the same last bit."""
    from lmforge import LLM
    from lmforge.errors import LMForgeError

    args = TINY + STEPS + LORA + ["--train.max_steps", "4"]
    data, single, sharded, resumed = runs["data"], tmp_path / "single", tmp_path / "sharded", tmp_path / "resumed"
    one = run_python(training_code(data, single, args + ["--train.grad_accum", "4"]))
    assert one.returncode == 0, one.stderr
    two = torchrun(training_code(data, sharded, args + FSDP), tmp_path, "lora")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(single), read_metrics(sharded)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 2, 3, 4, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss"):
            assert (key in ra) == (key in rb)
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5)
    ckpt = sharded / "checkpoints" / "step_00000004"
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_base.json", "sharded"} <= \
        {p.name for p in ckpt.iterdir()} and not (ckpt / "model.safetensors").exists()
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(ckpt / "sharded").read_metadata().state_dict_metadata
    model_keys = sorted(k for k in keys if k.startswith("model."))
    assert len(model_keys) == 2 * 3 * 2 and all(".adapters." in k for k in model_keys)  # 2 blocks x (q, v, down) x (A, B)
    wa = load_file(str(single / "checkpoints" / "step_00000004" / "adapter_model.safetensors"))
    wb = load_file(str(ckpt / "adapter_model.safetensors"))
    assert set(wa) == set(wb) and len(wa) == 2 * 2 * 2  # PEFT's GPT-2 names: q and v stacked in c_attn
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=2e-5)
        if "lora_B" in name:
            assert wb[name].abs().max() > 0, name  # B starts at zero: it trained
    base_a, base_b = load_file(str(single / "base" / "model.safetensors")), load_file(str(sharded / "base" / "model.safetensors"))
    assert set(base_a) == set(base_b) and all(torch.equal(base_a[k], base_b[k]) for k in base_a)  # the initial model
    idx = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(LLM.load(str(sharded)).model(idx), LLM.load(str(single)).model(idx), rtol=1e-4, atol=1e-4)
    with pytest.raises(LMForgeError, match="is a LoRA checkpoint whose adapter is already a model directory"):
        from lmforge.checkpoint import consolidate_sharded

        consolidate_sharded(ckpt, tmp_path / "out")

    kill = sigkill_after_step(2).replace("if step == 2:", "if step == 2 and os.environ['RANK'] == '0':")
    killed = torchrun(kill + training_code(data, resumed, args + FSDP), tmp_path, "lora-killed")
    assert killed.returncode != 0
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    again = torchrun(training_code(data, resumed, args + FSDP, resume="auto"), tmp_path, "lora-resumed")
    assert again.returncode == 0, again.stderr[-3000:]
    strip = lambda run: [{k: v for k, v in r.items() if k not in MEASURED} for r in read_metrics(run)]  # noqa: E731
    assert strip(resumed) == strip(sharded)
    wc = load_file(str(resumed / "checkpoints" / "step_00000004" / "adapter_model.safetensors"))
    assert all(torch.equal(wb[k], wc[k]) for k in wb)


def test_activation_checkpointing_gives_the_same_losses(runs, tmp_path):
    """fp32, dropout 0.1: the recomputed forward replays the dropout masks, so losses and gradients
    are those of the run that kept its activations (measured: equal to the last bit)."""
    args = TINY + STEPS + ["--train.max_steps", "4", "--model.dropout", "0.1"]
    plain, recomputed = tmp_path / "plain", tmp_path / "ac"
    for out, extra in ((plain, []), (recomputed, ["--train.activation_checkpointing", "true"])):
        done = run_python(training_code(runs["data"], out, args + extra))
        assert done.returncode == 0, done.stderr
    a, b = read_metrics(plain), read_metrics(recomputed)
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss"):
            assert rb.get(key) == ra.get(key)


def test_every_family_shards_and_checkpoints_activations_without_changing_the_numbers(tmp_path):
    """Encoder, T5 and BART models sharded across 2 processes (with activation checkpointing) give
    the loss and gradient norm of the whole model in one process (measured: equal loss, norms to 1e-7)."""
    code = ("import json, os, sys, torch\n"
            "from lmforge.models.registry import families\n"
            "from lmforge.train import distributed as D\n"
            "torch.set_num_threads(1)\n"
            "info = D.setup('cpu', 'fsdp') if 'RANK' in os.environ else D.DistInfo()\n"
            "found = {}\n"
            "for fam, preset in (('encoder', 'encoder-tiny'), ('seq2seq', 't5-tiny'), ('seq2seq', 'bart-tiny')):\n"
            "    f = families()[fam]\n"
            "    torch.manual_seed(0)\n"
            "    model = f.model_cls(f.config_from_preset(preset))\n"
            "    if info.sharded:\n"
            "        D.checkpoint_activations(model)\n"
            "        D.shard(model, info, torch.float32)\n"
            "    x = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(1))\n"
            "    out = model(x) if fam == 'encoder' else model(x, x[:, :12])\n"
            "    loss = out.float().pow(2).mean()\n"
            "    loss.backward()\n"
            "    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)\n"
            "    found[preset] = [float(loss.detach()), float(norm)]\n"
            "if info.is_main:\n"
            "    print(json.dumps(found))\n"
            "D.teardown(info)\n")
    whole = run_python(code)
    assert whole.returncode == 0, whole.stderr
    sharded = torchrun(code, tmp_path, "families")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = json.loads(whole.stdout.strip().splitlines()[-1]), json.loads(sharded.stdout.strip().splitlines()[-1])
    assert sorted(a) == sorted(b) == ["bart-tiny", "encoder-tiny", "t5-tiny"]
    for preset in a:
        assert b[preset][0] == pytest.approx(a[preset][0], rel=1e-6)
        assert b[preset][1] == pytest.approx(a[preset][1], rel=1e-5)


def test_sharding_units_are_the_blocks_of_every_family():
    from lmforge.models.registry import families
    from lmforge.train.distributed import transformer_blocks

    found = {}
    for fam in families().values():
        if fam.presets:
            with torch.device("meta"):  # shapes only
                model = fam.model_cls(fam.config_from_preset(next(iter(fam.presets))))
            found[fam.name] = [f"{type(b).__module__}.{type(b).__name__}" for b in transformer_blocks(model)]
    assert found == {"clip": ["lmforge.models.clip.Block"] * 4,  # clip-tiny: 2 vision + 2 text blocks
                     "decoder": ["lmforge.models.decoder.Block"] * 2,
                     "encoder": ["lmforge.models.encoder.Block"] * 2,
                     "seq2seq": ["lmforge.models.seq2seq.EncoderBlock"] * 2 + ["lmforge.models.seq2seq.DecoderBlock"] * 2}


@pytest.mark.parametrize("setting, message", [
    (["--train.optimizer", "muon"], "train.optimizer muon orthogonalises whole weight matrices, which "
                                    "--train.parallelism fsdp splits across processes; use adamw, or ddp"),
    (["--train.dtype", "float16"], "train.dtype float16 needs a gradient scaler, which --train.parallelism fsdp "
                                   "does not support; use bfloat16"),
    (["--lora.r", "4", "--lora.quantize", "int8"], "--train.parallelism fsdp shards parameters, and a quantised base "
                                                   "(lora.quantize) is held in buffers that every process would keep "
                                                   "whole; use --train.parallelism ddp"),
])
def test_what_fsdp_cannot_do_is_one_message_before_anything_is_written(runs, tmp_path, monkeypatch, setting, message):
    """In this process as torchrun's one worker would be (FSDP applies under torchrun at any world size)."""
    import socket

    from lmforge.errors import LMForgeError
    from lmforge.train.pretrain import run_training

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LMForgeError) as e:
        run_training(str(runs["data"]), str(tmp_path / "run"), overrides=TINY + ["--train.parallelism", "fsdp"] + setting)
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()
