"""FedAvg against centralised training and FedSGD on the LEAF-style Shakespeare federation.

    python benchmarks/federated.py [--data data/federated-shakespeare] [--out runs/federated] [--clients 100]
                                   [--clients-per-round 10] [--rounds 20] [--local-steps 5]
                                   [--fedsgd-rounds R_SGD] [--strategy fedavg|fedavgm|fedadam] [--quick]
                                   [--results PATH]

The demo model's shape (recipe demo: 4 x 256, SwiGLU, Muon) with a smaller batch; three runs from
the same initial weights, each evaluated on the held-out plays (bits per byte, the loop's formula):
  fedavg       `lmforge federated --strategy fedavg`: R rounds, K of N clients, S local steps each
               (--strategy fedavgm / fedadam: that server optimizer instead; the keys keep the name fedavg)
  fedsgd       the same with one local step (McMahan et al.'s FedSGD baseline), R_SGD rounds (default R)
  centralised  `lmforge train` on the union of the N clients' shards for R * K * S steps: the same
               tokens processed as FedAvg, and the same learning-rate span
The target is the worse of the two federated runs' final bits per byte (a level both reach);
rounds_to_target_* is the first round at or below it. Issue targets: fedavg_bpb within 0.1 of
centralised_bpb, rounds_to_target_fedsgd >= 10 x rounds_to_target_fedavg. With R_SGD = R the ratio
cannot exceed R / rounds_to_target_fedavg (FedSGD reaches the target at its last round at most);
--fedsgd-rounds 200 gives FedSGD the rounds to show a 10x ratio (or not), at about 7 s a round. Prints the table, then
one JSON line. --quick: a 1-layer model, 4 clients, 2 rounds (checks the chain runs, in seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmforge.bench.results import add_results_flag, publish
from lmforge.data.federated_shakespeare import build_federated_shakespeare, read_clients
from lmforge.federated.run import run_federated
from lmforge.train.metrics import read_rows

# On top of the demo recipe (its model and optimizer): batch 8 x 128 tokens, so a client's step
# sees about a third of a median role's text.
TRAIN = ["--train.micro_batch_size", "8", "--train.seq_len", "128", "--train.eval_iters", "20",
         "--train.progress", "false"]
QUICK = ["--model.preset", "tiny", "--model.n_layer", "1", "--train.seq_len", "16", "--train.micro_batch_size", "2",
         "--train.eval_iters", "2", "--train.progress", "false"]


def rounds_to(rows: list[dict], target: float) -> int | None:
    return next((r["round"] for r in rows if r["val_bits_per_byte"] <= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="federated", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/federated-shakespeare", help="built here first when missing")
    p.add_argument("--out", default="runs/federated")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--fedsgd-rounds", type=int, default=None, help="FedSGD's rounds (default: --rounds)")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedavgm", "fedadam"],
                   help="the multi-step row's Flower strategy (its keys stay fedavg_*; FedSGD stays plain FedAvg)")
    p.add_argument("--quick", action="store_true", help="a tiny model, 4 clients, 2 rounds: checks the chain runs")
    add_results_flag(p, "federated")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    data, out = Path(a.data), Path(a.out)
    if not (data / "clients.json").is_file():
        build_federated_shakespeare(data)
    n, k, rounds, steps = (4, 2, 2, 2) if a.quick else (a.clients, a.clients_per_round, a.rounds, a.local_steps)
    recipe, flags = (None, QUICK) if a.quick else ("demo", TRAIN)
    fed = dict(clients=n, clients_per_round=k, rounds=rounds, engine="inprocess", recipe=recipe, overwrite=True)
    runs = {}
    sgd_rounds = a.fedsgd_rounds or rounds
    for name, local_steps, r, strategy in (("fedavg", steps, rounds, a.strategy), ("fedsgd", 1, sgd_rounds, "fedavg")):
        start = time.perf_counter()
        run_federated(str(data), str(out / name), local_steps=local_steps, overrides=flags, strategy=strategy,
                      **{**fed, "rounds": r})
        runs[name] = {"rows": read_rows(out / name / "metrics.jsonl"), "minutes": (time.perf_counter() - start) / 60}
        print(f"federated: {name} done in {runs[name]['minutes']:.1f} min", file=sys.stderr, flush=True)

    # Centralised: the same tokens as FedAvg (R * K * S steps of the same batch) on the N clients' text.
    from lmforge.data.dataset import TokenData
    from lmforge.train.config import build_config
    from lmforge.train.loop import train_job
    from lmforge.train.pretrain import pretraining_job

    union = sum(c["tokens"] for c in read_clients(data)[:n])  # the first N clients lie first in train.bin
    cfg = build_config(overrides=flags + ["--train.max_steps", str(rounds * k * steps), "--train.warmup_steps", "0",
                                          "--train.eval_every", "0"], recipe=recipe)
    job = pretraining_job(cfg, data, train_tokens=TokenData(data).split("train")[:union],
                          train_name=f"the first {n} clients' text")
    start = time.perf_counter()
    summary = train_job(job, cfg.train, out / "centralised", overwrite=True)
    central_minutes = (time.perf_counter() - start) / 60

    final = {name: r["rows"][-1]["val_bits_per_byte"] for name, r in runs.items()}
    target = max(final.values())
    result = {"centralised_bpb": summary["val_bpb"], "fedavg_bpb": final["fedavg"], "fedsgd_bpb": final["fedsgd"],
              "rounds_to_target_fedavg": rounds_to(runs["fedavg"]["rows"], target),
              "rounds_to_target_fedsgd": rounds_to(runs["fedsgd"]["rows"], target), "target_bpb": target,
              "clients": n, "clients_per_round": k, "rounds": rounds, "fedsgd_rounds": sgd_rounds, "local_steps": steps,
              "centralised_steps": rounds * k * steps, "quick": a.quick, "strategy": a.strategy,
              "minutes": {"fedavg": round(runs["fedavg"]["minutes"], 2), "fedsgd": round(runs["fedsgd"]["minutes"], 2),
                          "centralised": round(central_minutes, 2)}}
    result["fedavg_gap_bpb"] = result["fedavg_bpb"] - result["centralised_bpb"]
    result["rounds_ratio"] = result["rounds_to_target_fedsgd"] / result["rounds_to_target_fedavg"]
    print(f"{'run':<12} {'held-out bpb':>12} {'rounds to ' + format(target, '.3f'):>16} {'minutes':>8}")
    for name in ("centralised", "fedavg", "fedsgd"):
        bpb = result[f"{name}_bpb"]
        to = "-" if name == "centralised" else str(result[f"rounds_to_target_{name}"])
        label = a.strategy if name == "fedavg" else name
        print(f"{label:<12} {bpb:>12.4f} {to:>16} {result['minutes'][name]:>8.1f}")
    publish("federated", result, results=a.results, wall_s=time.perf_counter() - t0)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
