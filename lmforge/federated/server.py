"""The ServerApp: rounds of a Flower strategy around lmforge's clients, with global evaluation.

Each round r: the strategy samples `clients-per-round` of the connected nodes (Python's `random`,
seeded with (train.seed, r) so a resumed run samples as the uninterrupted one) and sends them the
global model and the round's config (`round_lr`); it aggregates their replies (FedAvg: the weighted
mean, weights `num-examples`; FedProx: the same, clients add the proximal term; FedAdam: Adam on the
averaged update, server-side; FedAvgM: SGD with momentum on it, Hsu et al. 2019). The new global
model is evaluated on the held-out plays (the val split: loss and bits per byte as `lmforge train`
computes them) and written, in this order:
  RUN/metrics.jsonl  one row per round: round, val_loss, val_bits_per_byte, client_loss (the clients'
                     mean local loss, weighted like the aggregation; FedProx's includes its term), bytes_sent / bytes_received
                     (ArrayRecord payload bytes to and from the clients), nodes (sampled node ids),
                     lr, elapsed
  RUN/loss.png       val bits per byte and client loss against the round
  RUN/model/         the global model, an lmforge model directory (replaced atomically), holding
                     federated_state.json (the round it ends) and, for FedAdam and FedAvgM,
                     server_state.safetensors (their moments)
A killed run resumes from RUN/model: its round, weights and strategy state; metrics rows of later
rounds are dropped and written again.

Differential privacy (--dp-clipping-norm C): Flower's fixed-clipping wrapper around FedAvg / FedProx,
DifferentialPrivacyServerSideFixedClipping (the server clips each client's update to L2 norm C) or
...ClientSideFixedClipping (each client clips its own, Flower's fixedclipping_mod), then adds Gaussian
noise of standard deviation z * C / K to the aggregate (z = --dp-noise-multiplier, K = clients per
round; McMahan et al., 2018). Under DP every client weighs the same (it reports the tokens of its
round, equal for all), which the accounting assumes. Flower's RDP accountant (flwr[dp]: Google's
dp-accounting) composes one release per round, without sampling amplification (Flower's only choice
for fixed clipping): metrics.jsonl's `epsilon` is the client-level epsilon spent so far at --dp-delta,
and RUN/model/federated_state.json keeps it (and the accountant's state, for --resume).

Client learning rate: constant within a round, cosine over rounds from train.lr to train.min_lr
(train.muon_lr scaled alike); fresh optimizer state every round, as clients are sampled anew.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedAvgM, FedProx,
                                     Strategy)

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.federated.setup import Federation, exchanged_state, federation
from lmforge.train.job import to_device
from lmforge.train.metrics import read_rows
from lmforge.train.optim import lr_at

MODEL_DIR = "model"
STATE_FILE = "federated_state.json"
SERVER_TENSORS = "server_state.safetensors"
FEDADAM_BETAS = (0.9, 0.99)  # Flower's defaults
FEDADAM_TAU = 1e-3

def make_server_app(settings: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; it reads the federation from `settings`, else from Flower's run config."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_rounds(federation(settings or context.run_config), grid)

    return app


server_app = make_server_app()  # the deployment engine's (flower-superlink): settings from `flwr run --run-config`


def make_strategy(fed: Federation) -> Strategy:
    """The Flower strategy of --strategy; sampling `clients-per-round` of `clients` nodes; inside
    Flower's fixed-clipping DP wrapper when --dp-clipping-norm is given."""
    s = fed.settings
    n, k = s["clients"], s["clients-per-round"]
    common = dict(fraction_train=k / n, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=n)
    if s["strategy"] == "fedprox":
        strategy: Strategy = FedProx(**common, proximal_mu=s["proximal-mu"])
    elif s["strategy"] == "fedadam":
        return FedAdam(**common, eta=s["server-lr"], beta_1=FEDADAM_BETAS[0], beta_2=FEDADAM_BETAS[1], tau=FEDADAM_TAU)
    elif s["strategy"] == "fedavgm":
        return FedAvgM(**common, server_learning_rate=s["server-lr"], server_momentum=s["server-momentum"])
    else:
        strategy = FedAvg(**common)
    if s["dp-clipping-norm"] <= 0:
        return strategy
    wrapper = (DifferentialPrivacyServerSideFixedClipping if s["dp-clipping"] == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(strategy, noise_multiplier=s["dp-noise-multiplier"], clipping_norm=s["dp-clipping-norm"],
                   num_sampled_clients=k, accountant=privacy_accountant(fed))


def privacy_accountant(fed: Federation) -> Any:
    """Flower's RDP accountant over the `clients` population, or None without noise (no epsilon)."""
    s = fed.settings
    if s["dp-noise-multiplier"] <= 0:
        return None
    try:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return RdpAccountant(PrivacyConfig(target_delta=s["dp-delta"], population_size=s["clients"],
                                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                           sampling_method=SamplingMethod.NO_AMPLIFICATION))
    except ImportError as e:
        raise LMForgeError('--dp-noise-multiplier reports epsilon with Flower\'s RDP accountant: '
                           'pip install "flwr[dp]"') from e


def privacy_spent(strategy: Strategy) -> dict[str, float]:
    """{'epsilon': spent so far, 'dp_delta'} of a DP strategy with an accountant, else {}."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    return {} if spent is None else {"epsilon": float(spent.epsilon), "dp_delta": float(spent.delta)}


def round_lr(fed: Federation, server_round: int) -> tuple[float, float]:
    """(lr, muon_lr) of the clients in `server_round`: cosine over the rounds, constant within one."""
    t = fed.cfg.train
    min_lr = t.min_lr if t.min_lr is not None else t.lr / 10
    lr = lr_at(server_round - 1, t.lr, min_lr, 0, fed.settings["rounds"])
    return lr, t.muon_lr * lr / t.lr


def payload_bytes(messages: list[Message]) -> int:
    return sum(rec.count_bytes() for m in messages if m.has_content() for rec in m.content.array_records.values())


@torch.no_grad()
def evaluate_global(fed: Federation, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """val_loss and val_bits_per_byte of the global model on the held-out split, as the loop computes them."""
    job = fed.server_job
    model = fed.new_model(state).eval()
    losses = [float(job.objective(model, to_device(b, torch.device("cpu")))[0]) for b in job.eval_batches()]
    val_loss = sum(losses) / len(losses)
    return {"val_loss": val_loss, "val_bits_per_byte": val_loss / math.log(2) / job.bytes_per_token}


def run_rounds(fed: Federation, grid: Grid) -> None:
    out = Path(fed.settings["out"])
    out.mkdir(parents=True, exist_ok=True)  # under the deployment engine nothing made it before
    strategy = make_strategy(fed)
    done, state = resume_point(fed, strategy)
    rows = [r for r in read_rows(out / ckpt_io.RUN_METRICS) if r.get("round", 0) <= done] \
        if (out / ckpt_io.RUN_METRICS).is_file() else []
    ckpt_io.atomic_write_text(out / ckpt_io.RUN_METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    arrays = ArrayRecord(state)
    elapsed_before = rows[-1]["elapsed"] if rows else 0.0
    start = time.perf_counter()
    for r in range(done + 1, fed.settings["rounds"] + 1):
        random.seed(f"{fed.cfg.train.seed}/{r}")  # Flower samples nodes with Python's random
        np.random.seed(zlib.crc32(f"{fed.cfg.train.seed}/{r}".encode()))  # and draws DP noise with numpy's
        lr, muon_lr = round_lr(fed, r)
        messages = list(strategy.configure_train(r, arrays, ConfigRecord({"lr": lr, "muon-lr": muon_lr}), grid))
        replies = list(grid.send_and_receive(messages))
        failed = [m for m in replies if m.has_error()]
        if failed:
            raise LMForgeError(f"round {r}: {len(failed)} of {len(replies)} clients failed: {failed[0].error.reason}")
        aggregated, metrics = strategy.aggregate_train(r, replies)
        if aggregated is None:
            raise LMForgeError(f"round {r}: no client replied")
        # The global model stays in the model's dtype (FedAdam's numpy step returns float64), so a
        # resumed run continues from exactly what the uninterrupted one holds.
        state = {k: v.float() for k, v in aggregated.to_torch_state_dict().items()}
        arrays = ArrayRecord(state)
        if isinstance(strategy, FedAvgM):
            strategy.current_arrays = arrays  # its next step starts from the float32 model a resume loads
        row = {"round": r, **evaluate_global(fed, state), "client_loss": float(metrics["train_loss"]),
               "bytes_sent": payload_bytes(messages), "bytes_received": payload_bytes(replies),
               "nodes": sorted(m.metadata.dst_node_id for m in messages), "lr": lr,
               **privacy_spent(strategy), "elapsed": round(elapsed_before + time.perf_counter() - start, 3)}
        rows.append(row)
        with open(out / ckpt_io.RUN_METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        plot_rounds(rows, out / "loss.png", fed)
        save_global(fed, state, r, strategy)


def resume_point(fed: Federation, strategy: Strategy) -> tuple[int, dict[str, torch.Tensor]]:
    """(rounds done, the global model's exchanged state) from RUN/model, or (0, the initial model)."""
    d = Path(fed.settings["out"]) / MODEL_DIR
    if not (d / STATE_FILE).is_file():
        return 0, exchanged_state(fed.template)
    saved = ckpt_io.read_json(d / STATE_FILE)
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and "accountant" in saved.get("dp", {}):
        accountant.load_state_dict(saved["dp"]["accountant"])
    if isinstance(strategy, FedAdam) and (d / SERVER_TENSORS).is_file():
        tensors = ckpt_io.load_tensors(d / SERVER_TENSORS)
        strategy.m_t = {k[2:]: v.numpy() for k, v in tensors.items() if k.startswith("m.")}
        strategy.v_t = {k[2:]: v.numpy() for k, v in tensors.items() if k.startswith("v.")}
    if isinstance(strategy, FedAvgM) and (d / SERVER_TENSORS).is_file():
        tensors = ckpt_io.load_tensors(d / SERVER_TENSORS)
        keys = list(exchanged_state(fed.template))  # Flower keeps the momentum as a list in the arrays' order
        strategy.momentum_vector = [tensors[f"momentum.{k}"].numpy() for k in keys]
    model = fed.new_model()
    ckpt_io.load_state_checked(model, ckpt_io.load_tensors(d / ckpt_io.MODEL_WEIGHTS), d / ckpt_io.MODEL_WEIGHTS)
    return int(saved["round"]), exchanged_state(model)


def save_global(fed: Federation, state: dict[str, torch.Tensor], server_round: int, strategy: Strategy) -> None:
    """RUN/model: the global model after `server_round`, with what resuming needs, replaced atomically."""
    out = Path(fed.settings["out"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.partial-", dir=out))
    try:
        saved: dict[str, Any] = {"round": server_round, "rounds": fed.settings["rounds"],
                                 "strategy": fed.settings["strategy"]}
        if fed.settings["dp-clipping-norm"] > 0:
            accountant = getattr(strategy, "accountant", None)
            saved["dp"] = {"clipping_norm": fed.settings["dp-clipping-norm"], "clipping": fed.settings["dp-clipping"],
                           "noise_multiplier": fed.settings["dp-noise-multiplier"],
                           "clients_per_round": fed.settings["clients-per-round"],
                           "population": fed.settings["clients"], "releases": server_round, **privacy_spent(strategy),
                           **({"accountant": accountant.state_dict()} if accountant is not None else {})}
        extra = {STATE_FILE: json.dumps(saved, indent=2).encode()}
        ckpt_io.write_model_dir(tmp, fed.new_model(state), tokenizer_path=fed.data.tokenizer_path, extra_files=extra)
        if isinstance(strategy, FedAdam) and strategy.m_t:
            tensors = {f"m.{k}": torch.from_numpy(v) for k, v in strategy.m_t.items()}
            tensors.update({f"v.{k}": torch.from_numpy(v) for k, v in strategy.v_t.items()})
            ckpt_io.save_tensors(tmp / SERVER_TENSORS, tensors)
        if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
            tensors = {f"momentum.{k}": torch.from_numpy(np.ascontiguousarray(v))
                       for k, v in zip(state, strategy.momentum_vector, strict=True)}
            ckpt_io.save_tensors(tmp / SERVER_TENSORS, tensors)
        ckpt_io.replace_dir_atomically(tmp, out / MODEL_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot_rounds(rows: list[dict[str, Any]], path: Path, fed: Federation) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rounds = [r["round"] for r in rows]
    ax.plot(rounds, [r["val_bits_per_byte"] for r in rows], "o-", color="C0", markersize=3)
    ax.set_ylabel("global model: held-out bits per byte", color="C0")
    ax.set_xlabel("round")
    local = ax.twinx()
    local.plot(rounds, [r["client_loss"] for r in rows], color="C1", linewidth=1)
    local.set_ylabel(f"clients' local loss ({fed.server_job.objective.loss_label})", color="C1")
    s = fed.settings
    ax.set_title(f"{s['strategy']}: {s['clients-per-round']} of {s['clients']} clients, {s['local-steps']} local steps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    ckpt_io.atomic_write_bytes(path, buf.getvalue())
