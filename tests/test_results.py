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
