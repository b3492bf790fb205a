"""Tests for r1zero.data.gen_code: the stored source, run independently, gives the stored answer."""

from __future__ import annotations

import random

import pytest

from r1zero.data import gen_code


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_answers_come_from_running_the_source(difficulty):
    rng = random.Random(difficulty)
    kinds = set()
    for _ in range(150):
        item = gen_code.generate(rng, difficulty)
        meta = item["meta"]
        assert meta["func"] == "f" and meta["source"].startswith("def f(")
        assert item["prompt"].startswith(meta["source"])
        ns: dict = {}
        exec(meta["source"], ns)  # noqa: S102 - our own generated functions
        assert ns["f"](meta["input"]) == meta["output"]
        if meta["kind"] == "predict_output":
            assert item["answer"] == repr(meta["output"])
            assert f"f({meta['input']!r})" in item["prompt"]
        else:
            assert meta["kind"] == "find_input"
            assert ns["f"](eval(item["answer"])) == meta["output"]  # noqa: S307
            assert repr(meta["output"]) in item["prompt"]
        kinds.add(meta["kind"])
    assert kinds == {"predict_output", "find_input"}


def test_families_by_difficulty():
    seen = {d: {gen_code.generate(random.Random(i), d)["meta"]["family"] for i in range(200)} for d in (1, 4)}
    assert seen[1] == {"affine", "parity"}
    assert seen[4] == set(gen_code.FAMILIES)


def test_trace_mismatch_is_caught(monkeypatch):
    def broken(rng, difficulty):
        return "def f(x):\n    return x + 1", (lambda x: (x + 2, ["wrong"])), (lambda: 3), True

    monkeypatch.setitem(gen_code.FAMILIES, "affine", (broken, 1, 1.0))
    with pytest.raises(AssertionError, match="trace"):
        gen_code.generate(random.Random(0), 1, "affine")
