"""Tests for r1zero.data.importers: the three formats and every bad-line reason."""

from __future__ import annotations

import json

import pytest

from r1zero.data.importers import iter_import, last_boxed
from r1zero.errors import UserError


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_gsm8k_rows_and_bad_lines(tmp_path):
    good = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    lines = [
        json.dumps(good).encode(),
        b"",  # blank: no data, skipped
        b'{"question": "q", "answer": "no final answer"}',
        b'{"question": "q"',  # bad JSON
        b'{"question": "caf\xe9", "answer": "#### 1"}',  # latin-1 byte: bad UTF-8
        b'{"answer": "#### 2"}',  # missing question
        b'{"question": 5, "answer": "#### 2"}',  # wrong type
        b'[1, 2]',  # not an object
        json.dumps({"question": "Big", "answer": "so #### 1,234"}).encode(),
    ]
    out = list(iter_import(_write(tmp_path / "gsm.jsonl", lines), "gsm8k", 0))
    kinds = [k for k, _ in out]
    assert kinds == ["row", "bad", "bad", "bad", "bad", "bad", "bad", "row"]
    row = out[0][1]
    assert row["answer"] == "7" and row["domain"] == "math" and "<<" not in row["solution"]
    assert row["id"] == "import0:gsm.jsonl:1" and row["source"] == "import:gsm8k:gsm.jsonl"
    assert out[-1][1]["answer"] == "1234"
    reasons = [r["reason"] for k, r in out if k == "bad"]
    assert reasons == ["unparseable_answer", "bad_json", "bad_utf8", "missing_field", "wrong_type", "wrong_type"]
    bad_utf8 = out[3][1]
    assert bad_utf8["raw"] == '{"question": "caf\\xe9", "answer": "#### 1"}' and bad_utf8["split"] == "import"
    assert "line 5" in bad_utf8["detail"]


def test_math_format_boxed_and_level(tmp_path):
    lines = [
        json.dumps({"problem": "Find x.", "solution": "So $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 4",
                    "type": "Algebra"}).encode(),
        json.dumps({"problem": "P", "solution": "no box"}).encode(),
    ]
    out = list(iter_import(_write(tmp_path / "m.jsonl", lines), "math"))
    assert out[0][1]["answer"] == "\\frac{1}{2}" and out[0][1]["difficulty"] == 4
    assert json.loads(out[0][1]["meta"]) == {"format": "math", "type": "Algebra"}
    assert out[1][0] == "bad" and out[1][1]["reason"] == "unparseable_answer"
    assert last_boxed("\\boxed{a} then \\boxed{{b}+c}") == "{b}+c"
    assert last_boxed("\\boxed{unclosed") is None


def test_generic_format(tmp_path):
    lines = [
        json.dumps({"prompt": "Convert 2 km to m.", "answer": 2000, "domain": "cross", "id": "u1"}).encode(),
        json.dumps({"prompt": "Some prose.", "domain": "general"}).encode(),
        json.dumps({"prompt": "x", "answer": "1", "domain": "poetry"}).encode(),
        json.dumps({"prompt": "x", "answer": "1"}).encode(),
        json.dumps({"prompt": "x", "answer": True, "domain": "math"}).encode(),
        json.dumps({"prompt": "x", "answer": "1", "domain": "math", "difficulty": "hard"}).encode(),
    ]
    out = list(iter_import(_write(tmp_path / "g.jsonl", lines), "generic", 3))
    assert out[0] == ("row", out[0][1]) and out[0][1]["answer"] == "2000" and out[0][1]["id"].endswith(":u1")
    assert out[1][0] == "row" and out[1][1]["answer"] == ""
    assert [r["reason"] for _, r in out[2:]] == ["bad_domain", "missing_field", "wrong_type", "wrong_type"]


def test_missing_file_and_unknown_format_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="import file not found"):
        list(iter_import(str(tmp_path / "nope.jsonl"), "gsm8k"))
    with pytest.raises(UserError, match="unknown import format"):
        list(iter_import(str(tmp_path / "nope.jsonl"), "csv"))
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(UserError, match="not found"):
        list(iter_import(str(d), "gsm8k"))
