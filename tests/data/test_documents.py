"""Tests for r1zero.data.documents: plain vs template renderings and the template fraction."""

from __future__ import annotations

import random

from r1zero.data.documents import pretrain_text
from r1zero.template import extract_answer, format_ok, render_completion, render_prompt

ROW = {"domain": "math", "prompt": "What is 12 + 30?", "answer": "42", "solution": "12 + 30 = 42."}


def test_general_rows_are_plain_text():
    row = {"domain": "general", "prompt": "The baker sold bread.", "answer": "", "solution": ""}
    assert pretrain_text(row, random.Random(0), template_fraction=1.0) == "The baker sold bread."


def test_fraction_one_is_the_r1_template():
    text = pretrain_text(ROW, random.Random(0), template_fraction=1.0)
    assert text == render_prompt(ROW["prompt"]) + render_completion(ROW["solution"], ROW["answer"])
    assert format_ok(text, strict=True) and extract_answer(text) == "42"


def test_fraction_zero_is_plain_and_holds_the_answer():
    rng = random.Random(0)
    texts = {pretrain_text(ROW, rng, template_fraction=0.0) for _ in range(100)}
    assert len(texts) >= 3  # several plain formats
    assert all("<think>" not in t and "42" in t and ROW["prompt"] in t for t in texts)


def test_default_fraction_mixes_about_half():
    rng = random.Random(1)
    n = sum("<think>" in pretrain_text(ROW, rng) for _ in range(2000))
    assert 900 < n < 1100


def test_reasoning_fraction_splits_template_documents_into_worked_and_direct():
    rng = random.Random(2)
    texts = [pretrain_text(ROW, rng, template_fraction=1.0, reasoning_fraction=0.3) for _ in range(2000)]
    worked = sum(ROW["solution"] in t for t in texts)
    assert 500 < worked < 700  # ~30%
    direct = [t for t in texts if ROW["solution"] not in t]
    assert direct[0] == render_prompt(ROW["prompt"]) + " </think> <answer> 42 </answer>"
    assert all(format_ok(t) and extract_answer(t) == "42" for t in direct)


def test_reasoning_fraction_one_draws_nothing_extra():
    """At the default 1.0 the RNG stream (and so every existing preset's documents) is unchanged."""
    a, b = random.Random(5), random.Random(5)
    for _ in range(50):
        assert pretrain_text(ROW, a) == pretrain_text(ROW, b, reasoning_fraction=1.0)
    assert a.random() == b.random()


def test_digits_style_writes_the_solution_arithmetic_in_columns_in_every_format():
    worked = "12 + 30 = (2+0=2>2,1+3=4>42) 42."
    a, b = random.Random(6), random.Random(6)
    for _ in range(40):
        plain, digits = pretrain_text(ROW, a), pretrain_text(ROW, b, solution_style="digits")
        # same RNG draws; only the solution text differs (formats without a solution are equal)
        assert digits == plain.replace(ROW["solution"], worked)
    assert a.random() == b.random()
    text = pretrain_text(ROW, random.Random(0), template_fraction=1.0, solution_style="digits")
    assert worked in text and extract_answer(text) == "42"
