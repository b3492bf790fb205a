"""CLI tests for ``r1zero insight detect`` and ``r1zero experiment aha`` (argument errors)."""

from __future__ import annotations

import json

from r1zero.cli import main
from r1zero.insight.synthetic import aha_run_rows


def test_insight_detect_cli(tmp_path, capsys):
    m = tmp_path / "m.jsonl"
    rows = aha_run_rows(0, run="s0") + aha_run_rows(1, run="s1", jump_step=None)
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o" / "events.json"
    assert main(["insight", "detect", "--metrics", str(m), "--out", str(out), "--set", "insight.window=5"]) == 0
    text = capsys.readouterr().out
    assert "aha: 1/2 runs" in text and "rows kept" in text
    doc = json.loads(out.read_text())
    assert doc["summary"]["detector"]["window"] == 5
    assert len(list(out.parent.glob("events.*.png"))) == len(doc["summary"]["metrics"])


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["insight", "detect", "--metrics", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.json")]) == 2
    assert main(["insight", "detect", "--metrics", "x"]) == 2  # missing --out
    assert main(["insight", "detect", "--metrics", "x", "--out", "y", "--set", "insight.min_sigma=-1"]) == 2
    assert main(["experiment", "aha", "--runs", "0", "--out", str(tmp_path / "e")]) == 2
    assert main(["experiment", "aha", "--sweep", "grpo.algorithm=", "--out", str(tmp_path / "e")]) == 2
    assert main(["experiment", "aha", "--sweep", "grpo.algorithm=sgd", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("r1zero: error: ") for line in err)
    assert "Traceback" not in "".join(err)
