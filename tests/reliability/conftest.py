"""Fixtures for the reliability tests: ``tiny_data``, a data artifact made by the real data stage
(``r1zero data mix``) at a size that takes a few seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from relutil import TINY_DATA, TINY_POLICY, run_cli  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A real data artifact from ``r1zero data mix`` (tiny sizes)."""
    out = tmp_path_factory.mktemp("tinydata") / "data"
    res = run_cli("data", "mix", "--config", "configs/tiny.yaml", *TINY_DATA, "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def tiny_policy(tiny_data, tmp_path_factory) -> Path:
    """A real r1zero MoE model dir from ``r1zero pretrain`` (20 steps, world of one, checkpoints 10/15/20)."""
    out = tmp_path_factory.mktemp("tinypolicy") / "pretrain"
    res = run_cli("pretrain", "--config", "configs/tiny.yaml", *TINY_POLICY, "--data", tiny_data, "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    return out
