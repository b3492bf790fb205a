"""Reward terms: DAPO overlong shaping, format/accuracy scoring, verdict caching, empty/truncated."""

from __future__ import annotations

import pytest

from r1zero.config import RewardConfig
from r1zero.grpo.rewards import RewardScorer, overlong_penalty
from r1zero.verify import Verdict


def test_overlong_penalty_hand_values():
    # L_max = 20, buffer 8 -> safe up to 12, linear to -1 at 20, -1 when truncated
    assert overlong_penalty(12, False, 20, 8) == 0.0
    assert overlong_penalty(16, False, 20, 8) == pytest.approx(-0.5)
    assert overlong_penalty(20, False, 20, 8) == pytest.approx(-1.0)
    assert overlong_penalty(20, True, 20, 8) == -1.0
    assert overlong_penalty(0, False, 20, 8) == 0.0


class CountingVerifier:
    def __init__(self):
        self.calls = 0

    def __call__(self, items, preds, timeout_s=2.0):
        self.calls += len(items)
        return [Verdict(p == it["answer"], "correct" if p == it["answer"] else "wrong", "") for it, p in zip(items, preds)]


def test_scores_and_cache():
    v = CountingVerifier()
    sc = RewardScorer(RewardConfig(accuracy=1.0, format=0.2, format_mode="strict"), 16, verify_many_fn=v)
    item = {"id": "a", "answer": "5", "domain": "math", "meta": "{}"}
    texts = [" 2 + 3 = 5 </think> <answer> 5 </answer>",   # correct, strict format
             " guess </think> <answer> 4 </answer>",        # wrong, formatted
             " 2 + 3 </think> junk <answer> 5 </answer>",   # correct, only lenient format
             "",                                            # empty completion
             " 2 + 3 = 5 </think> <answer> 5"]              # truncated: no closing tag
    res = sc.score([item] * 5, texts, [9, 6, 9, 0, 16], [False, False, False, False, True])
    assert res.correct == [True, False, True, False, False]
    assert res.formatted == [True, True, False, False, False]
    assert res.total == pytest.approx([1.2, 0.2, 1.0, 0.0, 0.0])
    assert res.answers[3] is None and res.answers[4] is None
    assert v.calls == 2  # "5" once (cached), "4" once; None is never sent
    sc.score([item], [texts[0]], [9], [False])
    assert v.calls == 2


def test_lenient_format_and_overlong_term():
    v = CountingVerifier()
    sc = RewardScorer(RewardConfig(format_mode="lenient", overlong=True, overlong_buffer=4), 10, verify_many_fn=v)
    item = {"id": "b", "answer": "7"}
    res = sc.score([item, item], [" x </think> junk <answer> 7 </answer>", " x </think> <answer> 7"], [8, 10],
                   [False, True])
    assert res.formatted == [True, False]
    assert res.terms["overlong"] == pytest.approx([-(8 - 6) / 4, -1.0])
    assert res.total == pytest.approx([1.0 + 0.2 - 0.5, -1.0])


def test_real_verifier_math_and_code():
    sc = RewardScorer(RewardConfig(), 16)
    math_item = {"id": "m", "domain": "math", "answer": "1/2", "meta": "{}"}
    code_item = {"id": "c", "domain": "code", "answer": "-10", "meta": '{"kind": "predict_output", "source": '
                 '"def f(x):\\n    return x - 15", "func": "f", "input": 5, "output": -10}'}
    res = sc.score([math_item, math_item, code_item], [" </think> <answer> 0.5 </answer>",
                                                      " </think> <answer> 2 </answer>",
                                                      " </think> <answer> -10 </answer>"], [5, 5, 5], [False] * 3)
    assert res.correct == [True, False, True]


def test_cache_is_a_bounded_lru_that_never_raises_on_overflow():
    v = CountingVerifier()
    sc = RewardScorer(RewardConfig(), 16, verify_many_fn=v, cache_size=3)
    items = [{"id": f"i{i}", "answer": str(i)} for i in range(10)]
    texts = [f" x </think> <answer> {i} </answer>" for i in range(10)]
    # one batch bigger than the whole cache: every verdict comes back (the old cache raised KeyError)
    res = sc.score(items, texts, [8] * 10, [False] * 10)
    assert res.correct == [True] * 10 and len(sc._cache) == 3 and v.calls == 10
    # least recently used goes first: touch i7, add i0 -> i8 is evicted, i7 and i9 stay
    sc.score([items[7]], [texts[7]], [8], [False])
    assert v.calls == 10
    sc.score([items[0]], [texts[0]], [8], [False])
    assert list(sc._cache) == [sc._key(items[k], str(k)) for k in (9, 7, 0)]
    sc.score([items[9], items[8]], [texts[9], texts[8]], [8, 8], [False, False])
    assert v.calls == 12  # i0 rescored, i8 re-verified, i9 cached


def test_sandbox_error_verdicts_are_not_memoised():
    calls = []

    def flaky(items, preds, timeout_s=2.0):
        calls.append(len(items))
        status = "sandbox_error" if len(calls) == 1 else "correct"
        return [Verdict(status == "correct", status, "") for _ in items]

    sc = RewardScorer(RewardConfig(), 16, verify_many_fn=flaky)
    item, text = {"id": "s", "answer": "1"}, " x </think> <answer> 1 </answer>"
    assert sc.score([item], [text], [8], [False]).correct == [False]
    assert sc.score([item], [text], [8], [False]).correct == [True]
    assert sc.score([item], [text], [8], [False]).correct == [True] and calls == [1, 1]
