"""Tests for r1zero.data.schema: canonical meta JSON and quarantine rows."""

from __future__ import annotations

from r1zero.data.schema import (
    FIELDS,
    QUARANTINE_FIELDS,
    QUARANTINE_SCHEMA,
    ROW_SCHEMA,
    dump_meta,
    make_row,
    quarantine_row,
)


def test_schemas_match_the_contract():
    assert tuple(ROW_SCHEMA.names) == FIELDS == ("id", "domain", "prompt", "answer", "solution", "difficulty",
                                                  "source", "meta")
    assert tuple(QUARANTINE_SCHEMA.names) == QUARANTINE_FIELDS


def test_meta_is_canonical_json_and_rows_are_typed():
    assert dump_meta({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
    row = make_row(id="x", domain="math", prompt="p", difficulty="3", meta={"k": 1})
    assert row["difficulty"] == 3 and row["meta"] == '{"k":1}' and set(row) == set(FIELDS)
    q = quarantine_row(None, "bad_json", "line 3: ...", "import", raw="{oops")
    assert set(q) == set(QUARANTINE_FIELDS) and q["raw"] == "{oops" and q["prompt"] == ""
