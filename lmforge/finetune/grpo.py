"""`lmforge finetune grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath).

For each prompt, G completions are sampled from the current policy; their rewards (Python
functions or a reward model) are normalised within the group (`grpo.scale_rewards` group | batch |
none) into one advantage per completion; the loss is the clipped ratio objective per token, plus
`grpo.beta` x k3 KL to the reference (beta 0, the default, loads no reference model). Logged:
reward and its std, per reward function mean/std, frac_reward_zero_std, kl (beta > 0), clip_ratio,
completion_length, completions_ended, rollout_tok_per_s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lmforge.errors import LMForgeError
from lmforge.finetune import rl as R
from lmforge.finetune.align_common import RLTrainConfig
from lmforge.finetune.base_model import load_base
from lmforge.finetune.rl import add_arguments  # noqa: F401  (--reward, --reward-weights, --ptx-data)
from lmforge.train import alignment as A
from lmforge.train.adapters import LoRAConfig


@dataclass
class GRPOSection(R.PtxOptions):
    num_generations: int = field(default=8, metadata={"help": "completions sampled per prompt (G)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_k: Optional[int] = field(default=None, metadata={"help": "top-k of the rollouts"})
    top_p: Optional[float] = field(default=None, metadata={"help": "top-p of the rollouts"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL penalty to the reference (0 = no reference model)"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip of the ratio (1 - epsilon)"})
    epsilon_high: Optional[float] = field(default=None, metadata={"help": "upper clip (1 + epsilon_high); default epsilon"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={"help": "group | batch | none"})
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = field(default="grpo", metadata={"help": "grpo | bnpo | dr_grpo"})
    epochs: int = field(default=1, metadata={"help": "optimisation passes per rollout batch (TRL's num_iterations)"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass over a rollout batch"})


@dataclass
class GRPORunConfig:
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


CONFIG = GRPORunConfig  # `lmforge finetune grpo --help-config`


def build_job(cfg: GRPORunConfig, args: Any) -> Any:
    g, t = cfg.grpo, cfg.train
    if g.num_generations < 2:
        raise LMForgeError(f"grpo.num_generations must be at least 2 (advantages compare completions), got {g.num_generations}")
    llm, rewards, examples, pids = R.rl_inputs("grpo", args)
    ref = R.frozen_reference("grpo", args.base, cfg.lora) if g.beta > 0 else None
    names = [rf.name for rf in rewards]

    def process(buf: dict) -> dict:
        buf["old_logps"], _, _ = source.logps(source.model, buf)
        if g.beta > 0:
            buf["ref_logps"] = R.reference_logps(source, ref, buf)
        adv, st = A.grpo_advantages(buf["scores"], g.num_generations, g.scale_rewards)
        buf["advantages"] = adv
        buf.update(R.rollout_stats(buf, names))
        buf["stat/frac_reward_zero_std"] = st["frac_reward_zero_std"]
        return buf

    spec = R.RolloutSpec(g.num_generations, g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.epochs, g.minibatches)
    source = R.rollout_source(llm, examples, pids, rewards, spec, t, process)
    objective = R.GRPOObjective(g.epsilon, g.epsilon_high, g.beta, g.loss_type, g.max_new_tokens)
    holder = {"model": llm.model}
    return R.rl_job("grpo", args, cfg, llm, source, objective, g.ptx_coef, g.ptx_micro_batch_size,
                    build_model=lambda: holder.pop("model", None) or load_base(args.base, "grpo").model,
                    description=f"{len(examples)} prompts, {source.n_prompts * source.world} prompts x "
                                f"{g.num_generations} completions per rollout")
