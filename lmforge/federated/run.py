"""`lmforge federated`: a Flower federation of lmforge clients, run locally.

    run_federated(data, out, clients=..., clients_per_round=..., rounds=..., local_steps=..., strategy=...,
                  base=None, config_file=None, recipe=None, overrides=(), engine="auto", resume=False,
                  overwrite=False, dp_clipping_norm=0.0, dp_noise_multiplier=1.0, dp_clipping="server",
                  dp_delta=1e-5) -> summary dict

The model and training config are `lmforge train`'s (--recipe < --config < --model.* / --train.*), or
--base MODEL's architecture and weights. They travel to the apps in Flower's run config
(setup.SETTINGS), so the same ServerApp / ClientApp run under any engine:
  simulation  Flower's simulation engine, `flwr.simulation.run_simulation` (needs ray:
              pip install "flwr[simulation]")
  inprocess   the apps on an in-process Grid (grid.py), sequentially: no ray needed
  auto        simulation when ray is installed, else inprocess
  deployment  Flower's deployment engine (flower-superlink / flower-supernode processes): runs
              nothing here, writes RUN/run_config.toml and returns the `flwr run` command
RUN holds config.yaml (the federated settings + the train config), metrics.jsonl, loss.png and
model/ (server.py). A RUN holding a federated run needs --resume (continue after its last completed
round; only --rounds may change) or --overwrite.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import yaml

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.federated.setup import (LATER_DEFAULTS, SETTINGS, check_settings, default_server_lr, federation,
                                     run_config_of)
from lmforge.train.config import build_config, config_differences, gather_config_dict

ENGINES = ("auto", "simulation", "inprocess", "deployment")
FLOWER_APP = Path(__file__).parent / "flower_app"  # the apps as a Flower App (its pyproject.toml)
RUN_CONFIG_TOML = "run_config.toml"
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "loss.png", "model", "run_config.toml")
RESUMABLE = ("rounds",)  # settings that may change on resume


def run_federated(data: str, out: str, *, clients: int, clients_per_round: int, rounds: int, local_steps: int,
                  strategy: str = "fedavg", proximal_mu: float = 0.01, server_lr: float | None = None,
                  server_momentum: float = 0.9,
                  base: str | None = None, config_file: str | None = None, recipe: str | None = None,
                  overrides: Sequence[str] | dict = (), engine: str = "auto", resume: bool = False,
                  overwrite: bool = False, dp_clipping_norm: float = 0.0, dp_noise_multiplier: float = 1.0,
                  dp_clipping: str = "server", dp_delta: float = 1e-5) -> dict[str, Any]:
    """Run the federation (see the module docstring); returns a summary of the run."""
    if engine not in ENGINES:
        raise LMForgeError(f"unknown --engine '{engine}'; choose one of: {', '.join(ENGINES)}")
    if resume and overwrite:
        raise LMForgeError("pass either --resume or --overwrite, not both")
    given = gather_config_dict(config_file, overrides, recipe)
    if base:
        if given.get("model"):
            raise LMForgeError(f"--base {base} fixes the model; drop the model.* keys "
                               f"({', '.join(sorted(given['model']))})")
        given["model"] = _base_model_section(base, data)
    cfg = build_config(overrides=given)
    settings = run_config_of({"data": str(Path(data)), "out": str(Path(out)), "clients": clients,
                              "clients-per-round": clients_per_round, "rounds": rounds, "local-steps": local_steps,
                              "strategy": strategy, "proximal-mu": proximal_mu,
                              "server-lr": default_server_lr(strategy) if server_lr is None else server_lr,
                              "server-momentum": server_momentum,
                              "base": base or "", "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
                              "dp-clipping-norm": dp_clipping_norm, "dp-noise-multiplier": dp_noise_multiplier,
                              "dp-clipping": dp_clipping, "dp-delta": dp_delta})
    check_settings(settings)
    _check_out(Path(out), settings, resume, overwrite)
    fed = federation(settings)  # every check of data, clients and model before anything is written
    _start_out(Path(out), settings, overwrite)
    if engine == "deployment":
        return _deployment(Path(out), settings)
    from lmforge.federated.client import make_client_app
    from lmforge.federated.server import make_server_app

    server_app, client_app = make_server_app(settings), make_client_app(settings)

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # Flower's per-round INFO lines, and its warning that fraction_evaluate=0 skips client-side evaluation
    flwr_log.setLevel(logging.ERROR)
    try:
        if _engine(engine) == "simulation":
            from flwr.simulation import run_simulation

            run_simulation(server_app, client_app, num_supernodes=clients,
                           backend_config={"client_resources": {"num_cpus": 1}})
        else:
            from lmforge.federated.grid import run_in_process

            run_in_process(server_app, client_app, clients, settings)
    finally:
        flwr_log.setLevel(level)
    from lmforge.train.metrics import read_rows

    rows = read_rows(Path(out) / ckpt_io.RUN_METRICS)
    last = rows[-1] if rows else {}
    return {"run_dir": str(out), "rounds": last.get("round", 0), "val_bits_per_byte": last.get("val_bits_per_byte"),
            "client_loss": last.get("client_loss"), "model": str(Path(out) / "model"),
            "clients": len(fed.clients), **({"epsilon": last["epsilon"], "dp_delta": last["dp_delta"]}
                                            if "epsilon" in last else {})}


def _deployment(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """RUN/run_config.toml (Flower's run config of this run) and the commands that run it."""
    toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())  # JSON scalars are TOML scalars
    ckpt_io.atomic_write_text(out / RUN_CONFIG_TOML, toml)
    n = settings["clients"]
    nodes = [f"flower-supernode --insecure --superlink 127.0.0.1:9092 --port {9094 + p} "
             f"--node-config 'partition-id={p} num-partitions={n}'" for p in range(n)]
    return {"run_dir": str(out), "run_config": str(out / RUN_CONFIG_TOML),
            "superlink": "flower-superlink --insecure --disable-runtime-dependency-installation --port 9092",
            "supernodes": nodes,
            "flwr_run": f"flwr run {FLOWER_APP} local-deployment --run-config {out / RUN_CONFIG_TOML} --stream"}


