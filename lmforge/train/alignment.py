"""Loss and advantage functions of preference alignment and RL fine-tuning: pure tensor math.

Every function here is small, has no state and no I/O, and follows the definitions of Hugging Face
TRL (RewardTrainer, DPOTrainer, PPOTrainer, GRPOTrainer) so the same settings mean the same thing:

    bradley_terry_loss   reward model:  -logsigmoid(r_chosen - r_rejected [- margin]) (+ centring)
    dpo_loss             DPO: sigmoid (label-smoothed, cDPO) | ipo | hinge on the log-ratio logits
    sequence_logps       sum (or mean) of the log-probabilities of the labelled tokens of each row
    kl_estimate          per-token KL(pi || ref) estimators k1 = log r, k3 = (r - 1) - log r (Schulman)
    gae                  generalised advantage estimation over right-padded response tokens
    masked_whiten        zero-mean unit-variance advantages over the real tokens only
    ppo_policy_loss      clipped surrogate (+ approx KL and clip fraction)
    ppo_value_loss       clipped value loss (+ value clip fraction)
    grpo_advantages      group-normalised advantages; scale_rewards group | batch | none

Shapes: B rows, T tokens; masks are 1.0 (or True) on real response tokens, 0 elsewhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError

DPO_LOSSES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k3")
SCALE_REWARDS = ("group", "batch", "none")


# ---- masked statistics -----------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries; with `unbiased` Bessel's correction (as TRL's masked_var)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; `shift_mean=False` keeps the mean
    (TRL whitens rewards that way). Entries outside the mask are set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---- log-probabilities -----------------------------------------------------------------------

def token_logps(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log p(label_t) from the logits at the same position (the caller aligns labels with the
    next-token logits); 0 where label == ignore_index. fp32."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    safe_BT = labels_BT.clamp(min=0)
    out_BT = logp_BTV.gather(-1, safe_BT[..., None])[..., 0]
    return out_BT * (labels_BT != ignore_index)


def sequence_logps(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, average: bool = False,
                   ignore_index: int = -100) -> torch.Tensor:
    """Per-row sum of log p(label) over labelled tokens (mean with `average`), shape (B,)."""
    lp_BT = token_logps(logits_BTV, labels_BT, ignore_index)
    total_B = lp_BT.sum(-1)
    if average:
        return total_B / (labels_BT != ignore_index).sum(-1).clamp(min=1)
    return total_B


def entropy_from_logits(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position, (B, T)."""
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    return -(logp_BTV.exp() * logp_BTV).sum(-1)


# ---- reward model ----------------------------------------------------------------------------

def bradley_terry_loss(r_chosen_B: torch.Tensor, r_rejected_B: torch.Tensor, margin_B: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Mean of -logsigmoid(r_c - r_r - margin); plus center_coef * mean((r_c + r_r)^2), which pulls
    the rewards towards zero mean (Eisenstein et al. 2023; TRL's center_rewards_coefficient)."""
    diff_B = r_chosen_B - r_rejected_B
    if margin_B is not None:
        diff_B = diff_B - margin_B
    loss = -F.logsigmoid(diff_B).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen_B + r_rejected_B) ** 2).mean()
    return loss


# ---- DPO -------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses_B, chosen_rewards_B, rejected_rewards_B) exactly as TRL's DPOTrainer.dpo_loss:

        logits = (pi_c - pi_r) - (ref_c - ref_r)
        sigmoid: -logsigmoid(beta*logits)*(1 - ls) - logsigmoid(-beta*logits)*ls   (Rafailov et al.; cDPO)
        ipo:     (logits - 1/(2*beta))^2          (Azar et al. eq. 17; TRL feeds it length-averaged log-probs)
        hinge:   relu(1 - beta*logits)            (RSO, Liu et al.)
        rewards = beta * (pi - ref), detached
    """
    if loss_type not in DPO_LOSSES:
        raise LMForgeError(f"dpo.loss_type must be one of {', '.join(DPO_LOSSES)}, got '{loss_type}'")
    logits_B = (policy_chosen_B - policy_rejected_B) - (ref_chosen_B - ref_rejected_B)
    if loss_type == "sigmoid":
        losses_B = (-F.logsigmoid(beta * logits_B) * (1 - label_smoothing)
                    - F.logsigmoid(-beta * logits_B) * label_smoothing)
    elif loss_type == "ipo":
        losses_B = (logits_B - 1 / (2 * beta)) ** 2
    else:
        losses_B = torch.relu(1 - beta * logits_B)
    chosen_rewards_B = beta * (policy_chosen_B - ref_chosen_B).detach()
    rejected_rewards_B = beta * (policy_rejected_B - ref_rejected_B).detach()
    return losses_B, chosen_rewards_B, rejected_rewards_B


# ---- PPO -------------------------------------------------------------------------------------

def kl_estimate(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence"): k1 = log pi - log ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = ref/pi (unbiased, never negative)."""
    if kind == "k1":
        return logp_BT - ref_logp_BT
    if kind == "k3":
        log_r = ref_logp_BT - logp_BT
        return torch.expm1(log_r) - log_r
    raise LMForgeError(f"kl estimator must be one of {', '.join(KL_ESTIMATORS)}, got '{kind}'")


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages_BT, returns_BT) by generalised advantage estimation (Schulman et al. 2016):
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    with V and A zero past the last real token (responses are right-padded). returns = A + V."""
    m = mask_BT.to(values_BT.dtype)
    r, v = rewards_BT * m, values_BT * m
    T = r.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        last = last * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def ppo_policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor, mask_BT: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over real tokens of max(-A*ratio, -A*clamp(ratio, 1-clip, 1+clip)).
    Stats: approxkl = 0.5*mean((log ratio)^2), clipfrac = share of tokens where clipping bit, ratio."""
    log_ratio = logp_BT - old_logp_BT
    ratio = torch.exp(log_ratio)
    pg1 = -adv_BT * ratio
    pg2 = -adv_BT * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask_BT)
    with torch.no_grad():
        stats = {"approxkl": 0.5 * masked_mean(log_ratio ** 2, mask_BT),
                 "clipfrac": masked_mean((pg2 > pg1).float(), mask_BT),
                 "ratio": masked_mean(ratio, mask_BT)}
    return loss, stats


