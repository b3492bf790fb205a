"""The sharded GRPO update with vLLM rollouts holds no full copy of the policy
(``grpo.update_engine: fsdp2`` + ``grpo.rollout.engine: vllm``, colocated): the engine starts from
the policy checkpoint and takes the new weights from the shards one tensor at a time after every
update; evaluation runs on the engine; the export is streamed from the shards. Run for real in
the vLLM environment (tests/grpo/vllm_sharded_checks.py), as tests/grpo/test_vllm_rollout.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.grpo.conftest import warm_start

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
CHECKS = Path(__file__).with_name("vllm_sharded_checks.py")
TOL = 1e-4  # fp32 log-probs, the vLLM tests' bound


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM environment's interpreter, built with ``make vllm-env`` when missing (never skipped)."""
    if not (VENV / ".installed").exists():
        subprocess.run(["make", "vllm-env"], cwd=ROOT, check=True)
    return VENV / "bin" / "python"


@pytest.fixture(scope="module")
def moe32(grpo_env, tmp_path_factory) -> Path:
    """r1zero's MoE with attention heads of 32 (vLLM's CPU kernels), a few warm-start steps, saved
    as its standard checkpoint (the policy dir the engine starts from)."""
    from r1zero.config import load_config
    from r1zero.data.shards import read_rows
    from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM, load_causal_lm

    data, _, moe_dir = grpo_env
    _, tok = load_causal_lm(moe_dir)
    mcfg = load_config(None, [f"model.vocab_size={len(tok)}", "model.d_model=64", "model.n_layers=2",
                              "model.n_heads=2", "model.moe.n_experts=4", "model.moe.top_k=2",
                              "model.moe.d_expert=64"]).model
    torch.manual_seed(0)
    model = R1ZeroForCausalLM(R1ZeroConfig.from_model_config(mcfg, eos_token_id=tok.eos_token_id,
                                                             pad_token_id=tok.pad_token_id))
    warm_start(model, tok, [r for r in read_rows(data, "train") if r["domain"] != "general"], 10)
    out = tmp_path_factory.mktemp("moe32") / "policy"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_fsdp2_with_vllm_rollouts_holds_no_full_policy(vllm_python, moe32, grpo_env, tmp_path):
    data = grpo_env[0]
    out = tmp_path / "checks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT), "R1ZERO_PROGRESS": "0"}
    proc = subprocess.run([str(vllm_python), str(CHECKS), str(moe32), str(data), str(tmp_path / "run"), str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # no full-size policy module: the trainer's model is dropped, and the only r1zero models alive
    # are the sharded policy and reference
    assert r["model_is_none"] and r["r1zero_modules"]
    s = r["summary"]
    assert s["steps"] == 3 and s["rollout_engine"] == "vllm"
    assert s["eval_start"]["eval/n"] == 8 and "eval/accuracy" in s["eval_end"]  # greedy eval on vLLM
    # every step: vLLM's sampled-token log-probs equal the sharded policy's (pushed after each update)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    diffs = {x["step"]: x["value"] for x in rows if x["name"] == "grpo/rollout_logp_diff/max"}
    assert set(diffs) == {1, 2, 3} and max(diffs.values()) < TOL, diffs
    assert r["gap_after_fit"] < TOL
    # control: a step without the push leaves vLLM measurably stale; the push brings it back
    assert r["gap_stale"] > 100 * TOL, r["gap_stale"]
    assert r["gap_after_push"] < TOL
    # the streamed export holds exactly the shards' tensors (fp32), and stock transformers loads it
    # (a stock class, no missing or unexpected weights) with the sharded policy's log-probs
    assert r["export_missing"] == [] and r["export_max_diff"] == 0.0 and r["export_tensors"] > 20
    assert r["stock_class"].startswith("transformers.models."), r["stock_class"]
    assert r["stock_missing"] == [] and r["stock_vs_shards_max"] < TOL, r
    from safetensors.torch import load_file

    base = load_file(str(moe32 / "model.safetensors"))
    tuned = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert max(float((tuned[k] - base[k]).abs().max()) for k in base) > 1e-3  # the steps moved the weights


@pytest.mark.slow
def test_world2_fsdp2_ep2_with_vllm_rollouts(vllm_python, moe32, grpo_env, tmp_path):
    """``torchrun --nproc-per-node 2 -m r1zero.cli grpo`` with fsdp2, ``parallel.ep=2`` (2 of the 4
    experts per rank) and a colocated vLLM engine per rank: after the update each engine takes
    every tensor, the other rank's experts broadcast from their owner (step 2's rollout log-probs
    equal the shards'); rank 0's streamed export holds all 4 experts of every layer, those of both
    ranks moved by the update; the run exits cleanly (no traceback from the engines' shutdown)."""
    from safetensors.torch import load_file

    from r1zero.train.dist import free_port

    data, out = grpo_env[0], tmp_path / "run"
    sets = ["grpo.steps=2", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=24", "grpo.lr=1e-2",
            "grpo.eval_every=2", "grpo.eval_problems=8", "telemetry.enabled=false", "grpo.beta=0.02",
            "grpo.reward.overlong=true", "grpo.reward.overlong_buffer=16", "grpo.update_engine=fsdp2",
            "grpo.micro_batch=3", "grpo.rollout.engine=vllm", "parallel.ep=2", "model.moe.n_experts=4"]
    cmd = [str(vllm_python), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "r1zero.cli", "grpo", "--policy", str(moe32), "--data", str(data),
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "R1ZERO_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    diffs = {x["step"]: x["value"] for x in rows if x["name"] == "grpo/rollout_logp_diff/max"}
    assert set(diffs) == {1, 2} and max(diffs.values()) < TOL, diffs
    base = load_file(str(moe32 / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    assert set(tuned) == set(base)
    experts = [k for k in base if ".experts." in k]
    assert {k.split(".experts.")[1].split(".")[0] for k in experts} == {"0", "1", "2", "3"}
    moved = {k.split(".experts.")[1].split(".")[0] for k in experts if float((tuned[k] - base[k]).abs().max()) > 0}
    # experts stepped on both EP ranks (an expert no token was routed to keeps its weights)
    assert moved & {"0", "1"} and moved & {"2", "3"}, moved



@pytest.mark.slow
def test_fsdp2_with_a_spawned_vllm_rollout_server(vllm_python, moe32, grpo_env, tmp_path):
    """Server mode under fsdp2 (``r1zero grpo``, world 1): the spawned server starts from the
    policy dir and takes the shards' tensors as one payload after each update: the rollout
    log-probs equal the shards' at both steps; the export is written."""
    data, out = grpo_env[0], tmp_path / "run"
    sets = ["grpo.steps=2", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=24", "grpo.lr=1e-2",
            "grpo.eval_every=2", "grpo.eval_problems=8", "telemetry.enabled=false", "grpo.beta=0.02",
            "grpo.reward.overlong=true", "grpo.reward.overlong_buffer=16", "grpo.update_engine=fsdp2",
            "grpo.micro_batch=3", "grpo.rollout.engine=vllm", "grpo.rollout.mode=server"]
    cmd = [str(vllm_python), "-m", "r1zero.cli", "grpo", "--policy", str(moe32), "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT), "R1ZERO_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    diffs = {x["step"]: x["value"] for x in rows if x["name"] == "grpo/rollout_logp_diff/max"}
    assert set(diffs) == {1, 2} and max(diffs.values()) < TOL, diffs
    assert (out / "model.safetensors").is_file() and json.loads((out / "summary.json").read_text())["steps"] == 2
