"""Routing math: selection, gate weights, balancing losses, capacity, bias updates."""

import math

import pytest
import torch

from r1zero.model import router as R


def test_softmax_topk_weights_renormalised_and_match_probs():
    torch.manual_seed(0)
    logits = torch.randn(32, 8)
    w, ids, probs = R.route(logits, 2, "softmax")
    assert ids.shape == (32, 2) and w.shape == (32, 2)
    assert torch.allclose(w.sum(-1), torch.ones(32))
    ref = torch.softmax(logits, -1).topk(2, -1)
    assert torch.equal(ids, ref.indices)
    assert torch.allclose(w, ref.values / ref.values.sum(-1, keepdim=True))
    assert torch.allclose(probs.sum(-1), torch.ones(32))


def test_top1_softmax_keeps_raw_probability():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    w, ids, _ = R.route(logits, 1, "softmax")
    assert ids.item() == 0
    assert w.item() == pytest.approx(torch.softmax(logits, -1)[0, 0].item())


def test_sigmoid_bias_changes_selection_not_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    w0, ids0, _ = R.route(logits, 2, "sigmoid")
    assert ids0.tolist() == [[0, 1]]
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    w1, ids1, _ = R.route(logits, 2, "sigmoid", bias_E=bias)
    assert ids1.tolist() == [[2, 0]]
    s = torch.sigmoid(logits[0])
    # weights come from the un-biased affinities of the chosen experts, normalised (V3 eq. 16)
    assert torch.allclose(w1[0], torch.stack([s[2], s[0]]) / (s[2] + s[0]))
    assert torch.allclose(w0.sum(), torch.tensor(1.0))


def test_soft_router_uses_every_expert():
    logits = torch.randn(5, 4)
    w, ids, probs = R.route(logits, 4, "soft")
    assert ids.shape == (5, 4) and torch.equal(ids[0], torch.arange(4))
    assert torch.allclose(w, torch.softmax(logits, -1))


def test_switch_aux_loss_is_one_when_uniform_and_E_when_collapsed():
    E, K, T = 4, 2, 8
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    assert R.switch_aux_loss(probs, ids).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(T, E)
    collapsed_probs[:, 0] = 1.0
    collapsed_ids = torch.zeros(T, 1, dtype=torch.long)
    assert R.switch_aux_loss(collapsed_probs, collapsed_ids).item() == pytest.approx(E)
    assert K == 2


def test_z_loss_and_entropy_formulas():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    z = R.router_z_loss(logits).item()
    lse = torch.logsumexp(logits, -1)
    assert z == pytest.approx(float((lse**2).mean()))
    uniform = torch.full((3, 8), 1 / 8)
    assert R.router_entropy(uniform).item() == pytest.approx(math.log(8), rel=1e-6)


def test_capacity_formula():
    assert R.capacity(100, 2, 8, 1.0) == 25
    assert R.capacity(100, 2, 8, 1.25) == math.ceil(25 * 1.25)
    assert R.capacity(1, 1, 64, 1.0) == 1


def test_sort_is_stable_and_capacity_keeps_earliest_tokens():
    ids = torch.tensor([[1, 0], [1, 2], [1, 0], [0, 1]])
    order, counts = R.sort_by_expert(ids, 3)
    assert counts.tolist() == [3, 4, 1]
    assert order.tolist() == [1, 5, 6, 0, 2, 4, 7, 3]
    keep = R.capacity_keep(order, ids, counts, 2)
    kept = order[keep].tolist()
    assert kept == [1, 5, 0, 2, 3]  # expert 0: slots 1,5; expert 1: slots 0,2; expert 2: slot 3


def test_bias_delta_pushes_towards_balance_and_is_zero_mean():
    counts = torch.tensor([10.0, 0.0, 5.0, 5.0])
    d = R.bias_update_delta(counts, 1e-3)
    assert d[0] < 0 and d[1] > 0
    assert d.sum().abs().item() < 1e-9
