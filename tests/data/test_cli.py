"""Tests for r1zero.data.cli: `r1zero data mix|show`, bad input -> one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from r1zero.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.n_train=300", "--set", "data.n_eval=60", "--set", "data.vocab_size=300",
         "--set", "data.tokenizer_rows=200"]


def test_mix_and_show(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["data", "mix", "--config", str(ROOT / "configs" / "tiny.yaml"), *SMALL, "--out", str(out),
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("data mix: ") and "train ratios: math 40.0%" in lines[1]
    summary = json.loads(lines[-1])
    assert summary["counts"]["train"]["general"] == 30
    assert main(["data", "show", str(out)]) == 0
    assert capsys.readouterr().out.startswith("data mix: ")
    assert main(["data", "show", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows_kept"] == 360


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("R1ZERO_PROGRESS", "1")  # a progress bar must not precede the error line
    cases = [
        (["data", "mix", "--out", str(tmp_path / "o"), "--set", "data.mix.math=0.9"], "ratios must sum to 1"),
        (["data", "mix", "--out", str(tmp_path / "o"), "--set", "data.n_train=0"], "data.n_train"),
        (["data", "mix", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "none.yaml")], "config file not found"),
        (["data", "mix", "--out", str(tmp_path / "o"), "--set",
          f'data.imports=[{{"uri": "{tmp_path}/missing.jsonl", "format": "gsm8k"}}]'], "import file not found"),
        (["data", "mix", "--out", str(tmp_path / "o"), "--set", "data.vocab_size=100", *SMALL[:4]], "too small"),
        (["data", "mix"], "--out"),
        (["data", "show", str(tmp_path)], "no manifest.json"),
        (["data", "mix", "--out", str(tmp_path / "o"), "--set", "store.endpoint_url=http://127.0.0.1:9",
          "--set", "store.retries=0", "--set",
          'data.imports=[{"uri": "s3://bucket/in.jsonl", "format": "generic"}]'], "s3://bucket/in.jsonl"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("r1zero: error: ") and needle in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_console_script_bad_import_no_traceback(tmp_path):
    env = dict(os.environ, R1ZERO_PROGRESS="0")
    bad = tmp_path / "bad.jsonl"
    bad.mkdir()  # a directory where a file is expected: unreadable as a file
    proc = subprocess.run([sys.executable, "-m", "r1zero.cli", "data", "mix", "--out", str(tmp_path / "o"),
                           "--set", f'data.imports=[{{"uri": "{bad}", "format": "generic"}}]'],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "import file not found" in proc.stderr
