"""Tests for r1zero.data.filters: each rule's reason, the quality score, generated rows pass."""

from __future__ import annotations

import random

import pytest

from r1zero.data.filters import check, quality_score
from r1zero.data.generators import CellSampler
from r1zero.data.schema import make_row


def _row(**kw):
    base = dict(id="x", domain="math", prompt="What is 12 + 30?", answer="42", solution="12 + 30 = 42.")
    base.update(kw)
    return make_row(**base)


@pytest.mark.parametrize("kw,reason", [
    ({}, None),
    ({"domain": "poetry"}, "bad_domain"),
    ({"prompt": "   "}, "empty_prompt"),
    ({"answer": " "}, "missing_answer"),
    ({"domain": "general", "answer": "", "solution": "", "prompt": "Short text here."}, None),
    ({"prompt": "2+2", "solution": ""}, "too_short"),
    ({"prompt": "What is 1 + 1? " * 400}, "too_long"),
    ({"prompt": "What is 1\x07 + 1?"}, "control_chars"),
    ({"solution": "bad \ufffd decode"}, "control_chars"),
    ({"difficulty": 0}, "bad_difficulty"),
    ({"prompt": "$$$$ #### @@@@ %%%% ^^^^ &&&&", "solution": ""}, "low_quality"),
    ({"prompt": "spam " * 40, "solution": ""}, "low_quality"),
])
def test_rules(kw, reason):
    got = check(_row(**kw), min_chars=8, max_chars=4000, min_score=0.3)
    assert (got[0] if got else None) == reason
    if got:
        assert got[1]  # a detail for the quarantine row


def test_quality_score_range_and_order():
    assert quality_score("") == 0.0
    assert quality_score("The baker sold a basket of bread near the river.") == 1.0
    assert quality_score("x" * 50) < 0.3
    assert quality_score("Größe: über drei Meter, sagte er.") == 1.0  # non-ASCII letters count
    assert 0.0 <= quality_score("!!! ??? ...") < quality_score("What is 2 + 3?")


def test_generated_rows_pass_the_default_filters():
    for domain in ("math", "code", "cross", "general"):
        s = CellSampler(domain, 5, random.Random(domain))
        for i in range(400):
            d, fam, item = s.generate()
            row = make_row(id=str(i), domain=domain, prompt=item["prompt"], answer=item["answer"],
                           solution=item["solution"], difficulty=d, meta=item["meta"])
            assert check(row, 8, 4000, 0.3) is None, (row, check(row, 8, 4000, 0.3))
