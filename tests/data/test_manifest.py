"""Tests for r1zero.data.manifest: the accounting check and loading."""

from __future__ import annotations

import json

import pytest

from r1zero.data.manifest import check_accounting, load_manifest, write_manifest
from r1zero.errors import UserError


def test_accounting_invariant():
    good = {"rows_in": 10, "rows_kept": 7, "rows_quarantined": {"duplicate_exact": 2, "bad_json": 1}}
    check_accounting(good)
    with pytest.raises(AssertionError, match="rows_in 11"):
        check_accounting(dict(good, rows_in=11))


def test_write_is_sorted_and_stable_and_load_round_trips(tmp_path):
    m = {"b": 1, "a": {"y": 2, "x": 1}}
    write_manifest(tmp_path, m)
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(m, indent=2, sort_keys=True) + "\n" and text.index('"a"') < text.index('"b"')
    assert load_manifest(str(tmp_path)) == m
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        load_manifest(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="artifact not found"):
        load_manifest(str(tmp_path / "missing"))
