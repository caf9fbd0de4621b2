"""What the ServerApp and every ClientApp read from Flower's run config (a flat dict of scalars, the
same under every engine): the federated data set, the first `clients` of its clients, the model and
the `lmforge train` config. `federation(run_config)` builds it once per process.

The update a client returns (`exchanged_state`) is the model's full weights (tied tensors once), or
only its LoRA adapter (nn/lora.py) when the model carries one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.checkpoint import load_state_checked, model_state_for_saving
from lmforge.config import from_dict
from lmforge.data.dataset import TokenData
from lmforge.data.federated_shakespeare import read_clients
from lmforge.errors import LMForgeError
from lmforge.nn.lora import adapter_state_dict, has_lora
from lmforge.train.config import RunConfig
from lmforge.train.job import TrainJob
from lmforge.train.pretrain import pretraining_job

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
DP_CLIPPING = ("server", "client")  # where Flower's fixed-clipping DP wrapper clips the client updates
# Flower run-config keys (Flower's spelling: dashes) -> their type. dp-clipping-norm 0 = no differential privacy.
SETTINGS = {"data": str, "out": str, "clients": int, "clients-per-round": int, "rounds": int, "local-steps": int,
            "strategy": str, "proximal-mu": float, "server-lr": float, "server-momentum": float, "base": str, "config": str,
            "dp-clipping-norm": float, "dp-noise-multiplier": float, "dp-clipping": str, "dp-delta": float}
DP_DEFAULTS = {"dp-clipping-norm": 0.0, "dp-noise-multiplier": 1.0, "dp-clipping": "server", "dp-delta": 1e-5}
# Keys newer than some recorded runs, with the value those runs had in effect (their --resume compares them).
LATER_DEFAULTS = {"server-momentum": 0.9}


def default_server_lr(strategy: str) -> float:
    """--server-lr when not given: FedAdam's eta 0.01 (Flower's default: 0.1); FedAvgM's plain step 1.0."""
    return 1.0 if strategy == "fedavgm" else 0.01


