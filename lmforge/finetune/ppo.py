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
from typing import Any, Literal, Optional

import torch

from lmforge.finetune import rl as R
from lmforge.finetune.align_common import RLTrainConfig
from lmforge.finetune.rl import add_arguments  # noqa: F401  (--reward, --reward-weights, --ptx-data)
from lmforge.train import alignment as A
from lmforge.train.adapters import LoRAConfig


@dataclass
class PPOSection(R.PtxOptions):
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


@dataclass
class PPORunConfig:
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = PPORunConfig  # `lmforge finetune ppo --help-config`


def last_token_rewards(scores_N: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """(N, T) zeros with each row's score at its last real (masked) position."""
    N, T = mask_NT.shape
    pos = torch.arange(T)[None].expand(N, T)
    last = torch.where(mask_NT, pos, torch.full_like(pos, -1)).max(1).values
    out = torch.zeros(N, T)
    ok = last >= 0
    out[ok.nonzero()[:, 0], last[ok]] = scores_N[ok].float()
    return out


def build_job(cfg: PPORunConfig, args: Any) -> Any:
    from lmforge.models.heads import DecoderWithValueHead

    p, t = cfg.ppo, cfg.train
    llm, rewards, examples, pids = R.rl_inputs("ppo", args)
    ref = R.frozen_reference("ppo", args.base, cfg.lora)  # PPO needs it at every rollout
    names = [rf.name for rf in rewards]
    ctl = {"kl_coef": float(p.kl_coef)}

    def process(buf: dict) -> dict:
        m = buf["mask"]
        old, values, ent = source.logps(source.model, buf, with_values=True)
        ref_lp = R.reference_logps(source, ref, buf)
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
    source = R.rollout_source(llm, examples, pids, rewards, spec, t, process)
    source.on_load = on_load
    base = llm.model
    objective = R.PPOObjective(p.cliprange, p.cliprange_value, p.vf_coef)
    return R.rl_job("ppo", args, cfg, llm, source, objective, p.ptx_coef, p.ptx_micro_batch_size,
                    build_model=lambda: DecoderWithValueHead.from_decoder(base), head_modules=("value_head",),
                    description=f"{len(examples)} prompts, {source.n_prompts * source.world} replies per rollout, "
                                f"{spec.epochs * spec.minibatches} steps per rollout")
