"""Knowledge distillation: a teacher's outputs as the student's training signal, as an objective of
the one training loop (`lmforge distill`, finetune/distill.py builds the job).

Losses (pure tensor math, each checked against hand-computed values in tests/test_distill.py):
    soft_target_loss    Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over positions
    kd_loss             alpha * soft_target_loss + (1 - alpha) * cross entropy with the hard labels
    cosine_hidden_loss  DistilBERT (Sanh et al. 2019): mean of 1 - cos(h_student, h_teacher) over real tokens
    hidden_mse          TinyBERT (Jiao et al. 2020): MSE(h_student W, h_teacher) over real tokens
    attention_mse       TinyBERT: MSE of the pre-softmax attention scores over the attended (query, key) pairs
    generalized_jsd     GKD (Agarwal et al. 2024) exactly as TRL's GKDTrainer.generalized_jsd_loss:
                        beta 0 = KL(teacher || student) (forward), 1 = KL(student || teacher) (reverse)
    layer_map           TinyBERT's uniform mapping: student block i <- teacher block (i + 1) * Lt // Ls - 1

`DistillObjective` runs the teacher under torch.inference_mode once per micro-batch (inside the
loop's autocast, on the loop's device: `bind` moves it), or reads the logits a batch carries
(`teacher_logits`, precomputed once for classification with distill.cache_teacher). Hidden states
and attention scores come from forward hooks on the models' blocks (`capture`): the models keep one
forward path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import config_field
from lmforge.errors import LMForgeError

IGNORE = -100
LOSSES = ("kd", "cosine", "tinybert", "gkd")
TASKS = ("lm", "classify", "seq2seq")


@dataclass
class DistillConfig:
    teacher: Optional[str] = config_field(None, "the teacher: a run, model directory or Hugging Face folder (--teacher)")
    task: Literal["lm", "classify", "seq2seq"] = config_field(
        "lm", "lm = chat / SFT data on a decoder; classify = a labelled table; seq2seq = source -> target pairs (--task)")
    loss: Literal["kd", "cosine", "tinybert", "gkd"] = config_field(
        "kd", "kd = soft targets at temperature T + hard labels (Hinton); cosine = kd + DistilBERT's cosine loss on the "
              "last hidden states; tinybert = kd + TinyBERT's embedding, hidden-state and attention MSE; "
              "gkd = TRL's generalised JSD (decoders; lmbda on-policy)")
    alpha: float = config_field(0.5, "weight of the soft-target term; 1 - alpha weighs the hard-label cross entropy "
                                     "(kd, cosine, tinybert)")
    temperature: float = config_field(2.0, "softmax temperature T of both models' logits (kd scales by T^2)")
    hidden_weight: float = config_field(1.0, "weight of the hidden-state terms (cosine: the cosine loss; tinybert: "
                                             "embedding + hidden + attention MSE)")
    beta: float = config_field(0.5, "gkd: 0 = forward KL(teacher || student) ... 1 = reverse KL(student || teacher)")
    lmbda: float = config_field(0.5, "gkd: share of micro-batches whose completions the student samples itself "
                                     "(on-policy)")
    max_new_tokens: int = config_field(64, "gkd on-policy: tokens the student samples per completion")
    student_init: Literal["none", "teacher-layers"] = config_field(
        "none", "teacher-layers = DistilBERT's init: embeddings, head and uniformly spaced teacher blocks (0, 2, 4, "
                "... for half the layers) copied into a student of the same width (--student-init)")
    cache_teacher: bool = config_field(False, "classify: compute the teacher's logits once before training and "
                                              "read them from the batches")


# ---- losses -----------------------------------------------------------------------------------

def soft_target_loss(student_NV: torch.Tensor, teacher_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), summed over classes, mean over the N positions (Hinton:
    the T^2 keeps the soft term's gradient scale independent of T)."""
    T = temperature
    log_s = F.log_softmax(student_NV.float() / T, dim=-1)
    log_t = F.log_softmax(teacher_NV.float() / T, dim=-1)
    kl_N = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl_N.mean() * T * T


