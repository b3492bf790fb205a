"""Reflection keyword matching and the metrics JSONL writer."""

from __future__ import annotations

import json

from r1zero.config import GRPOConfig
from r1zero.grpo.metrics import MetricsWriter, keyword_pattern, reflection_flags, std


def test_reflection_keywords_whole_words_and_phrases():
    pat = keyword_pattern(GRPOConfig().reflection_keywords)
    texts = ["Wait, that is wrong", "waiting for nothing", "let me re-evaluate this", "I should try   again",
             "no reflection here", "HOWEVER it works", "reevaluate"]
    assert reflection_flags(texts, pat) == [True, False, True, True, False, True, False]
    assert reflection_flags(["wait"], keyword_pattern([])) == [False]


def test_metrics_writer_truncates_on_resume(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl", run="r")
    for s in range(1, 5):
        w.write(s, {"grpo/reward/mean": s / 10})
    w.truncate_after(2)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == {"step": 1, "name": "grpo/reward/mean", "value": 0.1,
                                                                "run": "r"}
    assert std([1.0, 3.0]) == 1.0
