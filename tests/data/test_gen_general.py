"""Tests for r1zero.data.gen_general: varied prose, no answer, passes the quality filter."""

from __future__ import annotations

import random

from r1zero.data import gen_general
from r1zero.data.filters import quality_score


def test_prose_rows_are_varied_and_clean():
    rng = random.Random(0)
    items = [gen_general.generate(rng, rng.randint(1, 5)) for _ in range(500)]
    texts = [it["prompt"] for it in items]
    assert all(it["answer"] == "" and it["solution"] == "" for it in items)
    assert len(set(texts)) == len(texts)
    assert min(quality_score(t) for t in texts) >= 0.9
    assert any("check" in t or "verify" in t or "Wait" in t for t in texts)  # reflection words occur
    assert all(t.endswith(".") for t in texts)


def test_longer_paragraphs_at_higher_difficulty():
    def mean_len(d):
        rng = random.Random(d)
        return sum(len(gen_general.generate(rng, d)["prompt"]) for _ in range(200)) / 200

    assert mean_len(5) > mean_len(1) * 1.3
