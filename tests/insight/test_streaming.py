"""Tests for r1zero.insight.streaming: events emitted once, as soon as detectable, with their lag."""

from __future__ import annotations

from r1zero.config import InsightConfig
from r1zero.insight.detect import run_detect
from r1zero.insight.streaming import StreamingDetector, metrics_callback
from r1zero.insight.synthetic import aha_run_rows


def _by_step(rows):
    return sorted(rows, key=lambda r: (r["step"], r["name"]))


def test_streaming_emits_jump_reflection_and_aha_once_with_small_lag(tmp_path):
    rows = _by_step(aha_run_rows(3, jump_step=60, n_steps=120))
    seen, written = [], []
    det = StreamingDetector(InsightConfig(), on_event=[seen.append, metrics_callback(written.append)])
    returned = det.update_many(rows)
    assert returned == seen == det.events
    kinds = [(e["metric"], e["kind"]) for e in seen]
    assert len(kinds) == len(set(kinds))  # each event once
    jump = next(e for e in seen if e["kind"] == "jump" and e["metric"] == "eval/accuracy/math")
    aha = next(e for e in seen if e["kind"] == "aha")
    assert abs(jump["step"] - 60) <= 2 and abs(aha["step"] - 60) <= 2
    # detectable soon after the jump: a re-check every 5 points and 5 points after its end
    assert 0 < jump["lag_steps"] <= 15 and jump["detected_at"] == jump["step"] + jump["lag_steps"]
    assert aha["detected_at"] >= jump["detected_at"]
    assert det.lag_summary()["jump"]["max"] <= 15
    # the streaming step agrees with the batch detector on the full curve
    import json

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = run_detect(str(path), str(tmp_path / "e.json"), plots=False)["events"]
    bj = next(e for e in batch if e["kind"] == "jump" and e["metric"] == "eval/accuracy/math")
    assert abs(bj["step"] - jump["step"]) <= 2
    # metrics rows: event step and lag, stamped at the confirmation step
    names = {r["name"] for r in written}
    assert "insight/aha/eval/accuracy/math" in names and "insight/jump/eval/accuracy/math/lag_steps" in names
    assert all(set(r) == {"step", "name", "value"} for r in written)
    assert [r["value"] for r in written if r["name"] == "insight/aha_events"] == [1.0]  # one aha, counted once


def test_streaming_is_quiet_on_a_flat_run_and_ignores_non_finite():
    rows = _by_step(aha_run_rows(5, jump_step=None, n_steps=120))
    det = StreamingDetector(InsightConfig())
    out = det.update_many(rows)
    assert [e["kind"] for e in out if e["kind"] in ("jump", "aha", "reflection")] == []
    assert det.update(200, "grpo/accuracy", float("nan")) == []


def test_streaming_keeps_runs_apart_and_bounds_memory():
    det = StreamingDetector(InsightConfig(), max_points=50)
    for s in range(120):
        det.update(s, "grpo/accuracy", 0.3 + 0.3 * (s >= 100), run="a")
        det.update(s, "grpo/accuracy", 0.3, run="b")
    assert {e["run"] for e in det.events} == {"a"}
    assert len(det._t[("a", "grpo/accuracy")]) == 50
