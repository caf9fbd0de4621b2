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
from typing import Any, Literal, Optional, Sequence


from lmforge.errors import LMForgeError
from lmforge.finetune import align_common as C
from lmforge.finetune import rl as R
from lmforge.train import alignment as A
from lmforge.train.config import TrainConfig


@dataclass
class GRPOSection:
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
    ptx_coef: float = field(default=0.05, metadata={"help": "with --ptx-data: weight of the SFT loss on that data "
                                                            "(InstructGPT's PPO-ptx gamma)"})
    ptx_micro_batch_size: int = field(default=8, metadata={"help": "with --ptx-data: packed SFT rows per micro-batch"})


@dataclass
class GRPORunConfig:
    train: C.RLTrainConfig = field(default_factory=C.RLTrainConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)


CONFIG = GRPORunConfig  # `lmforge finetune grpo --help-config`


def add_arguments(parser: Any) -> None:
    parser.add_argument("--reward", action="append", default=[], metavar="FILE.py:FN|MODULE:FN|RM_DIR",
                        help="reward function(s) or reward-model directory; repeat for several")
    parser.add_argument("--reward-weights", type=float, nargs="+", default=None, help="one weight per --reward")
    parser.add_argument("--ptx-data", default=None, metavar="FILE.jsonl",
                        help="SFT data mixed into every step with weight ptx_coef (InstructGPT's PPO-ptx): keeps "
                             "what the model could do while RL moves it")


def make_task(args: Any, overrides: Sequence[str] = ()) -> tuple[Any, TrainConfig]:
    from lmforge.data.alignment_data import reply_stop_ids, encode_prompt, read_prompts
    from lmforge.train import distributed as D
    from lmforge.train.job import TrainJob

    cfg = C.build_section_config(GRPORunConfig, args, overrides,
                                 {})
    g, t = cfg.grpo, cfg.train
    if g.num_generations < 2:
        raise LMForgeError(f"grpo.num_generations must be at least 2 (advantages compare completions), got {g.num_generations}")
    llm = C.load_base(args.base)
    tok = llm.tokenizer
    rewards = R.load_rewards(getattr(args, "reward", None) or [], getattr(args, "reward_weights", None),
                             int(llm.model.cfg.vocab_size))
    examples = read_prompts(args.data)
    pids = [encode_prompt(tok, e.prompt) for e in examples]
    ref = None
    if g.beta > 0:
        ref = C.load_base(args.base).model.eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    names = [rf.name for rf in rewards]

    def process(buf: dict) -> dict:
        buf["old_logps"], _, _ = source.logps(source.model, buf)
        if ref is not None:
            buf["ref_logps"], _, _ = source.logps(ref, buf)
        adv, st = A.grpo_advantages(buf["scores"], g.num_generations, g.scale_rewards)
        buf["advantages"] = adv
        buf.update(R.rollout_stats(buf, names))
        buf["stat/frac_reward_zero_std"] = st["frac_reward_zero_std"]
        return buf

    spec = R.RolloutSpec(g.num_generations, g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.epochs, g.minibatches)
    stops = reply_stop_ids(tok)
    source = R.RolloutSource(examples, pids, tok, rewards, spec, t.micro_batch_size, t.grad_accum, t.seed,
                             D.rank(), D.world_size(), process, stops, C.pad_id_of(tok))
    objective = R.GRPOObjective(g.epsilon, g.epsilon_high, g.beta, g.loss_type, g.max_new_tokens)
    batches, objective, ptx_sha = R.add_ptx(args, llm, source, objective, g.ptx_coef, g.ptx_micro_batch_size, t.seed,
                                            t.grad_accum, "grpo")
    holder = {"model": llm.model}
    task = TrainJob(name="grpo", config=C.resolved("grpo", args, cfg),
                build_model=lambda: holder.pop("model", None) or C.load_base(args.base).model,
                objective=objective, train_batches=batches, files=C.model_files(llm, args.base),
                data_fingerprint={"data": C.file_sha(args.data), **ptx_sha}, report_perplexity=C.REPORT_PPL,
                description=f"{len(examples)} prompts, {source.n_prompts * D.world_size()} prompts x "
                            f"{g.num_generations} completions per rollout")
    return task, t


def run(args: Any, overrides: Sequence[str] = ()) -> dict[str, Any]:
    from lmforge.train.loop import train_job

    task, t = make_task(args, overrides)
    return train_job(task, t, args.out, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
