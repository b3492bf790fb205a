"""Tests for r1zero.eval.evaluate: scoring logic with known completions, and run_eval end to end."""

from __future__ import annotations

import json

import pytest

from r1zero.config import load_config
from r1zero.errors import UserError
from r1zero.eval.evaluate import (
    aggregate,
    compare,
    flat_metrics,
    run_eval,
    score_problems,
    select_problems,
    selection_counts,
)
from r1zero.verify import Verdict

KW = ["wait", "recheck"]


def _fake_verify(items, answers):
    return [Verdict(a is not None and a == it["answer"], "x", "") for it, a in zip(items, answers)]


def _c(ans: str, extra: str = "") -> tuple[str, int, bool]:
    text = f" reasoning {extra}</think> <answer> {ans} </answer>"
    return (text, len(text.split()), False)


def test_score_problems_counts_exactly():
    items = [{"id": "a", "domain": "math", "answer": "5"}, {"id": "b", "domain": "cross", "answer": "x"}]
    greedy = [_c("5"), ("no tags at all", 3, True)]
    sampled = [[_c("5"), _c("4", "wait "), _c("4"), _c("5")],  # c=2 of 4; vote tie -> first ("5")
               [_c("y"), _c("y"), _c("x", "Recheck "), ("junk", 50, True)]]  # c=1; vote "y"
    recs = score_problems(items, greedy, sampled, k=2, strict_format=False, keywords=KW, verify_many=_fake_verify)
    a, b = recs
    assert a["pass@1"] == 1.0 and b["pass@1"] == 0.0
    assert (a["n"], a["c"], b["c"]) == (4, 2, 1)
    assert a["pass@k"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert b["pass@k"] == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert a["maj@k"] == 1.0  # first 2 samples: "5", "4" -> tie -> "5" (correct)
    assert b["maj@k"] == 0.0  # "y", "y"
    assert a["mean@n"] == 0.5 and b["mean@n"] == 0.25
    assert a["format_rate"] == 1.0 and b["format_rate"] == 0.0
    assert b["format_rate_sampled"] == 0.75
    assert a["reflection_rate"] == 0.25 and b["reflection_rate"] == 0.25
    assert b["truncated"] == 1.0 and b["truncated_rate"] == 0.25
    assert a["sample_lengths"] == [len(t.split()) for t, _, _ in sampled[0]]
    agg = aggregate(recs, n_boot=100, seed=0)
    assert agg["pass@1"]["mean"] == 0.5 and agg["n_problems"] == 2


def test_compare_is_paired_by_id_and_flat_metrics():
    base = [{"id": i, "domain": "math", **dict.fromkeys(("pass@1", "pass@k", "maj@k", "mean@n", "format_rate",
                                                         "format_rate_sampled", "reflection_rate", "truncated_rate"),
                                                        0.0)} for i in "abcd"]
    cur = [{**r, "pass@1": 1.0 if r["id"] in "ab" else 0.0} for r in base]
    d = compare(cur, base[::-1], n_boot=200, seed=0)  # order must not matter
    assert d["overall"]["pass@1"]["mean"] == 0.5 and d["overall"]["n_paired"] == 4
    assert d["overall"]["maj@k"]["mean"] == 0.0
    with pytest.raises(UserError):
        compare(cur, [{**base[0], "id": "zz"}], n_boot=10, seed=0)
    doc = {"overall": {"pass@1": {"mean": 0.5}}, "by_domain": {"math": {"pass@1": {"mean": 0.25}}}, "delta": d}
    flat = flat_metrics(doc)
    assert flat["accuracy"] == flat["pass@1"] == 0.5 and flat["math/pass@1"] == 0.25
    assert flat["delta/pass@1"] == 0.5 and flat["delta/math/pass@1"] == 0.5 and "delta/math/maj@k" in flat


def test_select_problems_filters_and_is_seeded():
    rows = [{"id": str(i), "domain": d, "answer": a} for i, (d, a) in
            enumerate([("math", "1"), ("general", ""), ("code", "2"), ("cross", "3"), ("math", "")] * 4)]
    got = select_problems(rows, ["math", "cross"], None, 0)
    assert {r["domain"] for r in got} == {"math", "cross"} and all(r["answer"] for r in got)
    assert select_problems(rows, ["math", "cross", "code"], 5, 1) == select_problems(rows, ["math", "cross", "code"], 5, 1)
    assert len(select_problems(rows, ["math"], 2, 0)) == 2
    c = selection_counts(rows, select_problems(rows, ["math"], 2, 0), ["math"])
    assert c == {"in": 20, "evaluated": 2, "not_evaluated": {"domain_not_evaluated": 12, "no_gold_answer": 4,
                                                            "not_sampled": 2}}


def _cfg(*extra):
    return load_config(None, ["eval.n_samples=4", "eval.k=2", "eval.max_new_tokens=40", "eval.bootstrap=200",
                              "eval.domains=[math,cross]", "telemetry.enabled=false", *extra])


@pytest.mark.slow
def test_run_eval_end_to_end(eval_env, tmp_path):
    data, trained, untrained = eval_env
    out = tmp_path / "eval"
    curves = tmp_path / "metrics.jsonl"
    curves.write_text("".join(json.dumps({"step": s, "name": "grpo/accuracy", "value": 0.2 + 0.5 * (s >= 30)}) + "\n"
                              for s in range(60)))
    flat = run_eval(_cfg(), str(trained), str(data), str(out), baseline_uri=str(untrained), curves=[str(curves)])
    doc = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "kfp_metrics.json").read_text()) == flat
    assert all(isinstance(v, float) for v in flat.values())
    # the fitted model answers most of its problems; the random-init one answers none
    assert doc["overall"]["n_problems"] == 8 and set(doc["by_domain"]) == {"math", "cross"}
    assert doc["rows"] == {"in": 9, "evaluated": 8, "not_evaluated": {"domain_not_evaluated": 1, "no_gold_answer": 0,
                                                                    "not_sampled": 0}}
    assert flat["accuracy"] == doc["overall"]["pass@1"]["mean"] >= 0.6
    assert doc["baseline"]["overall"]["pass@1"]["mean"] <= 0.1
    assert doc["delta"]["overall"]["pass@1"]["lo"] > 0  # significant improvement
    assert flat["pass@k"] >= flat["mean@n"]  # pass@k >= pass@1 of samples
    assert 0 <= flat["format_rate"] <= 1 and flat["length_mean"] > 0
    recs = [json.loads(x) for x in (out / "per_problem.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and sum(r["pass@1"] for r in recs) / 8 == flat["accuracy"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # accuracy, base vs RL, lengths, curves
    assert "Base vs RL" in html and "grpo/accuracy" in html
    assert [e["kind"] for e in doc["curves"]["events"]] == ["jump"]
    # an earlier eval output works as a baseline too (paired on problem ids): model vs itself = 0
    again = run_eval(_cfg(), str(trained), str(data), str(tmp_path / "eval2"), baseline_uri=str(out))
    assert again["delta/pass@1"] == 0.0 and again["accuracy"] == flat["accuracy"]  # deterministic


def test_run_eval_bad_inputs(eval_base, tmp_path):
    data, trained = eval_base[:2]
    with pytest.raises(UserError, match="no eval problems"):
        run_eval(_cfg("eval.domains=[code]"), str(trained), str(data), str(tmp_path / "o"))
    with pytest.raises(UserError, match="not found"):
        run_eval(_cfg(), str(tmp_path / "nope"), str(data), str(tmp_path / "o"))
    with pytest.raises(UserError, match="baseline"):
        run_eval(_cfg("eval.n_samples=1", "eval.k=1"), str(trained), str(data), str(tmp_path / "o"),
                 baseline_uri=str(data))


@pytest.mark.slow
def test_named_benchmark_evaluated_whole_and_reported_apart(eval_env, tmp_path):
    """A benchmark holding the eval problems: its own figures (not cut by n_problems) match the
    fitted model's skill, the baseline's and the paired difference come with it."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1zero.data.schema import ROW_SCHEMA
    from r1zero.data.shards import read_rows

    data, trained, untrained = eval_env
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    rows = [{**r, "id": f"bench:mine:{i}"} for i, r in enumerate(read_rows(data, "eval")) if r["answer"]]
    (mine / "bench" / "mine").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), mine / "bench" / "mine" / "part-00000.parquet")
    cfg = _cfg("eval.n_problems=2", "eval.benchmarks=[{name: mine, uri: mine.jsonl, format: generic}]")
    flat = run_eval(cfg, str(trained), str(mine), str(tmp_path / "eval"), baseline_uri=str(untrained))
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["overall"]["n_problems"] == 2  # the eval split is sampled ...
    b = doc["benchmarks"]["mine"]  # ... the benchmark is not
    assert b["rows"] == {"in": 8, "evaluated": 8, "not_evaluated": {"no_gold_answer": 0}} and b["n_problems"] == 8
    assert b["pass@1"]["mean"] >= 0.6 and b["baseline"]["pass@1"]["mean"] <= 0.1 and b["delta"]["pass@1"]["lo"] > 0
    assert flat["bench/mine/pass@1"] == b["pass@1"]["mean"] and flat["bench/mine/n"] == 8
    assert flat["delta/bench/mine/pass@1"] == b["delta"]["pass@1"]["mean"]
    assert "Named benchmarks" in (tmp_path / "eval" / "report.html").read_text()
    with pytest.raises(UserError, match="no benchmark 'other'"):
        run_eval(_cfg("eval.benchmarks=[{name: other, uri: x.jsonl, format: gsm8k}]"), str(trained), str(data),
                 str(tmp_path / "e3"))
