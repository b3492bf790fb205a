"""Tests for r1zero.data.shards: rotation, round trips in both formats, byte determinism."""

from __future__ import annotations

import pytest

from r1zero.data.schema import ROW_SCHEMA, make_row
from r1zero.data.shards import ShardWriter, iter_rows, read_rows
from r1zero.errors import UserError


def _rows(n):
    return [make_row(id=f"r{i}", domain="math", prompt=f"What is {i} + 1?", answer=str(i + 1), solution="ü ok",
                     difficulty=1 + i % 3, source="t", meta={"i": i}) for i in range(n)]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz"])
def test_rotation_and_round_trip(tmp_path, fmt):
    w = ShardWriter(tmp_path, "train", ROW_SCHEMA, shard_rows=7, fmt=fmt)
    rows = _rows(20)
    for r in rows:
        w.write(r)
    files = w.close()
    assert [n for _, n in files] == [7, 7, 6]
    assert [f for f, _ in files] == [f"train/part-0000{i}.{fmt}" for i in range(3)]
    assert read_rows(tmp_path, "train") == rows
    assert list(iter_rows(str(tmp_path), "train"))[5] == rows[5]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz"])
def test_same_rows_same_bytes(tmp_path, fmt):
    outs = []
    for name in ("a", "b"):
        w = ShardWriter(tmp_path / name, "eval", ROW_SCHEMA, shard_rows=100, fmt=fmt)
        for r in _rows(30):
            w.write(r)
        w.close()
        outs.append((tmp_path / name / "eval" / f"part-00000.{fmt}").read_bytes())
    assert outs[0] == outs[1]


def test_bad_split_and_missing_artifact(tmp_path):
    with pytest.raises(UserError, match="unknown split"):
        list(iter_rows(tmp_path, "test"))
    with pytest.raises(UserError, match="artifact not found"):
        list(iter_rows(tmp_path / "missing", "train"))
    with pytest.raises(UserError, match="no train/ directory"):
        list(iter_rows(tmp_path, "train"))
