"""RL fine-tuning pieces shared by GRPO and PPO: reward functions, the rollout batch source, and
the two objectives. Both methods run in the one training loop.

Rollout phase = a batch source. Optimizer steps come in blocks of K = epochs x minibatches steps
per rollout. At the first micro-batch of block r, the source generates completions for this
rank's prompts with lmforge's KV-cache engine (`infer.generate`, batched, seeded by
(seed, r, rank)), scores them, computes old log-probs (and values / reference log-probs) and
advantages, and keeps them in a buffer; the K steps of the block train on shuffled minibatches of
that buffer (epoch e's order seeded by (seed, r, e, rank)). The buffer (and PPO's adaptive KL
coefficient) is saved with every checkpoint through `state_dict()`, so a run resumed in the middle
of a block continues with the very same rollouts: resume is bit-exact.

Reward functions are plain Python, `f(prompts, completions, **columns) -> list[float | None]`
(TRL's signature), given as `file.py:function` or `package.module:function`, or a reward-model
directory (a `lmforge finetune reward` run). Several combine as a weighted sum; None means "does
not apply" and counts as 0. A function that raises, returns the wrong number of values, or NaN
stops the run with a message naming the function and the example.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lmforge.data.sampling import EpochOrder
from lmforge.errors import LMForgeError
from lmforge.train import alignment as A


# ---- reward functions ------------------------------------------------------------------------


@dataclass
class PtxOptions:
    """The keys GRPO and PPO share for InstructGPT's PPO-ptx term (`--ptx-data`)."""

    ptx_coef: float = field(default=0.05, metadata={"help": "with --ptx-data: weight of the SFT loss on that data "
                                                            "(InstructGPT's PPO-ptx gamma)"})
    ptx_micro_batch_size: int = field(default=8, metadata={"help": "with --ptx-data: packed SFT rows per micro-batch"})


@dataclass
class RewardFn:
    name: str
    fn: Callable[..., Sequence[Any]]
    weight: float = 1.0
    needs_ids: bool = False  # a reward model scores token ids


class RewardModelFn:
    """A trained reward model (DecoderClassifier directory) as a reward function on token ids."""

    def __init__(self, path: str | Path, vocab_size: int):
        from lmforge.models.registry import SCORE, family_of, load_model_dir

        model, cfg, _ = load_model_dir(path)
        if SCORE not in family_of(model).tasks(cfg) or cfg.num_labels != 1:
            raise LMForgeError(f"--reward {path}: not a reward model (a 'lmforge finetune reward' run)")
        if cfg.vocab_size != vocab_size:
            raise LMForgeError(f"--reward {path}: the reward model's vocabulary ({cfg.vocab_size}) differs from the "
                               f"policy's ({vocab_size}); train it from the same base model")
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, seqs: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
        out = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.bool)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(list(s))
                mask[j, :len(s)] = True
            out += self.model(ids, pad_mask_BT=mask)[:, 0].float().tolist()
        return out