def kd_loss(student_NV: torch.Tensor, teacher_NV: torch.Tensor, labels_N: torch.Tensor, alpha: float,
            temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * soft_target_loss + (1 - alpha) * cross entropy(student, labels); stats soft, hard."""
    soft = soft_target_loss(student_NV, teacher_NV, temperature)
    hard = F.cross_entropy(student_NV.float(), labels_N)
    return alpha * soft + (1 - alpha) * hard, {"soft_loss": soft.detach(), "hard_loss": hard.detach()}


def cosine_hidden_loss(student_BTC: torch.Tensor, teacher_BTC: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
    """DistilBERT's CosineEmbeddingLoss(target=1) on hidden states: mean over real tokens of 1 - cos."""
    cos_N = F.cosine_similarity(student_BTC[real_BT].float(), teacher_BTC[real_BT].float(), dim=-1)
    return (1 - cos_N).mean()


def hidden_mse(student_BTC: torch.Tensor, teacher_BTD: torch.Tensor, real_BT: torch.Tensor,
               projection: nn.Module | None = None) -> torch.Tensor:
    """TinyBERT's hidden-state loss: MSE(h_student W, h_teacher) over the real tokens' features."""
    s_NC = student_BTC[real_BT].float()
    if projection is not None:
        s_NC = projection(s_NC)
    return F.mse_loss(s_NC, teacher_BTD[real_BT].float())


def attention_mse(student_BHTT: torch.Tensor, teacher_BGTT: torch.Tensor, pairs_BTT: torch.Tensor) -> torch.Tensor:
    """TinyBERT's attention loss: MSE of the pre-softmax scores over the (query, key) pairs attention
    reads (padding and, in decoders, future and other-example keys left out). Per head when both
    models have as many heads, else of the head-averaged scores."""
    if student_BHTT.shape[1] != teacher_BGTT.shape[1]:
        student_BHTT, teacher_BGTT = student_BHTT.mean(1, keepdim=True), teacher_BGTT.mean(1, keepdim=True)
    H = student_BHTT.shape[1]
    pick = pairs_BTT[:, None].expand(-1, H, -1, -1)
    return F.mse_loss(student_BHTT[pick].float(), teacher_BGTT[pick].float())


def generalized_jsd(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, labels_BT: torch.Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1) as TRL computes it:
    beta * KL(teacher || m) + (1 - beta) * KL(student || m) with m = beta * teacher + (1 - beta) *
    student at temperature T (no T^2), summed over the vocabulary, averaged over the labelled tokens
    (labels != -100). beta 0 is KL(teacher || student), beta 1 KL(student || teacher)."""
    log_s = F.log_softmax(student_BTV.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_BTV.float() / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(log_s, log_t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(log_t, log_s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=log_s.dtype, device=log_s.device)
        log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(log_m, log_t, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(log_m, log_s, reduction="none", log_target=True)
    if labels_BT is None:
        return jsd.sum() / max(jsd.shape[0], 1)
    mask_BT = labels_BT != IGNORE
    return jsd[mask_BT].sum() / mask_BT.sum().clamp(min=1)


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's uniform mapping g: student block i learns from teacher block (i + 1) * Lt // Ls - 1
    (the last student block from the last teacher block)."""
    if n_student > n_teacher:
        raise LMForgeError(f"the student has more blocks ({n_student}) than the teacher ({n_teacher})")
    return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]


