"""The fine-tune scaffold: one table reader, one validation split, one epoch order, one config path
(the saved config honoured on --resume by every method), one method interface."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing

import pytest
import torch
import yaml

from lmforge.data.sampling import EpochOrder, ExampleBatches, split_validation
from lmforge.data.table import data_fingerprint, read_table
from lmforge.errors import LMForgeError
from lmforge.finetune.scaffold import METHODS, flag_keys, method_config, method_module
from test_alignment_pref import base  # noqa: F401  (the tiny base model + pairs fixture)


# ---- one table reader ---------------------------------------------------------------------------

def test_read_table_reads_csv_tsv_and_jsonl_rows_with_their_file_line(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('text,label\n"a, b",x\nc,y\n', encoding="utf-8")
    assert read_table(csv_path) == ([(f"{csv_path}:2", {"text": "a, b", "label": "x"}),
                                     (f"{csv_path}:3", {"text": "c", "label": "y"})], ["text", "label"])
    tsv_path = tmp_path / "a.tsv"
    tsv_path.write_text("\ufeffsrc\ttgt\nx\ty\n", encoding="utf-8")  # a byte-order mark is not a column name
    assert read_table(tsv_path) == ([(f"{tsv_path}:2", {"src": "x", "tgt": "y"})], ["src", "tgt"])
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"a": 1}\n\n{"b": 2, "a": 3}\n', encoding="utf-8")
    assert read_table(jl) == ([(f"{jl}:1", {"a": 1}), (f"{jl}:3", {"b": 2, "a": 3})], ["a", "b"])
    other = tmp_path / "pairs.data"
    other.write_text('{"a": 1}\n', encoding="utf-8")
    assert read_table(other, jsonl=True) == ([(f"{other}:1", {"a": 1})], ["a"])


def test_read_table_errors_are_one_line_and_name_file_and_line(tmp_path):
    def error(path, **kw):
        with pytest.raises(LMForgeError) as e:
            read_table(path, **kw)
        return str(e.value)

    assert error(tmp_path / "missing.csv") == f"data file not found: {tmp_path / 'missing.csv'}"
    (tmp_path / "x.data").write_text("a\n")
    assert error(tmp_path / "x.data") == f"{tmp_path / 'x.data'}: unsupported format '.data'; use .csv, .tsv or .jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{a: 1}\n')
    assert error(bad) == f"{bad}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    bad.write_text('{"a": 1}\n[1, 2]\n')
    assert error(bad) == f"{bad}:2: each line must be a JSON object, got list"
    bad.write_bytes(b'{"a": "\xff"}\n')
    assert error(bad, jsonl=True) == f"{bad}: not UTF-8 text (invalid start byte at byte 7)"


def test_every_example_reader_reports_a_bad_line_the_same_way(tmp_path):
    """SFT conversations, preference pairs, RL prompts, labelled texts and seq2seq pairs: one reader."""
    from lmforge.data.alignment_data import read_preferences, read_prompts
    from lmforge.data.chat import read_examples
    from lmforge.data.labeled import read_labeled
    from lmforge.finetune.seq2seq import read_pairs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n"just a string"\n')
    readers = (read_examples, read_preferences, read_prompts, read_labeled, read_pairs)
    for read in readers:
        with pytest.raises(LMForgeError) as e:
            read(bad)
        assert str(e.value) == f"{bad}:2: each line must be a JSON object, got str", read.__name__


def test_data_fingerprint_is_the_sha256_of_the_files_in_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b"first\n")
    b.write_bytes(b"second\n")
    assert data_fingerprint([a, b]) == hashlib.sha256(b"first\nsecond\n").hexdigest()
    assert data_fingerprint([b, a]) == hashlib.sha256(b"second\nfirst\n").hexdigest()


# ---- one validation split, one epoch order ------------------------------------------------------

def test_split_validation_holds_out_whole_examples_by_a_seeded_permutation():
    items = [f"ex{i}" for i in range(10)]
    held = set(torch.randperm(10, generator=torch.Generator().manual_seed(5))[:3].tolist())
    train, val = split_validation(items, None, 0.3, seed=5)
    assert train == [f"ex{i}" for i in range(10) if i not in held]  # both keep the file's order
    assert val == [f"ex{i}" for i in sorted(held)]
    assert split_validation(items, None, 0.3, seed=5) == (train, val)
    assert split_validation(items, None, 0.01, seed=5)[1] != []  # at least one example
    assert split_validation(items, ["v"], None, seed=5) == (items, ["v"])
    assert split_validation(items, None, None, seed=5) == (items, [])
    assert split_validation(items, None, 0.0, seed=5) == (items, [])


@pytest.mark.parametrize("val,fraction,message", [
    (["v"], 0.2, "give either --val-data or --val-fraction, not both"),
    (None, 1.5, "--val-fraction must be in (0, 1), got 1.5"),
    (None, -0.1, "--val-fraction must be in (0, 1), got -0.1"),
    (None, 0.9, "--val-fraction 0.9 leaves no training examples out of 2"),
])
def test_split_validation_errors(val, fraction, message):
    with pytest.raises(LMForgeError) as e:
        split_validation(["a", "b"], val, fraction, seed=0)
    assert str(e.value) == message


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_epoch_order_is_a_stream_of_seeded_epoch_permutations():
    order = EpochOrder(5, seed=7)
    stream = _perm(5, 7 * 1_000_003) + _perm(5, 7 * 1_000_003 + 1) + _perm(5, 7 * 1_000_003 + 2)
    assert order.take(3, 9) == stream[3:12]
    assert EpochOrder(5, seed=7).take(12, 3) == stream[12:15]  # a pure function of (seed, position)
    assert [order[g] for g in range(15)] == stream
    assert EpochOrder(4, seed=7, shuffle=False).take(2, 6) == [2, 3, 0, 1, 2, 3]
    reversed_epochs = EpochOrder(4, seed=3, arrange=lambda o, g: o[::-1])
    assert reversed_epochs.epoch(1) == _perm(4, 3 * 1_000_003 + 1)[::-1]
    wide = 2**62 + 5  # seeds mixed from several numbers (RL rollouts) are this wide: masked to 64 bits
    assert EpochOrder(6, seed=wide).epoch(2) == _perm(6, (wide * 1_000_003 + 2) % 2**64)


def test_example_batches_read_the_epoch_order_by_step_and_index():
    batches = ExampleBatches(5, collate=list, micro_batch_size=2, micro_batches_per_step=3, seed=1)
    stream = EpochOrder(5, seed=1).take(0, 20)
    assert batches.micro_batch(1, 2) == stream[10:12]  # (step 1 x 3 micro-batches + index 2) x 2 examples
    assert batches.micro_batch(0, 0) == stream[0:2]
    assert batches.all_batches() == [[0, 1], [2, 3], [4]]  # validation: every example once, in order
    assert batches.all_batches(2) == [[0, 1], [2, 3]]
    with pytest.raises(LMForgeError, match="^no training examples$"):
        ExampleBatches(0, list, 2, 1, seed=1)


# ---- one method interface, one config path -----------------------------------------------------

def test_every_method_module_has_the_one_interface():
    for name in METHODS:
        module = method_module(name)
        assert dataclasses.is_dataclass(module.CONFIG) and callable(module.build_job), name
        # distill's config depends on its --task (CONFIGS): a flag sets a key of one of them
        configs = list(getattr(module, "CONFIGS", {None: module.CONFIG}).values())
        hints = [typing.get_type_hints(c) for c in configs]
        assert all("train" in h for h in hints), name
        for attr, key in flag_keys(module).items():  # every flag sets a key of the method's config
            section, field = key.split(".")
            assert any(field in {f.name for f in dataclasses.fields(h[section])} for h in hints if section in h), \
                (name, attr, key)
    assert flag_keys(method_module("classify")) == {
        "text_column": "data.text_column", "text_pair_column": "data.text_pair_column",
        "label_column": "data.label_column", "val_fraction": "data.val_fraction"}
    assert flag_keys(method_module("sft")) == {"long": "data.long", "val_fraction": "data.val_fraction"}
    assert flag_keys(method_module("dpo")) == {}  # --val-fraction is recorded with the run's inputs


def test_config_layers_defaults_saved_config_file_flags_and_method_flags(tmp_path):
    classify = method_module("classify")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"lr": 0.25, "warmup_steps": 3},
                                           "data": {"label_column": "file_label"}}))
    saved = {"train": {"max_steps": 7, "lr": 0.5}, "data": {"text_column": "saved_text", "label_column": "saved_label",
                                                           "max_length": 33},
             "model_config": {"n_layer": 2}, "base": "elsewhere"}  # only the method's sections are read
    args = types.SimpleNamespace(config=str(config_file), recipe=None, text_column="flag_text", text_pair_column=None,
                                 label_column=None, val_fraction=0.3)
    cfg = method_config(classify, args, ["--train.lr", "0.125", "--data.text_column", "override_text"], saved)
    assert cfg.train.lr == 0.125                    # --section.key beats --config beats the saved config
    assert cfg.train.max_steps == 7                 # the saved config beats the method's defaults (300)
    assert cfg.train.warmup_steps == 3              # --config
    assert cfg.train.weight_decay == 0.01           # the method's DEFAULTS
    assert cfg.train.beta1 == 0.9                   # the dataclass default
    assert cfg.data.text_column == "flag_text"      # the method's own flag beats --data.text_column
    assert cfg.data.label_column == "file_label"
    assert cfg.data.max_length == 33
    assert cfg.data.val_fraction == 0.3             # --val-fraction sets data.val_fraction
    sft = method_module("sft")
    drop = method_config(sft, types.SimpleNamespace(long="drop", val_fraction=None), ["--data.long", "truncate"])
    assert drop.data.long == "drop" and drop.train.max_steps == 500


def _reward(base_dir, out, *flags):
    from lmforge.cli import main

    return main(["finetune", "reward", "--base", str(base_dir / "base"), "--data", str(base_dir / "pairs.jsonl"),
                 "--out", str(out), "--train.progress", "false", "--train.log_every", "1", "--train.ckpt_every", "1",
                 "--train.micro_batch_size", "4", *flags])


def test_resumed_reward_run_keeps_the_keys_set_only_when_it_started(base, tmp_path, capsys):  # noqa: F811
    """The config a checkpoint saved is the base of the resumed run's config: a reward run started with
    its own lr, seed, center_coef and --val-fraction resumes without repeating them, and trains exactly
    as the uninterrupted run does."""
    first_only = ["--train.lr", "3e-3", "--train.seed", "7", "--reward.center_coef", "0.05", "--val-fraction", "0.2"]
    assert _reward(base, tmp_path / "full", "--train.max_steps", "3", *first_only) == 0
    assert _reward(base, tmp_path / "run", "--train.max_steps", "2", *first_only) == 0
    assert _reward(base, tmp_path / "run", "--train.max_steps", "3", "--resume", "auto") == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["train"]["lr"], saved["train"]["seed"], saved["reward"]["center_coef"]) == (3e-3, 7, 0.05)
    assert saved["run"]["val_fraction"] == 0.2

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    full, resumed = rows(tmp_path / "full"), rows(tmp_path / "run")
    losses = [(r["step"], r["loss"]) for r in full if "loss" in r]
    assert [(r["step"], r["loss"]) for r in resumed if "loss" in r] == losses and [s for s, _ in losses] == [1, 2, 3]
    assert [r["val_loss"] for r in resumed if "val_loss" in r][-1] == [r["val_loss"] for r in full if "val_loss" in r][-1]
    capsys.readouterr()
    # a key given again with another value is still a change the checkpoint refuses
    assert _reward(base, tmp_path / "run", "--train.max_steps", "4", "--resume", "auto", "--reward.center_coef",
                   "0.1") == 2
    assert "reward.center_coef (0.05 -> 0.1)" in capsys.readouterr().err


# ---- what moved ---------------------------------------------------------------------------------

def test_decoder_rows_tokenize_text_then_eos_cut_to_the_limit():
    from lmforge.data.labeled import decoder_rows
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train_char(["abc\n"])
    idx, mask, cut = decoder_rows(tok, ["ab", "abcabc"], [None, "c"], limit=5)
    long = tok.encode("abcabc\nc")[:4] + [tok.eos_id]
    short = tok.encode("ab") + [tok.eos_id]
    assert cut == 1
    assert idx.tolist() == [short + [tok.pad_id] * (5 - len(short)), long]
    assert mask.tolist() == [[True] * len(short) + [False] * (5 - len(short)), [True] * 5]


def test_copied_files_carry_the_named_files_and_the_hugging_face_config(tmp_path):
    from lmforge.finetune.base_model import TOKENIZER_FILES, copied_files

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert copied_files(tmp_path, TOKENIZER_FILES + ("vocab.txt",)) == {
        "tokenizer.json": b"{}", "vocab.txt": b"[PAD]\n", "hf_config.json": b'{"model_type": "bert"}'}
    (tmp_path / "hf_config.json").write_text('{"model_type": "roberta"}')  # a converted model's own record wins
    assert copied_files(tmp_path, ("generation_config.json",)) == {"hf_config.json": b'{"model_type": "roberta"}'}
