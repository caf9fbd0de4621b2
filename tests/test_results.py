"""The results writer behind docs/results/: exact keys, where it writes, and the commit it names
(with "-dirty" for tracked changes outside docs/results/, None outside git)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lmforge.bench import results
from lmforge.bench.machine import machine_info
from train_fixtures import REPO

KEYS = ["name", "command", "commit", "date", "machine"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git checkout with one commit holding code.py and docs/results/old.json."""
    root = tmp_path / "checkout"
    (root / "docs" / "results").mkdir(parents=True)
    (root / "code.py").write_text("x = 1\n")
    (root / "docs" / "results" / "old.json").write_text("{}\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    return root


def test_record_has_exactly_the_documented_keys_and_writes_nothing_without_out(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--minutes", "5", "--out", "runs/a b"])
    before = datetime.now(timezone.utc).replace(microsecond=0)
    rec = results.record("x", {"val_bpb": 2.5, "steps": 450})
    assert list(rec) == KEYS + ["figures"]  # no wall_s unless given
    assert rec["name"] == "x"
    assert rec["command"] == "benchmarks/x.py --minutes 5 --out 'runs/a b'"
    assert rec["figures"] == {"val_bpb": 2.5, "steps": 450}
    assert rec["commit"] == results.git_commit(REPO)
    date = datetime.fromisoformat(rec["date"])
    assert date.utcoffset() == timedelta(0) and before <= date <= datetime.now(timezone.utc)
    assert set(rec["machine"]) == set(machine_info())
    assert rec["machine"]["cpu_model"] == machine_info()["cpu_model"]
    assert list(tmp_path.iterdir()) == []


def test_command_line_names_modules_and_scripts_of_the_checkout_as_typed(tmp_path):
    repo = Path(results.__file__).resolve().parents[2]
    assert results.command_line([str(repo / "lmforge" / "demo" / "chat_demo.py"), "--results", "docs/results/"]) == \
        "python -m lmforge.demo.chat_demo --results docs/results/"
    assert results.command_line([str(repo / "benchmarks" / "folio.py"), "--out", "runs/a b"]) == \
        "python benchmarks/folio.py --out 'runs/a b'"
    assert results.command_line([str(tmp_path / "elsewhere.py"), "-x"]) == f"{tmp_path / 'elsewhere.py'} -x"
    assert results.command_line(["lmforge", "bench", "seq2seq"]) == "lmforge bench seq2seq"


def test_record_writes_a_file_or_name_json_in_a_directory(tmp_path):
    file_rec = results.record("demo", {"a": 1}, out=tmp_path / "sub" / "mine.json", command="make demo", wall_s=12.345)
    assert list(file_rec) == KEYS + ["wall_s", "figures"]
    assert (file_rec["command"], file_rec["wall_s"]) == ("make demo", 12.3)
    assert json.loads((tmp_path / "sub" / "mine.json").read_text()) == file_rec

    (tmp_path / "dir").mkdir()
    in_dir = results.record("serve", {"b": 2}, out=tmp_path / "dir", command="c")
    assert json.loads((tmp_path / "dir" / "serve.json").read_text()) == in_dir
    new_dir = results.record("folio", {"c": 3}, out=f"{tmp_path}/new/", command="c")  # a trailing / means a directory
    assert json.loads((tmp_path / "new" / "folio.json").read_text()) == new_dir
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["folio.json", "mine.json", "serve.json"]


def test_git_commit_is_head_and_dirty_only_for_tracked_changes_outside_docs_results(repo, tmp_path):
    head = git(repo, "rev-parse", "HEAD")
    assert len(head) == 40 and results.git_commit(repo) == head
    (repo / "untracked.py").write_text("y = 2\n")
    assert results.git_commit(repo) == head  # untracked files do not count
    (repo / "docs" / "results" / "old.json").write_text('{"new": 1}\n')
    (repo / "docs" / "results" / "new.json").write_text("{}\n")
    assert results.git_commit(repo) == head  # records written while `make results` runs do not count
    (repo / "code.py").write_text("x = 2\n")
    assert results.git_commit(repo) == f"{head}-dirty"
    git(repo, "add", "code.py")
    assert results.git_commit(repo) == f"{head}-dirty"  # staged is still not HEAD
    outside = tmp_path / "not-a-checkout"
    outside.mkdir()
    assert results.git_commit(outside) is None


def test_the_timing_command_runs_records_and_returns_the_exit_status(tmp_path, capsys):
    cmd = [sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"]
    assert results.main(["--name", "step", "--results", str(tmp_path), "--", *cmd]) == 3
    rec = json.loads((tmp_path / "step.json").read_text())
    assert rec["name"] == "step" and rec["command"] == shlex.join(cmd)
    assert rec["figures"]["returncode"] == 3 and rec["figures"]["seconds"] == rec["wall_s"] >= 0
    assert capsys.readouterr().err.startswith("step: ")
    assert results.main(["--name", "quiet", "--", sys.executable, "-c", "pass"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.json"]


# ---- the demos and benchmarks record through it -------------------------------------------------------

BENCHMARKS = REPO / "benchmarks"


def test_lmforge_bench_results_records_what_it_prints(tmp_path, capsys, one_thread):
    from lmforge.cli import main

    assert main(["bench", "seq2seq", "--quick", "--results", f"{tmp_path}/"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rec = json.loads((tmp_path / "bench-seq2seq.json").read_text())
    assert rec["name"] == "bench-seq2seq" and rec["wall_s"] == printed["wall_s"]
    assert rec["figures"] == {k: v for k, v in printed.items() if k != "machine"}
    assert set(rec["machine"]) == set(printed["machine"])


def test_parity_benchmark_records_differences_within_the_tests_tolerance(tmp_path, one_thread):
    sys.path.insert(0, str(BENCHMARKS))
    import parity

    assert parity.main(["--only", "encoders,seq2seq", "--results", str(tmp_path / "parity.json")]) == 0
    figures = json.loads((tmp_path / "parity.json").read_text())["figures"]
    assert sorted(figures) == ["encoders", "seq2seq"]
    names = [f"{cls}{suffix}" for cls in ("Bert", "Roberta", "DistilBert", "ModernBert")
             for suffix in ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")]
    assert list(figures["encoders"]) == names
    for name, row in figures["encoders"].items():  # BertModel / RobertaModel: the pooler; heads: their logits
        expected = {"hidden", "pooler"} if name in ("BertModel", "RobertaModel") else \
            {"hidden"} if name.endswith("Model") else {"hidden", "logits"}
        assert set(row) == expected and max(row.values()) < 1e-4, (name, row)
    assert sorted(figures["seq2seq"]["logits"]) == ["bart", "bart-scaled", "t5", "t5-v1_1"]
    assert max(figures["seq2seq"]["logits"].values()) < 1e-4
    assert figures["seq2seq"]["generation"] == {"t5": {"settings_equal": 5, "of": 5},
                                                "bart": {"settings_equal": 5, "of": 5},
                                                "gpt2_beams": {"settings_equal": 4, "of": 4}}


def test_folio_training_curve_reads_steps_and_losses_from_metrics(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from folio import training_curve

    rows = [{"step": 50, "loss": 3.0}, {"step": 100, "loss": 2.5}, {"step": 100, "val_loss": 2.71234},
            {"step": 150, "loss": 1.25}, {"step": 150, "val_loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 20')  # cut short
    assert training_curve(tmp_path) == {"steps": 150, "val_loss_by_step": [[100, 2.7123], [150, 1.5]],
                                        "train_loss_last": 1.25}


def test_pretrain_demo_runs_lmforge_verbs_and_reads_their_json(tmp_path, capsys):
    from lmforge.demo import pretrain_demo
    from lmforge.models.decoder import config_from_preset

    info = pretrain_demo.last_json(pretrain_demo.lmforge("info", "--preset", "tiny", "--json"))
    assert info["params"] == config_from_preset("tiny").num_params() == 141056
    out = capsys.readouterr().out
    assert out.startswith("$ lmforge info --preset tiny --json\n{")  # the command, then its output as it came
    with pytest.raises(SystemExit, match=r"lmforge train failed \(exit 2\)"):
        pretrain_demo.lmforge("train")


def test_align_demo_sft_more_stage_takes_the_chat_demo_recipe(tmp_path, one_thread):
    import yaml

    from lmforge.demo import align_demo
    from sft_fixtures import make_base, task_rows, write_jsonl

    base = make_base(tmp_path, block_size=256)
    write_jsonl(tmp_path / "train.jsonl", task_rows(80, seed=1))
    overrides = align_demo.stage_budget(2, None) + ["--train.lr", "1e-4", "--train.min_lr", "1e-5",
                                                    "--train.eval_every", "0", "--train.progress", "false",
                                                    "--train.device", "cpu"]
    align_demo.run_method("sft", base, tmp_path / "train.jsonl", tmp_path / "more", overrides, recipe="chat-demo")
    config = yaml.safe_load((tmp_path / "more" / "config.yaml").read_text())
    assert (config["train"]["max_steps"], config["train"]["lr"], config["train"]["min_lr"]) == (2, 1e-4, 1e-5)
    assert (config["train"]["micro_batch_size"], config["train"]["seq_len"], config["data"]["template"]) == \
        (16, 256, "chatml")  # from the recipe
    assert align_demo.SFT_MORE_STEPS == 1500
