"""The family protocol (lmforge/models/registry.py + the interop protocol of lmforge/interop/):
what every entry declares, and that a new family is one model file, one interop module and one
registry entry: with those alone it loads, converts both ways, generates and describes itself."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from lmforge.checkpoint import write_model_dir
from lmforge.errors import LMForgeError
from lmforge.models import registry
from lmforge.models.registry import FAMILIES, Family, family_of, family_of_preset, get_family

PROTOCOL = {"recognises": ["folder", "hf"], "load_hf": ["folder", "hf", "device", "dtype"],
            "convert_from_hf": ["folder", "hf", "out", "overwrite"],
            "convert_to_hf": ["model_dir", "cfg", "out", "overwrite", "max_shard_size"]}


def test_every_preset_builds_its_familys_config_and_describes_itself():
    for name, fam in registry.all_presets():
        cfg = fam.config_from_preset(name)
        assert type(cfg) is fam.config_cls and cfg.preset == name
        info, lines = fam.describe(cfg, None)
        assert info["params"] == cfg.num_params() and lines[0].startswith("parameters")
        assert fam.list_row(name, cfg).startswith(name) and family_of_preset(name) is fam


def test_families_are_found_from_models_and_configs():
    for fam in FAMILIES.values():
        with torch.device("meta"):
            cfg = fam.config_from_preset(next(iter(fam.presets), None)) if fam.presets else \
                fam.config_from_preset("tiny")
            model = fam.model_cls(cfg)
        assert family_of(model) is fam and family_of(cfg) is fam and model.family == fam.name
    with pytest.raises(LMForgeError, match="unknown model family 'nope'; known: clip, decoder, decoder_classifier, "
                                           "decoder_value, encoder, seq2seq"):
        get_family("nope")


def test_capabilities_follow_the_config():
    enc = get_family("encoder")
    assert enc.tasks(enc.config_from_preset("encoder-tiny", head="sequence")) == {"embed", "classify"}
    assert enc.tasks(enc.config_from_preset("encoder-tiny")) == {"embed", "masked_lm"}
    assert get_family("decoder").tasks(None) == {"generate", "continue", "stream"}
    assert get_family("seq2seq").tasks(None) == {"generate"}
    clip = get_family("clip")
    assert [clip.tasks(clip.config_from_preset("clip-tiny", parts=p)) for p in ("both", "vision", "text")] == [
        {"embed", "embed_image", "zero_shot"}, {"embed_image"}, {"embed"}]
    assert get_family("decoder_classifier").tasks(None) == {"classify", "score"}


def test_every_interop_module_follows_the_protocol():
    for fam in FAMILIES.values():
        if fam.interop is None:
            with pytest.raises(LMForgeError, match=f"{fam.name} models have no Hugging Face form"):
                fam.interop_module()
            continue
        mod = fam.interop_module()
        assert mod.ARCHITECTURES and all(isinstance(a, str) for a in mod.ARCHITECTURES)
        for name, params in PROTOCOL.items():
            got = list(inspect.signature(getattr(mod, name)).parameters)
            assert len(got) == len(params), (fam.name, name, got)


@pytest.fixture
def toy_family(monkeypatch):
    """The one registry entry of a new family (its model file and interop module live in tests/toy_family/)."""
    from toy_family import model as toy

    entry = Family("toy", toy.ToyConfig, toy.Toy, toy.PRESETS, toy.config_from_preset, toy.describe,
                   lambda name, cfg: f"{name} toy", frozenset({"generate", "continue", "stream"}),
                   interop="toy_family.interop", generation="lmforge.infer.causal")
    monkeypatch.setitem(FAMILIES, "toy", entry)
    return entry


def test_a_new_family_is_one_model_file_one_interop_module_and_one_entry(toy_family, tmp_path, capsys):
    from lmforge import LLM
    from lmforge.cli import main
    from lmforge.interop.hf import convert_from_hf, convert_to_hf, load_hf_dir

    torch.manual_seed(0)
    model = toy_family.model_cls(toy_family.config_from_preset("toy-tiny"))
    write_model_dir(tmp_path / "run", model)
    llm = LLM.load(tmp_path / "run")
    assert type(llm.model) is toy_family.model_cls and llm.family is toy_family
    ids, expected = [3, 1, 4], []
    for _ in range(5):  # greedy by hand, no cache
        expected.append(model(torch.tensor([ids + expected]))[0, -1].argmax().item())
    assert llm.generate(ids, max_new_tokens=5, temperature=0) == expected  # through the KV cache

    convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ToyForCausalLM"]
    back, cfg, tok = load_hf_dir(tmp_path / "hf")
    assert tok is None and dataclasses.asdict(cfg) == dataclasses.asdict(model.cfg)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    convert_from_hf(tmp_path / "hf", tmp_path / "again")
    assert torch.equal(LLM.load(tmp_path / "again").model.head.weight, model.head.weight)

    assert main(["info", "--preset", "toy-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["params"]) == ("toy", sum(p.numel() for p in model.parameters()))


def test_unrecognised_hugging_face_folders_list_every_familys_architectures(tmp_path):
    from lmforge.interop.hf import load_hf_dir, supported_architectures

    (tmp_path / "config.json").write_text('{"architectures": ["FalconForCausalLM"]}')
    archs = supported_architectures()
    assert {"GPT2LMHeadModel", "BertModel", "T5ForConditionalGeneration"} <= set(archs)
    with pytest.raises(LMForgeError, match="architecture FalconForCausalLM is not supported; supported: "
                                           + ", ".join(archs)):
        load_hf_dir(tmp_path)
