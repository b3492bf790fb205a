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


def test_rollout_consistency_gaps_and_truncated_importance_weights():
    import math

    import torch

    from r1zero.grpo.metrics import rollout_consistency, unpack_rows

    mask_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rollout_BT = unpack_rows([[-1.0, -2.0, -0.5], [-0.1, -3.0]], mask_BT)
    assert rollout_BT[1, 2] == 0 and rollout_BT[0, 1] == -2.0
    train_BT = torch.tensor([[-1.0, -1.0, -0.5], [-0.2, -3.0, 7.0]])  # padding value must be ignored
    stats, w_BT = rollout_consistency(train_BT, rollout_BT, mask_BT, tis_cap=2.0)
    assert stats["n"] == 5 and math.isclose(stats["max"], 1.0) and math.isclose(stats["sum"], 1.1, rel_tol=1e-6)
    # ratio pi_train/pi_rollout = e^1 on token (0,1): truncated at 2; e^-0.1 on (1,0); 1 elsewhere; 0 at padding
    assert math.isclose(float(w_BT[0, 1]), 2.0) and math.isclose(float(w_BT[1, 0]), math.exp(-0.1), rel_tol=1e-6)
    assert float(w_BT[1, 2]) == 0.0 and stats["w_clipped"] == 1.0
    _, off_BT = rollout_consistency(train_BT, rollout_BT, mask_BT, tis_cap=0.0)
    assert torch.equal(off_BT, mask_BT.float())  # TIS off: weight 1 on every real token
