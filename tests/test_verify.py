"""Verifiers: math equivalence, code outputs/inputs (sandboxed), cross-domain, never raising, batching."""

from __future__ import annotations

import json
import random
import threading

import pytest

import r1zero.verify as V
from r1zero.data import gen_code
from r1zero.verify import Verdict, verify, verify_many


def M(answer):
    return {"id": "m", "domain": "math", "answer": answer, "meta": "{}"}


@pytest.mark.parametrize("gold,pred", [
    ("1/2", "0.5"), ("1/2", r"\frac{1}{2}"), ("1/2", r"\boxed{1/2}"), ("0.5", r"\dfrac{1}{2}"), ("0.5", "$\\frac12$"),
    ("2", "2.0"), ("-14", "-14"), ("1000", "1,000"), ("25/8", "3.125"), ("x+1", "1+x"),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"), ("1/3", "0.333333"), (r"\{1,2\}", r"\{2,1\}"), ("7", "7."),
    ("yes", "Yes"), ("false", "false."), (r"2\pi", r"2 \pi"),
])
def test_math_equivalent(gold, pred):
    v = verify(M(gold), pred)
    assert v.correct and v.status == "correct", v


@pytest.mark.parametrize("gold,pred", [
    ("1/3", "0.33"), ("2", "3"), ("1000000", "1000001"), ("x+1", "x+2"), ("5", "six"), ("1/2", "2"),
    ("no", "no1"), ("yes", "no"), ("true", "1"),  # sympy alone reads "no1" as n*o == "no"
])
def test_math_not_equivalent(gold, pred):
    v = verify(M(gold), pred)
    assert not v.correct and v.status in ("wrong", "unparseable"), v


def test_no_answer_and_too_complex():
    assert verify(M("3"), None) == Verdict(False, "no_answer", "no <answer> in the completion")
    assert verify(M("3"), "   ").status == "no_answer"
    assert verify(M("3"), "2^{99999999}").status == "too_complex"
    assert verify(M("3"), "x" * 5000).status == "too_complex"


def test_math_off_the_main_thread():
    # math-verify's SIGALRM timeout cannot be installed off the main thread: must still verify.
    out = []
    t = threading.Thread(target=lambda: out.append(verify(M("x+1"), "1+x")))
    t.start()
    t.join()
    assert out[0].correct, out


def _code_items(n, kind):
    rng, items = random.Random(3), []
    while len(items) < n:
        it = gen_code.generate(rng, 1 + len(items) % 3)
        if it["meta"]["kind"] == kind:
            items.append(dict(it, id=str(len(items)), domain="code", meta=json.dumps(it["meta"])))
    return items


def test_code_predict_output_needs_no_process(monkeypatch):
    monkeypatch.setattr(V, "run_code", lambda *a, **k: pytest.fail("predict_output must not run code"))
    for it in _code_items(6, "predict_output"):
        out = json.loads(it["meta"])["output"]
        assert verify(it, it["answer"]).correct
        assert verify(it, f" {out!r} ").correct
        assert not verify(it, repr(out) + "0").correct


def test_code_find_input_runs_f_in_the_sandbox():
    items = _code_items(4, "find_input")
    for it in items:
        meta = json.loads(it["meta"])
        assert verify(it, it["answer"]).correct, verify(it, it["answer"])
        assert verify(it, f"f({meta['input']!r})").correct
        assert verify(it, f"x = {meta['input']!r}").correct
        # a different input may or may not work; the verdict must agree with running f here
        other = meta["input"] + 1
        expect = gen_code.run_function(meta["source"], "f", other) == meta["output"]
        assert verify(it, repr(other)).correct == expect


def test_find_input_rejects_code_and_handles_hostile_sources():
    it = _code_items(1, "find_input")[0]
    v = verify(it, "__import__('os').system('touch pwned')")
    assert (v.correct, v.status) == (False, "unparseable")
    loop = {"domain": "code", "answer": "1", "meta": json.dumps(
        {"kind": "find_input", "source": "def f(x):\n    while True:\n        pass", "func": "f", "output": 1})}
    v = verify(loop, "1", timeout_s=0.5)
    assert (v.correct, v.status) == (False, "timeout")
    raising = {"domain": "code", "answer": "1", "meta": json.dumps(
        {"kind": "find_input", "source": "def f(x):\n    return 10 // x", "func": "f", "output": 5})}
    assert verify(raising, "2").correct
    assert verify(raising, "0").status == "runtime_error"


@pytest.mark.parametrize("gold,pred,ok", [
    ("Ivy", "ivy", True), ("Ivy", "Ivy.", True), ("240", "240 minutes", True), ("3000", "3,000", True),
    ("70", "70.0", True), ("Ivy", "Bob", False), ("12", "12.5", False), ("B", "(B)", True),
])
def test_cross(gold, pred, ok):
    item = {"domain": "cross", "answer": gold, "meta": json.dumps({"family": "units"})}
    assert verify(item, pred).correct is ok


@pytest.mark.parametrize("item", [
    {}, {"domain": "general", "answer": ""}, {"domain": "code", "meta": "{not json"}, {"domain": "math"},
    {"domain": "code", "meta": json.dumps({"kind": "find_input"})}, {"domain": "code", "meta": json.dumps({"kind": "x"})},
    {"domain": "math", "answer": None}, {"domain": "cross", "answer": "1", "meta": json.dumps({"rel_tol": "bad"})},
])
@pytest.mark.parametrize("pred", [None, "", "1", "\\frac{", "((((((((", "f(" * 500, "\x00\udcff"])
def test_never_raises(item, pred):
    v = verify(item, pred)
    assert isinstance(v, Verdict) and v.correct is False


def test_verify_many_matches_verify_and_dedups_runs(monkeypatch):
    calls = []
    real = V.run_code

    def counting(program, **kw):
        calls.append(program)
        return real(program, **kw)

    monkeypatch.setattr(V, "run_code", counting)
    monkeypatch.setattr(V, "_RUNS", V._RunCache())
    finds = _code_items(3, "find_input")
    items = [finds[i % 3] for i in range(12)] + [M("1/2")] * 4 + _code_items(4, "predict_output")
    preds = [finds[i % 3]["answer"] for i in range(12)] + ["0.5", "1/2", "2", None] + [it["answer"] for it in items[16:]]
    got = verify_many(items, preds)
    assert len(calls) == 3  # 12 find_input checks, 3 distinct programs
    assert [v.correct for v in got] == [True] * 12 + [True, True, False, False] + [True] * 4
    assert got == [verify(it, p) for it, p in zip(items, preds)]
    assert len(calls) == 3  # the per-item calls hit the cache
    with pytest.raises(ValueError):
        verify_many(items, preds[:-1])
