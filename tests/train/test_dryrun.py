"""Full-scale dry run (``r1zero plan --dry-run``): bytes per rank under the fake process group.

The small model's bytes are checked against a count by hand from its shapes and the engine's
layout rules; the a100-13b preset against its 80 GB budget and the planner; bad layouts against
the one-line exit-2 contract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1zero.cli import main
from r1zero.config import load_config
from r1zero.sizing_cli import planner_layout_bytes
from r1zero.train.dryrun import check_layout, default_ranks, layout_problems

REPO = Path(__file__).resolve().parents[2]
A100 = str(REPO / "configs" / "a100-13b.yaml")

# 16 ranks: pp 2 x edp 2 x ep 2 x tp 2. d_model 64, 4 heads of 16 (2 kv-heads), 4 layers, 4 experts
# of width 32, untied 256-token vocabulary.
SMALL = {
    "name": "dryrun-small",
    "model": {"vocab_size": 256, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
              "tie_embeddings": False, "moe": {"n_experts": 4, "top_k": 2, "d_expert": 32}},
    "parallel": {"dp": 4, "tp": 2, "pp": 2, "ep": 2, "zero_stage": 1},
    "pretrain": {"seq_len": 64, "micro_batch": 2, "grad_accum": 2, "precision": "bf16",
                 "activation_checkpointing": True},
    "cluster": {"gpu": "a100-80gb", "nodes": 2, "gpus_per_node": 8, "procs_per_node": 8, "global_batch": 16},
}


def _write(tmp_path, tree) -> str:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return str(path)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1zero.cli", "plan", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "R1ZERO_PROGRESS": "0"}, check=False)


def _hand_count(stage: int) -> dict[str, int]:
    """Elements this rank holds, from the shapes and the engine's rules (r1zero.train.parallelize):
    attention weights split over tp=2; norms and the router replicated over tp; routed experts
    split over ep=2 (2 of 4 per rank) and replicated over tp; embedding / LM head split over tp
    by vocabulary; then every unit FSDP2-sharded: dense over dp=4, experts over edp=2."""
    h, kv, V, E, F = 64, 32, 256, 4, 32
    attn = (h * h + h * kv + h * kv + h * h) // 2  # q, k, v, o over tp
    dense_layer = attn + 2 * h + h * E  # + attn_norm, ffn_norm, router gate (replicated)
    experts_layer = (E // 2) * (2 * F * h + h * F)  # w_gate_up (2F x h) and w_down (h x F)
    layers = 2 * (dense_layer // 4 + experts_layer // 2)
    ends = (V * h // 2) // 4 if stage == 0 else (V * h // 2) // 4 + h // 4  # embed | lm_head + final norm
    n = layers + ends
    # FSDP2 gathers bf16 copies (tp-local shapes): stages keep them between forward and backward
    # (zero_stage 1, and any pipeline stage): all units of the stage.
    unsharded = 2 * (dense_layer + experts_layer) + (V * h // 2 if stage == 0 else V * h // 2 + h)
    # grad_accum 2: FSDP2 keeps every unit's unsharded gradient in fp32 until the last micro-batch
    return {"params_bytes": 4 * n, "grads_bytes": 4 * n, "optimizer_bytes": 8 * n,
            "fsdp_buffers_bytes": 2 * unsharded, "unsharded_grads_bytes": 4 * unsharded}


@pytest.mark.slow
def test_small_model_bytes_equal_a_hand_count(tmp_path):
    cfg_path = _write(tmp_path, SMALL)
    proc = _cli("--config", cfg_path, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 16 and [r["rank"] for r in out["ranks"]] == [0, 8]  # one rank per pp stage
    for r in out["ranks"]:
        want = _hand_count(r["pp_stage"])
        got = {k: r[k] for k in want}
        assert got == want, (r["rank"], got, want)
        assert r["layers"] == 2
        assert r["total_bytes"] == sum(r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes",
                                                      "fsdp_buffers_bytes", "unsharded_grads_bytes",
                                                      "activations_bytes"))
    cfg = load_config(cfg_path)
    planner = planner_layout_bytes(cfg)
    largest = max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in out["ranks"])
    assert planner["states"] == pytest.approx(largest, rel=0.10)


@pytest.mark.slow
def test_a100_13b_fits_with_headroom_and_agrees_with_the_planner():
    proc = _cli("--config", A100, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 1024 and out["fits"] is True
    assert [r["rank"] for r in out["ranks"]] == [0, 512]
    largest = max(out["ranks"], key=lambda r: r["total_bytes"])
    assert largest["total_bytes"] <= 0.9 * out["device_bytes"]
    states = max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in out["ranks"])
    assert out["planner_states_bytes"] == pytest.approx(states, rel=0.10)
    # FSDP2 shards every parameter over dp: far below the ~45 GB of experts the old engine held
    assert largest["params_bytes"] < 1e9


@pytest.mark.slow
def test_a_layout_that_does_not_fit_is_refused_in_one_line():
    # the 13B model on 4 GPUs of one node (dp 4, ZeRO-1-style: parameters stay gathered): ~80 GB
    proc = _cli("--config", A100, "--set", "cluster.nodes=1", "--set", "cluster.gpus_per_node=4",
                "--set", "parallel.dp=4", "--set", "parallel.tp=1", "--set", "parallel.pp=1", "--set", "parallel.ep=1",
                "--set", "cluster.global_batch=32", "--dry-run", "--json")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "does not fit" in err and "Traceback" not in err
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("override, phrase", [
    ("parallel.tp=3", "n_heads(32) not divisible by tp(3)"),
    ("model.n_kv_heads=2", "n_kv_heads(2) not divisible by tp(4)"),
    ("parallel.ep=16", "n_experts(8) not divisible by ep(16)"),
    ("model.n_layers=33", "n_layers(33) not divisible by pp(2)"),
    ("cluster.global_batch=1000", "cluster.global_batch(1000) != pretrain.micro_batch(1)"),
    ("cluster.nodes=64", "but world size is 512"),
])
def test_bad_layouts_exit_2_with_one_line_naming_the_constraint(capsys, override, phrase):
    rc = main(["plan", "--config", A100, "--set", override, "--dry-run", "--json"])
    assert rc == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.count("\n") == 0 and phrase in err, err
    assert cap.out == ""


def test_layout_checks_and_default_ranks():
    cfg = load_config(A100)
    assert layout_problems(cfg, 1024) == []
    check_layout(cfg, 1024)
    assert default_ranks(cfg, 1024) == [0, 512]
    assert any("world size is 8" in p for p in layout_problems(cfg, 8))


def test_ranks_outside_the_world_and_unknown_stage_are_user_errors(capsys):
    assert main(["plan", "--config", A100, "--dry-run", "--ranks", "0,4096"]) == 2
    assert "outside the world of 1024" in capsys.readouterr().err
    assert main(["plan", "--config", A100, "--dry-run", "--ranks", "zero"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["plan", "--config", A100, "--dry-run", "--stage", "grpo"]) == 2
    assert "issue 16" in capsys.readouterr().err
