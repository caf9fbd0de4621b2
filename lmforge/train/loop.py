"""The training loop: one loop for every TrainJob (job.py).

    train_job(job, train_cfg, out, resume=None, overwrite=False) -> summary dict

Per optimizer step: set the scheduled learning rate, run grad_accum micro-batches (forward under
autocast, loss / grad_accum backward; DDP or FSDP syncs gradients only on the last one), unscale
(fp16), clip the global gradient norm (under FSDP the norm over every shard), step AdamW. Every
log_every steps a metrics.jsonl row; every eval_every steps validation loss / perplexity / bits per
byte plus the job's own metrics (and, with train.keep_best, checkpoints/best when the validation
loss improved); every ckpt_every steps a checkpoint; after either, loss.png (the y-axis named by the
objective's `loss_label`, the job's `plot_panels` below). Evaluation and a checkpoint always happen
at the end, including a stop forced by train.max_minutes.

Wall-clock budget (train.max_minutes, counted over resumes; `TimeBudget`): the budget covers
everything the run does. Once a few steps are timed, the trainer evaluates once to measure what an
evaluation costs (its real validation batches and the job's own evaluation, such as generation);
from then on the steps that fit in the time left, after the periodic evaluations and checkpoints
and with the final ones reserved, set where the cosine schedule ends (never beyond
train.max_steps), so the learning rate has decayed when time runs out. Such runs are not
bit-reproducible (their schedule depends on timing); runs without max_minutes are, including
across resumes.

Run directory handling (resume, --overwrite, what may be written where) is in run_dir.py; what
`lmforge train` trains is assembled in pretrain.py.

Exact resume: weights, AdamW moments, grad-scaler state, RNG states and the step counter (which
is the data position, see job.py) are saved; a resumed run continues as if never stopped. Under
train.parallelism fsdp (distributed.py) every process writes its shards of the weights and AdamW
moments (checkpoint.py's `sharded/`), and the run's last checkpoint also gathers the full weights
into model.safetensors, so `LLM.load(RUN)` reads it as any run. A sharded LoRA run's shards hold
only the trained tensors and their moments, and every checkpoint gathers its adapter (PEFT's files).
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmforge import checkpoint as ckpt_io
from lmforge.errors import LMForgeError
from lmforge.runtime import resolve_device
from lmforge.nn.lora import base_state_dict, trainable_parameters
from lmforge.nn.quant import quantization_of
from lmforge.train import distributed as D
from lmforge.train.adapters import (BASE_DIR, RUN_ADAPTER_FILES, load_trainable_state, prepare_lora,
                                    publish_adapter, trainable_state, write_adapter_model)
from lmforge.train.config import TrainConfig, config_hash, validate_train
from lmforge.train.energy import EnergyTracker
from lmforge.train.job import TrainJob, to_device
from lmforge.train.metrics import MetricsLog, peak_flops, plot_loss
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.train.run_dir import (PREVIOUS_RUN, RUN_ENTRIES, check_out_dir, check_resume_matches, holds_run,
                                   park_previous_run, resolve_resume, restore_previous_run, write_run_files)

_clock = time.perf_counter  # wall clock of the step timing (a test replaces it with a fake one)
_ESTIMATE_AFTER = 3  # steps timed before the max_minutes schedule estimate starts (step 1 includes warm-up)
EVAL_BAR_DELAY = 1.0  # seconds an evaluation runs before it shows a progress bar


def _say(msg: str, info: D.DistInfo) -> None:
    if info.is_main:
        print(f"lmforge train: {msg}", file=sys.stderr, flush=True)


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def training_precision(train_cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """(device, autocast dtype) the loop will train this process in: for the passes a task makes
    before training (DPO's reference log-probs), so they run where and as the training forward does."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if D.world_size() > 1 else 0
    device = resolve_device(train_cfg.device, "--train.device", local_rank)
    return device, _autocast_dtype(train_cfg.dtype, device)


def train_job(task: TrainJob, train_cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Run the one training loop on `task`, writing the run to `out_dir`."""
    out = Path(out_dir)
    if resume and overwrite:
        raise LMForgeError("pass either --resume or --overwrite, not both")
    validate_train(train_cfg)
    ckpt = resolve_resume(str(resume), out) if resume else None
    check_out_dir(out, resuming=bool(resume), overwrite=overwrite)
    state: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] = {}
    if ckpt is not None:
        state, tensors = ckpt_io.load_train_state(ckpt)
        check_resume_matches(ckpt, state, task.config, task.data_fingerprint)

    info = D.setup(train_cfg.device, train_cfg.parallelism)
    trainer = Trainer(task, train_cfg, out, info, ckpt, state, tensors, resume_requested=bool(resume),
                      overwrite=overwrite)
    try:
        return trainer.run()
    except BaseException:  # an error, Ctrl-C: before the first checkpoint, --out gets its old run back
        trainer.restore_parked_run()
        raise
    finally:
        trainer.energy.stop()  # codecarbon's threads end with the run, however it ends
        # DDP's reducer holds the process group: dropped here, the group is destroyed inside
        # destroy_process_group (which releases the GIL) rather than by the interpreter's cleanup, where
        # gloo's worker threads, still freeing a finished all_gather, wait for the GIL the joining main
        # thread holds (a deadlock seen under load: the last rank never exits)
        trainer.model = None
        gc.collect()
        D.teardown(info)


class Trainer:
    """One training run of `task` in this process (every rank runs one): `run()` builds or restores
    the model and optimizer, prepares the run directory and trains to train.max_steps (or the
    max_minutes budget), logging, evaluating and checkpointing on the way."""

    def __init__(self, task: TrainJob, train_cfg: TrainConfig, out: Path, info: D.DistInfo, ckpt: Path | None,
                 state: dict | None, tensors: dict[str, torch.Tensor], resume_requested: bool, overwrite: bool):
        self.task, self.t, self.resolved = task, train_cfg, task.config
        self.out, self.objective, self.info = out, task.objective, info
        self.ckpt, self.state, self.tensors = ckpt, state, tensors
        self.resume_requested, self.overwrite = resume_requested, overwrite
        self.device = info.device
        self.min_lr = train_cfg.min_lr if train_cfg.min_lr is not None else train_cfg.lr / 10
        self.per_step = self.t.grad_accum * info.world_size  # micro-batches per optimizer step, all ranks
        self.global_batch = self.t.micro_batch_size * self.per_step
        self.parked: Path | None = None
        self.lora: Any = None  # the adapter's LoRASettings once built (None: full fine-tuning)
        self.energy = EnergyTracker(train_cfg.carbon_region, enabled=info.is_main, processes=info.world_size)

    # ---- setup -----------------------------------------------------------------------------

    def _build(self) -> None:
        t, info = self.t, self.info
        self.dtype = _autocast_dtype(t.dtype, self.device)
        sharded_ckpt = self.ckpt is not None and ckpt_io.is_sharded(self.ckpt)
        if info.sharded:
            self._check_sharding(sharded_ckpt)
        elif sharded_ckpt:
            raise LMForgeError(f"{self.ckpt} is a sharded (FSDP) checkpoint: resume it under torchrun with "
                               "--train.parallelism fsdp, or consolidate its weights with `lmforge convert`")
        torch.manual_seed(t.seed)  # identical init on every rank and every device
        raw = self.task.build_model()
        # LoRA / QLoRA: base quantised and frozen, adapters added (train/adapters.py); None: full fine-tuning
        self.lora = prepare_lora(raw, self.task.lora, self.task.head_modules, seed=t.seed, device=self.device)
        if self.lora is not None and info.sharded and quantization_of(raw) is not None:
            raise LMForgeError("--train.parallelism fsdp shards parameters, and a quantised base (lora.quantize) is "
                               "held in buffers that every process would keep whole; use --train.parallelism ddp")
        if self.state is not None and not sharded_ckpt and self.lora is not None:  # the trained tensors only
            load_trainable_state(raw, self.tensors, self.ckpt / ckpt_io.TRAIN_STATE_TENSORS)
        elif self.state is not None and not sharded_ckpt:
            weights = ckpt_io.load_tensors(self.ckpt / ckpt_io.MODEL_WEIGHTS)
            ckpt_io.load_state_checked(raw, weights, self.ckpt / ckpt_io.MODEL_WEIGHTS)
        self.raw = raw.to(self.device)
        # the base a LoRA run's adapter goes on, by absolute path (the run may be loaded from elsewhere)
        self.base = str(Path(self.task.base or self.out / BASE_DIR).resolve()) if self.lora is not None else None
        # RUN/base of a LoRA run without a base directory, taken while the weights are whole (unsharded)
        self.initial_base = (base_state_dict(raw) if self.lora is not None and self.task.base is None
                             and self.state is None and info.is_main else None)
        self.raw.train()
        if t.activation_checkpointing:
            D.checkpoint_activations(self.raw)
        if info.sharded:
            D.shard(self.raw, info, param_dtype=self.dtype)
        # modules the objective trains beside the model (a distillation projection): in the optimizer
        # and the train state, not in the model files
        self.extra = self.task.extra_modules.to(self.device).train() if self.task.extra_modules is not None else None
        if self.extra is not None and info.sharded:
            raise LMForgeError("--train.parallelism fsdp shards the model, not the modules this objective trains "
                               f"beside it ({type(self.extra).__name__}); use --train.parallelism ddp")
        self.trained = self.raw if self.extra is None else torch.nn.ModuleList([self.raw, self.extra])
        self.trainable = [p for p in self.trained.parameters() if p.requires_grad]  # after sharding: its parameters
        if hasattr(self.task.train_batches, "bind"):
            self.task.train_batches.bind(self.raw, autocast=self.dtype)
        self.optimizer = build_optimizer(self.trained, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, self.device.type,
                                         name=t.optimizer, muon_lr=t.muon_lr, muon_momentum=t.muon_momentum,
                                         muon_weight_decay=t.muon_weight_decay)
        if sharded_ckpt:  # the weights and AdamW moments of this process's shards
            shards = D.sharded_state(self.raw, self.optimizer, trained_only=self.lora is not None)
            ckpt_io.load_sharded(self.ckpt, shards)
            D.load_sharded_state(self.raw, self.optimizer, shards)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        model: torch.nn.Module = torch.compile(self.raw) if t.compile else self.raw
        self.eval_model = model
        self.model = D.wrap(model, info)
        torch.manual_seed(t.seed + 1 + info.rank)  # dropout stream, distinct per rank

        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        self.horizon = t.max_steps
        self.best_val: float | None = None
        self.last_val: dict[str, float] | None = None
        if self.state is not None:
            self._restore()

    def _check_sharding(self, sharded_ckpt: bool) -> None:
        """What FSDP cannot do here, said before anything is built."""
        t = self.t
        if self.ckpt is not None and not sharded_ckpt:
            raise LMForgeError(f"{self.ckpt} is not a sharded checkpoint: resume it with --train.parallelism ddp")
        if t.optimizer == "muon":
            raise LMForgeError("train.optimizer muon orthogonalises whole weight matrices, which "
                               "--train.parallelism fsdp splits across processes; use adamw, or ddp")
        if self.dtype == torch.float16:
            raise LMForgeError("train.dtype float16 needs a gradient scaler, which --train.parallelism fsdp does not "
                               "support; use bfloat16")
        if hasattr(self.task.train_batches, "bind"):
            raise LMForgeError("on-policy rollouts (grpo, ppo) generate a different number of tokens on each "
                               "process, which FSDP's per-block all-gathers cannot follow; use --train.parallelism ddp")

    def _restore(self) -> None:
        s, tens, info = self.state, self.tensors, self.info
        src = self.ckpt / ckpt_io.TRAIN_STATE_TENSORS
        try:
            if s["optimizer"] is not None:  # None: a sharded checkpoint, loaded with the weights in _build
                self.optimizer.load_state_dict(ckpt_io.unflatten_state(s["optimizer"], tens, src))
            if s.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(ckpt_io.unflatten_state(s["scaler"], tens, src))
        except (KeyError, ValueError, RuntimeError) as e:
            raise LMForgeError(f"{src} does not fit this model's optimizer ({str(e).splitlines()[0]})") from None
        rank_key = f"rng.torch_cpu.r{info.rank}" if f"rng.torch_cpu.r{info.rank}" in tens else "rng.torch_cpu.r0"
        if rank_key in tens:
            torch.set_rng_state(tens[rank_key])
        cuda_key = f"rng.cuda.r{info.rank}"
        if self.device.type == "cuda" and cuda_key in tens:
            torch.cuda.set_rng_state(tens[cuda_key], self.device)
        self.step = s["step"]
        self.tokens = int(s.get("tokens", 0))
        self.elapsed_before = float(s.get("elapsed_seconds", 0.0))
        self.horizon = int((s.get("schedule") or {}).get("total_steps", self.t.max_steps))
        if self.t.max_minutes is None:
            self.horizon = self.t.max_steps  # max_steps may have changed on resume
        self.best_val = s.get("best_val_loss")
        self.last_val = s.get("last_eval")
        self.energy.restore(s.get("energy"))
        if self.extra is not None:
            try:  # copied in place: the optimizer holds these parameters already
                self.extra.load_state_dict({k[len("extra."):]: v for k, v in tens.items() if k.startswith("extra.")})
            except RuntimeError as e:
                raise LMForgeError(f"{src} does not fit this run's {type(self.extra).__name__} "
                                   f"({str(e).splitlines()[0]})") from None
        source = self.task.train_batches
        if hasattr(source, "load_state_dict"):
            prefix = "batches."
            source.load_state_dict({k[len(prefix):]: v for k, v in tens.items() if k.startswith(prefix)})

    def _prepare_run_dir(self) -> None:
        out, info = self.out, self.info
        if not info.is_main:
            return
        if self.overwrite and out.exists() and holds_run(out):
            self.parked = park_previous_run(out, self.run_entries())
            _say(f"moved the old run's files to {self.parked}; they are deleted once this run's first checkpoint "
                 "is written", info)
        elif (out / PREVIOUS_RUN).is_dir():
            self.parked = out / PREVIOUS_RUN  # left by an --overwrite that stopped before its first checkpoint
        from lmforge.models.registry import model_summary

        note = (f"What this run trains: {model_summary(self.raw.cfg, self.raw.num_params())} "
                "`lmforge info RUN` describes it.")
        write_run_files(out, self.resolved, {**self.task.files, **self.task.run_files}, model_note=note)
        if self.lora is not None and self.task.base is None and self.state is None:
            self._write_base()

    def _write_base(self) -> None:
        """RUN/base: the frozen initial model of a LoRA run that has no base directory (`lmforge train`)."""
        tmp = self.out / f".tmp_{BASE_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        ckpt_io.write_model_dir(tmp, self.raw, extra_files=self.task.files, state=self.initial_base)
        self.initial_base = None
        ckpt_io.replace_dir_atomically(tmp, self.out / BASE_DIR)

    def _weights_writer(self) -> Any:
        """How a checkpoint writes the model's weights: None (model.safetensors) or a LoRA run's adapter."""
        if self.lora is None:
            return None
        return lambda directory: write_adapter_model(directory, self.raw, self.base)

    def run_entries(self) -> tuple[str, ...]:
        """The entries of --out this run writes (lmforge's own; nothing else is moved or removed)."""
        own = (BASE_DIR,) if self.lora is not None and self.task.base is None else ()
        own += RUN_ADAPTER_FILES if self.lora is not None else ()
        return tuple(dict.fromkeys(RUN_ENTRIES + own + tuple(self.task.files) + tuple(self.task.run_files)))

    def restore_parked_run(self) -> None:
        """This run stopped before its first checkpoint: put back the run it parked, if any."""
        if self.parked is not None and self.info.is_main:
            restore_previous_run(self.out, self.run_entries())
            self.parked = None

    # ---- main ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t, info = self.t, self.info
        self.energy.start()
        self.eval_set = list(self.task.eval_batches()) if self.task.eval_batches is not None else []
        if t.keep_best and not self.eval_set:
            raise LMForgeError("train.keep_best keeps the checkpoint of the lowest validation loss, but this run "
                               "has no validation batches")
        self._build()
        self._prepare_run_dir()  # the first write to --out: every check is done by now
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=info.is_main)
        self.metrics.truncate_after(self.step)  # also creates the file for a new run
        if self.ckpt is not None:
            _say(f"resuming from {self.ckpt} at step {self.step}", info)
        elif self.resume_requested:
            _say(f"no checkpoint in {self.out}; starting a new run", info)
        n_params = self.raw.num_params()
        if self.lora is not None:
            trained, total = trainable_parameters(self.raw)
            _say(f"LoRA r={self.lora.r} on {self.base}: {trained:,} of {total:,} parameters trained "
                 f"({100 * trained / total:.2f}%)", info)
        _say(f"{n_params / 1e6:.2f}M parameters, device {self.device}, {str(self.dtype).replace('torch.', '')}, "
             f"{info.world_size} process(es), {self.task.description or f'global batch {self.global_batch}'}, "
             f"max {t.max_steps} steps" + (f" / {t.max_minutes:g} min" if t.max_minutes else ""), info)

        low_precision = self.dtype != torch.float32
        self.peak = t.peak_flops or peak_flops(self.device, low_precision)
        self.flops_per_token = self.task.flops_per_token

        from tqdm import tqdm

        bar = tqdm(total=self.horizon, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   dynamic_ncols=True, disable=not (t.progress and info.is_main), leave=True)
        try:  # an error ends the bar's line first, so its message stands on a line of its own
            stop_reason, loss_val, seconds = self._steps(bar)
        finally:
            bar.close()

        summary = {
            "run_dir": str(self.out),
            "steps": self.step,
            "stopped_by": stop_reason,
            "tokens": self.tokens,
            "train_loss": loss_val if math.isfinite(loss_val) else None,
            "val_loss": _finite(self.last_val.get("val_loss")) if self.last_val else None,
            "best_val_loss": self.best_val,
            "val_ppl": _finite(self.last_val.get("val_ppl")) if self.last_val else None,
            "val_bpb": self.last_val.get("val_bpb") if self.last_val else None,
            "seconds": round(seconds, 2),
            "checkpoint": str(ckpt_io.latest_checkpoint(self.out)) if info.is_main else None,
            "energy": self.energy.stop(),  # kWh, kg CO2e and how they were obtained (train/energy.py)
        }
        if t.keep_best:
            best = self.out / ckpt_io.CKPT_DIR / ckpt_io.BEST
            summary["best_checkpoint"] = str(best) if info.is_main and best.is_dir() else None
        if self.last_val:
            coverage = self.task.eval_coverage
            partial = coverage is not None and coverage.partial
            if partial:  # val_loss / val_ppl / val_bpb above read part of the validation set: say so
                summary.update(coverage.labels("val"))
            _say(f"done: {self.step} steps, val loss {self.last_val['val_loss']:.4f}"
                 + (f", {self.last_val['val_bpb']:.4f} bits/byte" if self.last_val.get("val_bpb") is not None else "")
                 + (f" (partial validation: {coverage.describe()})" if partial else "")
                 + f", {seconds:.0f}s; run in {self.out}", info)
        else:
            _say(f"done: {self.step} steps, train loss {loss_val:.4f}, {seconds:.0f}s; run in {self.out}", info)
        return summary

    def _steps(self, bar: Any) -> tuple[str, float, float]:
        """Train to train.max_steps or the time budget: (why it stopped, last train loss, seconds over resumes)."""
        t, info = self.t, self.info
        has_eval = bool(self.eval_set) or self.task.evaluate is not None
        budget = TimeBudget(t.max_minutes, t.eval_every, t.ckpt_every, has_eval) if t.max_minutes is not None else None
        self.session_start = _clock()
        self.interval_start, self.interval_tokens = _clock(), 0
        stop_reason = "max_steps"
        self.loss_val = float("nan")
        start_step = self.step
        while self.step < t.max_steps:
            loss_t, gnorm_t, lr, stats_t, step_tokens = self._train_step(self.step)
            self.step += 1
            self.tokens += step_tokens
            self.interval_tokens += step_tokens
            bar.update(1)
            stop = self.step >= t.max_steps
            logged = self.step % t.log_every == 0 or self.step == 1 or stop
            if logged:
                self._log_step(bar, loss_t, gnorm_t, lr, stats_t)

            now = _clock()
            elapsed = self.elapsed_before + (now - self.session_start)
            if budget is not None:
                budget.step_done(now)
                horizon, out_of_time = budget.plan(self.step, elapsed, t.max_steps, self.horizon)
                # Rank 0's clock decides for every rank, so all ranks stop at the same step.
                decision = D.broadcast_from_main(torch.tensor([float(horizon), float(out_of_time)]), info)
                self.horizon = int(decision[0])
                if bar.total != self.horizon:
                    bar.total = self.horizon
                if decision[1] > 0 and not stop:
                    stop, stop_reason = True, "max_minutes"
                    if not logged:
                        self._log_step(bar, loss_t, gnorm_t, lr, stats_t)

            # Evaluation and checkpoint, each timed for the budget (a budgeted run does both once
            # as soon as its step time is known, to measure them).
            extra_start = mark = now
            measure = budget is not None and budget.wants_timing()
            evaluated = has_eval and ((t.eval_every and self.step % t.eval_every == 0) or stop or measure)
            if evaluated:
                self._evaluate(elapsed)
                self._plot()
                now = _clock()
                if budget is not None:
                    budget.evaluated(now - mark)
                mark = now
            if (t.ckpt_every and self.step % t.ckpt_every == 0) or stop or measure:
                self._checkpoint(self.elapsed_before + (mark - self.session_start), final=stop)
                if not evaluated:  # runs without evaluations (RL) plot their curves here
                    self._plot()
                now = _clock()
                if budget is not None:
                    budget.checkpointed(now - mark)
                mark = now
            self.interval_start += mark - extra_start  # tokens/s measures training only
            if stop:
                break
        end = mark if self.step > start_step else self.session_start  # the end of the last checkpoint
        return stop_reason, self.loss_val, self.elapsed_before + (end - self.session_start)

    def _log_step(self, bar: Any, loss_t: torch.Tensor, gnorm_t: torch.Tensor, lr: float,
                  stats_t: dict[str, torch.Tensor]) -> None:
        """The metrics.jsonl row of the step just taken, and the progress bar's figures."""
        info = self.info
        self.loss_val = loss_val = float(D.all_reduce_mean(loss_t, info))
        now = _clock()
        tok_per_s = self.interval_tokens / max(now - self.interval_start, 1e-9)
        mfu = self.flops_per_token * tok_per_s / (self.peak * info.world_size) if self.peak and self.flops_per_token \
            else None
        row = {"step": self.step, "loss": loss_val, "lr": lr, "tokens": self.tokens,
               "grad_norm": float(gnorm_t), "tok_per_s": round(tok_per_s, 1),
               "mfu": round(mfu, 5) if mfu is not None else None,
               "elapsed": round(self.elapsed_before + (now - self.session_start), 3)}
        for name, value in stats_t.items():  # the objective's own numbers (accuracy, kl, ...)
            row[name] = float(D.all_reduce_mean(value, info))
        row.update(self.energy.figures())  # energy_kwh, kg_co2e, energy_method
        self.metrics.write(row)
        if not math.isfinite(loss_val):
            raise LMForgeError(f"the training loss became {loss_val} at step {self.step}; lower train.lr "
                               "or raise train.warmup_steps (the last checkpoint is unaffected)")
        post = {"loss": f"{loss_val:.4f}", "tok/s": f"{tok_per_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        bar.set_postfix(post, refresh=False)
        self.interval_start, self.interval_tokens = _clock(), 0

    def _train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor], int]:
        t, info = self.t, self.info
        lr = lr_at(step, t.lr, self.min_lr, t.warmup_steps, self.horizon)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        stat_sums: dict[str, torch.Tensor] = {}
        local_tokens = 0
        for a in range(t.grad_accum):
            batch = to_device(self.task.train_batches.micro_batch(step, info.rank * t.grad_accum + a), self.device)
            last = a == t.grad_accum - 1
            with D.gradient_sync(self.model, self.raw, info, sync=last):
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                    loss, stats = self.objective(self.model, batch)
                self.scaler.scale(loss / t.grad_accum).backward()
            loss_sum += loss.detach().float()
            for name, value in stats.items():
                if name == "tokens":
                    local_tokens += int(value)
                elif name != "loss":
                    stat_sums[name] = stat_sums.get(name, 0) + value.detach().float() / t.grad_accum
        if self.extra is not None and info.enabled:  # DDP averages the model's gradients, not these
            for p in self.extra.parameters():
                if p.grad is not None:
                    p.grad.copy_(D.all_reduce_mean(p.grad, info))
        self.scaler.unscale_(self.optimizer)
        # max_norm=inf still returns the norm and leaves the gradients as they are.
        gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, t.grad_clip if t.grad_clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.task.tokens_per_step is not None:
            step_tokens = self.task.tokens_per_step
        else:
            step_tokens = int(D.all_reduce_sum(torch.tensor([local_tokens], dtype=torch.float64), info)[0])
        return loss_sum / t.grad_accum, gnorm, lr, stat_sums, step_tokens

    @torch.no_grad()
    def _evaluate(self, elapsed: float) -> dict[str, float]:
        from tqdm import tqdm

        info = self.info
        self.raw.eval()
        sums: dict[str, torch.Tensor] = {}  # per stat: (sum over batches, batches)
        shown = self.t.progress and info.is_main  # a bar only once an evaluation takes a while
        n = len(self.eval_set)
        if info.sharded:  # every process runs as many forwards (each one all-gathers): round up, repeat a batch
            n = -(-n // info.world_size) * info.world_size
        for i in tqdm(range(info.rank, n, info.world_size), desc="eval", unit="batch",
                      file=sys.stderr, dynamic_ncols=True, leave=False, delay=EVAL_BAR_DELAY, disable=not shown):
            batch = to_device(self.eval_set[i % len(self.eval_set)], self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss, stats = self.objective(self.eval_model, batch)
            if i >= len(self.eval_set):
                continue  # the repeated batch: run for the collectives only
            for name, value in {**stats, "loss": loss}.items():
                if name == "tokens":
                    continue
                acc = sums.setdefault(name, torch.zeros(2, dtype=torch.float64, device=self.device))
                acc[0] += value.detach().double()
                acc[1] += 1
        # Under FSDP every process runs the job's evaluation (same inputs, same gathered weights, so the
        # same forwards); rank 0's figures are the ones written.
        run_extra = self.task.evaluate is not None and (info.is_main or info.sharded)
        extra = self.task.evaluate(self.raw) if run_extra else {}
        self.raw.train()
        means: dict[str, float] = {}
        for name in sorted(sums):  # every rank holds the same stat names
            total = D.all_reduce_sum(sums[name], info)
            means[name] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        val_loss = means.pop("loss", float("nan"))
        bpt = self.task.bytes_per_token  # bytes per token
        row: dict[str, Any] = {"step": self.step, "val_loss": val_loss}
        if self.task.report_perplexity:
            row["val_ppl"] = math.exp(min(val_loss, 700.0))
            row["val_bpb"] = val_loss / math.log(2) / bpt if bpt else None
        for name, value in means.items():
            row[f"val_{name}"] = value
        if self.task.eval_coverage is not None:
            row.update(self.task.eval_coverage.labels("val"))  # val_partial, and how much was read
        row.update(extra)
        row["elapsed"] = round(elapsed, 3)
        self.last_val = row
        improved = math.isfinite(val_loss) and (self.best_val is None or val_loss < self.best_val)
        if improved:
            self.best_val = val_loss
        gathered, adapter = self._gathered(info.sharded and improved and self.t.keep_best)
        if info.is_main:
            self.metrics.write(row)
            if improved and self.t.keep_best:
                with D.parameters_replaced(self.raw, adapter):
                    ckpt_io.write_best_checkpoint(self.out, self.raw, row, extra_files=self.task.files,
                                                  weights=self._weights_writer(), model_state=gathered)
        return row

    def _gathered(self, wanted: bool) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """(the whole model's weights on rank 0, a LoRA run's trained tensors on every rank), gathered
        from the FSDP shards when `wanted`; every rank calls it. A LoRA run's model directory is its
        adapter, so only the trained tensors are gathered (the frozen base stays sharded)."""
        if not wanted:
            return None, None
        if self.lora is not None:
            return None, D.full_trained_parameters(self.raw)
        return D.full_model_state(self.raw), None

    def _plot(self) -> None:
        """loss.png: the loss on the objective's axis, and the job's panels under it."""
        if not self.info.is_main:
            return
        last = self.last_val or {}
        title = f"{self.out.name}: step {self.step}"
        if last.get("val_loss") is not None and math.isfinite(last["val_loss"]):
            title += f", val loss {last['val_loss']:.3f}"
            if last.get("val_bpb") is not None:
                title += f", {last['val_bpb']:.3f} bits/byte"
            if last.get("val_partial"):
                title += " (partial)"
        plot_loss(self.metrics.rows, self.out / "loss.png", loss_label=self.objective.loss_label, title=title,
                  panels=self.task.plot_panels)

    def _checkpoint(self, elapsed: float, final: bool = False) -> None:
        """checkpoints/step_N (rank 0 writes it; under FSDP every process first writes its shards into
        the staging directory, and the final one also gathers the full weights)."""
        info = self.info
        tensors: dict[str, torch.Tensor] = {}
        cpu_states = D.all_gather_bytes(torch.get_rng_state(), info)
        for r, st in enumerate(cpu_states):
            tensors[f"rng.torch_cpu.r{r}"] = st
        if self.device.type == "cuda":
            for r, st in enumerate(D.all_gather_bytes(torch.cuda.get_rng_state(self.device), info)):
                tensors[f"rng.cuda.r{r}"] = st
        gathered = adapter = None
        if info.sharded:
            if info.is_main:
                ckpt_io.start_staging(self.out, self.step)
            D.barrier(info)
            ckpt_io.save_sharded(ckpt_io.staging_dir(self.out, self.step),
                                 D.sharded_state(self.raw, self.optimizer, trained_only=self.lora is not None))
            # the final checkpoint holds the whole model; a LoRA run's, every one, its (small) adapter
            gathered, adapter = self._gathered(final or self.lora is not None)
            D.barrier(info)  # every shard is on disk before rank 0 renames the directory
        if not info.is_main:
            return
        opt_struct = None
        if not info.sharded:
            opt_struct, _ = ckpt_io.flatten_state(self.optimizer.state_dict(), tensors, "opt")
        scaler_struct = None
        if self.scaler.is_enabled():
            scaler_struct, _ = ckpt_io.flatten_state(self.scaler.state_dict(), tensors, "scaler")
        from lmforge import __version__

        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_seconds": elapsed,
            "data_position": {"next_step": self.step, "seed": self.t.seed, "global_batch": self.global_batch},
            "schedule": {"kind": "warmup_cosine", "lr": self.t.lr, "min_lr": self.min_lr,
                         "warmup_steps": self.t.warmup_steps, "total_steps": self.horizon},
            "best_val_loss": self.best_val,
            "last_eval": self.last_val,
            "energy": self.energy.state(),
            "world_size": info.world_size,
            "config_hash": config_hash(self.resolved),
            "config": self.resolved,
            "data": self.task.data_fingerprint,
            "task": self.task.name,
            "optimizer": opt_struct,
            "scaler": scaler_struct,
            "lmforge_version": __version__,
        }
        if self.extra is not None:
            for name, value in self.extra.state_dict().items():
                tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
        source = self.task.train_batches
        if hasattr(source, "state_dict"):
            for name, value in source.state_dict().items():
                tensors[f"batches.{name}"] = value.detach().cpu().contiguous()
        if self.lora is not None and not info.sharded:  # the model directory holds the adapter; resume reads these
            tensors.update({k: v.detach().cpu().contiguous() for k, v in trainable_state(self.raw).items()})
        with D.parameters_replaced(self.raw, adapter):
            written = ckpt_io.write_train_checkpoint(self.out, self.step, self.raw, state, tensors,
                                           keep=self.t.keep_checkpoints, extra_files=self.task.files,
                                           weights=self._weights_writer() if self.lora is not None else
                                           _in_shards if info.sharded and gathered is None else None,
                                           model_state=gathered, staged=info.sharded)
        if self.lora is not None:
            publish_adapter(written, self.out)
        if self.parked is not None:
            shutil.rmtree(self.parked, ignore_errors=True)
            self.parked = None


def _in_shards(directory: Path) -> None:
    """A sharded checkpoint's weights: already in directory/sharded (no model.safetensors)."""


class TimeBudget:
    """train.max_minutes: where the schedule ends and when to stop, from costs measured in this session.

    A step costs the mean wall time from one step's end to the next, evaluations and checkpoints
    left out (and this session's first step, with its warm-up). An evaluation costs what the last one
    took, all of it (validation batches and the job's own evaluation such as generation), and a
    checkpoint what the last one took: the trainer evaluates and checkpoints as soon as the step cost
    is known (`wants_timing`), so the final ones are reserved at measured costs, never guesses. The
    run goes on while the evaluation and checkpoint due at this step, one more step and the final
    evaluation and checkpoint all fit in the time left.
    """

    def __init__(self, minutes: float, eval_every: int, ckpt_every: int, has_eval: bool):
        self.seconds = minutes * 60.0
        self.eval_every, self.ckpt_every = eval_every, ckpt_every
        self.eval_s: float | None = None if has_eval else 0.0  # None: not measured yet
        self.ckpt_s: float | None = None
        self.step_times: list[float] = []
        self.last_step_end: float | None = None
        self.extras = 0.0  # evaluation and checkpoint seconds since the last step's end

    def step_done(self, now: float) -> None:
        """A step ended at clock time `now`."""
        if self.last_step_end is not None:
            self.step_times.append(now - self.last_step_end - self.extras)
        self.last_step_end, self.extras = now, 0.0

    def evaluated(self, seconds: float) -> None:
        self.eval_s = seconds
        self.extras += seconds

    def checkpointed(self, seconds: float) -> None:
        self.ckpt_s = seconds
        self.extras += seconds

    @property
    def step_s(self) -> float | None:
        n = len(self.step_times)
        return sum(self.step_times) / n if n >= _ESTIMATE_AFTER else None

    def wants_timing(self) -> bool:
        """Whether to evaluate and checkpoint now to measure them: the step time is known, they are not."""
        return self.step_s is not None and (self.eval_s is None or self.ckpt_s is None)

    def plan(self, step: int, elapsed: float, max_steps: int, horizon: int) -> tuple[int, bool]:
        """(the step the schedule ends at, stop now) after `step` steps and `elapsed` seconds."""
        step_s, eval_s, ckpt_s = self.step_s, self.eval_s, self.ckpt_s
        if step_s is None or eval_s is None or ckpt_s is None:
            return horizon, elapsed >= self.seconds
        due = (eval_s if self.eval_every and step % self.eval_every == 0 else 0.0) + \
              (ckpt_s if self.ckpt_every and step % self.ckpt_every == 0 else 0.0)
        left = self.seconds - elapsed - due - eval_s - ckpt_s  # the final evaluation and checkpoint reserved
        per_step = step_s + (eval_s / self.eval_every if self.eval_every else 0.0) + \
            (ckpt_s / self.ckpt_every if self.ckpt_every else 0.0)
        return min(max_steps, step + max(0, int(left / per_step))), left < step_s


def _finite(x: Any) -> Any:
    """None instead of NaN/inf in the JSON summary (strict JSON has no NaN)."""
    return x if not isinstance(x, float) or math.isfinite(x) else None
