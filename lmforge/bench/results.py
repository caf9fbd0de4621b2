"""The raw record behind every figure the README and docs/ publish (docs/results/NAME.json).

    record(name, figures, out=PATH_OR_DIR, command=None, wall_s=None) -> dict
    git_commit(repo) -> "sha" | "sha-dirty" | None
    publish(name, result, json_path=None, results=None, wall_s=None)   # a benchmark's JSON out and record

A record says what was run, on which code and machine, and when:

    {"name", "command", "commit", "date", "machine", ["wall_s",] "figures"}

`command` is the command line (sys.argv as typed in the checkout, unless given), `commit` the checkout's HEAD
("-dirty" when tracked files outside docs/results/ differ from it; null outside git), `date` UTC
ISO 8601, `machine` lmforge.bench.machine.machine_info() (CPU and GPU model, cores, load, versions).
Every demo and benchmark takes `--results PATH` (a file, or a directory for PATH/NAME.json) and
records its figures with it; docs/results/README.md maps each file to the doc sections it backs.

    python -m lmforge.bench.results --name NAME [--results PATH] -- CMD [ARG ...]

runs CMD, prints how long it took on stderr, exits with its status, and with --results records
{"returncode", "seconds"} under NAME (how `make results` times each step and records `make test`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[2]
# Records land in the checkout while `make results` runs; writing them must not mark the later ones dirty.
RESULTS_DIR = "docs/results"


def git_commit(repo: str | Path = REPO) -> str | None:
    """HEAD of the git checkout at `repo`, with "-dirty" when a tracked file outside docs/results/
    differs from it (untracked files do not count); None when `repo` is not in a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(top,exclude){RESULTS_DIR}")
    return f"{head}-dirty" if changes else head


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line that is running, as one would type it in the checkout: a module of lmforge run
    with `python -m` (argv[0] is then its file) as `python -m lmforge.x`, a script of the checkout as
    `python path/from/the/checkout.py`, anything else as given."""
    args = list(sys.argv if argv is None else argv)
    try:
        where = Path(args[0]).resolve().relative_to(REPO)
    except (IndexError, ValueError):
        return shlex.join(args)
    if where.parts[0] == "lmforge" and where.suffix == ".py":
        args[:1] = ["python", "-m", ".".join(where.with_suffix("").parts)]
    elif where.suffix == ".py":
        args[:1] = ["python", where.as_posix()]
    return shlex.join(args)


def results_path(out: str | Path, name: str) -> Path:
    """`out` itself, or out/NAME.json when `out` is a directory (an existing one, or a path ending in '/')."""
    text = str(out)
    path = Path(out)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / f"{name}.json"
    return path


def record(name: str, figures: dict[str, Any], *, out: str | Path | None = None, command: str | None = None,
           wall_s: float | None = None) -> dict[str, Any]:
    """The record of `figures` (JSON-serialisable); written atomically to `out` when given."""
    from lmforge.bench.machine import machine_info  # torch: not needed to build a parser
    from lmforge.checkpoint import atomic_write_text

    rec: dict[str, Any] = {
        "name": name,
        "command": command if command is not None else command_line(),
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    if wall_s is not None:
        rec["wall_s"] = round(wall_s, 1)
    rec["figures"] = figures
    if out is not None:
        path = results_path(out, name)
        atomic_write_text(path, json.dumps(rec, indent=2) + "\n")
        print(f"results: {path}", file=sys.stderr)
    return rec


def publish(name: str, result: dict[str, Any], *, json_path: str | Path | None = None,
            results: str | Path | None = None, wall_s: float | None = None) -> None:
    """A benchmark's ending: print `result` as JSON, also write it to `json_path`, and with `results`
    record it under `name` (its own "machine" entry left to the record's)."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n", encoding="utf-8")
    if results:
        record(name, {k: v for k, v in result.items() if k != "machine"}, out=results, wall_s=wall_s)


def add_results_flag(parser: argparse.ArgumentParser, name: str) -> None:
    """The `--results PATH` option every demo and benchmark takes."""
    parser.add_argument("--results", metavar="PATH",
                        help=f"also record the figures with the command, commit, machine and date in PATH "
                             f"(a .json file, or a directory such as docs/results/ for {name}.json)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmforge.bench.results",
                                description="run a command, print how long it took, optionally record that")
    p.add_argument("--name", required=True, help="what the command is (the record's name)")
    p.add_argument("--results", help="record {returncode, seconds} here (a file, or a directory for NAME.json)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")
    t0 = time.perf_counter()
    returncode = subprocess.run(cmd).returncode
    seconds = time.perf_counter() - t0
    print(f"{args.name}: {seconds:.0f} s (exit {returncode})", file=sys.stderr)
    if args.results:
        record(args.name, {"returncode": returncode, "seconds": round(seconds, 1)}, out=args.results,
               command=shlex.join(cmd), wall_s=seconds)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
