"""Federated training with Flower: lmforge's one training loop inside Flower's ClientApp / ServerApp.

    setup.py   what both sides read from Flower's run config: data, clients, model, train config
    client.py  the ClientApp: `--local-steps` of train_job on its shard, returns the update
    server.py  the ServerApp: rounds of a Flower strategy (FedAvg, FedProx, FedAdam), global
               evaluation on the held-out plays, metrics.jsonl + loss.png, the global model, resume
    grid.py    an in-process Flower Grid: the apps without Flower's Ray-only simulation backend
    run.py     `lmforge federated`: the run directory, the run config, the engine
"""
