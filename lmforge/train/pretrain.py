"""`lmforge train`: a fresh model pretrained on a prepared data directory.

    run_training(data, out, config_file=None, overrides=(), recipe=None, resume=None, overwrite=False)

assembles the config (recipe < config file < --section.key overrides; on resume the checkpoint's
config is the base), builds the TrainJob of train.objective (`objectives.PRETRAINING`) and runs
the one training loop on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import LMForgeError
from lmforge.train import distributed as D
from lmforge.train.config import RunConfig, build_config, effective_seq_len, resolve_model, resolved_dict, validate
from lmforge.train.job import PretrainContext, TrainJob
from lmforge.train.loop import train_job
from lmforge.train.objectives import pretraining_spec
from lmforge.train.run_dir import saved_config


def run_training(data: str, out: str, config_file: str | None = None, overrides: Sequence[str] = (),
                 recipe: str | None = None, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Assemble the config and train (what `lmforge train` calls). Returns the run's summary dict."""
    base = saved_config(resume, Path(out)) if resume else None
    cfg = build_config(config_file, overrides, recipe, base=base)
    return train(cfg, data, out, resume=resume, overwrite=overwrite)


def train(cfg: RunConfig, data_dir: str | Path, out_dir: str | Path, resume: str | Path | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Pretrain per `cfg` on the prepared data in `data_dir`, writing the run to `out_dir`."""
    if resume and overwrite:
        raise LMForgeError("pass either --resume or --overwrite, not both")
    return train_job(pretraining_job(cfg, data_dir), cfg.train, out_dir, resume=resume, overwrite=overwrite)


def pretraining_job(cfg: RunConfig, data_dir: str | Path, train_tokens: Any = None,
                    train_name: str | None = None) -> TrainJob:
    """The TrainJob of `lmforge train`: a fresh model of the preset's family, trained with
    train.objective on the splits of a prepared data directory. `train_tokens` (named `train_name`
    in messages) replace the train split: a federated client's shard of it."""
    spec = pretraining_spec(cfg.train.objective)
    data = spec.open_data(data_dir)  # token memmaps (TokenData), or image-text rows for clip
    data.split(cfg.data.train_split), data.split(cfg.data.val_split)  # check the split names
    model_cfg = resolve_model(cfg, data.vocab_size)
    validate(cfg, model_cfg)
    t = cfg.train
    seq_len = effective_seq_len(cfg, model_cfg)
    train_split, val_split = cfg.data.train_split, cfg.data.val_split
    from lmforge.models.registry import family_of

    family = family_of(model_cfg)
    if spec.family is not None and spec.family != family.name:
        raise LMForgeError(f"train.objective {t.objective} trains a {spec.family} model, but model.preset "
                           f"{cfg.model.preset} is a {family.name}; choose a {spec.family} preset")
    n_tok, n_bytes = data.tokens(val_split), data.bytes(val_split)
    ctx = PretrainContext(train_tokens=data.split(train_split) if train_tokens is None else train_tokens,
                          val_tokens=data.split(val_split), seq_len=seq_len,
                          micro_batch_size=t.micro_batch_size, micro_batches_per_step=t.grad_accum * D.world_size(),
                          eval_iters=t.eval_iters, seed=t.seed, tokenizer=data.tokenizer(), options=cfg.objective,
                          model_cfg=model_cfg, train_name=train_name or f"{train_split} split of {data.directory}",
                          val_name=f"{val_split} split of {data.directory}",
                          val_bytes_per_token=n_bytes / n_tok if n_tok and n_bytes else None)
    parts = spec.make(ctx)
    flops = model_cfg.flops_per_token(seq_len) if hasattr(model_cfg, "flops_per_token") else None
    return TrainJob(
        name=t.objective, config=resolved_dict(cfg, model_cfg), build_model=lambda: family.model_cls(model_cfg),
        objective=parts.objective, train_batches=parts.train_batches, eval_batches=parts.eval_batches,
        eval_coverage=parts.eval_coverage,
        files={"tokenizer.json": data.tokenizer_path.read_bytes()},
        run_files={"data_meta.json": (data.directory / "meta.json").read_bytes()},
        data_fingerprint={"dir": str(data.directory), "splits": data.meta.get("splits")},
        tokens_per_step=parts.tokens_per_step, flops_per_token=flops, bytes_per_token=parts.bytes_per_token,
        report_perplexity=parts.report_perplexity,
        lora=cfg.lora,
        description=f"global batch {t.micro_batch_size * ctx.micro_batches_per_step} x {seq_len} tokens")

