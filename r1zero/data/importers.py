"""Importers for user data in JSONL, from a local file or ``s3://`` (``data.imports`` in the config).

Formats:
- ``gsm8k``: ``{"question", "answer"}`` where ``answer`` is the worked solution ending ``#### N``
  (GSM8K, Cobbe et al. 2021); calculator annotations ``<<...>>`` are stripped from the solution.
- ``math``: ``{"problem", "solution"}`` with the final answer in the last ``\\boxed{...}``
  (MATH, Hendrycks et al. 2021); ``level`` ("Level 3") becomes the difficulty.
- ``generic``: ``{"prompt", "answer", "domain"}`` plus optional ``solution``, ``difficulty``,
  ``id``; ``domain`` is one of math|code|cross|general (general rows may have answer "").

Every line is accounted for: a good line yields ``("row", row)``; a bad one yields
``("bad", quarantine_row)`` with reason ``bad_utf8``, ``bad_json``, ``wrong_type``,
``missing_field``, ``bad_domain`` or ``unparseable_answer`` and the raw line kept. Blank lines carry
no data and are skipped. Files are streamed line by line (S3 via the object body's line iterator).
A missing or unreadable file is a :class:`UserError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from r1zero import store
from r1zero.data.schema import DOMAINS, make_row, quarantine_row
from r1zero.errors import UserError

_CALC_RE = re.compile(r"<<[^<>]*>>")


def source_name(uri: str) -> str:
    """A short, path-free name for an import (its file name)."""
    return PurePosixPath(str(uri).rstrip("/")).name or "import"


def _iter_lines(uri: str) -> Iterator[bytes]:
    if store.is_s3(uri):
        bucket, key = store.split_s3(uri)
        body = store._with_retries(lambda: store.s3_client().get_object(Bucket=bucket, Key=key)["Body"],
                                   f"read import {uri}")
        # iter_lines drops the line terminators; empty lines come back as b"".
        yield from body.iter_lines(chunk_size=1 << 16, keepends=False)
        return
    path = store.local_path(uri)
    if not path.is_file():
        raise UserError(f"import file not found: {uri}")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, generator
    except OSError as err:
        raise UserError(f"import file {uri} unreadable: {err.strerror}") from None
    with f:
        for line in f:
            yield line.rstrip(b"\r\n")


def check_import(uri: str) -> None:
    """Raise :class:`UserError` unless ``uri`` names a readable file / existing S3 object."""
    if store.is_s3(uri):
        bucket, key = store.split_s3(uri)
        # missing object, bad credentials or an unreachable endpoint: one-line UserError (with retries)
        store._with_retries(lambda: store.s3_client().head_object(Bucket=bucket, Key=key), f"import {uri}")
        return
    path = store.local_path(uri)
    if not path.is_file():
        raise UserError(f"import file not found: {uri}")
    if not os.access(path, os.R_OK):
        raise UserError(f"import file {uri} unreadable: permission denied")


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (brace-matched), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _field(obj: dict, name: str, types=(str,), required: bool = True):
    if name not in obj or obj[name] is None:
        if required:
            raise _Bad("missing_field", f"missing field {name!r}")
        return None
    if not isinstance(obj[name], types) or isinstance(obj[name], bool):
        raise _Bad("wrong_type", f"field {name!r} is {type(obj[name]).__name__}, expected {'/'.join(t.__name__ for t in types)}")
    return obj[name]


def _parse_gsm8k(obj: dict) -> dict:
    q, a = _field(obj, "question"), _field(obj, "answer")
    if "####" not in a:
        raise _Bad("unparseable_answer", "answer has no '#### N' final answer")
    sol, _, final = a.rpartition("####")
    final = final.strip().replace(",", "")
    if not final:
        raise _Bad("unparseable_answer", "empty final answer after '####'")
    return {"domain": "math", "prompt": q.strip(), "answer": final,
            "solution": " ".join(_CALC_RE.sub("", sol).split()), "difficulty": 2, "meta": {"format": "gsm8k"}}


def _parse_math(obj: dict) -> dict:
    p, s = _field(obj, "problem"), _field(obj, "solution")
    ans = last_boxed(s)
    if not ans:
        raise _Bad("unparseable_answer", "solution has no \\boxed{...} answer")
    level = _field(obj, "level", required=False)
    m = re.search(r"\d+", level or "")
    meta = {"format": "math"}
    if isinstance(obj.get("type"), str):
        meta["type"] = obj["type"]
    return {"domain": "math", "prompt": p.strip(), "answer": ans, "solution": s.strip(),
            "difficulty": int(m.group(0)) if m else 3, "meta": meta}


def _parse_generic(obj: dict) -> dict:
    prompt = _field(obj, "prompt")
    domain = _field(obj, "domain")
    if domain not in DOMAINS:
        raise _Bad("bad_domain", f"domain {domain!r} not in {DOMAINS}")
    answer = _field(obj, "answer", (str, int, float), required=domain != "general")
    solution = _field(obj, "solution", required=False) or ""
    difficulty = _field(obj, "difficulty", (int,), required=False) or 1
    return {"domain": domain, "prompt": prompt.strip(), "answer": "" if answer is None else str(answer).strip(),
            "solution": solution.strip(), "difficulty": difficulty, "meta": {"format": "generic"},
            "id": _field(obj, "id", (str, int), required=False)}


_PARSERS = {"gsm8k": _parse_gsm8k, "math": _parse_math, "generic": _parse_generic}


def iter_import(uri: str, fmt: str, index: int = 0, source: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``("row", row)`` or ``("bad", quarantine_row)`` for every non-blank line of ``uri``.

    ``source`` (default ``import<index>``) prefixes row ids, e.g. ``bench:gsm8k`` for a benchmark.
    """
    if fmt not in _PARSERS:
        raise UserError(f"unknown import format {fmt!r} (one of {', '.join(_PARSERS)})")
    name = source_name(uri)
    prefix = source or f"import{index}"
    source = f"{source}:{fmt}:{name}" if source else f"import:{fmt}:{name}"
    for lineno, raw in enumerate(_iter_lines(uri), start=1):
        if not raw.strip():
            continue
        rid = f"{prefix}:{name}:{lineno}"
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _Bad("bad_utf8", f"line {lineno}: invalid UTF-8 at byte {err.start}") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise _Bad("bad_json", f"line {lineno}: {err.msg} at column {err.colno}") from None
            if not isinstance(obj, dict):
                raise _Bad("wrong_type", f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
            parsed = _PARSERS[fmt](obj)
        except _Bad as bad:
            detail = bad.detail if bad.detail.startswith("line ") else f"line {lineno}: {bad.detail}"
            row = make_row(id=rid, domain="", prompt="", source=source)
            yield "bad", quarantine_row(row, bad.reason, detail, "import", raw.decode("utf-8", "backslashreplace"))
            continue
        user_id = parsed.pop("id", None)
        yield "row", make_row(id=f"{rid}:{user_id}" if user_id is not None else rid, source=source, **parsed)


def check_format(uri: str, fmt: str, what: str) -> None:
    """Raise :class:`UserError` unless some line of ``uri`` parses as ``fmt`` (stops at the first that does).

    For files that must be usable as a whole (named benchmarks): a file in the wrong format fails
    before any work, instead of being quarantined line by line.
    """
    first_bad = None
    for kind, row in iter_import(uri, fmt):
        if kind == "row":
            return
        first_bad = first_bad or f"{row['reason']}: {row['detail']}"
    raise UserError(f"{what}: {source_name(uri)} has no row in {fmt} format"
                    + (f" ({first_bad})" if first_bad else " (empty file)"))

