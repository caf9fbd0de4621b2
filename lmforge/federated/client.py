"""The ClientApp: a data holder's local training, lmforge's one training loop on its own shard.

On a `train` message (the global model's ArrayRecord + the round's ConfigRecord) a client builds
`lmforge train`'s TrainJob on its shard (`Federation.shard`, the partition Flower's node config
names), starting from the global model, and runs `train_job` for `local-steps` steps at the round's
constant learning rate (the server's schedule, server.round_lr) into a temporary run directory. It
answers with the trained weights (`exchanged_state`) and a MetricRecord: `num-examples` (its shard's
tokens, FedAvg's weight n_k; under differential privacy the tokens it trained this round, equal for
every client, as DP-FedAvg's uniform weighting needs) and `train_loss` (the mean loss of its local steps).
With client-side DP clipping (--dp-clipping client) Flower's fixedclipping_mod clips the update the
client sends to the norm the server's wrapper puts in the round's config.

The data position is seeded per client and round (train.seed + (round - 1) * clients + partition):
client 0 of round 1 draws the batches `lmforge train --train.seed SEED` would, so one client for one
round is plain local training. FedProx adds mu/2 * ||w - w_global||^2 to the objective's loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from lmforge import checkpoint as ckpt_io
from lmforge.federated.setup import Federation, exchanged_state, federation
from lmforge.train.loop import train_job
from lmforge.train.metrics import read_rows
from lmforge.train.pretrain import pretraining_job


def make_client_app(settings: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; it reads the federation from `settings`, else from Flower's run config."""
    app = ClientApp(mods=[client_side_clipping])

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        return train(message, context, settings or context.run_config)

    return app


def train(message: Message, context: Context, settings: dict[str, Any]) -> Message:
    """Answer a `train` message: local training from the global model it carries."""
    fed = federation(settings)
    config = message.content["config"]
    global_state = message.content["arrays"].to_torch_state_dict()
    partition = int(context.node_config["partition-id"])
    state, loss, trained = local_training(fed, partition, global_state, int(config["server-round"]),
                                          float(config["lr"]), float(config["muon-lr"]),
                                          float(config.get("proximal-mu", 0.0)))
    weight = trained if fed.settings["dp-clipping-norm"] > 0 else fed.clients[partition]["tokens"]
    metrics = MetricRecord({"num-examples": weight, "train_loss": loss})
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=message)


def client_side_clipping(message: Message, context: Context, call_next: Any) -> Message:
    """Flower's fixedclipping_mod on the rounds whose config carries a clipping norm (the client-side
    DP wrapper's); other messages pass through, so one ClientApp serves every run config."""
    config = message.content.config_records.get("config") if message.has_content() else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(message, context, call_next)
    return call_next(message, context)


client_app = make_client_app()  # the deployment engine's (flower-supernode): settings from `flwr run --run-config`


def local_training(fed: Federation, partition: int, global_state: dict[str, torch.Tensor], server_round: int,
                   lr: float, muon_lr: float, proximal_mu: float = 0.0) -> tuple[dict[str, torch.Tensor], float, int]:
    """`local-steps` of the one loop on client `partition`'s shard from `global_state`:
    (the trained exchanged_state, the mean training loss of those steps, the tokens they trained)."""
    t = dataclasses.replace(fed.cfg.train, max_steps=fed.settings["local-steps"], lr=lr, min_lr=lr, muon_lr=muon_lr,
                            warmup_steps=0, max_minutes=None, eval_every=0, ckpt_every=0, keep_checkpoints=1,
                            keep_best=False, log_every=1, progress=False,
                            seed=fed.cfg.train.seed + (server_round - 1) * len(fed.clients) + partition)
    cfg = dataclasses.replace(fed.cfg, train=t)
    c = fed.clients[partition]
    job = pretraining_job(cfg, fed.settings["data"], train_tokens=fed.shard(partition),
                          train_name=f"shard of client {c['id']} ({c['play']}, {c['role']})")
    objective = ProximalObjective(job.objective, global_state, proximal_mu) if proximal_mu > 0 else job.objective
    job = dataclasses.replace(job, build_model=lambda: fed.new_model(global_state), objective=objective,
                              eval_batches=None, eval_coverage=None, files={}, run_files={})
    with tempfile.TemporaryDirectory(prefix="lmforge-client-") as out:
        with contextlib.redirect_stderr(io.StringIO()):  # the loop's start/done lines, once per client and round
            summary = train_job(job, t, out)
        model = fed.new_model()
        ckpt_io.load_state_checked(model, ckpt_io.load_tensors(Path(summary["checkpoint"]) / ckpt_io.MODEL_WEIGHTS),
                                   Path(summary["checkpoint"]))
        losses = [r["loss"] for r in read_rows(Path(out) / ckpt_io.RUN_METRICS) if "loss" in r]
    return exchanged_state(model), sum(losses) / len(losses), int(summary["tokens"])


class ProximalObjective:
    """FedProx (Li et al., 2020): the objective's loss + mu/2 * ||w - w_global||^2 over the exchanged
    weights, which keeps a client's local steps near the global model."""

    def __init__(self, inner: Any, global_state: dict[str, torch.Tensor], mu: float):
        self.inner, self.mu = inner, mu
        self.name, self.loss_label = inner.name, inner.loss_label
        self.anchor = {k: v.detach().clone() for k, v in global_state.items()}

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = self.inner(model, batch)
        params = dict(model.named_parameters())
        prox = sum(((params[k] - w.to(params[k].device)) ** 2).sum() for k, w in self.anchor.items() if k in params)
        return loss + 0.5 * self.mu * prox, {**stats, "proximal": prox.detach()}
