"""Knowledge distillation: the losses against hand-computed values and TRL, the student's
initialisation, and `lmforge distill` end to end on tiny models (classify and lm tasks, exact
resume, one teacher forward per micro-batch, the cached teacher, the tokenizer-mismatch error)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.train import distill as D
from tests.reference_libs import reference_lib


# ---- losses on tiny tensors --------------------------------------------------------------------

def test_soft_target_loss_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    # softmax([0.5, 0]) and softmax([0, 0.5])
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert D.soft_target_loss(s, t, T).item() == pytest.approx(kl * T * T, abs=1e-6)
    assert D.soft_target_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_mixes_soft_and_hard_by_alpha():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    soft = D.soft_target_loss(s, t, 3.0)
    hard = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) + math.log(math.e / (math.e + 2))) / 2
    loss, stats = D.kd_loss(s, t, y, alpha=0.25, temperature=3.0)
    assert stats["hard_loss"].item() == pytest.approx(hard, abs=1e-6)
    assert loss.item() == pytest.approx(0.25 * soft.item() + 0.75 * hard, abs=1e-6)


def test_cosine_hidden_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    real = torch.tensor([[True, True, False]])  # the padding token does not count
    # cos = 0 and 1: mean of (1 - 0, 1 - 1)
    assert D.cosine_hidden_loss(s, t, real).item() == pytest.approx(0.5, abs=1e-7)


def test_hidden_mse_through_projection_by_hand():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    proj = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # (a, b) -> (a, b, a + b)
    real = torch.tensor([[True, False]])
    # (1, 2, 3) against (1, 0, 2): squared errors 0, 4, 1 -> mean 5 / 3
    assert D.hidden_mse(s, t, real, proj).item() == pytest.approx(5 / 3, abs=1e-6)


def test_attention_mse_over_attended_pairs_and_head_mean():
    s = torch.zeros(1, 2, 2, 2)
    t = torch.zeros(1, 2, 2, 2)
    t[0, 0] = torch.tensor([[1.0, 9.0], [9.0, 9.0]])
    t[0, 1] = torch.tensor([[3.0, 9.0], [9.0, 9.0]])
    pairs = torch.tensor([[[True, False], [False, False]]])
    assert D.attention_mse(s, t, pairs).item() == pytest.approx((1 + 9) / 2)
    # one student head against two teacher heads: the head means, (1 + 3) / 2 = 2 -> 4
    assert D.attention_mse(s[:, :1], t, pairs).item() == pytest.approx(4.0)


def test_layer_maps():
    assert D.layer_map(2, 6) == [2, 5]  # TinyBERT: 3rd and last teacher blocks
    assert D.layer_map(3, 6) == [1, 3, 5]
    assert D.init_layer_map(3, 6) == [0, 2, 4]  # DistilBERT: every other block from the first
    assert D.init_layer_map(4, 4) == [0, 1, 2, 3]


def test_generalized_jsd_by_hand():
    s = torch.tensor([[[0.0, 0.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0]]])  # teacher (3/4, 1/4), student (1/2, 1/2)
    fwd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert D.generalized_jsd(s, t, beta=0.0).item() == pytest.approx(fwd, abs=1e-7)
    assert D.generalized_jsd(s, t, beta=1.0).item() == pytest.approx(rev, abs=1e-7)
    m = [0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + \
        0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert D.generalized_jsd(s, t, beta=0.5).item() == pytest.approx(jsd, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_generalized_jsd_matches_trl(beta, temperature):
    reference_lib("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    s = torch.randn(3, 5, 11, generator=g) * 2
    t = torch.randn(3, 5, 11, generator=g) * 2
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    for lab in (labels, None):
        ours = D.generalized_jsd(s, t, lab, beta=beta, temperature=temperature)
        ref = GKDTrainer.generalized_jsd_loss(s, t, labels=lab, beta=beta, temperature=temperature)
        assert abs(ours.item() - ref.item()) < 1e-6, (lab is None, ours.item(), ref.item())
