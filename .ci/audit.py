"""pip-audit of the pinned dependencies in pyproject.toml (runtime + dev), triaged findings ignored.

    make audit                                            # builds .venv-audit with pip-audit, runs this
    python .ci/audit.py --pip-audit .venv-audit/bin/pip-audit

pip-audit asks its vulnerability service (default: the PyPI JSON API) about each pinned version
(``-r <pins> --no-deps --disable-pip``: exactly the pins, no resolver). Outcomes:

- untriaged findings -> listed, exit 1 (CI fails);
- findings listed in ``TRIAGED`` (mirrored in README "Security posture and pip-audit triage") are
  passed to ``--ignore-vuln`` and reported as triaged;
- packages the service could not answer for (no network route, or no record of the pinned
  version) are reported as NOT AUDITED with the count; when that is every package, the audit was
  not performed, which is said plainly and does not fail the build (the dev machine and CI reach
  only a package mirror, not the advisory databases).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# vulnerability id -> (package, why it is accepted). Keep in sync with the README table.
TRIAGED: dict[str, tuple[str, str]] = {}


def pinned_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    unpinned = [r for r in reqs if "==" not in r]
    if unpinned:
        raise SystemExit(f"audit: unpinned requirements {unpinned}: pin them in pyproject.toml")
    return reqs


def classify(report: dict, triaged: dict) -> dict:
    """Split pip-audit's JSON report into findings (untriaged), triaged, skipped and audited."""
    out = {"findings": [], "triaged": [], "skipped": [], "audited": 0}
    for dep in report.get("dependencies", []):
        if dep.get("skip_reason"):
            out["skipped"].append(f"{dep['name']}: {dep['skip_reason']}")
            continue
        out["audited"] += 1
        for v in dep.get("vulns", []):
            row = {"package": dep["name"], "version": dep.get("version"), "id": v["id"],
                   "aliases": v.get("aliases", []), "fix_versions": v.get("fix_versions", [])}
            known = {v["id"], *v.get("aliases", [])} & set(triaged)
            out["triaged" if known else "findings"].append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pip-audit", default="pip-audit", help="pip-audit executable")
    args = ap.parse_args(argv)
    reqs = pinned_requirements()
    with tempfile.TemporaryDirectory() as tmp:
        req_file, out_file = Path(tmp) / "pins.txt", Path(tmp) / "report.json"
        req_file.write_text("\n".join(reqs) + "\n")
        cmd = [args.pip_audit, "-r", str(req_file), "--no-deps", "--disable-pip", "--progress-spinner", "off",
               "-f", "json", "-o", str(out_file)]
        for vid in TRIAGED:
            cmd += ["--ignore-vuln", vid]
        res = subprocess.run(cmd, capture_output=True, text=True)
        report = json.loads(out_file.read_text()) if out_file.is_file() and out_file.stat().st_size else None
    if report is None:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        print(f"audit: NOT PERFORMED: pip-audit produced no report (exit {res.returncode}): {tail}")
        return 0
    c = classify(report, TRIAGED)
    total = len(reqs)
    for row in c["triaged"]:
        print(f"audit: triaged {row['package']}=={row['version']} {row['id']}: {TRIAGED.get(row['id'], ('', ''))[1]}")
    if c["skipped"]:
        print(f"audit: {len(c['skipped'])} of {total} pinned packages NOT AUDITED (the vulnerability service "
              f"did not answer for them), e.g. {c['skipped'][0]}")
    if c["audited"] == 0:
        print(f"audit: NOT PERFORMED: no package could be checked ({total} pins); see README "
              "'Security posture and pip-audit triage'")
        return 0
    if c["findings"]:
        for row in c["findings"]:
            fix = ", ".join(row["fix_versions"]) or "no fix released"
            print(f"audit: UNTRIAGED {row['package']}=={row['version']} {row['id']} "
                  f"({', '.join(row['aliases'])}) fix: {fix}")
        print(f"audit: {len(c['findings'])} untriaged finding(s): upgrade the pin or triage in .ci/audit.py + README")
        return 1
    print(f"audit: {c['audited']} of {total} pinned packages audited, no untriaged known vulnerabilities")
    return 0


if __name__ == "__main__":
    sys.exit(main())
