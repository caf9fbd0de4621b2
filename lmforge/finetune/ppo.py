"""`lmforge finetune ppo`: RLHF with Proximal Policy Optimization (Ziegler et al. 2019; Ouyang et al.
2022), as TRL's PPOTrainer defines it.

The policy carries a value head on its own trunk (family "decoder_value"; it still generates and
chats like any decoder). Per rollout: sample one reply per prompt with the KV-cache engine, score it
(reward functions or a reward-model directory; `ppo.missing_eos_penalty` is subtracted from replies
that never end), compute the per-token KL to the frozen reference (`ppo.kl_estimator` k1 | k3),
rewards r_t = -kl_coef * kl_t with the score added at the last token, GAE (gamma, lam), whitened
advantages; then `ppo.epochs` passes of `ppo.minibatches` optimizer steps with the clipped policy
loss + vf_coef x clipped value loss. With `ppo.target_kl` the KL coefficient adapts after every
rollout (Ziegler et al.'s proportional controller). Logged: objective/kl, objective/scores,
objective/rlhf_reward, objective/entropy, policy/approxkl, policy/clipfrac, loss/policy,
loss/value, val/clipfrac, completion_length (mean reply length), objective/kl_coef.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch

from lmforge.finetune import align_common as C
from lmforge.finetune import rl as R
from lmforge.train import alignment as A
from lmforge.train.config import TrainConfig


@dataclass
class PPOSection:
    max_new_tokens: int = field(default=32, metadata={"help": "longest reply"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_k: Optional[int] = field(default=None, metadata={"help": "top-k of the rollouts"})
    top_p: Optional[float] = field(default=None, metadata={"help": "top-p of the rollouts"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial per-token KL penalty coefficient"})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "k1 | k3 (Schulman's estimators)"})
    target_kl: Optional[float] = field(default=None, metadata={"help": "adaptive KL: target KL per reply (None = fixed kl_coef)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon (in replies)"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    epochs: int = field(default=4, metadata={"help": "optimisation passes over each rollout batch"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass"})
    missing_eos_penalty: Optional[float] = field(default=None, metadata={"help": "subtracted from the score of replies that never end"})
    whiten_advantages: bool = field(default=True, metadata={"help": "zero-mean unit-variance advantages over the batch"})
    ptx_coef: float = field(default=0.05, metadata={"help": "with --ptx-data: weight of the SFT loss on that data "
                                                            "(InstructGPT's PPO-ptx gamma)"})
    ptx_micro_batch_size: int = field(default=8, metadata={"help": "with --ptx-data: packed SFT rows per micro-batch"})


@dataclass
class PPORunConfig:
    train: C.RLTrainConfig = field(default_factory=C.RLTrainConfig)
    ppo: PPOSection = field(default_factory=PPOSection)


CONFIG = PPORunConfig  # `lmforge finetune ppo --help-config`


def add_arguments(parser: Any) -> None:
    from lmforge.finetune.grpo import add_arguments as grpo_args

    grpo_args(parser)


def last_token_rewards(scores_N: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """(N, T) zeros with each row's score at its last real (masked) position."""
    N, T = mask_NT.shape
    pos = torch.arange(T)[None].expand(N, T)
    last = torch.where(mask_NT, pos, torch.full_like(pos, -1)).max(1).values
    out = torch.zeros(N, T)
    ok = last >= 0
    out[ok.nonzero()[:, 0], last[ok]] = scores_N[ok].float()
    return out


def make_task(args: Any, overrides: Sequence[str] = ()) -> tuple[Any, TrainConfig]:
    from lmforge.data.alignment_data import reply_stop_ids, encode_prompt, read_prompts
    from lmforge.models.heads import DecoderWithValueHead
    from lmforge.train import distributed as D
    from lmforge.train.job import TrainJob

    cfg = C.build_section_config(PPORunConfig, args, overrides,
                                 {})
    p, t = cfg.ppo, cfg.train
    llm = C.load_base(args.base)
    tok = llm.tokenizer
    rewards = R.load_rewards(getattr(args, "reward", None) or [], getattr(args, "reward_weights", None),
                             int(llm.model.cfg.vocab_size))
    examples = read_prompts(args.data)
    pids = [encode_prompt(tok, e.prompt) for e in examples]
    ref = C.load_base(args.base).model.eval()  # the frozen reference (PPO needs it at every rollout)
    for q in ref.parameters():
        q.requires_grad_(False)
    names = [rf.name for rf in rewards]
    ctl = {"kl_coef": float(p.kl_coef)}

    def process(buf: dict) -> dict:
        m = buf["mask"]
        old, values, ent = source.logps(source.model, buf, with_values=True)
        ref_lp, _, _ = source.logps(ref, buf)
        scores = buf["scores"].clone()
        if p.missing_eos_penalty is not None:
            scores = scores - p.missing_eos_penalty * (~buf["ended"]).float()
        kl = A.kl_estimate(old, ref_lp, p.kl_estimator) * m
        coef = ctl["kl_coef"]
        non_score = -coef * kl
        rew = non_score + last_token_rewards(scores, m)
        values = values * m
        adv, ret = A.gae(rew, values, m, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = A.masked_whiten(adv, m)
        buf.update({"old_logps": old, "ref_logps": ref_lp, "old_values": values, "advantages_t": adv, "returns": ret})
        buf.update(R.rollout_stats(buf, names))
        kl_seq = kl.sum(1).mean()
        buf.update({"stat/objective/kl": kl_seq, "stat/objective/scores": scores.mean(),
                    "stat/objective/rlhf_reward": scores.mean() + non_score.sum(1).mean(),
                    "stat/objective/entropy": A.masked_mean(ent, m), "stat/objective/kl_coef": torch.tensor(coef)})
        if p.target_kl is not None:  # proportional controller (Ziegler et al. 2019), state for the next rollout
            err = max(-0.2, min(0.2, float(kl_seq) / p.target_kl - 1))
            ctl["kl_coef"] = coef * (1 + err * m.shape[0] / p.kl_horizon)
        buf["ctl/kl_coef_next"] = torch.tensor(ctl["kl_coef"], dtype=torch.float64)
        return buf

    def on_load(buf: dict) -> None:
        if "ctl/kl_coef_next" in buf:
            ctl["kl_coef"] = float(buf["ctl/kl_coef_next"])

    spec = R.RolloutSpec(1, p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.epochs, p.minibatches)
    source = R.RolloutSource(examples, pids, tok, rewards, spec, t.micro_batch_size, t.grad_accum, t.seed,
                             D.rank(), D.world_size(), process, reply_stop_ids(tok), C.pad_id_of(tok))
    source.on_load = on_load
    base = llm.model
    objective = R.PPOObjective(p.cliprange, p.cliprange_value, p.vf_coef)
    batches, objective, ptx_sha = R.add_ptx(args, llm, source, objective, p.ptx_coef, p.ptx_micro_batch_size, t.seed,
                                            t.grad_accum, "ppo")

    task = TrainJob(name="ppo", config=C.resolved("ppo", args, cfg),
                build_model=lambda: DecoderWithValueHead.from_decoder(base),
                objective=objective, train_batches=batches,
                files=C.model_files(llm, args.base), data_fingerprint={"data": C.file_sha(args.data), **ptx_sha},
                report_perplexity=C.REPORT_PPL,
                description=f"{len(examples)} prompts, {source.n_prompts * D.world_size()} replies per rollout, "
                            f"{spec.epochs * spec.minibatches} steps per rollout")
    return task, t


def run(args: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from lmforge.train.loop import train_job

    task, t = make_task(args, overrides)
    return train_job(task, t, args.out, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
