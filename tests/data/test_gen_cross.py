"""Tests for r1zero.data.gen_cross: answers re-derived from the prompt text."""

from __future__ import annotations

import random
import re

import pytest

from r1zero.data import gen_cross

_FACTORS = {(a, b): k for a, b, k in gen_cross._UNITS}


def _check(item: dict) -> None:
    p, a = item["prompt"], item["answer"]
    fam = item["meta"]["family"]
    if fam == "units":
        n, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", p).groups()
        n = int(n)
        assert int(a) == (n * _FACTORS[(src, dst)] if (src, dst) in _FACTORS else n // _FACTORS[(dst, src)])
    elif fam == "sequence":
        seq = [int(x) for x in re.findall(r"-?\d+", p)]
        full = [*seq, int(a)]
        d = [y - x for x, y in zip(full, full[1:])]
        ok = (len(set(d)) == 1 or len({y / x for x, y in zip(full, full[1:]) if x}) == 1
              or all(full[i] == full[i - 1] + full[i - 2] for i in range(2, len(full)))
              or len({y - x for x, y in zip(d, d[1:])}) == 1)
        assert ok, (p, a)
    elif fam == "logic":
        facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", p)
        above = {x for x, _, _ in facts}
        below = {y for _, _, y in facts}
        top, bottom = (above - below).pop(), (below - above).pop()
        most = p.rsplit("Who is the ", 1)[1].rstrip("?")
        assert a == (top if most in [t[1] for t in gen_cross._TRAITS] else bottom)
    elif fam == "word_problem":
        nums = [int(x) for x in re.findall(r"\d+", p)]
        if "boxes" in p:
            assert int(a) == nums[0] * nums[1] - nums[2]
        elif "counter" in p:
            assert int(a) == nums[0] + nums[1] * nums[2]
        else:
            assert int(a) == nums[0] * nums[1]
    else:
        raise AssertionError(fam)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_answers_are_correct(difficulty):
    rng = random.Random(difficulty)
    for fam in gen_cross.FAMILIES:
        for _ in range(60):
            item = gen_cross.generate(rng, difficulty, fam)
            assert item["prompt"] and item["answer"] and item["solution"]
            _check(item)
