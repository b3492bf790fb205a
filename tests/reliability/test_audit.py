"""The pip-audit CI gate (.ci/audit.py): untriaged findings fail, triaged ones pass, an unreachable
vulnerability service is reported as "NOT PERFORMED" without failing. ``make audit`` (run by
.ci/run) is the real audit; here a stand-in executable writes pip-audit's JSON report format so
that each outcome of the gate is exercised.

    .venv/bin/python -m pytest tests/reliability/test_audit.py -q
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def audit():
    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(*deps) -> dict:
    return {"dependencies": list(deps), "fixes": []}


VULN = {"name": "examplepkg", "version": "1.0", "vulns": [{"id": "PYSEC-2099-1", "aliases": ["CVE-2099-0001"],
                                                             "fix_versions": ["1.1"], "description": "x"}]}
CLEAN = {"name": "cleanpkg", "version": "2.0", "vulns": []}
SKIP = {"name": "torch", "skip_reason": "Dependency not found on PyPI and could not be audited: torch (2.13.0)"}


def test_every_pin_is_exact_and_listed(audit):
    reqs = audit.pinned_requirements()
    assert len(reqs) >= 30 and all("==" in r for r in reqs)
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("pytest==") for r in reqs)


def test_classify(audit):
    c = audit.classify(_report(VULN, CLEAN, SKIP), {})
    assert [f["id"] for f in c["findings"]] == ["PYSEC-2099-1"] and c["audited"] == 2 and len(c["skipped"]) == 1
    c = audit.classify(_report(VULN, CLEAN), {"CVE-2099-0001": ("examplepkg", "not reachable from our code")})
    assert c["findings"] == [] and [t["id"] for t in c["triaged"]] == ["PYSEC-2099-1"]


def _fake_pip_audit(tmp_path: Path, report: dict | None, rc: int = 0) -> Path:
    exe = tmp_path / "pip-audit"
    body = "" if report is None else f"open(out, 'w').write({json.dumps(json.dumps(report))})\n"
    exe.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv\nout = args[args.index('-o') + 1]\n"
                   f"assert '--no-deps' in args and '--disable-pip' in args\n{body}"
                   f"sys.stderr.write('ConnectionError: cannot reach the vulnerability service\\n')\nsys.exit({rc})\n")
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("report, rc, want_rc, want", [
    (_report(VULN, CLEAN), 1, 1, "UNTRIAGED examplepkg==1.0 PYSEC-2099-1"),
    (_report(CLEAN, SKIP), 0, 0, "1 of"),
    (_report(SKIP), 0, 0, "NOT PERFORMED: no package could be checked"),
    (None, 1, 0, "NOT PERFORMED: pip-audit produced no report"),
])
def test_gate_outcomes(audit, tmp_path, capsys, report, rc, want_rc, want):
    exe = _fake_pip_audit(tmp_path, report, rc)
    assert audit.main(["--pip-audit", str(exe)]) == want_rc
    assert want in capsys.readouterr().out
