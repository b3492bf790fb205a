"""Prompt stream determinism/resume, dynamic-sampling filter, adaptive group sizes, rollout plumbing."""

from __future__ import annotations

import torch

from r1zero.grpo.adaptive import STRATUM_ALPHA, PassRateTracker, group_size, stratum_of
from r1zero.grpo.rewards import RewardResult
from r1zero.grpo.rollout import Rollout, concat
from r1zero.grpo.sampling import PromptStream, keep_informative


def test_stream_is_a_permutation_per_epoch_and_resumable():
    s = PromptStream(10, seed=3)
    first = s.take(10)
    assert sorted(first) == list(range(10))
    second = s.take(10)
    assert sorted(second) == list(range(10)) and second != first
    t = PromptStream(10, seed=3)
    t.take(7)
    st = t.state()
    u = PromptStream(10, seed=3)
    u.load(st)
    assert u.take(13) == t.take(13)
    w = PromptStream(10, seed=3)
    picks = w.take_weighted(200, [[0, 1], [2, 3, 4], []], [1.0, 0.0, 5.0], step=0)
    assert set(picks) == {0, 1}


def test_keep_informative():
    assert keep_informative([[1, 1, 1], [0, 1], [0.5], [0, 0.0]]) == [False, True, False, False]


def test_adaptive_group_size():
    assert group_size(None, 8, 2, 16) == 8
    assert group_size(0.5, 8, 2, 16) == 16
    assert group_size(0.0, 8, 2, 16) == 2 and group_size(1.0, 8, 2, 16) == 2
    assert group_size(0.25, 8, 2, 16) == 2 + round(14 * 0.75)
    tr = PassRateTracker()
    tr.update(3, 1.0)
    tr.update(3, 0.0)
    assert tr.get(3) == 0.5 and tr.get(4) is None
    tr2 = PassRateTracker()
    tr2.load(tr.state())
    assert tr2.rate == tr.rate and tr2.visits == {3: 2}


def test_unseen_prompts_take_their_stratum_pass_rate():
    rows = [{"source": "gen:math/linear", "difficulty": 1}, {"source": "gen:math/linear", "difficulty": 1},
            {"source": "gen:math/linear", "difficulty": 2}, {"domain": "math", "difficulty": 1}]
    strata = [stratum_of(r) for r in rows]
    assert strata == ["gen:math/linear/d1", "gen:math/linear/d1", "gen:math/linear/d2", "math/d1"]
    tr = PassRateTracker(strata)
    assert tr.estimate(1) is None
    tr.update(0, 1.0)
    tr.update(0, 0.0)
    # prompt 0 has its own EMA; prompt 1 (never seen) its stratum's; prompt 2 (other stratum) none
    assert tr.estimate(0) == 0.5 and tr.get(1) is None
    assert tr.estimate(1) == (1 - STRATUM_ALPHA) * 1.0 and tr.estimate(2) is None
    assert group_size(tr.estimate(1), 8, 2, 16) < group_size(tr.estimate(0), 8, 2, 16)
    tr2 = PassRateTracker(strata)
    tr2.load(tr.state())
    assert tr2.estimate(1) == tr.estimate(1)
    assert PassRateTracker().estimate(1) is None  # stratum prior off


def _roll(prompts, rewards, sizes):
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    n = len(groups)
    res = RewardResult(list(rewards), {"accuracy": list(rewards)}, [r > 0 for r in rewards], [True] * n, ["x"] * n)
    return Rollout(prompts, torch.tensor(groups), [[1]] * n, [[2]] * n, [False] * n, ["t"] * n, res)


def test_select_and_concat_reindex_groups():
    a = _roll([7, 8], [1, 0, 1, 1], [2, 2])
    kept = a.select_groups(keep_informative(a.group_rewards()))
    assert kept.prompt_index == [7] and kept.group_B.tolist() == [0, 0]
    b = _roll([9], [0, 1, 1], [3])
    c = concat([kept, b])
    assert c.prompt_index == [7, 9] and c.group_B.tolist() == [0, 0, 1, 1, 1]
    assert c.group_accuracy() == [0.5, 2 / 3]