def ppo_value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
                   mask_BT: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean over real tokens of max((V - R)^2, (clamp(V, V_old +- clip) - R)^2); stat clipfrac."""
    v_clipped = torch.clamp(values_BT, old_values_BT - clip, old_values_BT + clip)
    vf1 = (values_BT - returns_BT) ** 2
    vf2 = (v_clipped - returns_BT) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask_BT)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf2 > vf1).float(), mask_BT)}
    return loss, stats


# ---- GRPO ------------------------------------------------------------------------------------

def grpo_advantages(rewards_N: torch.Tensor, group_size: int, scale_rewards: str = "group",
                    eps: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantages of N = prompts x group_size completions (consecutive rows are one prompt's group),
    as TRL's GRPOTrainer: A = r - mean(group); divided by the group's std ("group", Shao et al.
    2024), by the std of the whole batch ("batch", Hu 2025 / REINFORCE++) or not at all ("none",
    Dr. GRPO, Liu et al. 2025). std is unbiased; eps keeps zero-std groups finite (their A is 0).
    Stats: frac_reward_zero_std (share of groups whose rewards are all equal: no signal)."""
    if scale_rewards not in SCALE_REWARDS:
        raise LMForgeError(f"grpo.scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got '{scale_rewards}'")
    if rewards_N.numel() % group_size:
        raise LMForgeError(f"{rewards_N.numel()} rewards do not split into groups of {group_size}")
    r_PG = rewards_N.float().view(-1, group_size)
    mean_P1 = r_PG.mean(1, keepdim=True)
    std_P1 = r_PG.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_P1)
    adv_PG = r_PG - mean_P1
    if scale_rewards == "group":
        adv_PG = adv_PG / (std_P1 + eps)
    elif scale_rewards == "batch":
        std_all = r_PG.std() if r_PG.numel() > 1 else torch.zeros(())
        adv_PG = adv_PG / (std_all + eps)
    zero_std = torch.isclose(std_P1, torch.zeros_like(std_P1)).float().mean()
    return adv_PG.reshape(-1), {"frac_reward_zero_std": zero_std, "reward_std": std_P1.mean()}


def grpo_token_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor, mask_BT: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float | None = None, ref_logp_BT: torch.Tensor | None = None,
                    beta: float = 0.0, loss_type: str = "grpo",
                    max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO objective (TRL): per token -min(ratio*A, clamp(ratio, 1-eps_low, 1+eps_high)*A)
    + beta * k3(pi, ref); averaged per sequence then over the batch ("grpo"), over all tokens
    ("bnpo"), or summed and divided by B * max_completion_length ("dr_grpo")."""
    eps_high = eps_low if eps_high is None else eps_high
    m = mask_BT.float()
    ratio = torch.exp(logp_BT - old_logp_BT)
    a = adv_B[:, None]
    per_tok1 = ratio * a
    per_tok2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    per_token = -torch.minimum(per_tok1, per_tok2)
    kl = None
    if beta:
        if ref_logp_BT is None:
            raise LMForgeError("grpo.beta > 0 needs reference log-probabilities")
        kl = kl_estimate(logp_BT, ref_logp_BT, "k3")
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        L = max_completion_length or mask_BT.shape[1]
        loss = (per_token * m).sum() / (mask_BT.shape[0] * L)
    else:
        raise LMForgeError(f"grpo.loss_type must be one of grpo, bnpo, dr_grpo, got '{loss_type}'")
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (a < 0)
        high = (ratio > 1 + eps_high) & (a > 0)
        stats = {"clip_ratio": masked_mean((low | high).float(), m),
                 "clip_ratio/low": masked_mean(low.float(), m), "clip_ratio/high": masked_mean(high.float(), m)}
        if kl is not None:
            stats["kl"] = masked_mean(kl, m)
    return loss, stats


LN2 = math.log(2.0)
