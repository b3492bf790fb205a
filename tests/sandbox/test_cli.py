"""``r1zero sandbox run|probe``: JSON verdict, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "r1zero.cli", "sandbox", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_run_prints_json_verdict(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text("print('hello')\n")
    p = _cli("run", str(prog), "--timeout", "2", "--memory-mb", "128")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert list(out) == ["status", "returncode", "stdout", "stderr", "seconds"]
    assert (out["status"], out["returncode"], out["stdout"]) == ("ok", 0, "hello\n")


def test_failing_program_exits_1_with_its_status(tmp_path):
    prog = tmp_path / "loop.py"
    prog.write_text("while True:\n    pass\n")
    p = _cli("run", str(prog), "--timeout", "0.5", "--protections")
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out["status"] == "timeout" and "audit_hook" in out["protections"]


def test_bad_input_is_one_line_exit_2(tmp_path):
    for args in (["run", str(tmp_path / "missing.py")], ["run", __file__, "--timeout", "abc"],
                 ["run", __file__, "--memory-mb", "1"]):
        p = _cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
        assert p.stderr.startswith("r1zero: error:")


def test_probe():
    p = _cli("probe")
    assert p.returncode == 0, p.stderr
    assert "audit_hook" in json.loads(p.stdout)["protections"]
