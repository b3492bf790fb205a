"""The article's three-level reward terms and the spectral dynamic grouping."""

from __future__ import annotations

import numpy as np
import pytest

from r1zero.config import GroupingConfig, RewardConfig
from r1zero.grpo.adaptive import PassRateTracker
from r1zero.grpo.grouping import DynamicGroups, spectral
from r1zero.grpo.three_level import ThreeLevelState, in_group_rank, jaccard, novelty, three_level_terms, trigrams


def test_rank_and_novelty_hand_values():
    assert in_group_rank([1.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]) == [1.0, 0.0, 0.5, 0.5]
    assert in_group_rank([3.0], [1]) == [0.5]
    a, b = trigrams("a b c d"), trigrams("a b c e")
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert novelty([a, b, a], [0, 0, 1]) == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_three_level_terms_and_weights():
    w = RewardConfig(three_level=True, level_weights=[1.0, 1.0, 1.0])
    st = ThreeLevelState()
    texts = ["so x is 5 </think> <answer> 5 </answer>", "guess </think> <answer> 4 </answer>"]
    t = three_level_terms(texts, ["5", "4"], [True, False], [True, True], [0, 0], ["c", "c"], st, w)
    assert t["task"] == [1.0, 0.0]
    assert t["consistency"] == [1.0, 0.0]  # "5" occurs in the reasoning, "4" does not
    assert t["base"][0] == pytest.approx(0.6 + 0.3 + 0.1 * t["novelty"][0])
    assert t["rank"] == [1.0, 0.0]
    assert t["transfer"] == [0.0, 0.0]  # no other prompt in cluster "c"
    assert t["progress"] == [0.0, 0.0]  # first visit: EMA starts at the current accuracy
    assert t["diversity"] == [1.0, 1.0]
    total0 = t["base"][0] + t["group"][0] + t["global"][0]
    assert t["three_level"][0] == pytest.approx(total0)
    t2 = three_level_terms(texts, ["5", "4"], [True, True], [True, True], [0, 0], ["c", "c"], st, w)
    assert t2["diversity"] == [0.0, 0.0]  # every trigram seen last step
    assert t2["progress"] == [pytest.approx(0.5), pytest.approx(0.5)]  # accuracy 1.0 vs EMA 0.5
    st2 = ThreeLevelState()
    st2.load(st.state())
    assert st2.ema == st.ema and len(st2.buffer) == len(st.buffer)


def test_spectral_groups_split_and_merge():
    rng = np.random.default_rng(0)
    centres = np.eye(4)
    emb = np.concatenate([c + 0.05 * rng.standard_normal((12, 4)) for c in centres])
    labels = spectral(emb, 4, seed=0)
    # each blob is one cluster
    for b in range(4):
        assert len(set(labels[b * 12:(b + 1) * 12].tolist())) == 1
    dg = DynamicGroups(emb, labels, GroupingConfig(enabled=True, k=2, spread_threshold=0.3), seed=0)
    tr = PassRateTracker()
    for p in range(12):  # blob 0: half solved, half not -> spread 0.5 > 0.3 -> split
        tr.update(p, 1.0 if p % 2 else 0.0)
    assert dg.n_groups() == 4
    dg.regroup(tr)
    # 4 -> 5 groups by the split, then merged back to 2k = 4 (closest mean pass rates)
    assert (dg.splits, dg.merges, dg.n_groups()) == (1, 1, 4)
    w = dg.weights(tr)
    assert len(w) == dg.n_groups() and all(x > 0 for x in w)
    rep = dg.report(tr)
    assert rep["grpo/groups/n"] == dg.n_groups()
    assert sum(rep[f"grpo/group/{g}/size"] for g in range(dg.n_groups())) == 48