def init_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """DistilBERT's initialisation: student block i <- teacher block i * Lt // Ls (0, 2, 4, ... at half)."""
    if n_student > n_teacher:
        raise LMForgeError(f"--student-init teacher-layers: the student has more blocks ({n_student}) than the "
                           f"teacher ({n_teacher})")
    return [i * n_teacher // n_student for i in range(n_student)]


# ---- hidden states and attention scores -------------------------------------------------------

def blocks_of(model: nn.Module) -> nn.ModuleList:
    model = getattr(model, "module", model)  # DDP
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise LMForgeError(f"distill.loss cosine / tinybert read the hidden states of encoder and decoder blocks; "
                           f"a {getattr(model, 'family', type(model).__name__)} model has none to read")
    return blocks


@dataclass
class Captured:
    embeddings: torch.Tensor | None = None  # what the first block reads (B, T, C)
    hidden: list[torch.Tensor] | None = None  # every block's output (B, T, C)
    scores: list[torch.Tensor] | None = None  # every block's attention scores (B, H, T, T)


@contextlib.contextmanager
def capture(model: nn.Module, attention: bool) -> Iterator[Captured]:
    """Forward hooks that record the embeddings, every block's output and (with `attention`) its
    pre-softmax attention scores while a forward pass of `model` runs inside the block."""
    got = Captured(hidden=[], scores=[])
    blocks = blocks_of(model)
    handles = [blocks[0].register_forward_pre_hook(lambda m, args: setattr(got, "embeddings", args[0]))]
    for block in blocks:
        handles.append(block.register_forward_hook(lambda m, args, out: got.hidden.append(out)))
        if attention:
            def on_attn(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                got.scores.append(m.scores(args[0], kwargs.get("rope")))
            handles.append(block.attn.register_forward_hook(on_attn, with_kwargs=True))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


# ---- what each task's batches hold --------------------------------------------------------------

def task_logits(task: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_NV, labels_N) at the positions the loss reads: classify one row per example (labels
    are class ids), lm / seq2seq the labelled tokens."""
    if task == "classify":
        types = {"token_type_BT": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return model(batch["input_ids"], pad_mask_BT=batch["attention_mask"], **types), batch["labels"]
    y_BT = batch["labels"]
    sel_BT = y_BT != IGNORE
    if "segment_ids" in batch:  # packed chat rows: the vocabulary head on the labelled positions only
        h_BTC = model(batch["input_ids"], segment_BT=batch["segment_ids"], hidden=True)
        return getattr(model, "module", model).head(h_BTC[sel_BT]), y_BT[sel_BT]
    if "decoder_input_ids" in batch:  # encoder-decoder, teacher forcing
        logits_BTV = model(batch["input_ids"], batch["decoder_input_ids"], src_mask_BS=batch["input_mask"],
                           tgt_mask_BT=batch["decoder_mask"])
    else:  # decoder prompt + completion rows
        logits_BTV = model(batch["input_ids"])
    return logits_BTV[sel_BT], y_BT[sel_BT]


def token_pairs(task: str, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(real_BT, pairs_BTT): the real tokens, and the (query, key) pairs attention reads."""
    if task == "classify":
        real_BT = batch["attention_mask"].bool()
        return real_BT, real_BT[:, :, None] & real_BT[:, None, :]
    seg_BT = batch["segment_ids"]
    real_BT = seg_BT >= 0
    T = seg_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=seg_BT.device).tril()
    pairs = (seg_BT[:, :, None] == seg_BT[:, None, :]) & causal_TT[None] & real_BT[:, :, None]
    return real_BT, pairs


# ---- the objective --------------------------------------------------------------------------------

class DistillObjective:
    """The student's loss against a frozen teacher (module docstring). `projection` (tinybert with
    different widths) maps student hidden states to the teacher's width; the job trains it beside
    the student (TrainJob.extra_modules)."""

    name = "distill"

    def __init__(self, task: str, teacher: nn.Module, cfg: DistillConfig, projection: nn.Module | None = None):
        if task not in TASKS:
            raise LMForgeError(f"distill.task must be one of {', '.join(TASKS)}, got '{task}'")
        if cfg.loss not in LOSSES:
            raise LMForgeError(f"distill.loss must be one of {', '.join(LOSSES)}, got '{cfg.loss}'")
        if cfg.temperature <= 0:
            raise LMForgeError(f"distill.temperature must be > 0, got {cfg.temperature}")
        if not 0 <= cfg.alpha <= 1 or not 0 <= cfg.beta <= 1 or not 0 <= cfg.lmbda <= 1:
            raise LMForgeError("distill.alpha, distill.beta and distill.lmbda must lie in [0, 1]")
        self.task, self.teacher, self.cfg, self.projection = task, teacher, cfg, projection
        self.loss_label = ("generalised JSD (nats/token)" if cfg.loss == "gkd"
                           else f"distillation loss ({cfg.loss}, alpha {cfg.alpha:g}, T {cfg.temperature:g})")

    def teacher_outputs(self, batch: dict[str, torch.Tensor], hidden: bool) -> tuple[torch.Tensor, Captured]:
        """The teacher's logits (and captured states) for `batch`, computed once, without autograd."""
        got = Captured()
        with torch.inference_mode():
            if "teacher_logits" in batch and not hidden:
                logits = batch["teacher_logits"]
            else:
                self.teacher.eval()
                with capture(self.teacher, self.cfg.loss == "tinybert") if hidden else contextlib.nullcontext() as c:
                    logits, _ = task_logits(self.task, self.teacher, batch)
                got = c or got
        # inference tensors cannot be saved for backward: plain copies enter the loss
        clone = lambda t: t.clone() if t is not None else None  # noqa: E731
        return clone(logits), Captured(clone(got.embeddings), [clone(h) for h in got.hidden or []],
                                       [clone(s) for s in got.scores or []])

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        cfg = self.cfg
        hidden = cfg.loss in ("cosine", "tinybert")
        with capture(model, cfg.loss == "tinybert") if hidden else contextlib.nullcontext() as s_got:
            s_NV, y_N = task_logits(self.task, model, batch)
        t_NV, t_got = self.teacher_outputs(batch, hidden)
        if s_NV.shape[-1] != t_NV.shape[-1]:
            raise LMForgeError(f"the student's outputs have {s_NV.shape[-1]} entries per position, the teacher's "
                               f"{t_NV.shape[-1]}: distillation compares them one to one")
        if cfg.loss == "gkd":
            loss = generalized_jsd(s_NV[None], t_NV[None], y_N[None], cfg.beta, cfg.temperature)
            stats = {"gkd_loss": loss.detach()}
        else:
            loss, stats = kd_loss(s_NV, t_NV, y_N, cfg.alpha, cfg.temperature)
        if hidden:
            real_BT, pairs_BTT = token_pairs(self.task, batch)
            if cfg.loss == "cosine":
                inter = cosine_hidden_loss(s_got.hidden[-1], t_got.hidden[-1], real_BT)
                stats["cosine_loss"] = inter.detach()
            else:
                inter, parts = self._tinybert(s_got, t_got, real_BT, pairs_BTT)
                stats.update(parts)
            loss = loss + cfg.hidden_weight * inter
        with torch.no_grad():
            acc = (s_NV.argmax(-1) == y_N).float().mean()
            agree = (s_NV.argmax(-1) == t_NV.argmax(-1)).float().mean()
        return loss, {"loss": loss.detach(), **stats, "acc": acc, "teacher_agreement": agree,
                      "tokens": _input_tokens(batch)}

    def _tinybert(self, s: Captured, t: Captured, real_BT: torch.Tensor,
                  pairs_BTT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Embedding MSE + sum over mapped blocks of hidden-state MSE and attention-score MSE."""
        emb = hidden_mse(s.embeddings, t.embeddings, real_BT, self.projection)
        hid = att = torch.zeros((), device=emb.device)
        for i, j in enumerate(layer_map(len(s.hidden), len(t.hidden))):
            hid = hid + hidden_mse(s.hidden[i], t.hidden[j], real_BT, self.projection)
            att = att + attention_mse(s.scores[i], t.scores[j], pairs_BTT)
        return emb + hid + att, {"embedding_mse": emb.detach(), "hidden_mse": hid.detach(),
                                 "attention_mse": att.detach()}


def _input_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real input tokens of a micro-batch (tok/s counts them)."""
    for key in ("attention_mask", "input_mask"):
        if key in batch:
            return batch[key].sum() + (batch["decoder_mask"].sum() if "decoder_mask" in batch else 0)
    if "segment_ids" in batch:
        return (batch["segment_ids"] >= 0).sum()
    return (batch["labels"] != IGNORE).sum()
