"""Tests for r1zero.insight.detect: events, aha co-occurrence, repeatability summary, files written."""

from __future__ import annotations

import json

import pytest

from r1zero.config import InsightConfig
from r1zero.errors import UserError
from r1zero.insight.detect import find_aha, parse_metrics, run_detect
from r1zero.insight.synthetic import aha_run_rows

EVENT_KEYS = {"run", "metric", "kind", "step", "before", "after", "width_steps", "score"}


def _write(path, rows, extra_lines=()):
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def five_runs(tmp_path_factory):
    # 4 of 5 seeds have an aha moment (jumps at steps 50, 55, 60, 65), seed 4 has none.
    d = tmp_path_factory.mktemp("detect")
    rows = []
    for s in range(5):
        rows += aha_run_rows(s, run=f"seed{s}", jump_step=None if s == 4 else 50 + 5 * s)
    metrics = _write(d / "metrics.jsonl", rows, ["{bad json", json.dumps({"step": 1, "name": "x"}),
                                                 json.dumps({"step": 1, "name": "x", "value": "nan"})])
    doc = run_detect(str(metrics), str(d / "out" / "events.json"))
    return d, doc, len(rows)


def test_events_schema_and_planted_aha(five_runs):
    _, doc, _ = five_runs
    assert doc["events"] and all(set(e) == EVENT_KEYS for e in doc["events"])
    aha = {e["run"]: e["step"] for e in doc["events"] if e["kind"] == "aha"}
    assert set(aha) == {"seed0", "seed1", "seed2", "seed3"}
    for s in range(4):
        assert abs(aha[f"seed{s}"] - (50 + 5 * s)) <= 2
    # task specificity: math jumps, the flat general-domain accuracy does not
    assert not [e for e in doc["events"] if e["metric"] == "eval/accuracy/general"]
    knees = [e for e in doc["events"] if e["kind"] == "knee"]
    assert len(knees) == 5 and all(e["metric"] == "train/loss" for e in knees)


def test_repeatability_summary(five_runs):
    _, doc, _ = five_runs
    s = doc["summary"]
    assert s["n_runs"] == 5
    aha = s["by_kind"]["aha"]
    assert aha["runs_with_event"] == 4 and aha["fraction"] == pytest.approx(0.8)
    assert aha["first_step"]["min"] == pytest.approx(50, abs=2) and aha["first_step"]["max"] == pytest.approx(65, abs=2)
    assert aha["first_step"]["std"] > 0
    refl = s["by_metric"]["grpo/reflection_rate"]["reflection"]
    assert refl["runs_with_event"] == 4 and refl["n_runs"] == 5
    assert s["by_metric"]["grpo/completion_length/mean"]["length_growth"]["runs_with_event"] == 4


def test_rows_accounted_and_files_written(five_runs):
    d, doc, n_good = five_runs
    rows = doc["summary"]["rows"]
    assert rows["kept"] == n_good
    assert rows["in"] == rows["kept"] + sum(rows["quarantined"].values())
    assert rows["quarantined"] == {"bad_json": 1, "missing_field": 1, "non_finite": 1}
    out = d / "out"
    assert json.loads((out / "events.json").read_text()) == json.loads(json.dumps(doc))
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "events.eval_accuracy_math.png" in pngs and len(pngs) == len(doc["summary"]["metrics"])
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_deterministic(tmp_path):
    rows = aha_run_rows(7, jump_step=40, n_steps=90)
    m = _write(tmp_path / "m.jsonl", rows)
    a = run_detect(str(m), str(tmp_path / "a.json"), plots=False)
    b = run_detect(str(m), str(tmp_path / "b.json"), plots=False)
    assert a == b
    assert all(e["run"] == "default" for e in a["events"])


def test_find_aha_window():
    jump = {"run": "r", "metric": "eval/accuracy/math", "kind": "jump", "step": 100.0, "before": 0, "after": 1,
            "width_steps": 2.0, "score": 5}
    refl = {**jump, "metric": "grpo/reflection_rate", "kind": "reflection", "step": 112.0, "width_steps": 10.0}
    assert find_aha([jump, refl], window=10) == [{**jump, "kind": "aha"}]  # 100 within [107-10, 117+10]
    assert find_aha([jump, refl], window=4) == []
    assert find_aha([jump, {**refl, "run": "other"}], window=50) == []


def test_config_threshold_is_used(tmp_path):
    m = _write(tmp_path / "m.jsonl", aha_run_rows(1, jump_step=50))
    loose = run_detect(str(m), str(tmp_path / "a.json"), InsightConfig(min_sigma=3.0), plots=False)
    strict = run_detect(str(m), str(tmp_path / "b.json"), InsightConfig(min_sigma=100.0), plots=False)
    assert any(e["kind"] == "jump" for e in loose["events"])
    assert not any(e["kind"] in ("jump", "aha") for e in strict["events"])


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        run_detect(str(tmp_path / "missing.jsonl"), str(tmp_path / "o.json"))
    empty = tmp_path / "e.jsonl"
    empty.write_text("garbage\n")
    with pytest.raises(UserError, match="no valid rows"):
        run_detect(str(empty), str(tmp_path / "o.json"))


def test_parse_metrics_averages_duplicates_and_sorts():
    lines = [json.dumps({"step": 2, "name": "a", "value": 1.0}), json.dumps({"step": 1, "name": "a", "value": 3.0}),
             json.dumps({"step": 2, "name": "a", "value": 3.0})]
    series, rows = parse_metrics(lines)
    t, y = series[("default", "a")]
    assert list(t) == [1.0, 2.0] and list(y) == [3.0, 2.0] and rows["kept"] == 3


def test_run_detect_reads_and_writes_s3(s3_bucket):
    from r1zero import store

    rows = aha_run_rows(2, jump_step=45, n_steps=90)
    src = f"s3://{s3_bucket}/grpo/metrics.jsonl"
    store.write_bytes(src, "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = f"s3://{s3_bucket}/insight/events.json"
    doc = run_detect(src, out)
    assert json.loads(store.read_bytes(out)) == json.loads(json.dumps(doc))
    assert store.read_bytes(f"s3://{s3_bucket}/insight/events.eval_accuracy_math.png")[:4] == b"\x89PNG"
    assert any(e["kind"] == "aha" for e in doc["events"])
