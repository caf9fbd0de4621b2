"""Training: one loop (`loop.py`) for every TrainJob (`job.py`), the pretraining objectives of
`lmforge train` by name (`objectives.py`: causal LM, masked LM, span corruption, text infilling),
AdamW/Muon + warmup/cosine (`optim.py`, `muon.py`), typed config (`config.py`), the run directory
(`run_dir.py`), DDP (`distributed.py`) and telemetry (`metrics.py`).

Entry points: `lmforge.train.pretrain.run_training(data, out, ...)` (what `lmforge train` calls),
`lmforge.train.pretrain.train(cfg, data_dir, out_dir, resume=None, overwrite=False)` and
`lmforge.train.loop.train_job(job, train_cfg, out)` (every fine-tuning method). This package
imports nothing eagerly so `lmforge --help` stays fast.
"""
