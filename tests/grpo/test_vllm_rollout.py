"""vLLM as GRPO's rollout engine, run for real in the vLLM environment (``.venv-vllm``, built by
``make vllm-env`` when missing; vLLM's CPU build needs transformers<5.20, the project pins 5.24).

The vLLM side runs in ``.venv-vllm/bin/python`` (tests/grpo/vllm_checks.py and ``r1zero grpo``);
these tests build the policy and data here and assert on what comes back. vLLM's CPU attention
supports head sizes 32..512, so the policy has 2 heads of 32 (the shared GRPO fixtures' Llama has
head size 16, which is the engine-start failure case below).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
CHECKS = Path(__file__).with_name("vllm_checks.py")
SMALL = ["--set", "grpo.steps=3", "--set", "grpo.prompts_per_step=4", "--set", "grpo.group_size=4",
         "--set", "grpo.max_new_tokens=24", "--set", "grpo.lr=1e-3", "--set", "grpo.eval_every=2",
         "--set", "grpo.eval_problems=8", "--set", "grpo.checkpoint_every=2", "--set", "telemetry.enabled=false",
         "--set", "grpo.rollout.engine=vllm"]


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM environment's interpreter, built with ``make vllm-env`` when missing (never skipped)."""
    if not (VENV / ".installed").exists():
        subprocess.run(["make", "vllm-env"], cwd=ROOT, check=True)
    return VENV / "bin" / "python"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def vllm_policy(grpo_env, tmp_path_factory) -> Path:
    """A Llama with head size 32, warm-started on template-formatted solutions (a few SFT steps)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from r1zero.data.schema import ROW_SCHEMA  # noqa: F401 - the data package is importable
    from r1zero.data.shards import read_rows
    from r1zero.model import load_causal_lm
    from r1zero.template import render_completion, render_prompt

    data, llama_dir, _ = grpo_env
    _, tok = load_causal_lm(llama_dir)
    rows = list(read_rows(data, "train"))
    rows = [r for r in rows if r["domain"] != "general"]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    texts = [render_prompt(r["prompt"]) + " " + render_completion(" ".join(r["solution"].split()[:4]), r["answer"])
             + tok.eos_token for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(60):
        enc = tok(rng.sample(texts, 8), return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("vllm_policy") / "llama32"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _checks(python: Path, what: str, policy: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{what}.json"
    proc = subprocess.run([str(python), str(CHECKS), what, str(policy), str(out)], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_vllm_engine_matches_native_sampler_and_transformers(vllm_python, vllm_policy, tmp_path):
    r = _checks(vllm_python, "engine", vllm_policy, tmp_path)
    g = r["greedy"]
    # greedy: identical tokens from vLLM, r1zero's sampler and transformers generate()
    assert g["vllm"] == g["native"] == g["hf"]
    assert g["vllm_truncated"] == g["native_truncated"]
    assert r["seeded_repeat_equal"]  # seeded sampling (temperature 1, top-p 0.9) repeats exactly
    # seeded prompts whose prefill exceeds one engine step (the tiny preset's GRPO step crashed)
    assert r["big_prefill_tokens"] > 4096 and r["big_seeded_completions"] == 128
    # sampled-token log-probs, fp32: vLLM vs r1zero's forward and vs stock transformers
    assert r["logprobs_start"]["vllm_vs_trainer_max"] < 1e-4 and r["logprobs_start"]["vllm_vs_hf_max"] < 1e-4
    # the policy moved: vLLM is stale until the in-place push, then matches again
    assert r["logprobs_stale"]["vllm_vs_trainer_max"] > 1e-2
    assert r["logprobs_updated"]["vllm_vs_trainer_max"] < 1e-4 and r["greedy_updated_equal"]


@pytest.mark.slow
def test_vllm_server_weight_push_and_hung_server(vllm_python, vllm_policy, tmp_path):
    r = _checks(vllm_python, "server", vllm_policy, tmp_path)
    print(f"server push figures: {json.dumps(r)}")
    assert r["server_gaps"]["vllm_vs_trainer_max"] < 1e-4
    # the push (in 32 KiB buckets) moves the server from the stale weights to the trainer's
    assert r["server_gaps_stale"]["vllm_vs_trainer_max"] > 1e-2
    assert r["push_buckets"] >= 4
    assert r["server_gaps_after_push"]["vllm_vs_trainer_max"] < 1e-4
    # between a push's first bucket and its commit, and after a push that broke off: no sampling
    assert r["partial_push_answer"] == "ok"
    assert "half-pushed" in r["sample_mid_push"] and "half-pushed" in r["sample_after_broken_push"]
    assert r["server_gaps_after_repush"]["vllm_vs_trainer_max"] < 1e-4
    # a server stopped mid-push: one clear error after push_timeout_s (5 s) on a bucket, no hang
    assert "weight push timed out after 5 s (grpo.rollout.push_timeout_s), at bucket " in r["hung_push"], r["hung_push"]
    assert r["hung_push_s"] < 20 and r["server_killed"]


def _grpo(python: Path, policy: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "r1zero.cli", "grpo", *SMALL, *extra, "--policy", str(policy),
                           "--data", str(data), "--out", str(out)], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_grpo_with_vllm_rollouts_follows_the_policy(vllm_python, vllm_policy, grpo_env, tmp_path):
    data = grpo_env[0]
    out = tmp_path / "run"
    proc = _grpo(vllm_python, vllm_policy, data, out, "--set", "grpo.rollout.tis_cap=2.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["rollout_engine"] == "vllm"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["name"], {})[r["step"]] = r["value"]
    # rollout log-probs follow the policy at every step (weights pushed after each update)
    assert set(by["grpo/rollout_logp_diff/max"]) == {1, 2, 3}
    assert max(by["grpo/rollout_logp_diff/max"].values()) < 1e-3
    assert all(0.99 < w < 1.01 for w in by["grpo/tis/weight_mean"].values())
    assert {"grpo/accuracy", "grpo/kept/accuracy", "grpo/kept/reward/mean", "grpo/n_sampled"} <= set(by)
    base = load_file(str(vllm_policy / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    changed = [k for k in base if k in tuned and not torch.equal(base[k], tuned[k])]
    assert changed, "the update changed nothing"


@pytest.mark.slow
def test_world2_ranks_share_one_rollout_server(vllm_python, vllm_policy, grpo_env, tmp_path):
    """torchrun, 2 ranks, ``ranks_per_server=2``: rank 0 spawns the one server and pushes (in small
    buckets), rank 1 connects to the same server and samples only after the push committed."""
    from r1zero.train.dist import free_port

    data, out = grpo_env[0], tmp_path / "run"
    sets = [*SMALL, "--set", "grpo.steps=2", "--set", "grpo.rollout.mode=server", "--set",
            "grpo.rollout.ranks_per_server=2", "--set", "grpo.rollout.push_bucket_mb=0.0625"]
    cmd = [str(vllm_python), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "r1zero.cli", "grpo", *sets, "--policy", str(vllm_policy),
           "--data", str(data), "--out", str(out)]
    env = {**_env(), "OMP_NUM_THREADS": "1", "R1ZERO_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "vLLM rollout server" in x and "(ranks 0-1;" in x]
    addresses = {x.split("vLLM rollout server ")[1].split(" ")[0] for x in lines}
    assert len(lines) == 2 and len(addresses) == 1, proc.stderr[-3000:]  # both ranks, one server
    assert any("rank 0:" in x and "pushes" in x for x in lines) and any("rank 1:" in x and "waits" in x for x in lines)
    # the two ranks' sample requests went into shared engine calls (vLLM batches their rows)
    [stats] = [x for x in proc.stderr.splitlines() if "sample requests in" in x]
    requests, calls = int(stats.split(": ")[-1].split()[0]), int(stats.split(" in ")[-1].split()[0])
    print(stats)
    assert requests >= 4 and calls < requests, stats
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    diffs = {r["step"]: r["value"] for r in rows if r["name"] == "grpo/rollout_logp_diff/max"}
    # both ranks' rollouts (gathered) follow the policy at every step: the one push reached them
    assert set(diffs) == {1, 2} and max(diffs.values()) < 1e-3, diffs


@pytest.mark.slow
def test_vllm_engine_that_fails_to_start_exits_2(vllm_python, grpo_env, tmp_path):
    data, llama16, _ = grpo_env  # head size 16: vLLM's CPU attention refuses it at the first step
    out = tmp_path / "bad"
    proc = _grpo(vllm_python, llama16, data, out)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("r1zero: error: vLLM engine failed to start"), lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def test_push_buckets_hold_a_bounded_share_of_the_tensors_in_order():
    from r1zero.grpo.rollout_server import buckets

    named = [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 5, 1, 40])]
    out = list(buckets(iter(named), 80))  # 80 bytes = 20 floats; a bigger tensor is a bucket of its own
    assert [[k for k, _ in b] for b in out] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"], ["t6"]]
    assert [k for b in out for k, _ in b] == [k for k, _ in named]
    assert list(buckets(iter([]), 80)) == []


def test_vllm_engine_outside_the_vllm_environment_exits_2(grpo_env, tmp_path, capsys):
    from r1zero.cli import main

    data, llama, _ = grpo_env
    rc = main(["grpo", "--set", "grpo.rollout.engine=vllm", "--set", "telemetry.enabled=false", "--policy",
               str(llama), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "vLLM environment" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written
