"""Training config: layering (recipe < file < flags), presets, validation, help, resume rules."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lmforge.errors import LMForgeError
from lmforge.train.config import (RESUMABLE_CHANGES, RunConfig, build_config, config_differences, config_hash,
                                  config_help, resolve_model, resolved_dict, validate)


def test_layers_recipe_then_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 5.0e-4\n  seed: 7\nmodel:\n  n_layer: 5\n")
    cfg = build_config(str(f), ["--train.seed", "9", "--model.dropout=0.1"], recipe="demo")
    assert cfg.train.lr == 5e-4  # file beats recipe (4e-3)
    assert cfg.train.seed == 9  # flag beats file
    assert cfg.model.n_layer == 5 and cfg.model.n_embd == 256  # file over recipe; recipe kept elsewhere
    assert cfg.model.dropout == 0.1 and cfg.train.max_steps == 450  # recipe kept
    assert build_config().train.lr == 1e-3  # defaults


def test_preset_then_user_keys_then_vocab_from_data():
    cfg = build_config(overrides=["--model.preset", "tiny", "--model.n_embd", "96", "--model.n_head", "3"])
    m = resolve_model(cfg, data_vocab_size=300)
    assert (m.preset, m.n_layer, m.n_embd, m.n_head, m.head_dim, m.block_size, m.vocab_size) == \
        ("tiny", 2, 96, 3, 32, 128, 300)
    default = resolve_model(build_config(), data_vocab_size=4096)
    assert (default.preset, default.n_layer, default.n_embd) == ("small", 6, 384)
    with pytest.raises(LMForgeError) as e:
        resolve_model(build_config(overrides=["--model.preset", "tinyy"]), 100)
    assert str(e.value).startswith("unknown preset 'tinyy' (did you mean 'tiny'?); presets: tiny, small, ")


def test_demo_recipe_is_valid():
    cfg = build_config(recipe="demo")
    m = resolve_model(cfg, data_vocab_size=4096)
    validate(cfg, m)
    assert (m.n_layer, m.n_embd, m.pos_encoding, m.norm, m.mlp, m.mlp_hidden, m.block_size) == (
        4, 256, "rope", "rmsnorm", "swiglu", 688, 256)
    assert cfg.train.optimizer == "muon" and m.qk_norm and not m.tie_embeddings
    assert 3e6 < m.num_params() < 6e6
    assert cfg.train.max_steps == 450 and cfg.train.max_minutes is None and cfg.train.seq_len == 256


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = build_config(overrides=["--model.preset", "tiny", "--train.lr", "2e-3"])
    m = resolve_model(cfg, 40)
    resolved = resolved_dict(cfg, m)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    again = build_config(str(path))
    assert resolved_dict(again, resolve_model(again, 40)) == resolved
    assert resolved["train"]["min_lr"] == pytest.approx(2e-4) and resolved["train"]["seq_len"] == 128


def test_validation_messages():
    def msg(*flags):
        cfg = build_config(overrides=["--model.preset", "tiny", *flags])
        with pytest.raises(LMForgeError) as e:
            validate(cfg, resolve_model(cfg, 40))
        return str(e.value)

    assert msg("--train.max_steps", "0") == "train.max_steps must be positive, got 0"
    assert msg("--train.grad_accum", "-1") == "train.grad_accum must be positive, got -1"
    assert msg("--train.min_lr", "1") == "train.min_lr must be between 0 and train.lr (0.001), got 1.0"
    assert msg("--train.max_minutes", "0") == "train.max_minutes must be positive, got 0.0"
    assert msg("--train.beta2", "1.5") == "train.beta2 must be in [0, 1), got 1.5"
    with pytest.raises(LMForgeError) as e:
        build_config(overrides=["--data.tain_split", "x"])
    assert str(e.value) == ("unknown config key 'data.tain_split' (did you mean 'train_split'?); "
                            "valid keys in data: train_split, val_split")


def test_help_lists_every_key_with_type_and_default():
    text = config_help()
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f"{section.name}.{f.name} " in text, f.name
    line = next(l for l in text.splitlines() if l.strip().startswith("train.dtype "))
    assert "auto|float32|bfloat16|float16" in line and '"auto"' in line and "bf16 autocast" in line
    line = next(l for l in text.splitlines() if l.strip().startswith("train.max_steps "))
    assert line.split()[1:3] == ["int", "1000"]
    line = next(l for l in text.splitlines() if l.strip().startswith("model.n_layer "))
    assert line.split()[1:3] == ["int?", "preset"]


def test_resume_may_change_only_cadence_and_budget_keys():
    cfg = build_config(overrides=["--model.preset", "tiny"])
    base = resolved_dict(cfg, resolve_model(cfg, 40))
    changed = build_config(overrides=["--model.preset", "tiny", "--train.max_steps", "5000", "--train.eval_every",
                                      "7", "--train.max_minutes", "3", "--train.ckpt_every", "9"])
    new = resolved_dict(changed, resolve_model(changed, 40))
    assert config_differences(base, new) == []
    assert config_hash(base) == config_hash(new)
    worse = build_config(overrides=["--model.preset", "tiny", "--train.seed", "1", "--train.dtype", "bfloat16"])
    new = resolved_dict(worse, resolve_model(worse, 40))
    assert config_differences(base, new) == ["train.dtype (auto -> bfloat16)", "train.seed (1337 -> 1)"]
    assert config_hash(base) != config_hash(new)
    assert {"train.max_steps", "train.max_minutes", "train.eval_every", "train.ckpt_every"} <= RESUMABLE_CHANGES
    assert not {"train.lr", "train.seed", "train.micro_batch_size", "train.grad_accum"} & RESUMABLE_CHANGES
