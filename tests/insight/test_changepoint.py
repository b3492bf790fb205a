"""Tests for r1zero.insight.changepoint: noise estimate, rise fits, jumps vs trends, growth, knees."""

from __future__ import annotations

import numpy as np
import pytest

from r1zero.insight import changepoint as cp
from r1zero.insight.synthetic import logistic


def test_robust_sigma_ignores_steps_and_trends():
    rng = np.random.default_rng(0)
    y = 0.1 * rng.normal(size=400)
    y[200:] += 5.0  # a huge step barely moves the MAD of differences
    y += np.linspace(0, 3, 400)  # nor does a linear trend
    assert cp.robust_sigma(y) == pytest.approx(0.1, rel=0.15)
    assert cp.robust_sigma(np.ones(50)) > 0  # constant series: positive fallback


def test_fit_rise_recovers_center_height_width():
    t = np.arange(300, dtype=float)
    y = 1.0 + 2.0 * logistic(t, 140.0, 20.0) + 0.05 * np.random.default_rng(1).normal(size=t.size)
    r = cp.fit_rise(t, y, 0.05)
    assert r.center == pytest.approx(140.0, abs=2)
    assert r.height == pytest.approx(2.0, rel=0.05)
    assert r.width80 == pytest.approx(20.0, rel=0.25)
    assert r.before == pytest.approx(1.0, abs=0.1) and r.after == pytest.approx(3.0, abs=0.1)


def test_find_jumps_sees_step_but_not_slow_trend_or_noise():
    rng = np.random.default_rng(2)
    t = np.arange(200, dtype=float)
    noise = 0.02 * rng.normal(size=t.size)
    step = 0.5 + 0.1 * (t >= 120) + noise  # 5 sigma step at 120
    trend = 0.5 + 0.2 * logistic(t, 100, 120) + noise  # 10 sigma, but 60% of the run wide
    flat = 0.5 + noise
    jumps = cp.find_jumps(t, step, 3.0, 0.1)
    assert len(jumps) == 1 and abs(jumps[0].center - 120) <= 2 and jumps[0].height_sigma > 3
    assert cp.find_jumps(t, trend, 3.0, 0.1) == []
    assert cp.find_jumps(t, flat, 3.0, 0.1) == []
    # drops are found only when asked for
    assert cp.find_jumps(t, -step, 3.0, 0.1) == []
    assert len(cp.find_jumps(t, -step, 3.0, 0.1, direction=-1)) == 1


def test_find_jumps_separates_two_jumps():
    rng = np.random.default_rng(3)
    t = np.arange(300, dtype=float)
    y = 0.2 + 0.1 * (t >= 80) + 0.1 * (t >= 200) + 0.02 * rng.normal(size=t.size)
    centers = sorted(j.center for j in cp.find_jumps(t, y, 3.0, 0.1))
    assert len(centers) == 2 and abs(centers[0] - 80) <= 3 and abs(centers[1] - 200) <= 3


def test_sustained_growth_needs_trend_and_holding_level():
    rng = np.random.default_rng(4)
    t = np.arange(150, dtype=float)
    grow = 30 + 10 * logistic(t, 70, 60) + rng.normal(size=t.size)
    g = cp.sustained_growth(t, grow, 3.0)
    assert g is not None and 50 <= g.center <= 90 and g.start < g.center < g.end and g.score > 3
    bump = 30 + 10 * np.exp(-((t - 75) / 10) ** 2) + rng.normal(size=t.size)  # rises then falls back
    assert cp.sustained_growth(t, bump, 3.0) is None
    assert cp.sustained_growth(t, 30 + rng.normal(size=t.size), 3.0) is None
    assert cp.sustained_growth(t[:5], grow[:5], 3.0) is None  # too short


def test_find_knee_on_loss_curve():
    rng = np.random.default_rng(5)
    t = np.arange(200, dtype=float)
    loss = 0.5 + 3.0 * np.exp(-t / 20) + 0.01 * rng.normal(size=t.size)
    k = cp.find_knee(t, loss, 3.0)
    assert k is not None and 15 <= k.step <= 70 and k.slope_before < k.slope_after < 0
    assert cp.find_knee(t, 0.5 + 0.01 * rng.normal(size=t.size), 3.0) is None
    assert cp.find_knee(t, 3.0 - 0.01 * t + 0.01 * rng.normal(size=t.size), 3.0) is None  # straight line
