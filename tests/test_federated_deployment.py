"""Flower's deployment engine with lmforge's apps: a flower-superlink and two flower-supernodes on
127.0.0.1 (free ports, FLWR_HOME in tmp_path), `flwr run` of lmforge/federated/flower_app with the
run config `lmforge federated --engine deployment` writes; two rounds complete and the global model
is bit-identical to the in-process engine's. Each client message starts a `flwr-clientapp` process
(torch imported anew), hence the ~30 s."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmforge import checkpoint as ckpt_io
from tests.test_federated import FED_TINY, federated_data
from tests.train_fixtures import REPO

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flower-superexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a Flower process exited while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def test_deployment_engine_two_rounds_on_localhost_equal_the_inprocess_engine(tmp_path, one_thread):
    from lmforge.cli import main

    data = federated_data(tmp_path / "data", 2)
    args = ["federated", "--data", str(data), "--clients", "2", "--clients-per-round", "2", "--rounds", "2",
            "--local-steps", "2", *FED_TINY]
    assert main(args + ["--engine", "deployment", "--out", str(tmp_path / "deployed")]) == 0
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr"),
           "OMP_NUM_THREADS": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}  # Flower's default: 1 s
    link = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [subprocess.Popen([BIN / "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                               "--host", "127.0.0.1", "--port", str(link)], env=env,
                              stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT)]
    try:
        for p in range(2):
            procs.append(subprocess.Popen(
                [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                 "--port", str(free_port()), "--node-config", f"partition-id={p} num-partitions=2"],
                env=env, stdout=open(logs / f"supernode{p}.log", "w"), stderr=subprocess.STDOUT))
        wait_for_port(link, procs)
        (tmp_path / "flwr").mkdir(exist_ok=True)  # the SuperLink may have made it
        (tmp_path / "flwr" / "config.toml").write_text(
            f'[superlink.local-deployment]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
        run = subprocess.run([BIN / "flwr", "run", REPO / "lmforge" / "federated" / "flower_app", "local-deployment",
                              "--run-config", tmp_path / "deployed" / "run_config.toml", "--stream"],
                             env=env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    rows = [json.loads(line) for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["bytes_received"] > 0 for r in rows)
    assert main(args + ["--engine", "inprocess", "--out", str(tmp_path / "inprocess")]) == 0
    got = ckpt_io.load_tensors(tmp_path / "deployed" / "model" / ckpt_io.MODEL_WEIGHTS)
    want = ckpt_io.load_tensors(tmp_path / "inprocess" / "model" / ckpt_io.MODEL_WEIGHTS)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    inprocess = [json.loads(line) for line in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_bits_per_byte"] for r in rows] == [r["val_bits_per_byte"] for r in inprocess]
