"""Per-step GRPO metrics: reflection keywords, length stats, the JSONL writer.

Reflection rate = fraction of completions whose text contains at least one keyword of the
configured vocabulary (``grpo.reflection_keywords``; default mixes DeepSeek-R1's expert list,
Nature Extended Data Fig. 1, with the oat-zero / understand-r1-zero lists). Matching is
case-insensitive on word boundaries, so "waiting" does not count as "wait" but "re-evaluate" and
"try again" match as phrases.

:class:`MetricsWriter` appends ``{"step", "name", "value"}`` lines (the project-wide metrics
format) and can truncate a file back to a step on resume, so a resumed run's JSONL equals an
uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path


def keyword_pattern(keywords: Iterable[str]) -> re.Pattern:
    """One regex matching any keyword as a whole word/phrase (case-insensitive)."""
    alts = sorted({k.strip().lower() for k in keywords if k.strip()}, key=len, reverse=True)
    if not alts:
        return re.compile(r"(?!x)x")  # matches nothing
    body = "|".join(r"\s+".join(re.escape(w) for w in k.split()) for k in alts)
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)


def reflection_flags(texts: Sequence[str], pattern: re.Pattern) -> list[bool]:
    return [pattern.search(t) is not None for t in texts]


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def std(xs: Sequence[float]) -> float:
    """Population std (what TRL/verl log for reward std)."""
    if not xs:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


class MetricsWriter:
    """Append-only metrics JSONL with resume truncation."""

    def __init__(self, path: str | Path, run: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = run

    def truncate_after(self, step: int) -> None:
        """Drop lines with ``step > step`` (resume from a checkpoint taken at ``step``)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip() and json.loads(line)["step"] <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for name, value in values.items():
                rec = {"step": int(step), "name": name, "value": float(value)}
                if self.run:
                    rec["run"] = self.run
                f.write(json.dumps(rec) + "\n")
