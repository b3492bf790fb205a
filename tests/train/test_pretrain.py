"""run_pretrain end to end on CPU (world=1, the FSDP2 engine): output layout, determinism, resume."""

from __future__ import annotations

import json

import pytest

from r1zero.train import pretrain as P


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["value"] for r in sorted((r for r in rows if r["name"] == "train/loss"), key=lambda r: r["step"])]


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory, make_config):
    out = tmp_path_factory.mktemp("base") / "out"
    summary = P.run_pretrain(make_config(), str(data_dir), str(out))
    return out, summary


def test_output_is_an_hf_model_dir_with_metrics_and_summary(baseline):
    out, summary = baseline
    from r1zero.model import load_causal_lm

    model, tok = load_causal_lm(str(out))
    assert tok.eos_token_id is not None and model.config.model_type == "r1zero_moe"
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 6 and s["engine"] == "fsdp2" and len(s["losses"]) == 6
    assert set(s["heldout_accuracy"]) == {"math", "code"}  # the fixture has no cross items
    assert s["losses"][-1] < s["losses"][0]  # it learns
    names = {json.loads(line)["name"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"train/loss", "train/lr", "train/grad_norm", "moe/L0/max_load_ratio", "moe/L1/router_entropy"} <= names
    assert (out / "checkpoints" / "step-00000006" / "MANIFEST.json").is_file()


def test_same_seed_same_losses(baseline, data_dir, tmp_path, make_config):
    out, summary = baseline
    again = P.run_pretrain(make_config(), str(data_dir), str(tmp_path / "again"))
    assert again["losses"] == summary["losses"]


def test_resume_after_interruption_reproduces_losses_exactly(baseline, data_dir, tmp_path, monkeypatch, make_config):
    out, summary = baseline
    cfg = make_config(pretrain={"checkpoint_every": 3})
    target = tmp_path / "resumed"
    from r1zero.train.engine import TrainEngine

    real = TrainEngine.train_step
    calls = {"n": 0}

    def crashing(self, micro):
        calls["n"] += 1
        if calls["n"] == 5:  # dies in step 5, after the step-3 checkpoint
            raise KeyboardInterrupt("simulated preemption")
        return real(self, micro)

    monkeypatch.setattr(TrainEngine, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        P.run_pretrain(cfg, str(data_dir), str(target))
    monkeypatch.setattr(TrainEngine, "train_step", real)
    resumed = P.run_pretrain(cfg, str(data_dir), str(target))
    assert resumed["start_step"] == 3 and len(resumed["losses"]) == 3
    assert _losses(target) == summary["losses"]  # bit-identical, not approximately


def test_bad_inputs_are_one_line_errors(data_dir, tmp_path, capsys):
    from r1zero.cli import main

    rc = main(["pretrain", "--set", "parallel.dp=2", "--data", str(data_dir), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "dp(2) * tp(1) * pp(1) = 2 but world size is 1" in err and "Traceback" not in err
    rc = main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_zero_stages_bf16_and_activation_checkpointing(data_dir, tmp_path, make_config):
    """World 1, 3 steps: ZeRO 1/2/3 and activation checkpointing give the ZeRO-0 losses exactly;
    bf16 trains (finite, within 1% of fp32 on the first steps)."""
    def run(name, pretrain=None, parallel=None):
        pre = {"steps": 3, "heldout_per_domain": 0, **(pretrain or {})}
        return P.run_pretrain(make_config(pretrain=pre, parallel=parallel or {}), str(data_dir),
                              str(tmp_path / name))["losses"]

    base = run("z0")
    for stage in (1, 2, 3):
        assert run(f"z{stage}", parallel={"zero_stage": stage}) == base, f"ZeRO-{stage}"
    assert run("ac", pretrain={"activation_checkpointing": True}) == base
    bf16 = run("bf16", pretrain={"precision": "bf16"})
    assert all(abs(a - b) / b < 1e-2 for a, b in zip(bf16, base)) and bf16 != base


def test_s3_output_checkpoints_and_resume(data_dir, s3_bucket, s3_server, monkeypatch, make_config):
    """Model dir published to S3, checkpoints on S3, and a crashed run resumes from S3."""
    from r1zero.model import load_causal_lm
    from r1zero.train.engine import TrainEngine

    cfg = make_config(pretrain={"steps": 4, "checkpoint_every": 2, "heldout_per_domain": 0})
    out = f"s3://{s3_bucket}/run/pretrain"
    real = TrainEngine.train_step
    calls = {"n": 0}

    def crashing(self, micro):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated preemption")
        return real(self, micro)

    monkeypatch.setattr(TrainEngine, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        P.run_pretrain(cfg, str(data_dir), out)
    monkeypatch.setattr(TrainEngine, "train_step", real)
    summary = P.run_pretrain(cfg, str(data_dir), out)
    assert summary["start_step"] == 2 and summary["steps"] == 4
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]}
    assert "run/pretrain/_SUCCESS" in keys and "run/pretrain/summary.json" in keys
    assert "run/pretrain/checkpoints/step-00000004/MANIFEST.json" in keys
    model, tok = load_causal_lm(out)
    assert model.config.model_type == "r1zero_moe" and tok.eos_token_id is not None


def test_time_budget_stops_early_and_still_publishes(data_dir, tmp_path, make_config):
    # telemetry on (ephemeral loopback port): the loop must run with the real exporter too
    cfg = make_config(pretrain={"steps": 50, "time_budget_s": 0.001, "heldout_per_domain": 1},
                      telemetry={"enabled": True, "port": 0, "bind": "127.0.0.1"})
    s = P.run_pretrain(cfg, str(data_dir), str(tmp_path / "o"))
    assert s["stopped_by_time_budget"] is True and s["steps"] == 1 and len(s["losses"]) == 1
    assert (tmp_path / "o" / "model.safetensors").is_file() and (tmp_path / "o" / "summary.json").is_file()
    assert set(s["heldout"]["n"].values()) == {1}
