"""Hand-computed checks of r1zero.grpo.losses."""

from __future__ import annotations

import math

import pytest
import torch

from r1zero.grpo.losses import aggregate, clipped_surrogate, entropy, k3_kl, policy_loss, token_logprobs


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_clip_higher_cases():
    logp = t([[math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1)]])
    old = torch.zeros_like(logp)
    adv = t([[1.0, -1.0, 1.0, 1.0]])
    loss, low, high = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, t([[-1.28, 0.8, -0.5, -1.1]]), atol=1e-6)
    assert low.tolist() == [[False, True, False, False]]
    assert high.tolist() == [[True, False, False, False]]


def test_k3_hand_value_and_nonnegative():
    kl = k3_kl(t([math.log(0.5)]), t([math.log(0.25)]))
    assert abs(float(kl) - (0.5 + math.log(2) - 1)) < 1e-6
    x = torch.randn(100)
    assert (k3_kl(x, torch.randn(100)) >= 0).all()
    assert float(k3_kl(x, x).abs().max()) == 0.0


def test_aggregation_modes():
    loss = t([[1.0, 2, 3], [4, 0, 0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    num, den = aggregate(loss, mask, "sequence")
    assert float(num) / den == pytest.approx(3.0)
    num, den = aggregate(loss, mask, "token")
    assert float(num) / den == pytest.approx(2.5)
    num, den = aggregate(loss, mask, "constant", max_len=3)
    assert float(num) / den == pytest.approx(10 / 6)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "constant")
    with pytest.raises(ValueError):
        aggregate(loss, mask, "bogus")


def test_empty_completion_contributes_nothing():
    loss = t([[1.0, 1.0], [7.0, 7.0]])
    mask = t([[1, 1], [0, 0]])
    num, den = aggregate(loss, mask, "sequence")
    assert float(num) == pytest.approx(1.0) and den == 2.0
    num, den = aggregate(loss, mask, "token")
    assert float(num) / den == pytest.approx(1.0)


def test_on_policy_gradient_is_minus_advantage():
    logp = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]]).requires_grad_(True)
    adv = t([2.0, -1.0])
    mask = t([[1, 1, 0], [1, 1, 1]])
    num, den, stats = policy_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28, agg="token")
    (num / den).backward()
    expect = t([[-2.0, -2.0, 0.0], [1.0, 1.0, 1.0]]) / 5
    assert torch.allclose(logp.grad, expect)
    assert float(num.detach() / den) == pytest.approx((-2 * 2 + 1 * 3) / 5)
    assert stats["tokens"] == 5 and stats["clip_low"] == 0 and stats["kl_sum"] == 0


def test_beta_adds_k3_and_needs_reference():
    logp = t([[math.log(0.5)]])
    ref = t([[math.log(0.25)]])
    num, den, stats = policy_loss(logp, logp, t([0.0]), t([[1]]), eps_low=.2, eps_high=.2, beta=0.1,
                                  ref_logp_BT=ref, agg="sequence")
    assert float(num) / den == pytest.approx(0.1 * (0.5 + math.log(2) - 1), rel=1e-5)
    with pytest.raises(ValueError):
        policy_loss(logp, logp, t([0.0]), t([[1]]), eps_low=.2, eps_high=.2, beta=0.1)


def test_logprobs_and_entropy():
    logits = torch.zeros(1, 2, 4)
    lp = token_logprobs(logits, torch.tensor([[0, 3]]))
    assert torch.allclose(lp, torch.full((1, 2), -math.log(4)))
    assert torch.allclose(entropy(logits), torch.full((1, 2), math.log(4)))