def _load_callable(spec: str) -> tuple[str, Callable]:
    if ":" not in spec:
        raise LMForgeError(f"--reward {spec}: expected file.py:function, package.module:function or a reward model "
                           "directory")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise LMForgeError(f"--reward {spec}: file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"lmforge_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise LMForgeError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise LMForgeError(f"--reward {spec}: cannot import module {where} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LMForgeError(f"--reward {spec}: {where} has no function '{name}'")
    return name, fn


def load_rewards(specs: Sequence[str], weights: Sequence[float] | None, vocab_size: int) -> list[RewardFn]:
    if not specs:
        raise LMForgeError("give at least one --reward (file.py:function, module:function or a reward model directory)")
    if weights and len(weights) != len(specs):
        raise LMForgeError(f"--reward-weights has {len(weights)} values for {len(specs)} --reward functions")
    out = []
    for i, spec in enumerate(specs):
        w = float(weights[i]) if weights else 1.0
        if Path(spec).is_dir():
            out.append(RewardFn(f"reward_model:{Path(spec).name}", RewardModelFn(spec, vocab_size), w, needs_ids=True))
        else:
            name, fn = _load_callable(spec)
            out.append(RewardFn(name, fn, w))
    return out


def _example(prompts: Sequence[str], completions: Sequence[str], where: Sequence[str], i: int) -> str:
    return f"example {where[i]} (prompt {prompts[i][:80]!r}, completion {completions[i][:80]!r})"


def compute_rewards(fns: Sequence[RewardFn], prompts: Sequence[str], completions: Sequence[str],
                    columns: dict[str, list], where: Sequence[str],
                    seqs: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total (N,), per-function (F, N) with NaN where a function returned None)."""
    n = len(completions)
    per = torch.full((len(fns), n), float("nan"))
    for k, rf in enumerate(fns):
        if rf.needs_ids:
            values = rf.fn(seqs)
        else:
            try:
                values = rf.fn(list(prompts), list(completions), **columns)
            except Exception as e:
                # Find the example it fails on, to name it.
                bad = None
                for i in range(n):
                    try:
                        rf.fn([prompts[i]], [completions[i]], **{c: [v[i]] for c, v in columns.items()})
                    except Exception:
                        bad = i
                        break
                at = f" on {_example(prompts, completions, where, bad)}" if bad is not None else ""
                raise LMForgeError(f"reward function {rf.name} raised {type(e).__name__}: {e}{at}") from None
        try:
            values = list(values)
        except TypeError:
            raise LMForgeError(f"reward function {rf.name} returned {type(values).__name__}, not a list of floats") from None
        if len(values) != n:
            raise LMForgeError(f"reward function {rf.name} returned {len(values)} values for {n} completions "
                               f"(first: {_example(prompts, completions, where, 0)})")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise LMForgeError(f"reward function {rf.name} returned {v!r} (not a number) for "
                                   f"{_example(prompts, completions, where, i)}") from None
            if not math.isfinite(fv):
                raise LMForgeError(f"reward function {rf.name} returned {fv} for {_example(prompts, completions, where, i)}")
            per[k, i] = fv
    w = torch.tensor([rf.weight for rf in fns])[:, None]
    total = torch.nan_to_num(per * w, nan=0.0).sum(0)
    return total, per


# ---- the rollout batch source ----------------------------------------------------------------

def _seed(*parts: int) -> int:
    return int(np.random.default_rng([p & 0xFFFFFFFF for p in parts]).integers(0, 2**62))


@dataclass
class RolloutSpec:
    group_size: int = 1           # completions per prompt (GRPO's G; 1 for PPO)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    epochs: int = 1               # optimisation passes over each rollout batch
    minibatches: int = 1          # optimizer steps per epoch


class RolloutSource:
    """Generates, scores and buffers rollouts; serves shuffled minibatches (module docstring).
    `process(buffer) -> buffer` adds the method's tensors (old log-probs, advantages, ...)."""

    def __init__(self, prompts: Sequence[Any], prompt_ids: Sequence[Sequence[int]], tokenizer: Any,
                 rewards: Sequence[RewardFn], spec: RolloutSpec, micro_batch_size: int, grad_accum: int,
                 seed: int, rank: int, world: int, process: Callable[[dict], dict], stop_id: int | Sequence[int],
                 pad_id: int):
        self.prompts, self.prompt_ids, self.tok, self.rewards = list(prompts), list(prompt_ids), tokenizer, list(rewards)
        self.spec, self.mb, self.ga, self.seed, self.rank, self.world = spec, micro_batch_size, grad_accum, seed, rank, world
        # Generation ends at any stop id; an ended reply is trained with the primary one (end-of-turn).
        self.stop_ids = [stop_id] if isinstance(stop_id, int) else list(stop_id)
        self.process, self.stop_id, self.pad_id = process, self.stop_ids[0], pad_id
        self.rows = spec.minibatches * grad_accum * micro_batch_size  # per rank per rollout
        if self.rows % spec.group_size:
            raise LMForgeError(f"the rollout batch per process (minibatches {spec.minibatches} x grad_accum {grad_accum} "
                               f"x micro_batch_size {micro_batch_size} = {self.rows}) must be a multiple of the "
                               f"group size {spec.group_size}")
        self.n_prompts = self.rows // spec.group_size  # per rank per rollout
        self.prompt_order = EpochOrder(len(self.prompts), seed)  # every rank reads the one stream
        self.steps_per_rollout = spec.epochs * spec.minibatches
        self.model: torch.nn.Module | None = None
        self.autocast = torch.float32  # the training forward's autocast dtype (bind)
        self.on_load: Callable[[dict], None] | None = None  # restores controller state (PPO's KL coef)
        self.buffer: dict[str, torch.Tensor] | None = None
        self.all_buffers: list[dict[str, torch.Tensor]] = []
        self.buffer_id = -1

    def bind(self, model: torch.nn.Module, autocast: torch.dtype = torch.float32) -> None:
        """The live policy, and the autocast dtype of the loop's training forward: the rollout's
        log-probs (old, reference) are computed in that precision, so the first minibatch's ratio is 1
        up to summation order rather than off by the bf16-vs-fp32 rounding of every token."""
        self.model, self.autocast = model, autocast

    def logps(self, model: torch.nn.Module, buf: dict[str, torch.Tensor], with_values: bool = False):
        """forward_logps of the buffer's rows under `model` (the policy or a frozen reference, moved
        to the policy's device on first use) in the training precision."""
        device = next(self.model.parameters()).device
        if next(model.parameters()).device != device:
            model.to(device)
        return forward_logps(model, buf["ids"], buf["labels"], with_values=with_values, autocast=self.autocast)

    # -- checkpointed state (only rank 0 writes checkpoints, so it holds every rank's buffer)
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.buffer is None:
            return {}
        out = {f"r{r}.{k}": v for r, b in enumerate(self.all_buffers) for k, v in b.items()}
        return {**out, "buffer_id": torch.tensor(self.buffer_id)}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        if "buffer_id" not in d:
            return
        mine = {k[len(f"r{self.rank}."):]: v for k, v in d.items() if k.startswith(f"r{self.rank}.")}
        if not mine:
            raise LMForgeError("this checkpoint was written in the middle of a rollout by a run with fewer processes; "
                               "resume with the same number of processes")
        self.buffer_id, self.buffer = int(d["buffer_id"]), mine
        self.all_buffers = [mine]
        if self.on_load is not None:
            self.on_load(self.buffer)

    def _share(self, buf: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's rollout buffer on every rank (small tensors; safetensors bytes on the wire)."""
        if self.world == 1:
            return [buf]
        import torch.distributed as dist
        from safetensors.torch import load, save

        data = save({k: v.detach().cpu().contiguous() for k, v in buf.items()})
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, data)
        return [load(b) for b in gathered]

    # -- rollouts
    def _prompt_indices(self, r: int) -> list[int]:
        return self.prompt_order.take((r * self.world + self.rank) * self.n_prompts, self.n_prompts)

    @torch.no_grad()
    def rollout(self, r: int) -> dict[str, torch.Tensor]:
        from lmforge.infer.generate import generate

        if self.model is None:
            raise RuntimeError("RolloutSource.bind(model) was not called")
        G, s = self.spec.group_size, self.spec
        idx = [i for i in self._prompt_indices(r) for _ in range(G)]
        pids = [list(self.prompt_ids[i]) for i in idx]
        ctx = int(self.model.cfg.block_size)
        n_new = min(s.max_new_tokens, ctx - max(len(p) for p in pids))
        if n_new < 1:
            raise LMForgeError(f"a prompt of {max(len(p) for p in pids)} tokens leaves no room to generate in the "
                               f"model's context of {ctx}")
        t0 = time.perf_counter()
        gens = generate(self.model, pids, max_new_tokens=n_new, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, eos_id=self.stop_ids, pad_id=self.pad_id, seed=_seed(self.seed, r, self.rank),
                        decode_text=False)
        gen_s = time.perf_counter() - t0
        comps = [g.ids + ([self.stop_id] if g.finish_reason == "eos" else []) for g in gens]
        ended = torch.tensor([g.finish_reason == "eos" for g in gens])
        texts = [self.tok.decode(g.ids) for g in gens]
        ex = [self.prompts[i] for i in idx]
        ptexts = [_prompt_text(e.prompt) for e in ex]
        cols: dict[str, list] = {}
        for e in ex:
            for k in e.columns:
                cols.setdefault(k, [])
        for k in cols:
            cols[k] = [e.columns.get(k) for e in ex]
        seqs = [p + c for p, c in zip(pids, comps)]
        total, per = compute_rewards(self.rewards, ptexts, texts, cols, [e.where for e in ex], seqs)
        # Right-padded rows prompt + completion; labels on completion tokens (aligned with logits).
        N, T = len(seqs), max(len(q) for q in seqs)
        ids = torch.full((N, T), self.pad_id, dtype=torch.long)
        labels = torch.full((N, T), -100, dtype=torch.long)
        for i, (p, q) in enumerate(zip(pids, seqs)):
            ids[i, :len(q)] = torch.tensor(q)
            if len(q) > len(p):
                labels[i, len(p) - 1:len(q) - 1] = ids[i, len(p):len(q)]
        buf = {"ids": ids, "labels": labels, "mask": labels != -100, "scores": total.float(), "ended": ended,
               "per_reward": per.float().t().contiguous(), "gen_tokens": torch.tensor(sum(len(g.ids) for g in gens)),
               "gen_seconds": torch.tensor(gen_s, dtype=torch.float64)}
        return self.process(buf)

    def micro_batch(self, step: int, index: int) -> dict[str, torch.Tensor]:
        r, k = divmod(step, self.steps_per_rollout)
        if self.buffer is None or self.buffer_id != r:
            self.buffer, self.buffer_id = self.rollout(r), r
            self.all_buffers = self._share(self.buffer)
        epoch, m = divmod(k, self.spec.minibatches)
        a = index - self.rank * self.ga
        # epoch e of the block reads this rank's buffer in the e-th permutation of its own stream
        order = EpochOrder(self.rows, _seed(self.seed, r, self.rank))
        sel = torch.as_tensor(order.take(epoch * self.rows + (m * self.ga + a) * self.mb, self.mb))
        b = self.buffer
        out = {k2: v[sel] for k2, v in b.items() if v.dim() >= 1 and v.shape[0] == self.rows}
        # Trim trailing all-padding columns of this micro-batch.
        width = int(out["mask"].any(0).nonzero().max()) + 2 if bool(out["mask"].any()) else 1
        for k2 in ("ids", "labels", "mask", "old_logps", "ref_logps", "old_values", "advantages_t", "returns"):
            if k2 in out and out[k2].dim() == 2:
                out[k2] = out[k2][:, :width]
        out["stats"] = {k2[len("stat/"):]: v for k2, v in b.items() if k2.startswith("stat/")}
        return out


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


@torch.no_grad()
def forward_logps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 16,
                  with_values: bool = False, autocast: torch.dtype = torch.float32,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log-probs of the labels (N, T), values (N, T) or None, entropy (N, T); eval mode,
    under `autocast` (the training forward's dtype) where that is not float32."""
    was = model.training
    model.eval()
    lps, vals, ents = [], [], []
    device = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(x.device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast != torch.float32):
            if with_values:
                logits, v = model(x, values=True)
                vals.append(v.float().cpu())
            else:
                logits = model(x)
        lps.append(A.token_logps(logits, y).cpu())
        ents.append(A.entropy_from_logits(logits).cpu())
    model.train(was)
    return torch.cat(lps), (torch.cat(vals) if with_values else None), torch.cat(ents)


def rollout_stats(buf: dict[str, torch.Tensor], reward_names: Sequence[str]) -> dict[str, torch.Tensor]:
    m = buf["mask"].float()
    lengths = m.sum(1)
    s = {"stat/completion_length": lengths.mean(), "stat/completions_ended": buf["ended"].float().mean(),
         "stat/reward": buf["scores"].mean(), "stat/reward_std": buf["scores"].std() if len(lengths) > 1 else torch.zeros(()),
         "stat/rollout_tok_per_s": buf["gen_tokens"].double() / buf["gen_seconds"].clamp(min=1e-9)}
    for k, name in enumerate(reward_names):
        col = buf["per_reward"][:, k]
        ok = ~torch.isnan(col)
        s[f"stat/rewards/{name}/mean"] = col[ok].mean() if ok.any() else torch.zeros(())
        s[f"stat/rewards/{name}/std"] = col[ok].std() if ok.sum() > 1 else torch.zeros(())
    return {k: v.float() for k, v in s.items()}


# ---- objectives ------------------------------------------------------------------------------

class GRPOObjective:
    name = "grpo"
    loss_label = "GRPO loss (clipped policy objective)"

    def __init__(self, eps_low: float, eps_high: float | None, beta: float, loss_type: str, max_new_tokens: int):
        self.eps_low, self.eps_high, self.beta, self.loss_type, self.L = eps_low, eps_high, beta, loss_type, max_new_tokens

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]):
        logits = model(batch["ids"])
        lp = A.token_logps(logits, batch["labels"])
        loss, st = A.grpo_token_loss(lp, batch["old_logps"], batch["advantages"], batch["mask"], self.eps_low,
                                     self.eps_high, batch.get("ref_logps"), self.beta, self.loss_type, self.L)
        stats = {**st, **batch["stats"], "tokens": batch["mask"].sum()}
        return loss, stats


class PPOObjective:
    name = "ppo"
    loss_label = "PPO loss (policy + vf_coef x value)"

    def __init__(self, cliprange: float, cliprange_value: float, vf_coef: float):
        self.clip, self.vclip, self.vf_coef = cliprange, cliprange_value, vf_coef

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]):
        logits, values = model(batch["ids"], values=True)
        lp = A.token_logps(logits, batch["labels"])
        m = batch["mask"]
        pg, pst = A.ppo_policy_loss(lp, batch["old_logps"], batch["advantages_t"], m, self.clip)
        vf, vst = A.ppo_value_loss(values.float(), batch["old_values"], batch["returns"], m, self.vclip)
        loss = pg + self.vf_coef * vf
        stats = {"policy/approxkl": pst["approxkl"], "policy/clipfrac": pst["clipfrac"], "policy/ratio": pst["ratio"],
                 "loss/policy": pg.detach(), "loss/value": vf.detach(), "val/clipfrac": vst["clipfrac"],
                 **batch["stats"], "tokens": m.sum()}
        return loss, stats


