"""End-to-end GRPO runs on tiny policies: outputs, metrics, exact resume, PPO on the MoE policy, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from r1zero.cli import main
from r1zero.grpo.trainer import run_grpo

REQUIRED = ["grpo/reward/mean", "grpo/reward/std", "grpo/reward/accuracy/mean", "grpo/reward/format/mean",
            "grpo/accuracy", "grpo/format_rate", "grpo/frac_zero_std", "grpo/kl", "grpo/clip_frac/low",
            "grpo/clip_frac/high", "grpo/entropy", "grpo/completion_length/mean", "grpo/completion_length/max",
            "grpo/truncated_frac", "grpo/reflection_rate", "grpo/tokens_per_s", "eval/accuracy"]
TIMING = ("grpo/tokens_per_s", "grpo/generate_tokens_per_s", "grpo/step_seconds")


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(rows):
    return [(r["step"], r["name"], round(r["value"], 6)) for r in rows if r["name"] not in TIMING]


@pytest.mark.slow
def test_llama_run_outputs_and_exact_resume(grpo_env, tmp_path, make_cfg):
    tiny_cfg = make_cfg
    data, llama, _ = grpo_env
    cfg = tiny_cfg("grpo.beta=0.02", "grpo.mu=2", "grpo.reward.overlong=true", "grpo.reward.overlong_buffer=8")
    full = tmp_path / "full"
    summary = run_grpo(cfg, str(llama), str(data), str(full))
    assert summary["steps"] == 3 and summary["nan_skipped"] == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "samples.jsonl",
                 "summary.json"):
        assert (full / name).is_file(), name
    rows = _metrics(full / "metrics.jsonl")
    names = {r["name"] for r in rows}
    assert set(REQUIRED) <= names
    assert all(math.isfinite(r["value"]) for r in rows)
    assert sorted({r["step"] for r in rows if r["name"] == "eval/accuracy"}) == [0, 2, 3]
    assert {r["step"] for r in rows if r["name"] == "grpo/reward/mean"} == {1, 2, 3}
    kl = [r["value"] for r in rows if r["name"] == "grpo/kl"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and max(kl) > 0  # policy drifts from the reference
    assert "grpo/reward/overlong/mean" in names
    samples = [json.loads(x) for x in (full / "samples.jsonl").read_text().splitlines()]
    assert samples and {"completion", "reward", "correct", "formatted"} <= set(samples[0])
    base = load_file(str(llama / "model.safetensors"))
    tuned = load_file(str(full / "model.safetensors"))
    assert any(not torch.equal(base[k], tuned[k]) for k in base), "the update changed nothing"

    # crash after step 2 (checkpoint) then resume to step 3: identical weights and metrics
    part = tmp_path / "part"
    run_grpo(tiny_cfg("grpo.beta=0.02", "grpo.mu=2", "grpo.reward.overlong=true", "grpo.reward.overlong_buffer=8",
                      "grpo.steps=2"), str(llama), str(data), str(part))
    assert (part / "checkpoints" / "step-00000002").is_dir()
    resumed = run_grpo(cfg, str(llama), str(data), str(part))
    assert resumed["steps"] == 3
    again = load_file(str(part / "model.safetensors"))
    for k in tuned:
        assert torch.equal(tuned[k], again[k]), k
    assert _untimed(_metrics(part / "metrics.jsonl")) == _untimed(rows)


@pytest.mark.slow
def test_moe_policy_with_ppo_and_dynamic_sampling(grpo_env, tmp_path, make_cfg):
    tiny_cfg = make_cfg
    data, _, moe = grpo_env
    s = run_grpo(tiny_cfg("grpo.algorithm=ppo", "grpo.steps=2", "grpo.eval_problems=0"), str(moe), str(data),
                 str(tmp_path / "ppo"))
    rows = _metrics(tmp_path / "ppo" / "metrics.jsonl")
    vl = [r["value"] for r in rows if r["name"] == "grpo/value_loss"]
    assert len(vl) == 2 and all(math.isfinite(v) for v in vl) and s["algorithm"] == "ppo"
    s = run_grpo(tiny_cfg("grpo.algorithm=rloo", "grpo.steps=1", "grpo.eval_problems=0", "grpo.dynamic_sampling=true",
                          "grpo.max_refills=2", "grpo.adaptive.enabled=true"), str(moe), str(data),
                 str(tmp_path / "rloo"))
    rows = {r["name"]: r["value"] for r in _metrics(tmp_path / "rloo" / "metrics.jsonl")}
    # dynamic sampling: every kept group has unequal rewards unless the refills ran out
    assert rows["grpo/refills"] <= 2
    assert rows["grpo/n_completions"] >= 4


def test_cli_bad_inputs_exit_2(tmp_path, capsys, grpo_env):
    data, llama, _ = grpo_env
    rc = main(["grpo", "--policy", str(tmp_path / "missing"), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing" in err
    rc = main(["grpo", "--set", "grpo.group_size=1", "--set", "telemetry.enabled=false", "--policy", str(llama),
               "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "group_size" in err
    rc = main(["grpo", "--set", "grpo.algorithm=dpo", "--policy", str(llama), "--data", str(data),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "algorithm" in capsys.readouterr().err


@pytest.mark.slow
def test_spectral_grouping_three_level_and_batch_advantages(grpo_env, tmp_path, make_cfg):
    data, llama, _ = grpo_env
    cfg = make_cfg("grpo.steps=2", "grpo.eval_problems=0", "grpo.grouping.enabled=true", "grpo.grouping.k=3",
                   "grpo.grouping.recluster_every=1", "grpo.grouping.spread_threshold=0.0",
                   "grpo.reward.three_level=true", "grpo.reward.level_weights=[1.0,0.5,0.5]",
                   "grpo.advantage=batch", "grpo.loss_agg=sequence")
    s = run_grpo(cfg, str(llama), str(data), str(tmp_path / "g"))
    assert s["steps"] == 2
    rows = _metrics(tmp_path / "g" / "metrics.jsonl")
    names = {r["name"] for r in rows}
    assert {"grpo/groups/n", "grpo/group/0/pass_rate", "grpo/groups/spread", "grpo/reward/three_level/mean",
            "grpo/reward/base/mean"} <= names
    n_groups = [r["value"] for r in rows if r["name"] == "grpo/groups/n"]
    assert n_groups[0] == 3 and all(2 <= n <= 6 for n in n_groups)
    assert all(math.isfinite(r["value"]) for r in rows)


def test_step_metrics_over_all_sampled_groups_with_kept_series():
    from r1zero.config import load_config
    from r1zero.grpo.metrics import keyword_pattern, step_metrics

    def pop(correct, lengths, texts):
        return {"total": [float(c) for c in correct], "terms": {"accuracy": [float(c) for c in correct]},
                "correct": correct, "formatted": [True] * len(correct), "lengths": lengths,
                "truncated": [False] * len(correct), "reflect": ["wait" in t for t in texts]}

    # 3 groups of 2 sampled: two all-wrong (dropped by dynamic sampling), one mixed (kept)
    sampled = pop([False, False, False, False, True, False], [4, 4, 2, 2, 6, 8], ["a", "b", "c", "d", "wait", "e"])
    kept = pop([True, False], [6, 8], ["wait", "e"])
    summary = {"sampled": sampled, "kept": kept, "zero_std": [True, True, False], "gen_seconds": 1.0,
               "dropped_groups": 2, "refills": 0}
    upd = {"kl_sum": 0.0, "tokens": 14.0, "clip_low": 0.0, "clip_high": 0.0, "entropy_sum": 1.0, "loss": 0.1,
           "grad_norm": 1.0, "skipped": 0}
    cfg = load_config(None, [])
    m = step_metrics(cfg, [summary], upd, 2.0, keyword_pattern(["wait"]))
    assert abs(m["grpo/accuracy"] - 1 / 6) < 1e-9 and m["grpo/kept/accuracy"] == 0.5  # kept: biased to 0.5
    assert abs(m["grpo/completion_length/mean"] - 26 / 6) < 1e-9 and m["grpo/kept/completion_length/mean"] == 7.0
    assert abs(m["grpo/reflection_rate"] - 1 / 6) < 1e-9 and m["grpo/kept/reflection_rate"] == 0.5
    assert m["grpo/n_sampled"] == 6 and m["grpo/n_completions"] == 2 and m["grpo/tokens_per_s"] == 13.0


def test_trainer_named_parts_make_one_train_step(grpo_env, tmp_path, make_cfg):
    """GRPOTrainer's parts called one by one give what train_step gives, and train_step moves the
    policy, the step counter and the prompt stream (one step, no eval)."""
    from r1zero.grpo.trainer import GRPOTrainer
    from r1zero.grpo.update import build_batch

    data, llama, _ = grpo_env
    cfg = make_cfg("grpo.beta=0.02", "grpo.eval_problems=0")
    trainer = GRPOTrainer(cfg, str(llama), str(data), tmp_path, str(tmp_path / "checkpoints"))
    try:
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        m, roll, upd = trainer.train_step()
        assert trainer.st.step == 1 and roll.n_groups == cfg.grpo.prompts_per_step
        assert m["grpo/n_sampled"] == len(roll.completion_ids) and m["grpo/loss"] == upd["loss"]
        assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        # the parts by hand on the next step's rollout: scores, advantages and batch agree in shape
        roll2, info = trainer.rollout()
        batch = build_batch(roll2.prompt_ids, roll2.completion_ids, trainer.tok.pad_token_id)
        old_logp, ref_logp, old_v = trainer.score(roll2, batch)
        assert old_logp is None and old_v is None and ref_logp.shape == batch.mask_BT.shape  # mu=1, beta>0
        adv, ret, _ = trainer.advantages(roll2, batch, info, old_logp, old_v)
        assert adv.shape == (len(roll2.completion_ids),) and ret is None
    finally:
        trainer.close()
