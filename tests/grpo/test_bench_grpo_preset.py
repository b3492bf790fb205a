"""Smoke run of benchmarks/bench_grpo_preset.py on the test MoE policy: every piece runs on a
ragged sampled batch (the update's length buckets have padding to skip)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_grpo_preset_smoke_json(grpo_env):
    data, _, moe_dir = grpo_env
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_grpo_preset.py"), "--policy", str(moe_dir),
           "--data", str(data), "--repeats", "1", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"sample_native_tokens_per_s", "sample_routed_tokens_per_s",
                           "sample_dynamic_cache_tokens_per_s", "update_shared_prompt_ms", "update_generic_ms"}
    assert all(v > 0 for v in result.values())
    setup = lines[0]
    assert "padding)" in setup and "(0% padding)" not in setup, setup  # a ragged batch was measured


@pytest.mark.slow
def test_bench_grpo_against_trl_on_an_r1zero_moe_policy(grpo_env):
    """bench_grpo.py --policy: TRL's GRPOTrainer trains r1zero's MoE checkpoint like any transformers
    causal LM (its fused LM-head path calls the backbone, which returns ``last_hidden_state``), and
    both sides report throughput."""
    data, _, moe_dir = grpo_env
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_grpo.py"), "--policy", str(moe_dir), "--data", str(data),
           "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8", "--steps", "3", "--repeats", "1", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result[k] > 0 for k in ("r1zero_tokens_per_s", "trl_tokens_per_s", "r1zero_generate_tokens_per_s",
                                       "hf_generate_tokens_per_s"))
    assert "policy " + str(moe_dir) in proc.stdout
