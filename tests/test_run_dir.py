"""A run that stops before its first checkpoint does not block its --out: the next run starts there
without --overwrite, and a run an --overwrite had parked is put back (lmforge/train/run_dir.py)."""

from __future__ import annotations

import pytest

from lmforge.cli import main
from train_fixtures import TINY, make_data_dir, train_rows

pytestmark = pytest.mark.usefixtures("one_thread")

# a learning rate of 1e30 makes the loss NaN at step 2, long before the checkpoint at step 5
DIVERGE = ["--train.max_steps", "5", "--train.lr", "1e30", "--train.warmup_steps", "0", "--train.eval_every", "0"]
NAN = ("error: the training loss became nan at step 2; lower train.lr or raise train.warmup_steps (the last checkpoint "
       "is unaffected)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("run_dir") / "data")


def train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_out_reusable(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, *DIVERGE) == 2
    assert last_error(capsys) == NAN
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()  # kept, to see what happened
    assert train(data, out, "--train.max_steps", "2", "--train.eval_every", "0") == 0  # no --overwrite needed
    assert [r["step"] for r in train_rows(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert train(data, out, "--train.max_steps", "2") == 2  # now it holds a run: protected again
    assert last_error(capsys).startswith(f"error: {out} already holds a training run; pass --resume auto")


def test_a_failed_overwrite_gives_the_old_run_back(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, "--train.max_steps", "3", "--train.eval_every", "0") == 0
    (out / "notes.txt").write_text("mine")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert train(data, out, *DIVERGE, "--overwrite") == 2
    assert last_error(capsys) == NAN
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # every file of the old run, byte for byte; nothing of the failed one; no .previous_run
    assert train(data, out, "--train.max_steps", "4", "--resume", "auto", "--train.eval_every", "0") == 0
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3, 4]  # the old run goes on
