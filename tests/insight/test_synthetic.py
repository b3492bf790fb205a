"""Detection quality on synthetic curves (the issue's goals) and the suite's determinism."""

from __future__ import annotations

import numpy as np
import pytest

from r1zero.config import InsightConfig
from r1zero.insight import changepoint as cp
from r1zero.insight.synthetic import make_suite, score_jumps


def test_suite_is_deterministic_and_planted_as_documented():
    a, b = make_suite(5, seed=11), make_suite(5, seed=11)
    assert all(np.array_equal(x.values, y.values) for x, y in zip(a, b))
    jumps = [j for c in a if c.kind == "jump" for j in c.jumps]
    assert jumps and all(j.height_sigma >= 3.0 for j in jumps)
    assert all(j.width_steps <= 0.05 * c.run_length for c in a for j in c.jumps)
    assert all(not c.jumps for c in a if c.kind != "jump")


def test_score_jumps_counts_matches_and_false_positives():
    suite = make_suite(3, seed=0)
    perfect = {id(c.values): [j.step for j in c.jumps] for c in suite}
    s = score_jumps(suite, lambda t, y: perfect[id(y)])
    assert s["precision"] == 1.0 and s["recall"] == 1.0 and s["false_curve_rate"] == 0.0
    s = score_jumps(suite, lambda t, y: [t[0]])  # always one wrong detection
    assert s["tp"] == 0 and s["false_curve_rate"] == 1.0 and s["precision"] == 0.0


@pytest.mark.slow
def test_jump_detection_quality_meets_goals():
    # 200 curves per family, fixed seed, detector at the config defaults (2.5 sigma, 10% width).
    cfg = InsightConfig()
    suite = make_suite(200, seed=2026)
    s = score_jumps(suite, lambda t, y: [r.center for r in cp.find_jumps(t, y, cfg.min_sigma, cfg.max_width_frac)])
    print(s)
    assert s["planted"] >= 200
    assert s["precision"] >= 0.95
    assert s["recall"] >= 0.90
    assert s["step_error_frac_max"] <= 0.05
    assert s["false_curve_rate"] <= 0.05
