"""The data artifact's row schema (shared contract) and the quarantine row schema.

Row: ``id: str, domain: str (math|code|cross|general), prompt: str, answer: str, solution: str,
difficulty: int, source: str, meta: str (JSON)``. Quarantine rows add ``reason``, ``detail``,
``split`` (where the row was headed: train|eval|import) and ``raw`` (the original line for
unparseable input, so nothing is lost).
"""

from __future__ import annotations

import json

import pyarrow as pa

DOMAINS = ("math", "code", "cross", "general")
VERIFIABLE = ("math", "code", "cross")
FIELDS = ("id", "domain", "prompt", "answer", "solution", "difficulty", "source", "meta")
QUARANTINE_FIELDS = (*FIELDS, "reason", "detail", "split", "raw")

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("domain", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
    ("solution", pa.string()), ("difficulty", pa.int64()), ("source", pa.string()), ("meta", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([*ROW_SCHEMA, ("reason", pa.string()), ("detail", pa.string()),
                               ("split", pa.string()), ("raw", pa.string())])


def dump_meta(meta: dict) -> str:
    """Canonical JSON for the ``meta`` column (sorted keys, no spaces: byte-stable)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def make_row(id: str, domain: str, prompt: str, answer: str = "", solution: str = "", difficulty: int = 1,
             source: str = "", meta: dict | str | None = None) -> dict:
    return {"id": id, "domain": domain, "prompt": prompt, "answer": answer, "solution": solution,
            "difficulty": int(difficulty), "source": source,
            "meta": meta if isinstance(meta, str) else dump_meta(meta or {})}


def quarantine_row(row: dict | None, reason: str, detail: str, split: str, raw: str = "") -> dict:
    base = dict(row) if row else make_row(id="", domain="", prompt="")
    base.update(reason=reason, detail=detail, split=split, raw=raw)
    return base
