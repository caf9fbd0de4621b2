"""Knowledge distillation: train a student to match a teacher (`lmforge distill`, also `lmforge finetune distill`).

    lmforge distill --teacher MODEL --student MODEL_OR_PRESET --data FILE --out RUN [--task lm|classify|seq2seq]
                    [--student-init teacher-layers|none] [--val-data F] [--section.key V ...]

The student is a model (run, model directory or Hugging Face folder), a preset of the teacher's
family, or `teacher`: the teacher's own shape, with the `student` section's overrides (n_layer
defaults to half the teacher's). Preset and `teacher` students read the teacher's tokenizer;
`--student-init teacher-layers` (DistilBERT) copies the teacher's embeddings, head and blocks 0, 2,
4, ... into a `teacher` student. Every task reads the data of its fine-tuning method (classify: a
labelled table; lm: chat / SFT JSONL; seq2seq: source -> target pairs) and its batches, with that
method's config sections; the `distill` section picks the loss (train/distill.py). The job is the
method's TrainJob with the distillation objective, so resume, torchrun, plots, metrics and the
validation metrics of the method (accuracy, generation scores) work as they do there.

Teacher and student read one batch, so they must share the tokenizer; a mismatch stops before
anything is written, naming both vocabularies.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import typing
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from lmforge.config import config_field
from lmforge.errors import LMForgeError
from lmforge.finetune import classify, seq2seq, sft
from lmforge.train.distill import IGNORE, DistillConfig, DistillObjective, init_layer_map

MODEL_FLAG = "--student"  # the model this method trains (other methods: --base)
TEACHER_SHAPE = "teacher"  # --student teacher: the teacher's shape, resized by the student section


@dataclass
class StudentConfig:
    n_layer: Optional[int] = config_field(None, "blocks of a preset or `teacher` student (default: the preset's; "
                                                "half the teacher's for --student teacher)")
    n_embd: Optional[int] = config_field(None, "width of a preset or `teacher` student (default: the preset's / the teacher's)")
    n_head: Optional[int] = config_field(None, "attention heads of a preset or `teacher` student")
    mlp_hidden: Optional[int] = config_field(None, "MLP hidden width of a preset or `teacher` student")
    n_kv_head: Optional[int] = config_field(None, "key/value heads of a preset or `teacher` decoder student")


INNER = {"lm": sft, "classify": classify, "seq2seq": seq2seq}  # the method whose data and batches a task reads


def _config_class(task: str) -> type:
    inner = INNER[task]
    types = typing.get_type_hints(inner.CONFIG)  # the classes, not their names (annotations are strings)
    sections = [(f.name, types[f.name], field(default_factory=f.default_factory)) for f in dataclasses.fields(inner.CONFIG)]
    return make_dataclass(f"Distill{task.capitalize()}Config", sections + [
        ("distill", DistillConfig, field(default_factory=lambda: DistillConfig(task=task))),
        ("student", StudentConfig, field(default_factory=StudentConfig))])


CONFIGS = {task: _config_class(task) for task in INNER}
CONFIG = CONFIGS["lm"]  # --help-config shows the lm task's keys (`--task classify --help-config`: that task's)


def _task_of(args: Any, overrides: Sequence[str], saved: dict[str, Any] | None) -> str:
    """--task, else a --distill.task override, else the resumed run's, else lm."""
    task = getattr(args, "task", None)
    for i, arg in enumerate(overrides):
        if arg.startswith("--distill.task"):
            task = arg.split("=", 1)[1] if "=" in arg else (overrides[i + 1] if i + 1 < len(overrides) else None)
    if task is None and saved:
        task = (saved.get("distill") or {}).get("task")
    task = task or "lm"
    if task not in INNER:
        raise LMForgeError(f"--task must be one of {', '.join(INNER)}, got '{task}'")
    return task


def config_for(args: Any, overrides: Sequence[str], saved: dict[str, Any] | None) -> tuple[type, dict[str, Any]]:
    """(CONFIG, DEFAULTS) of this run's task: the task's method sections plus distill and student."""
    task = _task_of(args, overrides, saved)
    return CONFIGS[task], {**getattr(INNER[task], "DEFAULTS", {}), "distill": {"task": task}}


# ---- teacher and student ------------------------------------------------------------------------

def _vocabulary(tok: Any) -> str:
    return hashlib.sha256(tok.hf.to_str().encode()).hexdigest()[:12] if tok is not None else "none"


