"""How `r1zero run` / `r1zero pipeline` reach pipelines/: entry points, not names in the core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_groups_come_from_entry_points():
    from r1zero.cli import COMMANDS, CORE_GROUPS, plugin_groups

    plugins = plugin_groups()
    assert set(plugins) == {"run", "pipeline"} and not set(plugins) & set(CORE_GROUPS)
    assert set(COMMANDS) == set(CORE_GROUPS) | {"run", "pipeline"}
    # the core never names the layer above it (import-linter checks imports; this checks strings)
    text = (REPO / "r1zero" / "cli.py").read_text()
    assert "pipelines." not in text and "import pipelines" not in text


def test_config_show_imports_neither_torch_nor_kfp():
    code = ("import sys; from r1zero.cli import main; rc = main(['config', 'show', '--config', 'configs/tiny.yaml']);"
            "print('HEAVY', sorted(m for m in ('torch', 'kfp', 'kubernetes', 'deepspeed') if m in sys.modules), rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HEAVY [] 0"


def test_run_and_pipeline_help_through_the_core_entry():
    for group in ("run", "pipeline"):
        out = subprocess.run([sys.executable, "-m", "r1zero.cli", group, "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and "usage: r1zero " + group in out.stdout, out.stderr[-2000:]
