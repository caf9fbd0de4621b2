"""`make align-demo`: preference alignment and RL on top of the chat demo's SFT model, measured.

Chain (each stage starts from the SFT model; all on the CPU):
    sft               the starting point: greedy exact-match accuracy on the held-out test prompts
    sampling          sample 8 replies per training prompt (--pair-prompts of them) from the SFT model and
                      verify them: preference pairs, correct over incorrect (chosen = a sampled correct
                      reply, else the reference reply), and the RL prompts: those whose 8 samples disagree
                      (pass rate strictly between 0 and 1, the only groups with a GRPO advantage)
    grpo              GRPO on the RL prompts, reward = the task verifier (lmforge.finetune.rewards:task_verifier)
    ppo               PPO with the same reward
    dpo               DPO on those pairs (reward accuracy on held-out pairs reported)
    reward_model      a reward model on the same pairs (pairwise accuracy on held-out pairs)
    ppo_reward_model  PPO with the learned reward model instead of the verifier; the verifier rides
                      along at weight 0, so the log shows whether the policy exploits the model
    sft_more          the control (not a default stage): as much compute spent on more SFT of the chat
                      demo's training conversations instead (1,500 steps of the chat-demo recipe at lr 1e-4)
Every stage trains a fixed number of steps, so every machine trains the same models: GRPO 473,
PPO 950, DPO 2 and the reward model 3 epochs of the pairs, the control 1,500 SFT steps. On the 2-core
build machine at 2 threads (docs/results/align-demo.json) that took: sampling 9 min, GRPO 20 (with a
test run beside it; about 12 alone), PPO 26, DPO 4, reward model 4, PPO with it 30, the control 28:
about 2 hours with the control. `--minutes M` opts into a wall-clock budget per stage instead.
Printed: one table (stage, accuracy +- standard error, mean reply length, KL to SFT, steps, minutes)
and, as the last line, one JSON object with each stage's accuracy and reward_model_pair_accuracy;
`--results` records every figure (docs/results/align-demo.json).

    python -m lmforge.demo.align_demo [--sft runs/chat-demo] [--data data/chat_tasks] [--out runs/align-demo]
                                      [--grpo-steps 473] [--ppo-steps 950] [--minutes M] [--quick]
                                      [--stages grpo,ppo,dpo,ppo_reward_model,sft_more] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from lmforge.bench.results import add_results_flag, record
from lmforge.data.alignment_data import encode_prompt, reply_stop_ids
from lmforge.data.tasks import check
from lmforge.demo.chat_demo import trained_steps
from lmforge.infer.generate import generate
from lmforge.infer.llm import LLM
from lmforge.runtime import THREADS_HELP, set_threads

VERIFIER = "lmforge.finetune.rewards:task_verifier"
GRPO_STEPS = 473  # what 12 minutes of GRPO reached on the quiet 2-core build machine
PPO_STEPS = 950  # chosen for about 12 minutes there; measured 26 (align-demo.json): a PPO step costs twice the estimate
SFT_MORE_STEPS = 1500  # the control: chosen for about 12 minutes of chat-demo SFT steps; measured 28 there


def log(msg: str) -> None:
    print(f"align-demo: {msg}", file=sys.stderr, flush=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def evaluate(model_dir: Path, sft: LLM, test: list[dict], max_new: int, batch: int = 100,
             kl_prompts: int = 200) -> dict[str, float]:
    """Greedy exact match on the test prompts (+- s.e.), mean reply length (tokens), and KL to the
    SFT model: sum over reply tokens of log p_policy - log p_sft on the policy's greedy replies."""
    llm = LLM.load(model_dir)
    model, tok = llm.model.eval(), llm.tokenizer
    stop = reply_stop_ids(tok)
    correct, lengths, seqs, by_task = [], [], [], {}
    for i in range(0, len(test), batch):
        rows = test[i:i + batch]
        prompts = [encode_prompt(tok, r["messages"][:-1]) for r in rows]
        gens = generate(model, prompts, max_new_tokens=max_new, temperature=0, eos_id=stop, pad_id=tok.pad_id,
                        decode_text=False)
        for r, g, p in zip(rows, gens, prompts):
            correct.append(check(tok.decode(g.ids), r["answer"]))
            by_task.setdefault(r.get("task", "?"), []).append(correct[-1])
            lengths.append(len(g.ids))
            if len(seqs) < kl_prompts and g.ids:
                seqs.append((p, g.ids))
    # KL to SFT on the policy's own greedy replies, in right-padded batches
    from lmforge.finetune.rl import forward_logps

    kls = []
    for i in range(0, len(seqs), 50):
        chunk = seqs[i:i + 50]
        T = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), T), tok.pad_id or 0, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for j, (p, c) in enumerate(chunk):
            ids[j, :len(p) + len(c)] = torch.tensor(p + c)
            labels[j, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
        lp_pol, _, _ = forward_logps(model, ids, labels, batch_size=50)
        lp_sft, _, _ = forward_logps(sft.model, ids, labels, batch_size=50)
        kls += (lp_pol - lp_sft).sum(1).tolist()
    n = len(correct)
    acc = sum(correct) / n
    return {"accuracy": acc, "se": math.sqrt(acc * (1 - acc) / n), "reply_len": sum(lengths) / n,
            "kl_to_sft": sum(kls) / max(len(kls), 1), "by_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())}}


def by_task_table(results: dict[str, dict]) -> list[str]:
    """Lines of the per-task accuracy table: one column per task, one row per stage."""
    tasks = sorted({t for r in results.values() for t in r["by_task"]})
    lines = [f"{'accuracy by task':<18} " + " ".join(f"{t:>9}" for t in tasks)]
    for name, r in results.items():
        lines.append(f"{name:<18} " + " ".join(
            f"{100 * r['by_task'][t]:>8.1f}%" if t in r["by_task"] else f"{'-':>9}" for t in tasks))
    return lines


def stage_budget(steps: int, minutes: float | None) -> list[str]:
    """The train keys that end a stage: `steps` optimizer steps, or with `minutes` a wall-clock
    budget (the schedule fitted to it) that `steps` only caps."""
    return ["--train.max_steps", str(steps)] + (["--train.max_minutes", str(minutes)] if minutes is not None else [])


def rl_steps(given: int | None, default: int, minutes: float | None) -> int:
    """An RL stage's steps: as given, else its fixed default, or under a wall-clock budget no cap of its own."""
    if given is not None:
        return given
    return 100000 if minutes is not None else default


def run_method(name: str, base: Path, data: Path, out: Path, overrides: list[str], **extra: Any) -> dict:
    from lmforge.finetune.scaffold import run

    args = types.SimpleNamespace(base=str(base), data=str(data), out=str(out), val_data=extra.pop("val_data", None),
                                 val_fraction=None, config=None, recipe=extra.pop("recipe", None), resume=None,
                                 overwrite=True, **extra)
    return run(name, args, overrides)


@torch.no_grad()
def sample_training_prompts(sft: LLM, train: list[dict], n_prompts: int, k: int, max_new: int, seed: int,
                            temperature: float = 1.0, pairs_per_prompt: int = 1) -> tuple[list[dict], list[dict]]:
    """Sample k replies per training prompt from the SFT model and verify them. Returns
    (pairs, rl_prompts): a pair = a correct reply (sampled when one is, else the reference reply of
    the training data) over a sampled incorrect one, up to `pairs_per_prompt` distinct (correct,
    incorrect) combinations per prompt, each pair tagged with its prompt's index ("group");
    rl_prompts = the training rows whose pass rate is strictly between 0 and 1 — the prompts where a
    group of samples disagrees, the only ones that give GRPO a non-zero advantage (offline pass-rate
    filtering, as DAPO / Kimi k1.5 do)."""
    tok = sft.tokenizer
    stop = reply_stop_ids(tok)
    pairs, rl_rows = [], []
    for i in range(0, n_prompts, 32):
        rows = train[i:i + 32]
        prompts = [encode_prompt(tok, r["messages"][:-1]) for r in rows for _ in range(k)]
        gens = generate(sft.model, prompts, max_new_tokens=max_new, temperature=temperature, eos_id=stop, pad_id=tok.pad_id,
                        seed=seed + i, decode_text=False)
        for j, r in enumerate(rows):
            group = gens[j * k:(j + 1) * k]
            texts = [tok.decode(g.ids) for g in group if g.finish_reason == "eos"]
            right = [check(t, r["answer"]) for t in texts]
            if 0 < sum(right) < k:
                rl_rows.append(r)
            good = list(dict.fromkeys(t for t, ok in zip(texts, right) if ok))  # distinct, in order
            bad = list(dict.fromkeys(t for t, ok in zip(texts, right) if not ok and t.strip()))
            chosen = good or [r["messages"][-1]["content"]]
            combos = [(c, b) for b in bad for c in chosen][:pairs_per_prompt]
            for c, b in combos:
                pairs.append({"prompt": r["messages"][:-1], "chosen": c, "rejected": b, "chosen_sampled": bool(good),
                              "task": r.get("task"), "answer": r["answer"], "group": i + j})
    return pairs, rl_rows


def split_pairs_by_prompt(pairs: list[dict], fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, held_out): the held-out pairs are all the pairs of the first `fraction` of the prompts,
    so no held-out prompt has a pair in training."""
    groups = list(dict.fromkeys(p["group"] for p in pairs))
    held = set(groups[:max(1, round(len(groups) * fraction))])
    return [p for p in pairs if p["group"] not in held], [p for p in pairs if p["group"] in held]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--sft", default="runs/chat-demo", help="the chat demo's SFT run (make chat-demo)")
    p.add_argument("--data", default="data/chat_tasks", help="the chat demo's task split (train.jsonl, test.jsonl)")
    p.add_argument("--out", default="runs/align-demo")
    p.add_argument("--grpo-steps", type=int, default=None, help=f"GRPO steps (default {GRPO_STEPS})")
    p.add_argument("--ppo-steps", type=int, default=None, help=f"steps of each PPO stage (default {PPO_STEPS})")
    p.add_argument("--minutes", type=float, default=None,
                   help="opt-in: a wall-clock budget of each stage instead of fixed steps (results then depend on the machine)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--pair-prompts", type=int, default=3000, help="training prompts sampled (8 replies each) for preference pairs and RL prompts")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of RL rollouts and pairs")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every stage's learning rate")
    p.add_argument("--quick", action="store_true", help="4 steps per stage: checks the chain runs")
    p.add_argument("--pairs-per-prompt", type=int, default=4,
                   help="distinct (correct, incorrect) reply pairs kept per sampled training prompt")
    p.add_argument("--rpo-alpha", type=float, default=5.0,
                   help="DPO stage: weight of the chosen replies' NLL added to the DPO loss (TRL's rpo_alpha; 0 = plain DPO)")
    p.add_argument("--stages", default="grpo,ppo,dpo,ppo_reward_model",
                   help="comma-separated: grpo, ppo, dpo, reward_model (the reward model alone), ppo_reward_model "
                        "(the reward model, then PPO with it), sft_more (the control: more SFT instead of RL)")
    add_results_flag(p, "align-demo")
    a = p.parse_args()
    set_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = Path(a.data)
    if not (tasks / "test.jsonl").is_file():
        raise SystemExit(f"align-demo: no {tasks / 'test.jsonl'}; run `make chat-demo` first")
    if not Path(a.sft).is_dir():
        raise SystemExit(f"align-demo: no SFT model at {a.sft}; run `make chat-demo` first")
    train, test = read_jsonl(tasks / "train.jsonl"), read_jsonl(tasks / "test.jsonl")[:a.n_test]
    sft_dir = Path(a.sft)
    sft = LLM.load(sft_dir)
    max_new = 64  # the worked replies of the arithmetic tasks run to ~40 tokens
    minutes = None if a.quick else a.minutes
    grpo_steps = 4 if a.quick else rl_steps(a.grpo_steps, GRPO_STEPS, minutes)
    ppo_steps = 4 if a.quick else rl_steps(a.ppo_steps, PPO_STEPS, minutes)
    stages = a.stages.split(",")

    def lr(x: float) -> str:
        return f"{x * a.lr_scale:g}"
    results: dict[str, dict] = {}

    t0 = time.time()
    results["sft"] = {**evaluate(sft_dir, sft, test, max_new), "steps": 0, "minutes": 0.0}
    log(f"sft: {results['sft']}")
    common = ["--train.progress", "false", "--train.log_every", "5", "--train.ckpt_every", "1000000",
              "--train.warmup_steps", "5"]

    def stage(name: str, method: str, data: Path, steps: int, ov: list[str], **extra: Any) -> Path:
        run = out / name
        t = time.time()
        run_method(method, sft_dir, data, run, common + stage_budget(steps, minutes) + ov, **extra)
        results[name] = {**evaluate(run, sft, test, max_new), "steps": trained_steps(run),
                         "minutes": (time.time() - t) / 60}
        log(f"{name}: {results[name]}")
        return run

    # Sample the SFT model on training prompts once: preference pairs for DPO and the reward model,
    # and the RL prompts (those whose samples disagree; their answer column feeds the verifier).
    t = time.time()
    n_pair_prompts = 64 if a.quick else a.pair_prompts
    pairs, rl_rows = sample_training_prompts(sft, train, n_pair_prompts, 8, max_new, seed=1, temperature=a.temperature,
                                             pairs_per_prompt=a.pairs_per_prompt)
    pairs_train, pairs_heldout = split_pairs_by_prompt(pairs)
    (out / "pairs_train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs_train))
    (out / "pairs_heldout.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs_heldout))
    rl_data = out / "rl_prompts.jsonl"
    rl_data.write_text("".join(json.dumps(x) + "\n" for x in (rl_rows or train)))
    sampled = sum(x["chosen_sampled"] for x in pairs)
    results["sampling"] = {"minutes": (time.time() - t) / 60, "pairs": len(pairs), "rl_prompts": len(rl_rows),
                           "heldout_pairs": len(pairs_heldout), "chosen_sampled": sampled,
                           "pairs_by_task": dict(Counter(x["task"] for x in pairs)),
                           "rl_prompts_by_task": dict(Counter(x.get("task") for x in rl_rows))}
    log(f"sampled {n_pair_prompts} training prompts x 8: {len(pairs)} pairs (chosen sampled in {sampled}, else the "
        f"reference reply), {len(rl_rows)} RL prompts with a pass rate in (0, 1) "
        f"({results['sampling']['minutes']:.1f} min)")

    def epochs_of_pairs(n: float) -> int:  # steps of batch 16 for n passes over the training pairs
        return 4 if a.quick else max(1, int(n * len(pairs_train) / 16))

    if "grpo" in stages:
        # 8 prompts x 8 completions per rollout, two passes over each (TRL's num_iterations), DAPO's
        # clip-higher, and a KL anchor so tasks that are already right do not drift
        stage("grpo", "grpo", rl_data, grpo_steps, ["--train.lr", lr(2e-5), "--train.micro_batch_size", "64",
                                        "--grpo.num_generations", "8", "--grpo.max_new_tokens", str(max_new),
                                        "--grpo.temperature", str(a.temperature), "--grpo.loss_type", "bnpo",
                                        "--grpo.scale_rewards", "group", "--grpo.epochs", "2",
                                        "--grpo.epsilon_high", "0.28", "--grpo.beta", "0.04"],
              reward=[VERIFIER], reward_weights=None)
    if "ppo" in stages:
        stage("ppo", "ppo", rl_data, ppo_steps, ["--train.lr", lr(3e-5), "--train.micro_batch_size", "32", "--ppo.epochs", "2",
                                      "--ppo.max_new_tokens", str(max_new), "--ppo.kl_coef", "0.02",
                                      "--ppo.temperature", str(a.temperature),
                                      "--ppo.missing_eos_penalty", "1.0"], reward=[VERIFIER], reward_weights=None)
    pair_acc = None
    if "dpo" in stages or "reward_model" in stages or "ppo_reward_model" in stages:
        if "dpo" in stages:
            rpo = ["--dpo.rpo_alpha", str(a.rpo_alpha)] if a.rpo_alpha else []
            run = stage("dpo", "dpo", out / "pairs_train.jsonl", epochs_of_pairs(2),
                        ["--train.lr", lr(2e-5), "--train.micro_batch_size", "16", "--dpo.beta", "0.1",
                         "--train.eval_every", "0"] + rpo,
                        val_data=str(out / "pairs_heldout.jsonl"))
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            results["dpo"]["heldout_reward_accuracy"] = [r for r in rows if "val_rewards/accuracies" in r][-1][
                "val_rewards/accuracies"]
        if "reward_model" in stages or "ppo_reward_model" in stages:
            t = time.time()
            rm = out / "reward_model"
            run_method("reward", sft_dir, out / "pairs_train.jsonl", rm,
                       common + stage_budget(epochs_of_pairs(3), minutes)
                       + ["--train.lr", lr(1e-4), "--train.micro_batch_size", "16", "--train.eval_every", "0"],
                       val_data=str(out / "pairs_heldout.jsonl"))
            rows = [json.loads(x) for x in (rm / "metrics.jsonl").read_text().splitlines()]
            pair_acc = [r for r in rows if "val_accuracy" in r][-1]["val_accuracy"]
            log(f"reward model: held-out pair accuracy {pair_acc:.3f} ({trained_steps(rm)} steps, "
                f"{(time.time() - t) / 60:.1f} min)")
        if "ppo_reward_model" in stages:
            run = stage("ppo_reward_model", "ppo", rl_data, ppo_steps,
                        ["--train.lr", lr(3e-5), "--train.micro_batch_size", "32", "--ppo.epochs", "2",
                         "--ppo.max_new_tokens", str(max_new), "--ppo.kl_coef", "0.02",
                         "--ppo.temperature", str(a.temperature),
                         "--ppo.missing_eos_penalty", "1.0"],
                        reward=[str(rm), VERIFIER], reward_weights=[1.0, 0.0])
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            q = max(1, len(rows) // 4)
            rm_key = [k for k in rows[0] if k.startswith("rewards/reward_model") and k.endswith("/mean")][0]
            first = {k: sum(r[k] for r in rows[:q]) / q for k in (rm_key, "rewards/task_verifier/mean")}
            last = {k: sum(r[k] for r in rows[-q:]) / q for k in (rm_key, "rewards/task_verifier/mean")}
            exploit = [1 for r0, r1 in zip(rows[:-1], rows[1:]) if r1[rm_key] > r0[rm_key]
                       and r1["rewards/task_verifier/mean"] <= r0["rewards/task_verifier/mean"]]
            results["ppo_reward_model"]["exploitation"] = {
                "learned_reward_first_quarter": first[rm_key], "learned_reward_last_quarter": last[rm_key],
                "verified_accuracy_first_quarter": first["rewards/task_verifier/mean"],
                "verified_accuracy_last_quarter": last["rewards/task_verifier/mean"],
                "share_of_logged_intervals_reward_up_accuracy_flat_or_down": len(exploit) / max(len(rows) - 1, 1)}

    if "sft_more" in stages:
        # the control for the RL stages: the same compute spent on more SFT of the training conversations
        stage("sft_more", "sft", tasks / "train.jsonl", 4 if a.quick else rl_steps(None, SFT_MORE_STEPS, minutes),
              ["--train.lr", lr(1e-4), "--train.min_lr", lr(1e-5), "--train.eval_every", "0"], recipe="chat-demo")

    print(f"{'stage':<18} {'accuracy':>16} {'reply len':>10} {'KL to SFT':>10} {'steps':>6} {'minutes':>8}")
    sampling = results.pop("sampling")
    for name, r in results.items():
        acc = f"{100 * r['accuracy']:.1f} +- {100 * r['se']:.1f}%"
        print(f"{name:<18} {acc:>16} {r['reply_len']:>10.1f} {r['kl_to_sft']:>10.3f} {r['steps']:>6} {r['minutes']:>8.1f}")
    print("\n".join(by_task_table(results)))
    if "dpo" in results:
        print(f"DPO implicit-reward accuracy on held-out pairs: {results['dpo']['heldout_reward_accuracy']:.3f}")
    if "ppo_reward_model" in results:
        print(f"reward-model exploitation: {json.dumps(results['ppo_reward_model']['exploitation'])}")
    print(f"sampling the SFT model for pairs and RL prompts: {sampling['minutes']:.1f} minutes, {sampling['pairs']} pairs, "
          f"{sampling['rl_prompts']} RL prompts")
    print(f"total minutes: {(time.time() - t0) / 60:.1f}")
    summary = {name: round(r["accuracy"], 4) for name, r in results.items()}
    summary["reward_model_pair_accuracy"] = pair_acc
    print(json.dumps(summary))
    if a.results:
        record("align-demo", {"stages": results, "sampling": sampling, "reward_model_pair_accuracy": pair_acc,
                              "test_prompts": len(test), "config": vars(a)},
               out=a.results, wall_s=time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
