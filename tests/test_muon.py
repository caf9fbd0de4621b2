"""Muon: Newton-Schulz orthogonalisation, parameter routing, learning-rate scaling, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import LMForgeError
from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.train.muon import Muon, build_muon_optimizer, fused_splits, muon_param_split, newton_schulz


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: small ops on a shared 2-core machine are far slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_singular_values_near_one(shape, dtype):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3.0
    O = newton_schulz(G, steps=5, dtype=dtype)
    assert O.shape == G.shape and O.dtype == G.dtype
    s = torch.linalg.svdvals(O)
    s_in = torch.linalg.svdvals(G)
    assert s_in.max() / s_in.min() > 2.5  # the input is far from orthogonal...
    assert s.min() > 0.6 and s.max() < 1.25  # ...the output's singular values sit near 1
    # and it keeps the singular vectors: O is close to U V^T of G
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
    assert cos > 0.97


def _tiny(**kw):
    torch.manual_seed(0)
    return Decoder(config_from_preset("tiny", **kw))


def test_routing_muon_for_block_matrices_adamw_for_the_rest():
    m = _tiny(tie_embeddings=False, bias=True)
    muon, adam = muon_param_split(m)
    assert {n for n, _ in muon} == {f"blocks.{i}.{k}.weight" for i in range(2)
                                    for k in ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")}
    adam_names = {n for n, _ in adam}
    assert {"tok_emb.weight", "pos_emb.weight", "lm_head.weight", "norm_f.weight",
            "blocks.0.attn.qkv.bias"} <= adam_names
    opt = build_muon_optimizer(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, muon_lr=0.02)
    groups = {(g["use_muon"], g["weight_decay"]): g for g in opt.param_groups}
    assert groups[(True, 0.0)]["lr_scale"] == pytest.approx(20.0)
    assert [p for p in groups[(False, 0.1)]["params"]] == [m.lm_head.weight]  # only the untied head decays
    cfg = m.cfg
    splits = fused_splits(m, muon)
    assert splits[m.blocks[0].attn.qkv.weight] == [cfg.n_head * cfg.head_dim] * 3


def test_step_decreases_loss_on_a_tiny_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g)
    W_true = torch.randn(16, 32, generator=g)
    Y = X @ W_true.t()
    W = torch.nn.Parameter(torch.zeros(16, 32))
    b = torch.nn.Parameter(torch.zeros(16))
    opt = Muon([dict(params=[W], use_muon=True, lr=0.3), dict(params=[b], use_muon=False, lr=0.01)])
    losses = []
    for _ in range(20):
        loss = F.mse_loss(X @ W.t() + b, Y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[1] < losses[0] and losses[-1] < 0.15 * losses[0]


def test_decoder_trains_and_the_loop_lr_drives_muon_through_lr_scale():
    m = _tiny(tie_embeddings=False)
    opt = build_muon_optimizer(m, lr=2e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, muon_lr=0.02)
    x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))

    def loss_fn():
        return F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    first = loss_fn().item()
    for _ in range(3):
        loss_fn().backward()
        opt.step()
        opt.zero_grad()
    assert loss_fn().item() < first - 0.1

    # the training loop overwrites every group's lr with the schedule; Muon moves by lr * lr_scale
    W = m.blocks[0].attn.proj.weight
    loss_fn().backward()
    for group in opt.param_groups:
        group["lr"] = 1e-3  # half the peak
    before = W.detach().clone()
    opt.step()
    step = (W.detach() - before)
    # an orthogonalised square update has RMS ~ 1/sqrt(n) per entry scaled by lr: ~ 0.01 * ~0.05
    rms = step.pow(2).mean().sqrt().item()
    assert 0.3 * 0.01 / math.sqrt(W.shape[0]) < rms < 1.5 * 0.01 / math.sqrt(W.shape[0])


def test_state_dict_round_trip_continues_identically():
    m1, m2 = _tiny(), _tiny()
    x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(2))
    o1 = build_muon_optimizer(m1, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    for _ in range(2):
        F.cross_entropy(m1(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        o1.step()
        o1.zero_grad()
    m2.load_state_dict(m1.state_dict())
    o2 = build_muon_optimizer(m2, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as if read back from a checkpoint
    for m, o in ((m1, o1), (m2, o2)):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_bad_settings_raise():
    m = _tiny()
    with pytest.raises(LMForgeError, match="train.muon_momentum must be in"):
        build_muon_optimizer(m, 1e-3, 0.0, (0.9, 0.95), 1e-8, muon_momentum=1.5)
    with pytest.raises(ValueError, match="matrices only"):
        Muon([dict(params=[torch.nn.Parameter(torch.zeros(3))], use_muon=True)])
