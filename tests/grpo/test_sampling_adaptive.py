"""Prompt stream determinism/resume, dynamic-sampling filter, adaptive group sizes, rollout plumbing."""

from __future__ import annotations

import torch

from r1zero.grpo.adaptive import PassRateTracker, group_size
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