@dataclass
class Federation:
    settings: dict[str, Any]        # the run config (SETTINGS)
    cfg: RunConfig                  # the `lmforge train` config every client trains with
    data: TokenData
    clients: list[dict[str, Any]]   # clients.json rows of the first `clients` clients
    server_job: TrainJob            # the full train split: the objective, the held-out batches
    template: torch.nn.Module       # the global model of round 0

    def new_model(self, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """A copy of the round-0 model, with `state` (exchanged_state of a global model) loaded."""
        model = copy.deepcopy(self.template)
        if state is not None:
            load_exchanged_state(model, state)
        return model

    def shard(self, partition: int) -> np.ndarray:
        """The tokens of client `partition` (a slice of the train split)."""
        c = self.clients[partition]
        return self.data.split("train")[c["offset"]:c["offset"] + c["tokens"]]


def exchanged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a client sends and the server aggregates: the LoRA adapter of a model carrying one, else
    every weight (a tied tensor once)."""
    state = adapter_state_dict(model) if has_lora(model) else model_state_for_saving(model)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def load_exchanged_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put `state` (exchanged_state's names) into `model`, checking names and shapes."""
    if not has_lora(model):
        load_state_checked(model, state, Path("<federated update>"))
        return
    live = adapter_state_dict(model)  # the adapter's own parameters
    if set(live) != set(state):
        odd = sorted(set(live) ^ set(state))
        raise LMForgeError(f"the update does not fit the model's LoRA adapter ({', '.join(odd[:3])})")
    with torch.no_grad():
        for k, p in live.items():
            p.copy_(state[k])


def run_config_of(settings: dict[str, Any]) -> dict[str, Any]:
    """Checked Flower run config from `lmforge federated`'s settings (the DP keys default to off)."""
    settings = {**DP_DEFAULTS, **LATER_DEFAULTS, **settings}
    missing = sorted(set(SETTINGS) - set(settings))
    if missing:
        raise LMForgeError(f"the federated run config lacks {', '.join(missing)}")
    return {k: SETTINGS[k](settings[k]) for k in SETTINGS}


def federation(run_config: dict[str, Any]) -> Federation:
    """The Federation of a Flower run config (built once per process and run config)."""
    return _federation(json.dumps({k: run_config[k] for k in SETTINGS}, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _federation(key: str) -> Federation:
    s = json.loads(key)
    check_settings(s)
    data = TokenData(s["data"])
    clients = read_clients(s["data"])
    if s["clients"] > len(clients):
        raise LMForgeError(f"--clients {s['clients']}: {s['data']} holds {len(clients)} clients")
    cfg = from_dict(RunConfig, json.loads(s["config"]))
    job = pretraining_job(cfg, s["data"])
    seq_len = job.config["train"]["seq_len"]
    chosen = clients[:s["clients"]]
    small = [c for c in chosen if c["tokens"] < seq_len + 1]
    if small:
        c = small[0]
        raise LMForgeError(f"client {c['id']} ({c['play']}, {c['role']}) of {s['data']} holds {c['tokens']} tokens, "
                           f"fewer than train.seq_len + 1 ({seq_len + 1}); lower train.seq_len")
    if s["base"]:
        from lmforge.infer.llm import LLM

        template = LLM.load(s["base"]).model
    else:
        torch.manual_seed(cfg.train.seed)  # the init `lmforge train` starts from
        template = job.build_model()
    return Federation(settings=s, cfg=cfg, data=data, clients=chosen, server_job=job, template=template.float().train())


def check_settings(s: dict[str, Any]) -> None:
    """The federated settings a user gives, each checked with the flag that sets it."""
    for key in ("clients", "clients-per-round", "rounds", "local-steps"):
        if s[key] <= 0:
            raise LMForgeError(f"--{key} must be positive, got {s[key]}")
    if s["clients-per-round"] > s["clients"]:
        raise LMForgeError(f"--clients-per-round {s['clients-per-round']} exceeds --clients {s['clients']}")
    if s["strategy"] not in STRATEGIES:
        raise LMForgeError(f"unknown --strategy '{s['strategy']}'; choose one of: {', '.join(STRATEGIES)}")
    if s["proximal-mu"] < 0:
        raise LMForgeError(f"--proximal-mu must not be negative, got {s['proximal-mu']}")
    if s["server-lr"] <= 0:
        raise LMForgeError(f"--server-lr must be positive, got {s['server-lr']}")
    if not 0 <= s["server-momentum"] < 1:
        raise LMForgeError(f"--server-momentum must lie in [0, 1), got {s['server-momentum']}")
    if s["dp-clipping-norm"] < 0:
        raise LMForgeError(f"--dp-clipping-norm must be positive, got {s['dp-clipping-norm']}")
    if s["dp-noise-multiplier"] < 0:
        raise LMForgeError(f"--dp-noise-multiplier must not be negative, got {s['dp-noise-multiplier']}")
    if s["dp-clipping"] not in DP_CLIPPING:
        raise LMForgeError(f"unknown --dp-clipping '{s['dp-clipping']}'; choose one of: {', '.join(DP_CLIPPING)}")
    if not 0 < s["dp-delta"] < 1:
        raise LMForgeError(f"--dp-delta must lie strictly between 0 and 1, got {s['dp-delta']}")
    if s["dp-clipping-norm"] > 0 and s["strategy"] in ("fedadam", "fedavgm"):
        # Flower's wrapper adds the noise to the strategy's output; FedAdam's per-coordinate step
        # divides by its second moment and FedAvgM's adds past rounds' steps, so the output's
        # sensitivity is no longer clipping_norm / K.
        name = {"fedadam": "FedAdam", "fedavgm": "FedAvgM"}[s["strategy"]]
        raise LMForgeError(f"differential privacy (--dp-clipping-norm) needs --strategy fedavg or fedprox: Flower's "
                           f"DP wrapper noises the aggregate, and {name}'s server step rescales it, so no epsilon holds")


def base_model_section(base: str) -> dict[str, Any]:
    """The `model` config section that rebuilds --base's architecture (its every key set)."""
    from lmforge.infer.llm import LLM

    return dataclasses.asdict(LLM.load(base).model.cfg)