# ---- PPO-ptx: a language-model term on SFT data (InstructGPT) -----------------------------------

class PtxBatches:
    """Rollout micro-batches with rows of SFT data under "ptx" (InstructGPT's PPO-ptx, OpenRLHF's
    --pretrain_data). The SFT rows of (step, index) are a pure function of the seed, so resume stays
    exact; everything else (bind, checkpoint state, the model) is the rollout source's."""

    def __init__(self, rollouts: RolloutSource, rows: Any):
        self.rollouts, self.rows = rollouts, rows

    def micro_batch(self, step: int, index: int) -> dict[str, Any]:
        return {**self.rollouts.micro_batch(step, index), "ptx": self.rows.micro_batch(step, index)}

    def __getattr__(self, name: str) -> Any:  # bind, state_dict, load_state_dict, n_prompts, ...
        if name == "rollouts":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.rollouts, name)


class WithPtx:
    """The RL objective plus ptx_coef x the SFT loss (mean NLL of the trained tokens) of the ptx rows."""

    def __init__(self, objective: Any, coef: float):
        from lmforge.finetune.sft import SFTObjective

        self.objective, self.coef, self.sft, self.name = objective, coef, SFTObjective(), objective.name
        self.loss_label = f"{objective.loss_label} + ptx_coef x SFT loss"

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]):
        rl = {k: v for k, v in batch.items() if k != "ptx"}
        loss, stats = self.objective(model, rl)
        ptx, _ = self.sft(model, batch["ptx"])
        return loss + self.coef * ptx, {**stats, "loss/ptx": ptx.detach()}


