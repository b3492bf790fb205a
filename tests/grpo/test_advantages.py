"""Hand-computed checks of r1zero.grpo.advantages."""

from __future__ import annotations

import math

import pytest
import torch

from r1zero.grpo.advantages import advantages, gae, whiten, zero_std_groups


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


G0 = t([0, 0, 0, 0], torch.long)


def test_group_normalised_hand_values():
    a = advantages(t([1.0, 0, 0, 1]), G0, "group")
    s = math.sqrt(1 / 3)  # unbiased std of {1,0,0,1}
    expect = 0.5 / (s + 1e-6)
    assert torch.allclose(a, t([expect, -expect, -expect, expect]), atol=1e-6)


def test_all_equal_rewards_and_group_of_one_give_zero():
    for mode in ("group", "mean", "batch", "rloo"):
        assert torch.equal(advantages(t([1.0, 1, 1]), t([0, 0, 0], torch.long), mode), torch.zeros(3))
        assert torch.equal(advantages(t([0.7]), t([0], torch.long), mode), torch.zeros(1))


def test_mean_only_dr_grpo():
    assert torch.allclose(advantages(t([1.0, 0, 0, 1]), G0, "mean"), t([0.5, -0.5, -0.5, 0.5]))


def test_batch_normalised_uses_batch_std():
    a = advantages(t([1.0, 0, 1, 1]), t([0, 0, 1, 1], torch.long), "batch")
    # centred by group mean: [.5,-.5,0,0]; batch std (unbiased) of {1,0,1,1} = .5
    assert torch.allclose(a, t([1.0, -1.0, 0, 0]), atol=1e-5)
    b = advantages(t([1.0, 0, 1, 1]), t([0, 0, 1, 1], torch.long), "batch", batch_std=0.25)
    assert torch.allclose(b, t([2.0, -2.0, 0, 0]), atol=1e-5)


def test_rloo_leave_one_out():
    a = advantages(t([1.0, 0, 0]), t([0, 0, 0], torch.long), "rloo")
    assert torch.allclose(a, t([1.0, -0.5, -0.5]))


def test_variable_group_sizes():
    r = t([1.0, 0, 5.0, 3.0, 4.0])
    g = t([0, 0, 1, 1, 1], torch.long)
    a = advantages(r, g, "mean")
    assert torch.allclose(a, t([0.5, -0.5, 1.0, -1.0, 0.0]))


def test_unknown_mode_and_empty():
    with pytest.raises(ValueError):
        advantages(t([1.0, 0]), t([0, 0], torch.long), "nope")
    assert advantages(t([]), t([], torch.long)).numel() == 0


def test_zero_std_groups():
    z = zero_std_groups(t([1.0, 1, 0, 1, 0.5]), t([0, 0, 1, 1, 2], torch.long))
    assert z.tolist() == [True, False, True]


def test_gae_hand_values():
    r = t([[0.0, 0, 1]])
    v = t([[0.5, 0.5, 0.5]])
    m = t([[1, 1, 1]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[0.5, 0.5, 0.5]]))
    assert torch.allclose(ret, t([[1.0, 1.0, 1.0]]))
    adv0, _ = gae(r, v, m, gamma=1.0, lam=0.0)
    assert torch.allclose(adv0, t([[0.0, 0.0, 0.5]]))
    # padding is ignored: a 2-token row padded to 3
    adv_p, _ = gae(t([[0.0, 1, 9]]), t([[0.5, 0.5, 9]]), t([[1, 1, 0]]), 1.0, 1.0)
    assert torch.allclose(adv_p, t([[0.5, 0.5, 0.0]]))
    # gamma discounts: lam=1, gamma=.5, V=0 -> A_0 = .5 * 1
    adv_g, _ = gae(t([[0.0, 1]]), t([[0.0, 0]]), t([[1, 1]]), 0.5, 1.0)
    assert torch.allclose(adv_g, t([[0.5, 1.0]]))


def test_whiten():
    x = t([[1.0, 2, 3, 100]])
    m = t([[1, 1, 1, 0]])
    w = whiten(x, m)
    assert abs(float(w[0, :3].mean())) < 1e-6 and float(w[0, 3]) == 0.0
