"""Project-wide checks: layering (import-linter), ruff, CLI help everywhere, repo layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r1zero.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_layout():
    for name in ["r1zero", "components", "pipelines", "images", "manifests", "configs", "tests", "benchmarks",
                 "README.md", "pyproject.toml", "Makefile", ".ci/run", "BENCHMARKS.md"]:
        assert (REPO / name).exists(), name


def test_import_layers():
    """r1zero core imports neither kfp nor kubernetes; pipelines -> components -> r1zero."""
    out = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_ruff_clean():
    out = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "r1zero.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_top_level_help_lists_every_group():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("group", sorted(COMMANDS))
def test_group_help(group):
    out = _cli(group, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def test_unknown_command_is_one_line_exit_2():
    out = _cli("frobnicate")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
