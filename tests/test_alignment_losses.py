"""Alignment losses and advantages against values computed by hand (see the comments)."""

import math

import pytest
import torch

from lmforge.errors import LMForgeError
from lmforge.train import alignment as A


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_bradley_terry_margin_and_centring():
    # -logsigmoid(1) = log(1 + e^-1) = 0.3132617
    assert A.bradley_terry_loss(t([2.0]), t([1.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    # a margin of 1 leaves a difference of 0: log 2
    assert A.bradley_terry_loss(t([2.0]), t([1.0]), t([1.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    # centring adds coef * (2 + 1)^2 = 0.01 * 9
    assert A.bradley_terry_loss(t([2.0]), t([1.0]), center_coef=0.01).item() == pytest.approx(0.4032617, abs=1e-6)
    # the mean over the batch
    two = A.bradley_terry_loss(t([2.0, 0.0]), t([1.0, 0.0])).item()
    assert two == pytest.approx((0.3132617 + math.log(2)) / 2, abs=1e-6)


def test_dpo_losses_hand_computed():
    # policy chosen -1, rejected -2; reference both -1.5: logits = (-1 + 2) - 0 = 1
    pc, pr, rc, rr = t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5])
    loss, cr, rj = A.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)  # log(1 + e^-0.5)
    assert cr.item() == pytest.approx(0.25) and rj.item() == pytest.approx(-0.25)
    # label smoothing 0.1: 0.9 * log(1+e^-0.5) + 0.1 * log(1+e^0.5) = 0.4266693 + 0.0974077
    loss, _, _ = A.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.5240770, abs=1e-6)
    # hinge: relu(1 - 0.5 * 1) = 0.5; and 0 once beta * logits >= 1
    assert A.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.5)
    assert A.dpo_loss(pc, pr, rc, rr, beta=2.0, loss_type="hinge")[0].item() == 0.0
    # ipo: (1 - 1/(2*0.25))^2 = (1 - 2)^2 = 1
    assert A.dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")[0].item() == pytest.approx(1.0)
    with pytest.raises(LMForgeError, match="dpo.loss_type must be one of sigmoid, ipo, hinge, got 'nope'"):
        A.dpo_loss(pc, pr, rc, rr, loss_type="nope")


def test_dpo_is_ln2_when_policy_is_reference():
    x = torch.randn(5)
    y = torch.randn(5)
    loss, cr, rj = A.dpo_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full((5,), math.log(2)))
    assert cr.abs().max() == 0 and rj.abs().max() == 0


def test_sequence_logps_counts_only_labelled_tokens():
    logits = torch.zeros(1, 3, 4)  # uniform: every token has log p = -ln 4
    labels = torch.tensor([[-100, 2, 3]])
    assert A.sequence_logps(logits, labels).item() == pytest.approx(-2 * math.log(4), abs=1e-6)
    assert A.sequence_logps(logits, labels, average=True).item() == pytest.approx(-math.log(4), abs=1e-6)
    logits[0, 1, 2] = 10.0
    # log softmax of [0, 0, 10, 0] at 2 = 10 - log(3 + e^10)
    expect = 10 - math.log(3 + math.exp(10)) - math.log(4)
    assert A.sequence_logps(logits, labels).item() == pytest.approx(expect, abs=1e-5)


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -2.0])
    assert A.kl_estimate(logp, ref, "k1").tolist() == pytest.approx([1.0, 0.0])
    # k3 with log r = ref - logp = -1: e^-1 - 1 + 1 = 0.3678794
    assert A.kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.3678794, 0.0], abs=1e-6)
    with pytest.raises(LMForgeError, match="kl estimator must be one of k1, k3"):
        A.kl_estimate(logp, ref, "k2")


