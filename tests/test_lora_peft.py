"""LoRA adapters against PEFT, the reference: lmforge's adapters saved in PEFT's format load with
`peft.PeftModel.from_pretrained` on the `convert --to-hf` export and give the same logits, and
adapters PEFT makes on a transformers model load into lmforge with the same logits (GPT-2, whose
c_attn fuses q|k|v, and Llama, which keeps them apart, both directions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reference_libs import reference_lib
transformers = reference_lib("transformers")
peft = reference_lib("peft")

from lmforge.checkpoint import load_tensors, write_model_dir  # noqa: E402
from lmforge.errors import LMForgeError  # noqa: E402
from lmforge.interop.hf import convert_to_hf  # noqa: E402
from lmforge.interop.peft import load_adapter, save_adapter  # noqa: E402
from lmforge.nn import lora  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402
from test_hf_export import GPT2_STYLE, LLAMA_STYLE, V, load_in_transformers, make_model  # noqa: E402

TOL = 1e-4


def randomize_adapters_(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B (a fresh adapter is a no-op, which would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".lora_A." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def idx_BT() -> torch.Tensor:
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(6))


def lmforge_to_peft(tmp_path: Path, cfg: dict, settings: lora.LoRASettings) -> tuple[float, dict]:
    model = make_model(**cfg)
    write_model_dir(tmp_path / "base", model)
    lora.add_lora(model, settings)
    randomize_adapters_(model)
    save_adapter(model, tmp_path / "adapter", base=tmp_path / "base")
    convert_to_hf(tmp_path / "base", tmp_path / "hf")
    hf = load_in_transformers(tmp_path / "hf")
    with torch.no_grad():
        ours = model(idx_BT())
        base_hf = hf(idx_BT()).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
        theirs = peft_model(idx_BT()).logits
    assert (ours - base_hf).abs().max().item() > 1e-2  # the adapter changes the logits
    return (ours - theirs).abs().max().item(), json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("case,targets,rslora", [
    ("gpt2", "all-linear", False), ("gpt2", "q,v", False), ("gpt2", "q,k,v,down", True),
    ("llama", "all-linear", False), ("llama", "q,v,gate", True), ("llama", "qkv,o", False)])
def test_lmforge_adapter_loads_in_peft_with_equal_logits(tmp_path, case, targets, rslora):
    cfg = GPT2_STYLE if case == "gpt2" else LLAMA_STYLE
    diff, config = lmforge_to_peft(tmp_path, cfg, lora.LoRASettings(r=4, alpha=8, targets=targets,
                                                                      use_rslora=rslora))
    assert diff < TOL
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    if case == "llama" and targets == "q,v,gate":  # one PEFT module per role, PEFT's own names
        assert config["target_modules"][:3] == ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.q_proj",
                                                "model.layers.0.self_attn.v_proj"]
        assert config["r"] == 4 and config["rank_pattern"] == {} and config["use_rslora"] is True
    if case == "gpt2" and targets == "q,v":  # q and v stacked into c_attn: rank 8 there
        assert config["rank_pattern"] == {"transformer.h.0.attn.c_attn": 8, "transformer.h.1.attn.c_attn": 8}
        assert config["fan_in_fan_out"] is True


def peft_to_lmforge(tmp_path: Path, cfg: dict, lora_config) -> float:
    model = make_model(**cfg)
    write_model_dir(tmp_path / "base", model)
    convert_to_hf(tmp_path / "base", tmp_path / "hf")
    hf = load_in_transformers(tmp_path / "hf")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, lora_config)
    randomize_adapters_(peft_model, seed=4)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    llm = LLM.load(tmp_path / "hf", adapter=tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model.eval()(idx_BT()).logits
        ours = llm.model(idx_BT())
        assert (ours - model(idx_BT())).abs().max().item() > 1e-2  # the adapter acts
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("case,modules,rank_pattern", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"], {}), ("gpt2", ["c_attn"], {"h.1.attn.c_attn": 2}),
    ("llama", ["q_proj", "v_proj"], {}), ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"], {"k_proj": 2})])
def test_peft_adapter_loads_in_lmforge_with_equal_logits(tmp_path, case, modules, rank_pattern):
    cfg = GPT2_STYLE if case == "gpt2" else LLAMA_STYLE
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=modules, rank_pattern=rank_pattern,
                             alpha_pattern={modules[0]: 3.0}, fan_in_fan_out=case == "gpt2")
    assert peft_to_lmforge(tmp_path, cfg, config) < TOL


def test_round_trip_through_peft_format_keeps_the_adapter(tmp_path):
    model = make_model(**LLAMA_STYLE)
    lora.add_lora(model, lora.LoRASettings(r=4, alpha=8, targets="q,k,v,o,up,down"))
    randomize_adapters_(model)
    save_adapter(model, tmp_path / "a", base=None)
    fresh = make_model(**LLAMA_STYLE)
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(model(idx_BT()), fresh(idx_BT()), atol=1e-5)


def test_adapter_for_another_base_is_refused(tmp_path):
    model = make_model(**LLAMA_STYLE)
    lora.add_lora(model, lora.LoRASettings(r=4, targets="q"))
    save_adapter(model, tmp_path / "a", base=None)
    wider = make_model(**{**LLAMA_STYLE, "n_embd": 96})
    with pytest.raises(LMForgeError, match=r"'model.layers.0.self_attn.q_proj' has lora_A \(4, 64\) and lora_B "
                                           r"\(64, 4\), this model needs \(4, 96\) and \(96, 4\): an adapter for "
                                           r"another base\?"):
        load_adapter(wider, tmp_path / "a")
    gpt2 = make_model(**GPT2_STYLE)
    with pytest.raises(LMForgeError, match="targets 'model.layers.0.self_attn.q_proj', which this model "
                                           r"\(GPT2LMHeadModel\) does not have"):
        load_adapter(gpt2, tmp_path / "a")


# ---- the other families: BERT-style classifiers and T5 / BART, both directions ---------------------------

def _peft_and_ours(tmp_path: Path, hf_model, lora_config, direction: str):
    """(PEFT model, lmforge model) holding the same adapter, made on the side `direction` names."""
    from lmforge.interop.hf import load_hf_dir

    hf_model.save_pretrained(tmp_path / "hf")
    if direction == "peft->lmforge":
        torch.manual_seed(3)
        theirs = peft.get_peft_model(hf_model, lora_config)
        randomize_adapters_(theirs, seed=4)
        theirs.save_pretrained(str(tmp_path / "adapter"))
        ours = LLM.load(tmp_path / "hf", adapter=tmp_path / "adapter").model
    else:
        ours, _, _ = load_hf_dir(tmp_path / "hf")
        lora.add_lora(ours, lora_config)
        randomize_adapters_(ours, seed=4)
        save_adapter(ours, tmp_path / "adapter", base=tmp_path / "hf")
        theirs = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter"))
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("direction", ["peft->lmforge", "lmforge->peft"])
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_encoder_classifier_adapter_equals_peft(tmp_path, kind, direction):
    from test_encoder_parity import CLASS, batch, hf_config

    torch.manual_seed(0)
    hf_model = getattr(transformers, CLASS[kind] + "ForSequenceClassification")(hf_config(kind, num_labels=3)).eval()
    with torch.no_grad():  # a trained head, so that saving it with the adapter matters
        hf_model.classifier.weight.normal_(0, 0.5)
    if direction == "peft->lmforge":
        targets = ["query", "value"] if kind == "bert" else ["q_lin", "v_lin", "lin1"]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    else:
        config = lora.LoRASettings(r=4, alpha=8, targets="q,v,up", modules_to_save="classifier")
    theirs, ours = _peft_and_ours(tmp_path, hf_model, config, direction)
    if direction == "peft->lmforge":
        with torch.no_grad():
            theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_(0, 0.5)
        theirs.save_pretrained(str(tmp_path / "adapter2"))
        ours = LLM.load(tmp_path / "hf", adapter=tmp_path / "adapter2").model.eval()
    else:
        with torch.no_grad():
            ours.classifier.weight.normal_(0, 0.5)
        save_adapter(ours, tmp_path / "adapter2", base=tmp_path / "hf")
        fresh = type(hf_model).from_pretrained(tmp_path / "hf")  # not the one PEFT wrapped already
        theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter2")).eval()
    ids, mask, types = batch(0)
    with torch.no_grad():
        kw = {"token_type_ids": types} if kind == "bert" else {}
        ref = theirs(input_ids=ids, attention_mask=mask, **kw).logits
        got = ours(ids, mask.bool(), types if kind == "bert" else None)
    assert (ref - got).abs().max().item() < TOL
    assert ref.abs().max().item() > 0.1


@pytest.mark.parametrize("direction", ["peft->lmforge", "lmforge->peft"])
@pytest.mark.parametrize("kind", ["t5-v1.1", "bart"])
def test_seq2seq_adapter_equals_peft(tmp_path, kind, direction):
    from test_seq2seq_parity import hf_model as seq2seq_model

    hf_model = seq2seq_model(kind)
    if direction == "peft->lmforge":
        targets = ["q", "v", "wi_0", "wo"] if kind.startswith("t5") else ["q_proj", "v_proj", "fc1", "out_proj"]
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    else:
        config = lora.LoRASettings(r=4, alpha=8, targets="all-linear")
    theirs, ours = _peft_and_ours(tmp_path, hf_model, config, direction)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, 50, (2, 9), generator=g), torch.randint(3, 50, (2, 6), generator=g)
    with torch.no_grad():
        ref = theirs(input_ids=src, decoder_input_ids=tgt).logits
        got = ours(src, tgt)
        base = seq2seq_model(kind)(input_ids=src, decoder_input_ids=tgt).logits
    assert (ref - got).abs().max().item() < TOL
    assert (ref - base).abs().max().item() > 1e-2  # the adapter acts


@pytest.mark.parametrize("case,modules", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"]), ("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"]),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("llama", ["model.layers.1.self_attn.q_proj", "down_proj"])])
def test_peft_target_names_select_the_modules_peft_selects(tmp_path, case, modules):
    """`--lora.targets q_proj,v_proj` (PEFT's target_modules, as written for the HF architecture) puts
    adapters of the same shapes on the same modules as `peft.get_peft_model` does on the export."""
    from lmforge.interop.peft import hf_module_rows

    cfg = GPT2_STYLE if case == "gpt2" else LLAMA_STYLE
    model = make_model(**cfg)
    write_model_dir(tmp_path / "base", model)
    lora.add_lora(model, lora.LoRASettings(r=4, targets=",".join(modules)), aliases=hf_module_rows(model))
    save_adapter(model, tmp_path / "ours", base=tmp_path / "base")
    convert_to_hf(tmp_path / "base", tmp_path / "hf")
    peft_model = peft.get_peft_model(load_in_transformers(tmp_path / "hf"),
                                     peft.LoraConfig(r=4, target_modules=modules, fan_in_fan_out=case == "gpt2"))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    ours = load_tensors(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_tensors(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_a_peft_name_that_matches_nothing_lists_the_hf_names_and_overlaps_are_refused():
    from lmforge.interop.peft import hf_module_rows

    model = make_model(**LLAMA_STYLE)
    with pytest.raises(LMForgeError) as err:
        lora.add_lora(model, lora.LoRASettings(r=4, targets="q_proj,qproj"), aliases=hf_module_rows(model))
    assert str(err.value).endswith("or as Hugging Face names them down_proj,gate_proj,k_proj,lm_head,o_proj,"
                                   "q_proj,up_proj,v_proj")
    assert str(err.value).startswith("lora.targets: 'qproj' matches no linear layer of this model")
    model = make_model(**GPT2_STYLE)
    with pytest.raises(LMForgeError, match=r"^lora.targets: segments 'q' and 'all' of blocks.0.attn.qkv overlap "
                                           r"\(rows 0-64 and 0-192\); target one of them$"):
        lora.add_lora(model, lora.LoRASettings(r=4, targets="c_attn,q"), aliases=hf_module_rows(model))


def test_peft_loads_a_lora_training_run_directory(tmp_path):
    """`lmforge train --lora.r` writes its random base to RUN/base and keeps the latest adapter at the top of
    RUN: PEFT on the base's export, given the run directory itself, gives the run's logits."""
    from lmforge.cli import main as cli
    from train_fixtures import TINY, make_data_dir

    data = make_data_dir(tmp_path / "data", train_chars=4_000, val_chars=1_000)
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(run), *TINY, "--train.max_steps", "3", "--train.lr", "5e-2",
                "--train.eval_every", "0", "--lora.r", "4", "--lora.targets", "q,v,o,up,down"]) == 0
    convert_to_hf(run / "base", tmp_path / "hf")
    hf = load_in_transformers(tmp_path / "hf")
    llm = LLM.load(run)
    idx = torch.randint(0, llm.model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = hf(idx).logits
        theirs = peft.PeftModel.from_pretrained(hf, str(run)).eval()(idx).logits
        ours = llm.model(idx)
    assert (ours - base_logits).abs().max().item() > 1e-3  # the trained adapter acts
    assert (ours - theirs).abs().max().item() < TOL
