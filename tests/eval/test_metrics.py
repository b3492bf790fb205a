"""Unit tests for r1zero.eval.metrics (pure functions)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from r1zero.eval.metrics import (
    bootstrap_ci,
    count_reflection,
    has_reflection,
    length_summary,
    maj_at_k,
    majority_vote,
    normalize_answer,
    paired_bootstrap_diff,
    pass_at_k,
    unpaired_bootstrap_diff,
    vote_classes,
)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 9) for c in range(0, n + 1) for k in range(1, n + 1)])
def test_pass_at_k_matches_closed_form(n, c, k):
    want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_equals_subset_enumeration():
    # pass@k is the probability that a uniformly drawn k-subset holds at least one correct sample.
    flags = [1, 0, 0, 1, 0, 0]
    k = 3
    subsets = list(itertools.combinations(flags, k))
    want = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k(len(flags), sum(flags), k) == pytest.approx(want)


def test_pass_at_k_large_n_is_finite_and_pass1_is_mean():
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0.0 < pass_at_k(10_000, 3, 100) < 1.0


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, 1, 5), (4, 1, 0)])
def test_pass_at_k_rejects_bad_args(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_normalize_and_majority():
    assert normalize_answer("  $\\boxed{ 42 }$ ") == "42"
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("   ") is None
    assert majority_vote(["3", "4", "4", " 3", None]) == "3"  # tie -> earliest first occurrence
    assert majority_vote([None, None]) is None
    assert majority_vote(["7", "8", "8"]) == "8"


def test_maj_at_k_uses_first_k_and_voted_answer():
    answers = ["5", "6", "6", "5", "5"]
    correct = [True, False, False, True, True]
    assert maj_at_k(answers, correct, k=3) is False  # "6" wins among the first 3
    assert maj_at_k(answers, correct, k=5) is True  # "5" wins among all 5
    assert maj_at_k([None, None], [False, False], k=2) is False
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], k=1)


def test_reflection_keywords_are_whole_word_and_case_insensitive():
    kws = ["wait", "try again", "re-evaluate"]
    assert has_reflection("Hmm, WAIT. Let me check", kws)
    assert not has_reflection("the result was awaited", kws)
    assert has_reflection("let me try\n again", kws)
    assert count_reflection("wait... wait, re-evaluate", kws) == 3
    assert not has_reflection("", kws)
    assert not has_reflection("wait", [])


def test_bootstrap_ci_is_deterministic_and_brackets_mean():
    rng = np.random.default_rng(1)
    x = rng.binomial(1, 0.6, size=200)
    a = bootstrap_ci(x, n_boot=500, seed=3)
    b = bootstrap_ci(x, n_boot=500, seed=3)
    assert a == b
    assert a.lo <= a.mean <= a.hi
    # half-width close to the normal approximation 1.96 * sqrt(p(1-p)/n)
    se = math.sqrt(a.mean * (1 - a.mean) / x.size)
    assert (a.hi - a.lo) / 2 == pytest.approx(1.96 * se, rel=0.2)
    assert math.isnan(bootstrap_ci([]).mean)
    single = bootstrap_ci([1.0])
    assert single.lo == single.hi == 1.0


def test_bootstrap_ci_coverage_close_to_nominal():
    # 95% intervals for the mean of N(0, 1) samples should cover 0 about 95% of the time.
    rng = np.random.default_rng(7)
    hits = 0
    trials = 200
    for t in range(trials):
        e = bootstrap_ci(rng.normal(size=60), n_boot=400, seed=t)
        hits += e.lo <= 0.0 <= e.hi
    assert 0.88 <= hits / trials <= 0.99


def test_paired_and_unpaired_diffs():
    a = [1, 1, 1, 0, 1, 1, 0, 1]
    b = [0, 1, 0, 0, 1, 0, 0, 1]
    p = paired_bootstrap_diff(a, b, n_boot=300)
    assert p.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert p.lo <= p.mean <= p.hi
    u = unpaired_bootstrap_diff(a, b, n_boot=300)
    assert u.mean == pytest.approx(p.mean)
    # pairing removes the shared per-problem variance, so the paired interval is not wider
    assert (p.hi - p.lo) <= (u.hi - u.lo) + 1e-9
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1], [1, 2])


def test_length_summary():
    s = length_summary([1, 2, 3, 4, 10])
    assert s["mean"] == pytest.approx(4.0) and s["p50"] == 3.0 and s["max"] == 10.0
    assert length_summary([])["mean"] == 0.0


def test_maj_at_k_votes_by_the_verifiers_equivalence():
    from r1zero.eval.evaluate import answer_equivalence

    answers, correct = ["3", "1/2", "0.5", "\\frac{1}{2}"], [False, True, True, True]
    # string votes: four singletons, the earliest ("3", wrong) wins
    assert maj_at_k(answers[:3], correct[:3], k=3) is False
    eq = answer_equivalence({"domain": "math"})
    assert vote_classes(answers, eq) == [0, 1, 1, 1]
    assert maj_at_k(answers[:3], correct[:3], k=3, equivalent=eq) is True
    assert majority_vote(answers, eq) == "1/2"
    assert vote_classes(["7", None, "7.0"], answer_equivalence({"domain": "cross"})) == [0, None, 0]
    assert answer_equivalence({"domain": "code"}) is None