def check_same_tokenizer(teacher: Any, student: Any, teacher_name: str, student_name: str) -> None:
    """One batch feeds both models: their tokenizers (and, for vocabulary logits, vocabularies) must agree."""
    t_tok, s_tok = teacher.tokenizer, student.tokenizer
    same = t_tok is not None and s_tok is not None and t_tok.hf.get_vocab(with_added_tokens=True) == \
        s_tok.hf.get_vocab(with_added_tokens=True)
    t_rows = getattr(teacher.model.cfg, "vocab_size", None)
    s_rows = getattr(student.model.cfg, "vocab_size", None)
    if not same or t_rows != s_rows:
        def describe(tok: Any, rows: Any, name: str) -> str:
            size = f"{tok.vocab_size} tokens (tokenizer.json sha256 {_vocabulary(tok)})" if tok is not None else "no tokenizer"
            return f"{name} has {size}, {rows} embedding rows"
        raise LMForgeError("teacher and student must share the tokenizer (distillation feeds one batch to both and "
                           f"compares their outputs): the teacher {describe(t_tok, t_rows, teacher_name)}; the student "
                           f"{describe(s_tok, s_rows, student_name)}")


def _resized(cfg: Any, over: dict[str, Any]) -> Any:
    unknown = [k for k in over if not hasattr(cfg, k)]
    if unknown:
        raise LMForgeError(f"student.{unknown[0]} does not apply to a {type(cfg).__name__}")
    new = dataclasses.replace(cfg, **over)
    if "n_embd" in over and "mlp_hidden" not in over and getattr(cfg, "mlp_hidden", None):
        new = dataclasses.replace(new, mlp_hidden=cfg.mlp_hidden * over["n_embd"] // cfg.n_embd)
    if hasattr(new, "validate"):
        new.validate()
    return new


def build_student(spec: str, teacher: Any, s: StudentConfig, init: str, seed: int) -> tuple[Any, bool]:
    """(student LLM, built here): a model path is loaded; a preset or `teacher` is built with the
    teacher's tokenizer (and, with init teacher-layers, the teacher's weights)."""
    from lmforge.finetune.base_model import load_base
    from lmforge.infer.llm import LLM
    from lmforge.models.registry import build_model, family_of, family_of_preset

    over = {k: v for k, v in dataclasses.asdict(s).items() if v is not None}
    if Path(spec).exists():
        if over or init != "none":
            raise LMForgeError(f"--student {spec} is a model: the student section and --student-init teacher-layers "
                               "shape a preset or `teacher` student")
        return load_base(spec, "distill"), False
    t_model = teacher.model
    if spec == TEACHER_SHAPE:
        over.setdefault("n_layer", max(1, t_model.cfg.n_layer // 2))
        family, cfg = family_of(t_model), _resized(t_model.cfg, over)
    else:
        if init != "none":
            raise LMForgeError("--student-init teacher-layers copies the teacher's blocks into a student of its shape: "
                               "use --student teacher (and --student.n_layer N)")
        family = family_of_preset(spec)
        base = family.config_from_preset(spec)
        shared = {k: getattr(t_model.cfg, k) for k in ("vocab_size", "pad_id", "eos_id", "bos_id", "decoder_start_id",
                                                      "type_vocab_size") if hasattr(base, k) and hasattr(t_model.cfg, k)}
        cfg = _resized(base, {**shared, **over})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(family, cfg)
    if init == "teacher-layers":
        copy_teacher_layers(t_model, model)
    model.train()
    return LLM(model, cfg, teacher.tokenizer, path=None), True


def copy_teacher_layers(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """DistilBERT's initialisation: every tensor outside the blocks (embeddings, norms, head) and
    block i of the student from teacher block init_layer_map(i); the widths must agree."""
    n_s, n_t = len(student.blocks), len(teacher.blocks)
    src_of = {f"blocks.{i}.": f"blocks.{j}." for i, j in enumerate(init_layer_map(n_s, n_t))}
    t_state = teacher.state_dict()
    new = {}
    for name, value in student.state_dict().items():
        src = name
        if name.startswith("blocks."):
            prefix = ".".join(name.split(".")[:2]) + "."
            src = src_of[prefix] + name[len(prefix):]
        if src not in t_state or t_state[src].shape != value.shape:
            raise LMForgeError(f"--student-init teacher-layers: the student's {name} {tuple(value.shape)} has no "
                               f"teacher tensor of that shape ({src}); the student must have the teacher's width")
        new[name] = t_state[src]
    student.load_state_dict(new)


# ---- batches ------------------------------------------------------------------------------------

class TeacherBatches:
    """The task's batch source, with what distillation adds: `bind` puts the teacher on the loop's
    device, and (gkd, lm task) a share lmbda of the micro-batches, chosen by a hash of (seed, step,
    index) so resume is exact, has its completions sampled by the live student (lmforge's sampler)
    before the loss reads them."""

    def __init__(self, inner: Any, teacher: torch.nn.Module, cfg: DistillConfig, seed: int,
                 tokenizer: Any = None, pad_id: int = 0):
        self.inner, self.teacher, self.cfg, self.seed = inner, teacher, cfg, seed
        self.tok, self.pad_id = tokenizer, pad_id
        self.student: torch.nn.Module | None = None
        self.on_policy = cfg.loss == "gkd" and cfg.lmbda > 0

    def bind(self, model: torch.nn.Module, autocast: torch.dtype = torch.float32) -> None:
        self.student = model
        self.teacher.to(next(model.parameters()).device)

    def micro_batch(self, step: int, index: int) -> Any:
        batch = self.inner.micro_batch(step, index)
        if self.on_policy and random.Random(f"{self.seed}/{step}/{index}").random() < self.cfg.lmbda:
            batch = self.sampled(batch, step, index)
        return batch

    def sampled(self, batch: dict[str, torch.Tensor], step: int, index: int) -> dict[str, torch.Tensor]:
        """Each example's prompt (its tokens before the first trained one), completed by the student."""
        from lmforge.infer.generate import generate

        prompts = []
        for ids_T, y_T, seg_T in zip(batch["input_ids"], batch["labels"], batch["segment_ids"]):
            for k in seg_T[seg_T >= 0].unique().tolist():
                pos = (seg_T == k).nonzero()[:, 0]
                trained = (y_T[pos] != IGNORE).nonzero()
                if len(trained):
                    prompts.append(ids_T[pos[:int(trained[0]) + 1]].tolist())
        stops = sorted(self.tok.stop_ids)
        ctx = int(self.student.cfg.block_size)
        n_new = min(self.cfg.max_new_tokens, ctx - max(len(p) for p in prompts))
        if n_new < 1:
            return batch
        was_training = self.student.training
        self.student.eval()
        try:
            gens = generate(self.student, prompts, max_new_tokens=n_new, temperature=self.cfg.temperature,
                            eos_id=stops or None, pad_id=self.pad_id, seed=hash((self.seed, step, index)) % 2**31,
                            decode_text=False)
        finally:
            self.student.train(was_training)
        seqs = [(p, p + g.ids + ([stops[0]] if stops and g.finish_reason == "eos" else [])) for p, g in zip(prompts, gens)]
        T = max(len(q) for _, q in seqs)
        x = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        seg = torch.full((len(seqs), T), -1, dtype=torch.long)
        for b, (p, q) in enumerate(seqs):
            x[b, :len(q)] = torch.tensor(q)
            y[b, len(p) - 1:len(q) - 1] = torch.tensor(q[len(p):])
            seg[b, :len(q)] = 0
        return {"input_ids": x, "labels": y, "segment_ids": seg}

    def __getattr__(self, name: str) -> Any:  # all_batches, coverage, ... of the task's source
        return getattr(self.inner, name)


def cached_teacher_logits(teacher: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device,
                          dtype: torch.dtype) -> list[torch.Tensor]:
    """The teacher's class logits of each batch, once, in the training precision (CPU fp32 copies)."""
    from lmforge.train.distill import task_logits
    from lmforge.train.job import to_device

    teacher.to(device).eval()
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for b in batches:
            out.append(task_logits("classify", teacher, to_device(b, device))[0].float().cpu())
    return out


def _cache_train_logits(source: Any, teacher: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Precompute every training example's teacher logits; the source's collate then attaches them."""
    collate = source.collate
    logits_NL = torch.cat(cached_teacher_logits(teacher, source.all_batches(), device, dtype))

    def with_teacher(rows: list[int]) -> dict[str, torch.Tensor]:
        return {**collate(rows), "teacher_logits": logits_NL[rows]}

    source.collate = with_teacher


def _with_cached_logits(eval_batches: Any, teacher: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
    """The task's validation batches, each with the teacher's logits computed once."""
    def batches() -> list[dict[str, torch.Tensor]]:
        plain = eval_batches()
        logits = cached_teacher_logits(teacher, plain, device, dtype)
        return [{**b, "teacher_logits": lg} for b, lg in zip(plain, logits)]
    return batches


# ---- the job --------------------------------------------------------------------------------------

def build_job(cfg: Any, args: Any) -> Any:
    from lmforge.finetune.scaffold import say
    from lmforge.infer.llm import LLM
    from lmforge.train.loop import training_precision

    d, t = cfg.distill, cfg.train
    if not d.teacher:
        raise LMForgeError("lmforge distill needs --teacher MODEL (a run, model directory or Hugging Face folder)")
    teacher = LLM.load(d.teacher)
    needs = {"classify": ("classify", "a classifier (lmforge finetune classify)"),
             "lm": ("continue", "a language model"), "seq2seq": ("generate", "a model that generates")}[d.task]
    if needs[0] not in teacher.tasks:
        raise LMForgeError(f"--teacher {d.teacher} is a {teacher.family.name} model; --task {d.task} distils "
                           f"{needs[1]}")
    teacher.model.eval().requires_grad_(False)
    student, built = build_student(args.base, teacher, cfg.student, d.student_init, t.seed)
    check_same_tokenizer(teacher, student, f"--teacher {d.teacher}", f"--student {args.base}")
    if d.loss == "gkd" and d.task == "classify":
        raise LMForgeError("distill.loss gkd distils language models (--task lm or seq2seq); use kd for classify")
    if d.cache_teacher and d.task != "classify":
        raise LMForgeError("distill.cache_teacher caches class logits: it works with --task classify")

    inner = INNER[d.task]
    inner_cfg = inner.CONFIG(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(inner.CONFIG)})
    inner_args = argparse.Namespace(**{**vars(args), "base": d.teacher if built else args.base})
    job = inner.build_job(inner_cfg, inner_args, llm=student)
    s_model = job.build_model()
    if getattr(s_model.cfg, "vocab_size", None) != getattr(teacher.model.cfg, "vocab_size", None):
        raise LMForgeError(f"the {d.task} data's chat template added tokens to the student's vocabulary "
                           f"({s_model.cfg.vocab_size} rows; the teacher's {teacher.model.cfg.vocab_size}): distil "
                           "from a teacher that has the template (an lmforge finetune sft run), or pass "
                           "--data.template none")
    if d.task == "classify":
        want = job.config["labels"]
        have = teacher.model.cfg.label_names() if hasattr(teacher.model.cfg, "label_names") else None
        if have != want:
            raise LMForgeError(f"the teacher's labels ({', '.join(map(str, have or []))}) are not the data's "
                               f"({', '.join(want)})")

    projection = None
    if d.loss in ("cosine", "tinybert"):
        s_width, t_width = s_model.cfg.n_embd, teacher.model.cfg.n_embd
        if s_width != t_width:
            if d.loss == "cosine":
                raise LMForgeError(f"distill.loss cosine compares hidden states of one width; the student's is "
                                   f"{s_width}, the teacher's {t_width} (tinybert learns a projection)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)
                projection = torch.nn.Linear(s_width, t_width)  # TinyBERT's W: student -> teacher width

    device, dtype = training_precision(t)
    source = job.train_batches
    if d.cache_teacher:
        _cache_train_logits(source, teacher.model, device, dtype)
        say("distill", f"cached the teacher's logits of {source.n} training examples")
        if job.eval_batches is not None:
            job.eval_batches = _with_cached_logits(job.eval_batches, teacher.model, device, dtype)

    from lmforge.finetune.base_model import pad_id_of

    job.train_batches = TeacherBatches(source, teacher.model, d, t.seed, student.tokenizer, pad_id_of(student.tokenizer))
    job.objective = DistillObjective(d.task, teacher.model, d, projection)
    job.extra_modules = projection
    job.name = "distill"
    job.config = {**job.config, "distill": dataclasses.asdict(d), "student": dataclasses.asdict(cfg.student),
                  "student_spec": args.base}
    if built:  # the teacher's Hugging Face config does not describe this student
        job.files = {k: v for k, v in job.files.items() if k != "hf_config.json"}
    s_n, t_n = s_model.num_params(), teacher.model.num_params()
    say("distill", f"teacher {d.teacher} ({t_n / 1e6:.2f}M parameters) -> student {args.base} ({s_n / 1e6:.2f}M, "
                   f"{100 * s_n / t_n:.0f}%), loss {d.loss}" + (", on-policy share "
                   f"{d.lmbda:g}" if d.loss == "gkd" else ""))
    job.description = f"{job.description}; distilling {d.task} ({d.loss})"
    return job


# ---- command line -------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="the teacher: a run, model directory or Hugging Face folder")
    p.add_argument("--task", choices=sorted(INNER), help="lm (chat / SFT data), classify (labelled table) or "
                                                          "seq2seq (source -> target pairs); default lm")
    p.add_argument("--student-init", choices=["none", "teacher-layers"],
                   help="teacher-layers: DistilBERT's init from every other teacher block (--student teacher)")
    for method in INNER.values():  # the tasks' own flags (--text-column, --truncate, --source-column, ...)
        method.add_arguments(p)


FLAG_KEYS = {"teacher": "distill.teacher", "task": "distill.task", "student_init": "distill.student_init",
             **sft.FLAG_KEYS, **classify.FLAG_KEYS, **seq2seq.FLAG_KEYS}


def final_metrics(out: Path) -> dict[str, Any]:
    """The task's summary figures (classify: accuracy and macro-F1; seq2seq: generation scores)."""
    from lmforge.train.run_dir import saved_config

    task = (saved_config("auto", out) or {}).get("distill", {}).get("task")
    module = INNER.get(task)
    return module.final_metrics(out) if module is not None and hasattr(module, "final_metrics") else {}
