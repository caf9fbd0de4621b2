"""Benchmarks: quick modes return the documented keys with sane numbers; the HF <-> lmforge weight
mapping they rely on gives equal logits; the fused loss and the static decode path are exact."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.bench import resolve_args, target
from lmforge.bench import decode as bdecode
from lmforge.bench import machine
from lmforge.bench import train as btrain
from lmforge.errors import LMForgeError
from lmforge.models.decoder import Decoder, config_from_preset

MACHINE_KEYS = {"cpu_model", "logical_cores", "usable_cores", "torch_version", "transformers_version",
                "torch_threads", "load_average_1m", "malloc_tuned"}
TARGET_KEYS = {"name", "variant", "value", "target", "met", "margin", "text"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: small ops on a shared 2-core machine are far slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_targets(targets: list[dict], expected_names: set[str]) -> None:
    assert {t["name"] for t in targets} == expected_names
    for t in targets:
        assert set(t) == TARGET_KEYS
        assert t["met"] == (t["value"] >= t["target"])
        assert t["margin"] == pytest.approx(t["value"] / t["target"] - 1, abs=1e-3)
        assert ("NOT met" in t["text"]) == (not t["met"])


def test_train_quick_reports_documented_keys_and_consistent_numbers():
    threads = torch.get_num_threads()
    r = btrain.run({"quick": True})
    assert torch.get_num_threads() == threads  # the quick mode's thread setting is undone
    json.dumps(r)  # JSON-serialisable as the CLI writes it
    assert r["benchmark"] == "train" and MACHINE_KEYS <= set(r["machine"])
    assert r["matmul_peak"]["gflops"] > 0
    tokens = r["model"]["tokens_per_step"]
    assert tokens == btrain.QUICK["micro_batch"] * btrain.QUICK["seq_len"]
    assert set(r["results"]) == {"lmforge", "lmforge_fast", "transformers"}
    for v, res in r["results"].items():
        assert res["step_s"] > 0 and len(res["step_s_samples"]) == btrain.QUICK["iters"]
        assert res["tokens_per_s"] == pytest.approx(tokens / res["step_s"], rel=1e-3)
        assert res["gflops"] == pytest.approx(r["model"]["flops_per_token"] * res["tokens_per_s"] / 1e9, rel=1e-3)
        assert res["fraction_of_peak"] == pytest.approx(res["gflops"] / r["matmul_peak"]["gflops"], rel=1e-3)
        # identical initial weights: the loss on random tokens starts near ln(V)
        assert abs(res["first_loss"] - math.log(btrain.QUICK["vocab_size"])) < 0.3
    # the fused head+loss computes the same loss as the plain objective on the same first batch
    assert r["results"]["lmforge_fast"]["first_loss"] == pytest.approx(r["results"]["lmforge"]["first_loss"], abs=1e-4)
    assert r["ratios"]["lmforge_vs_transformers"] == pytest.approx(
        r["results"]["lmforge"]["tokens_per_s"] / r["results"]["transformers"]["tokens_per_s"], rel=1e-3)
    _check_targets(r["targets"], {"train_tokens_per_s_vs_transformers", "train_fraction_of_matmul_peak"})
    prof = r["profile"]["lmforge"]
    assert prof["ms"]["matmul"] > 0 and sum(prof["share"].values()) == pytest.approx(1.0, abs=1e-2)


def test_decode_quick_reports_documented_keys_and_identical_greedy_tokens():
    r = bdecode.run({"quick": True, "variants": ["lmforge", "lmforge_fast", "lmforge_static", "transformers"]})
    json.dumps(r)
    assert r["benchmark"] == "decode" and MACHINE_KEYS <= set(r["machine"])
    m = r["models"]["tiny"]
    assert m["params"] > 0 and m["kv_cache_bytes_per_token"] == 2 * 2 * 64 * 4  # 2 (k,v) x layers x width x fp32
    for v in ("lmforge", "lmforge_fast", "lmforge_static", "transformers"):
        assert m["ttft_s"][v] > 0
        for b in ("1", "4"):
            d = m["decode"][b][v]
            n_new = bdecode.QUICK["new_tokens"]
            assert d["tokens_per_s"] == pytest.approx(int(b) * n_new / d["s"], rel=1e-3)
            positions = bdecode.QUICK["batch_prompt_len"] + n_new
            assert d["kv_cache_bytes"] == int(b) * positions * m["kv_cache_bytes_per_token"]
    assert m["match"] == {"lmforge": 1.0, "lmforge_fast": 1.0, "lmforge_static": 1.0}  # same weights, greedy
    assert m["ratios"]["lmforge_batch4_vs_own_batch1"] == pytest.approx(
        m["decode"]["4"]["lmforge"]["tokens_per_s"] / m["decode"]["1"]["lmforge"]["tokens_per_s"], rel=1e-3)
    _check_targets(r["targets"], {"tiny_decode_batch1_vs_transformers", "tiny_decode_batch4_vs_own_batch1"})


def test_hf_gpt2_weights_give_equal_logits():
    lm, hf = btrain.make_pair(btrain.hf_gpt2_config(300, 64, 2, 4, 64), seed=3)
    lm.eval(), hf.eval()
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = lm(idx)
        b = hf(input_ids=idx).logits
    assert a.shape == b.shape == (2, 40, 300)
    assert (a - b).abs().max().item() < 1e-4
    # and the incremental (KV-cache) path gives the full-sequence logits
    with torch.no_grad():
        cache = lm.new_cache(2, 40)
        first = lm(idx[:, :39], cache=cache)
        last = lm(idx[:, 39:], cache=cache)
    assert (torch.cat([first, last], 1) - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_linear_cross_entropy_matches_reference(softcap):
    from lmforge.nn.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    y[[3, 20]] = -100
    z = h @ w.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, y, ignore_index=-100)
    gh, gw = torch.autograd.grad(2.0 * ref, (h, w))
    got = linear_cross_entropy(h, w, y, rows=8, softcap=softcap)  # 37 rows: uneven last block
    gh2, gw2 = torch.autograd.grad(2.0 * got, (h, w))
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(gh, gh2, atol=1e-6) and torch.allclose(gw, gw2, atol=1e-6)


def test_chunked_objective_uses_hidden_states_and_restores_the_head():
    torch.manual_seed(0)
    m = Decoder(config_from_preset("tiny", tie_embeddings=False, logit_softcap=10.0))
    x = torch.randint(0, 512, (2, 16))
    y = torch.randint(0, 512, (2, 16))
    loss, stats = btrain.ChunkedCausalLMObjective(rows=7)(m, (x, y))
    ref = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert isinstance(m.lm_head, torch.nn.Linear) and m.cfg.logit_softcap == 10.0


@pytest.mark.parametrize("overrides", [{}, {"pos_encoding": "rope", "qk_norm": True, "mlp": "swiglu", "n_kv_head": 2}])
def test_static_greedy_matches_the_engine(overrides):
    from lmforge.infer.generate import generate

    torch.manual_seed(1)
    m = Decoder(config_from_preset("tiny", **overrides)).eval()
    prompts = torch.randint(0, 512, (3, 9))
    ref = [g.ids for g in generate(m, prompts.tolist(), max_new_tokens=10, temperature=0.0)]
    got = bdecode.StaticGreedy(m).generate(prompts, 10)
    assert got.tolist() == ref


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(LMForgeError, match=r"unknown train benchmark option\(s\) iterz; valid options: .*iters"):
        resolve_args({"iterz": 3}, btrain.DEFAULTS, btrain.QUICK, "train")
    with pytest.raises(LMForgeError, match="unknown decode benchmark model 'gpt5'"):
        bdecode.run({"quick": True, "models": ["gpt5"]})
    with pytest.raises(LMForgeError, match="must include transformers"):
        btrain.run({"quick": True, "variants": ["lmforge"]})


def test_target_verdict_and_op_categories():
    t = target("x", "lmforge", 0.9, 1.1, "x", "speed")
    assert not t["met"] and t["margin"] == pytest.approx(0.9 / 1.1 - 1, abs=1e-4) and "18.2% below" in t["text"]
    assert target("x", "v", 2.0, 1.0, "", "s")["met"]
    assert btrain.op_category("aten::addmm") == "matmul"
    assert btrain.op_category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert btrain.op_category("aten::_fused_adamw_") == "optimizer"
    assert btrain.op_category("aten::_log_softmax_backward_data") == "loss"
    assert btrain.op_category("aten::gelu_backward") == "norm_activation"
    assert btrain.op_category("aten::mul") == "other"


def test_machine_measurements():
    peak = machine.matmul_peak(128, 2)
    assert peak["torch_mm_gflops"] > 0 and peak["gflops"] == max(
        v for k, v in peak.items() if k.endswith("_gflops") and k != "gflops")
    assert peak["gflops"] == peak[f"{peak['best_kernel']}_gflops"]
    before = machine.peak_rss_bytes()
    assert machine.rss_bytes() > 0 and before >= machine.rss_bytes() - (1 << 20)
    x = torch.ones(64 << 20, dtype=torch.uint8)  # touch 64 MiB
    x.fill_(1)
    assert machine.peak_rss_bytes() >= machine.rss_bytes() - (1 << 20)
    del x
    if machine.reset_peak_rss():  # Linux: the high-water mark drops back towards the current RSS
        assert machine.peak_rss_bytes() <= machine.rss_bytes() + (8 << 20)


@pytest.mark.skipif(not btrain.onednn_available(), reason="PyTorch built without oneDNN")
def test_onednn_linears_give_the_same_loss_gradients_and_logits():
    from lmforge.nn.linear import Linear

    torch.manual_seed(0)
    ref = Decoder(config_from_preset("tiny", tie_embeddings=False))
    fast = Decoder(config_from_preset("tiny", tie_embeddings=False))
    fast.load_state_dict(ref.state_dict())
    # lmforge's models use oneDNN Linears; the reference is the same model on torch's plain nn.Linear
    linears = [m for m in ref.modules() if isinstance(m, Linear)]
    assert len(linears) == 2 * 4 + 1  # qkv, proj, fc_in, fc_out per block + head
    for m in linears:
        m.__class__ = torch.nn.Linear
    assert btrain.use_onednn_linears(fast) == 0  # already all oneDNN
    x = torch.randint(0, 512, (3, 20))
    y = torch.randint(0, 512, (3, 20))
    for m in (ref, fast):
        F.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    with torch.inference_mode():
        assert torch.allclose(ref(x), fast(x), atol=1e-5)
    assert set(ref.state_dict()) == set(fast.state_dict())


def test_lora_memory_quick_measures_each_variant_in_its_own_process():
    import subprocess
    import sys

    from train_fixtures import REPO

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lora_memory.py"), "--quick",
                           "--mmap-threshold", "131072", "--repeat", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert (r["shape"], r["batch"], r["seq_len"], r["r"], r["malloc_mmap_threshold"]) == ("tiny", 2, 32, 16, 131072)
    rows = r["variants"]
    assert list(rows) == ["full", "lora", "qlora"]
    assert rows["full"]["trainable_share"] == 1.0
    # tiny (d=64, MLP 256, 2 layers), r=16, one pair per linear (all-linear, as PEFT): qkv (64 -> 192),
    # proj (64 -> 64), fc_in (64 -> 256), fc_out (256 -> 64)
    per_layer = 16 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] == 2 * per_layer == 32768
    assert rows["lora"]["total_params"] == rows["qlora"]["total_params"] == rows["full"]["total_params"] + 32768
    for v in rows.values():
        assert v["peak_rss_bytes"] > v["rss_before_model_bytes"] > 0 and math.isfinite(v["loss"])
        assert r["repeat"] == 3 and v["peak_rss_bytes"] == sorted(v["peak_rss_bytes_runs"])[1]  # the median of 3
    assert [v["name"] for v in r["verdicts"]] == ["lora_peak_rss_vs_full", "qlora_peak_rss_vs_full",
                                                  "lora_trainable_share"]
    assert rows["lora"]["peak_rss_vs_full"] == round(rows["lora"]["peak_rss_bytes"] / rows["full"]["peak_rss_bytes"], 4)
    above = {v: rows[v]["peak_rss_bytes"] - rows[v]["rss_before_model_bytes"] for v in rows}
    assert rows["qlora"]["peak_above_start_vs_full"] == round(above["qlora"] / above["full"], 4)