def add_ptx(args: Any, llm: Any, source: RolloutSource, objective: Any, coef: float, rows_per_micro_batch: int,
            seed: int, grad_accum: int, method: str) -> tuple[Any, Any, dict[str, str]]:
    """With `--ptx-data FILE` (conversations, prompt/completion or instruction/output rows, as `lmforge
    finetune sft` reads them): the source and objective with the ptx term, and the data's fingerprint."""
    path = getattr(args, "ptx_data", None)
    if not path:
        return source, objective, {}
    if coef <= 0:
        raise LMForgeError(f"--ptx-data needs {method}.ptx_coef > 0, got {coef}")
    from lmforge.data.chat import read_examples
    from lmforge.data.table import data_fingerprint
    from lmforge.finetune.base_model import pad_id_of
    from lmforge.finetune.sft import PackedRows, render_examples
    from lmforge.train import distributed as D

    seq_len = int(llm.model.cfg.block_size)
    rendered = render_examples(read_examples(path), llm.tokenizer, "completion", seq_len, "truncate")
    # seed + 1: a stream of its own, not the permutation the prompts use
    rows = PackedRows(rendered, seq_len, rows_per_micro_batch, grad_accum * D.world_size(), seed + 1, True,
                      pad_id_of(llm.tokenizer))
    return PtxBatches(source, rows), WithPtx(objective, coef), {"ptx_data": data_fingerprint([path])}


