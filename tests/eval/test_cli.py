"""CLI tests for ``r1zero eval``."""

from __future__ import annotations

import json

import pytest

from r1zero.cli import main


@pytest.mark.slow
def test_eval_cli_runs_and_prints(eval_env, tmp_path, capsys):
    data, trained, _ = eval_env
    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(trained), "--data", str(data), "--out", str(out), "--set", "eval.n_samples=2",
               "--set", "eval.k=2", "--set", "eval.max_new_tokens=32", "--set", "eval.bootstrap=50",
               "--set", "eval.domains=[math]", "--set", "eval.n_problems=2", "--json"])
    assert rc == 0
    flat = json.loads(capsys.readouterr().out)
    assert flat == json.loads((out / "kfp_metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["overall"]["n_problems"] == 2


def test_eval_cli_bad_input(eval_base, tmp_path, capsys):
    data, trained = eval_base[:2]
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", "--model", str(trained), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", "--model", str(trained), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("r1zero: error: ") for line in err)
