"""Training: one loop (`loop.py`) for every objective (`objectives.py`), AdamW + warmup/cosine
(`optim.py`), typed config (`config.py`), deterministic token windows (`batches.py`), DDP
(`distributed.py`) and telemetry (`metrics.py`).

Entry points: `run_training(data, out, ...)` (what `lmforge train` calls) and
`train(cfg, data_dir, out_dir, resume=None, overwrite=False)`. Import them from
`lmforge.train.loop`; this package imports nothing eagerly so `lmforge --help` stays fast.
"""