def _engine(engine: str) -> str:
    has_ray = importlib.util.find_spec("ray") is not None
    if engine == "simulation" and not has_ray:
        raise LMForgeError("--engine simulation is Flower's simulation engine, whose only backend in flwr "
                           "is Ray, and ray is not installed: pip install \"flwr[simulation]\", or use "
                           "--engine inprocess (the same apps on an in-process grid)")
    if engine == "auto":
        return "simulation" if has_ray else "inprocess"
    return engine


def _base_model_section(base: str, data: str) -> dict[str, Any]:
    """The model section that rebuilds --base's architecture; its tokenizer must be the data's."""
    from lmforge.data.dataset import TokenData
    from lmforge.federated.setup import base_model_section

    model_dir = ckpt_io.resolve_model_dir(base)
    theirs, ours = model_dir / ckpt_io.TOKENIZER, TokenData(data).tokenizer_path
    if not theirs.is_file() or theirs.read_bytes() != ours.read_bytes():
        raise LMForgeError(f"--base {base} does not use {ours} as its tokenizer; federate a model trained on "
                           "this data's tokenizer (make demo's runs/demo reads the same Shakespeare tokenizer)")
    return base_model_section(base)


def _check_out(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs; on --resume the saved settings must match (reads only)."""
    saved_path = out / ckpt_io.RUN_CONFIG
    has_run = (out / "model").is_dir() or (out / ckpt_io.RUN_METRICS).is_file()
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"--out {out} is a file, not a directory")
    if has_run and not (resume or overwrite):
        raise LMForgeError(f"{out} already holds a federated run; pass --resume to continue it or --overwrite "
                           "to start over")
    if out.is_dir() and not has_run and any(p.name not in RUN_ENTRIES for p in out.iterdir()):
        raise LMForgeError(f"{out} is not empty and holds no federated run; choose a new or empty --out directory")
    if has_run and resume and saved_path.is_file():
        saved = (yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}).get("federated", {})
        now = _config_yaml(settings)["federated"]
        diffs = [f"{k} ({saved.get(k, LATER_DEFAULTS.get(k))} -> {now[k]})" for k in now
                 if k not in (*RESUMABLE, "config") and saved.get(k, LATER_DEFAULTS.get(k)) != now[k]]
        diffs += config_differences(saved.get("config") or {}, now["config"])
        if diffs:
            raise LMForgeError(f"the settings differ from those {out} was started with: {'; '.join(diffs)}; "
                               f"only {', '.join('--' + k for k in RESUMABLE)} may change on --resume")


def _start_out(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """--overwrite: remove the old run's entries; then RUN/config.yaml."""
    saved_path = out / ckpt_io.RUN_CONFIG
    if overwrite:
        for name in RUN_ENTRIES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_io.atomic_write_text(saved_path, yaml.safe_dump(_config_yaml(settings), sort_keys=False))


def _config_yaml(settings: dict[str, Any]) -> dict[str, Any]:
    fed = {k: v for k, v in settings.items() if k not in ("config", "out")}
    fed["config"] = json.loads(settings["config"])
    return {"federated": fed}


__all__ = ["ENGINES", "SETTINGS", "run_federated"]
