"""Tests for r1zero.data.generators: cell probabilities and saturation retirement."""

from __future__ import annotations

import random

import pytest

from r1zero.data import generators
from r1zero.data.generators import WINDOW, CellSampler, cells


@pytest.mark.parametrize("domain", ["math", "code", "cross", "general"])
@pytest.mark.parametrize("max_d", [1, 3, 5])
def test_cell_probabilities_sum_to_one_and_respect_min_difficulty(domain, max_d):
    probs = cells(domain, max_d)
    assert sum(probs.values()) == pytest.approx(1.0)
    fams = generators.MODULES[domain].FAMILIES
    assert all(fams[f][1] <= d <= max_d for d, f in probs)
    # difficulty is uniform
    for d in range(1, max_d + 1):
        assert sum(p for (dd, _), p in probs.items() if dd == d) == pytest.approx(1 / max_d)


def test_saturated_cell_is_retired_and_others_keep_drawing():
    s = CellSampler("math", 2, random.Random(0))
    victim = s.active[0]
    for _ in range(WINDOW):
        s.record(victim, False)
    assert victim in s.retired and victim not in s.active
    assert all(s.draw() != victim for _ in range(500))
    other = s.active[0]
    for i in range(WINDOW):
        s.record(other, i % 2 == 0)  # 50% acceptance: stays
    assert other in s.active and not s.exhausted
    for cell in list(s.active):
        for _ in range(WINDOW):
            s.record(cell, False)
    assert s.exhausted


def test_sampler_is_deterministic():
    a = [CellSampler("code", 3, random.Random(5)).generate() for _ in range(3)]
    b = [CellSampler("code", 3, random.Random(5)).generate() for _ in range(3)]
    assert a == b