# ---- what GRPO and PPO build alike --------------------------------------------------------------

def add_arguments(parser: Any) -> None:
    """The RL methods' own flags: the reward functions and the ptx data."""
    parser.add_argument("--reward", action="append", default=[], metavar="FILE.py:FN|MODULE:FN|RM_DIR",
                        help="reward function(s) or reward-model directory; repeat for several")
    parser.add_argument("--reward-weights", type=float, nargs="+", default=None, help="one weight per --reward")
    parser.add_argument("--ptx-data", default=None, metavar="FILE.jsonl",
                        help="SFT data mixed into every step with weight ptx_coef (InstructGPT's PPO-ptx): keeps "
                             "what the model could do while RL moves it")


def rl_inputs(method: str, args: Any) -> tuple[Any, list[RewardFn], list[Any], list[list[int]]]:
    """The policy to start from (an `LLM`), the reward functions, the prompts and their token ids."""
    from lmforge.data.alignment_data import encode_prompt, read_prompts
    from lmforge.finetune.base_model import load_base

    llm = load_base(args.base, method)
    rewards = load_rewards(getattr(args, "reward", None) or [], getattr(args, "reward_weights", None),
                           int(llm.model.cfg.vocab_size))
    examples = read_prompts(args.data)
    return llm, rewards, examples, [encode_prompt(llm.tokenizer, e.prompt) for e in examples]


