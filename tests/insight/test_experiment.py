"""Tests for the aha experiment harness with injected fake stages (the real ones take minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from r1zero.errors import UserError
from r1zero.insight.detect import run_detect
from r1zero.insight.experiment import (
    Stages,
    convergence_step,
    markdown_table,
    parse_sweep,
    run_experiment,
    variants,
)
from r1zero.insight.synthetic import logistic


class FakePipeline:
    """Stage doubles: GRPO runs jump at step 40 except seed 4; PPO runs never jump."""

    def __init__(self):
        self.calls = {"mix": [], "pretrain": [], "rl": [], "eval": []}

    def mix(self, cfg, out):
        self.calls["mix"].append((cfg.seed, cfg.data.mix.math))
        Path(out).mkdir(parents=True)
        (Path(out) / "manifest.json").write_text("{}")

    def pretrain(self, cfg, data, out):
        self.calls["pretrain"].append((cfg.seed, data))
        Path(out).mkdir(parents=True)

    def rl(self, cfg, policy, data, out):
        self.calls["rl"].append((cfg.seed, cfg.grpo.algorithm, policy))
        rng = np.random.default_rng(cfg.seed)
        t = np.arange(100, dtype=float)
        aha = cfg.grpo.algorithm == "grpo" and cfg.seed != 4
        acc = 0.2 + (0.4 * logistic(t, 40, 2) if aha else 0.2 * t / 100) + 0.02 * rng.normal(size=t.size)
        refl = 0.05 + (0.2 * logistic(t, 42, 4) if aha else 0) + 0.01 * rng.normal(size=t.size)
        rows = [{"step": int(s), "name": n, "value": float(v)} for n, ys in
                (("grpo/accuracy", acc), ("grpo/reflection_rate", refl)) for s, v in zip(t, ys)]
        Path(out).mkdir(parents=True)
        (Path(out) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def evaluate(self, cfg, model, data, out, baseline_uri=None, curves=None):
        self.calls["eval"].append((model, baseline_uri, curves))
        return {"accuracy": 0.6 if cfg.grpo.algorithm == "grpo" else 0.3}

    def stages(self):
        return Stages(mix=self.mix, pretrain=self.pretrain, rl=self.rl, evaluate=self.evaluate,
                      detect=lambda m, o, c: run_detect(m, o, c, plots=False))


def test_experiment_counts_aha_per_variant_and_shares_the_base(tmp_path):
    fake = FakePipeline()
    res = run_experiment(None, ["seed=0"], 5, parse_sweep(["grpo.algorithm=grpo,ppo"]), str(tmp_path),
                         stages=fake.stages())
    grpo, ppo = res["variants"]["grpo.algorithm=grpo"], res["variants"]["grpo.algorithm=ppo"]
    assert grpo["events"]["aha"]["runs_with_event"] == 4 and grpo["events"]["aha"]["n_runs"] == 5
    assert grpo["events"]["aha"]["step"]["mean"] == pytest.approx(40, abs=2)
    assert ppo["events"]["aha"]["runs_with_event"] == 0 and ppo["events"]["jump"]["runs_with_event"] == 0
    assert grpo["final_accuracy"]["mean"] == pytest.approx(0.6) and ppo["final_accuracy"]["mean"] == pytest.approx(0.3)
    assert grpo["convergence_step"]["mean"] < ppo["convergence_step"]["mean"]
    # data and base model built once (RL-only sweep, seed scope "rl"); RL + eval run 10 times
    assert len(fake.calls["mix"]) == 1 and len(fake.calls["pretrain"]) == 1 and len(fake.calls["rl"]) == 10
    assert sorted({s for s, _, _ in fake.calls["rl"]}) == [0, 1, 2, 3, 4]
    assert all(b == fake.calls["rl"][0][2] for _, b, _ in fake.calls["eval"])  # baseline = the shared base
    for name in ("experiment.json", "experiment.md", "experiment.png", "events.json", "metrics_all.jsonl"):
        assert (tmp_path / name).is_file()
    md = (tmp_path / "experiment.md").read_text()
    assert "| grpo.algorithm=grpo | 5 | 4/5 |" in md and "| grpo.algorithm=ppo | 5 | 0/5 |" in md
    rows = [json.loads(x) for x in (tmp_path / "metrics_all.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {f"grpo.algorithm={a}/seed{s}" for a in ("grpo", "ppo") for s in range(5)}


MIXES = "data.mix={math: 0.3, code: 0.25, cross: 0.15, general: 0.3}|{math: 0.45, code: 0.25, cross: 0.15, general: 0.15}"


def test_mixture_sweep_rebuilds_data_per_variant_and_per_seed_with_scope_all(tmp_path):
    fake = FakePipeline()
    run_experiment(None, [], 2, parse_sweep([MIXES]), str(tmp_path / "rl"), stages=fake.stages())
    assert sorted(m for _, m in fake.calls["mix"]) == [0.3, 0.45] and len(fake.calls["pretrain"]) == 2
    fake = FakePipeline()
    run_experiment(None, [], 2, parse_sweep([MIXES]), str(tmp_path / "all"), stages=fake.stages(), seed_scope="all")
    assert sorted(fake.calls["mix"]) == [(0, 0.3), (0, 0.45), (1, 0.3), (1, 0.45)]
    assert len(fake.calls["pretrain"]) == 4
    with pytest.raises(UserError, match="sum to 1"):  # an invalid variant is a one-line user error
        run_experiment(None, [], 1, parse_sweep(["data.mix.math=0.5"]), str(tmp_path / "bad"), stages=fake.stages())


def test_sweep_parsing_and_variants():
    assert parse_sweep(["a.b=1,2", "c=x"]) == {"a.b": ["1", "2"], "c": ["x"]}
    assert variants({"a": ["1", "2"], "b": ["x", "y"]}) == [{"a": "1", "b": "x"}, {"a": "1", "b": "y"},
                                                          {"a": "2", "b": "x"}, {"a": "2", "b": "y"}]
    assert variants({}) == [{}]
    for bad in (["nokey"], ["a="], ["a=1", "a=2"]):
        with pytest.raises(UserError):
            parse_sweep(bad)
    with pytest.raises(UserError):
        run_experiment(None, [], 0, {}, "unused")


def test_convergence_step_and_table():
    t = np.arange(100, dtype=float)
    assert convergence_step(t, logistic(t, 30, 4)) == pytest.approx(31, abs=2)
    assert convergence_step(t, 1 - t / 100) is None
    noise = 0.3 + 0.02 * np.random.default_rng(0).normal(size=t.size)
    assert convergence_step(t, noise) is None  # no real rise: not converged
    agg = {"v": {"n_runs": 2, "events": {k: {"runs_with_event": 1, "n_runs": 2, "step": None}
                                         for k in ("jump", "reflection", "length_growth", "aha", "knee")},
                 "convergence_step": None, "not_converged": 2, "final_accuracy": {"mean": 0.5, "std": 0.1}}}
    assert "| v | 2 | 1/2 | 1/2 | 1/2 | 1/2 | - | - (0/2 runs) | 0.500 ± 0.100 |" in markdown_table(agg)