def _gae_reference(rewards, values, gamma, lam):
    """Textbook GAE on one unpadded episode, in plain Python."""
    n = len(rewards)
    adv = [0.0] * n
    last = 0.0
    for i in reversed(range(n)):
        nv = values[i + 1] if i + 1 < n else 0.0
        delta = rewards[i] + gamma * nv - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_hand_computed_and_padding():
    adv, ret = A.gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=0.9)
    # delta_2 = 1 - 0.7 = 0.3; A_1 = 0.1 + 0.9*0.3 = 0.37; A_0 = 0.1 + 0.9*0.37 = 0.433
    assert adv[0].tolist() == pytest.approx([0.433, 0.37, 0.3], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.933, 0.97, 1.0], abs=1e-6)
    # a right-padded row: the garbage value and reward at the padding change nothing
    adv, ret = A.gae(t([[0.0, 2.0, 5.0]]), t([[0.2, 0.4, 9.0]]), t([[1, 1, 0]]), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.8, 1.6, 0.0], abs=1e-6)
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    adv, ret = A.gae(r, v, mask, gamma=0.99, lam=0.95)
    for b, n in enumerate(lengths):
        ra, rr = _gae_reference(r[b, :n].tolist(), v[b, :n].tolist(), 0.99, 0.95)
        assert adv[b, :n].tolist() == pytest.approx(ra, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx(rr, abs=1e-5)
        assert adv[b, n:].abs().sum() == 0


def test_masked_whiten():
    x = t([[1.0, 2.0, 3.0, 4.0, 100.0]])
    m = t([[1, 1, 1, 1, 0]])
    w = A.masked_whiten(x, m)
    sd = math.sqrt(5 / 3)  # unbiased variance of 1..4 = 5/3
    assert w[0].tolist() == pytest.approx([-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd, 0.0], abs=1e-5)
    assert A.masked_whiten(x, m, shift_mean=False)[0, :4].tolist() == pytest.approx(
        [2.5 - 1.5 / sd, 2.5 - 0.5 / sd, 2.5 + 0.5 / sd, 2.5 + 1.5 / sd], abs=1e-5)


def test_ppo_policy_loss_ratio_one_and_clipping():
    adv, m = t([[1.0, -2.0, 0.5]]), t([[1, 1, 1]])
    lp = t([[-1.0, -2.0, -3.0]])
    loss, s = A.ppo_policy_loss(lp, lp.clone(), adv, m)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert s["approxkl"].item() == 0 and s["clipfrac"].item() == 0 and s["ratio"].item() == 1
    # ratio 1.5 with A=+1: clipped to 1.2 (no gradient); ratio 0.5 with A=-1: clipped to 0.8
    old = t([[0.0, 0.0]])
    new = t([[math.log(1.5), math.log(0.5)]]).requires_grad_()
    loss, s = A.ppo_policy_loss(new, old, t([[1.0, -1.0]]), t([[1, 1]]), clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert s["clipfrac"].item() == 1.0
    loss.backward()
    assert new.grad.abs().max().item() == 0.0
    # ratio 1.5 with A=-1 and ratio 0.5 with A=+1: the unclipped term is the max, gradient flows
    new = t([[math.log(1.5), math.log(0.5)]]).requires_grad_()
    loss, s = A.ppo_policy_loss(new, old, t([[-1.0, 1.0]]), t([[1, 1]]), clip=0.2)
    assert loss.item() == pytest.approx((1.5 - 0.5) / 2, abs=1e-6)
    assert s["clipfrac"].item() == 0.0
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([0.75, -0.25], abs=1e-6)  # d/dlp of -A*e^lp / 2


def test_ppo_value_loss_clipped():
    # V=1, V_old=0, R=2, clip 0.2: (1-2)^2 = 1 vs (0.2-2)^2 = 3.24 -> 0.5 * 3.24
    loss, s = A.ppo_value_loss(t([[1.0]]), t([[0.0]]), t([[2.0]]), t([[1]]), clip=0.2)
    assert loss.item() == pytest.approx(1.62, abs=1e-6) and s["clipfrac"].item() == 1.0
    loss, s = A.ppo_value_loss(t([[0.1]]), t([[0.0]]), t([[2.0]]), t([[1]]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 1.9 ** 2, abs=1e-6) and s["clipfrac"].item() == 0.0


def test_grpo_advantages_modes():
    r = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, s = A.grpo_advantages(r, 4, "group")
    sd = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / (sd + 1e-4), -0.5 / (sd + 1e-4)] * 1 + [-0.5 / (sd + 1e-4), 0.5 / (sd + 1e-4)], abs=1e-5)
    assert adv[4:].abs().max().item() == 0.0
    assert s["frac_reward_zero_std"].item() == 0.5
    for mode in A.SCALE_REWARDS:
        a, _ = A.grpo_advantages(torch.randn(12), 3, mode)
        assert a.view(4, 3).sum(1).abs().max().item() < 1e-5  # zero-sum within every group
    adv, _ = A.grpo_advantages(r, 4, "none")
    assert adv[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    adv, _ = A.grpo_advantages(r, 4, "batch")
    sd_all = math.sqrt((2 * 0.75 ** 2 + 6 * 0.25 ** 2) / 7)  # unbiased std of all 8 rewards
    assert adv[0].item() == pytest.approx(0.5 / (sd_all + 1e-4), abs=1e-5)
    with pytest.raises(LMForgeError, match="grpo.scale_rewards must be one of group, batch, none, got 'x'"):
        A.grpo_advantages(r, 4, "x")


def test_grpo_token_loss_on_policy_and_kl():
    lp = t([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    m = t([[1, 1, 0], [1, 1, 1]])
    adv = t([1.0, -0.5])
    loss, s = A.grpo_token_loss(lp, lp.clone(), adv, m)
    # ratio 1: per-token loss -A; per-sequence mean then batch mean: (-1 + 0.5) / 2
    assert loss.item() == pytest.approx(-0.25) and s["clip_ratio"].item() == 0
    loss_b, _ = A.grpo_token_loss(lp, lp.clone(), adv, m, loss_type="bnpo")
    assert loss_b.item() == pytest.approx((-1 * 2 + 0.5 * 3) / 5)
    ref = lp - 1.0  # k3 per token with log r = -1: e^-1
    loss_k, s = A.grpo_token_loss(lp, lp.clone(), adv, m, ref_logp_BT=ref, beta=0.1)
    assert loss_k.item() == pytest.approx(-0.25 + 0.1 * math.exp(-1), abs=1e-6)
    assert s["kl"].item() == pytest.approx(math.exp(-1), abs=1e-6)