def frozen_reference(method: str, base: str | Path, lora: Any) -> torch.nn.Module | None:
    """A second copy of the base model, in eval mode and without gradients: the KL reference; None
    under LoRA, where the reference is the policy with its adapters disabled (`reference_logps`)."""
    from lmforge.finetune.base_model import load_base

    if lora.r is not None:
        return None

    ref = load_base(base, method).model.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reference_logps(source: "RolloutSource", ref: torch.nn.Module | None, buf: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's per-token log-probs of the buffer's rows: the frozen copy, or (LoRA, ref None)
    the live policy with its adapters off: the base itself, no second copy of its weights."""
    if ref is not None:
        return source.logps(ref, buf)[0]
    from lmforge.nn.lora import disabled

    with disabled(source.model):
        return source.logps(source.model, buf)[0]


def rollout_source(llm: Any, examples: Sequence[Any], prompt_ids: Sequence[Sequence[int]], rewards: Sequence[RewardFn],
                   spec: RolloutSpec, t: Any, process: Callable[[dict], dict]) -> RolloutSource:
    """This process's rollout source under the loop's settings `t` (micro-batch, accumulation, seed)."""
    from lmforge.data.alignment_data import reply_stop_ids
    from lmforge.finetune.base_model import pad_id_of
    from lmforge.train import distributed as D

    tok = llm.tokenizer
    return RolloutSource(examples, prompt_ids, tok, rewards, spec, t.micro_batch_size, t.grad_accum, t.seed, D.rank(),
                         D.world_size(), process, reply_stop_ids(tok), pad_id_of(tok))


# loss.png of a GRPO / PPO run: what its rollouts tell, under the loss (GRPO logs kl only with grpo.beta > 0)
RL_PANELS = {"reward (mean per completion)": ("reward",), "KL to the reference": ("kl", "objective/kl"),
             "reply length (tokens)": ("completion_length",)}


def rl_job(method: str, args: Any, cfg: Any, llm: Any, source: RolloutSource, objective: Any, ptx_coef: float,
           ptx_micro_batch_size: int, build_model: Callable[[], torch.nn.Module], description: str,
           head_modules: tuple[str, ...] = ()) -> Any:
    """The TrainJob of an RL method: its rollouts (plus the ptx rows of --ptx-data) and objective."""
    from lmforge.data.table import data_fingerprint
    from lmforge.finetune.align_common import REPORT_PPL, resolved
    from lmforge.finetune.base_model import chat_model_files
    from lmforge.train.job import TrainJob

    t = cfg.train
    batches, objective, ptx_sha = add_ptx(args, llm, source, objective, ptx_coef, ptx_micro_batch_size, t.seed,
                                          t.grad_accum, method)
    return TrainJob(name=method, config=resolved(method, args, cfg), build_model=build_model, objective=objective,
                    train_batches=batches, files=chat_model_files(llm, args.base),
                    data_fingerprint={"data": data_fingerprint([args.data]), **ptx_sha},
                    report_perplexity=REPORT_PPL, description=description, plot_panels=RL_PANELS,
                    head_modules=head_modules)
