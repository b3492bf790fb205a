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
from r1zero.sizing import interleaved_in_flight
from r1zero.sizing_cli import planner_layout_bytes
from r1zero.train.dryrun import check_layout, default_ranks, layout_problems

REPO = Path(__file__).resolve().parents[2]
A100 = str(REPO / "configs" / "a100-13b.yaml")
# The preset's former layout (tp 4, pp 2, dp 128, 8 micro-batches; its ep group of 8 x 4 ranks spans
# 4 nodes): the layout checks below that need tp, pp or a pipeline schedule start from it.
PP_LAYOUT = ["parallel.tp=4", "parallel.pp=2", "parallel.dp=128", "pretrain.grad_accum=8",
             "parallel.ep_across_nodes=true"]

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
def test_hsdp_shards_over_one_replica_and_agrees_with_the_planner(tmp_path):
    # dp 4 = 2 replicas x 2 shards: dense states shard over 2 ranks (not 4), experts over
    # edp = 4 / (2 replicas x ep 2) = 1: twice the dense and the expert states of plain FSDP2
    tree = {**SMALL, "parallel": {**SMALL["parallel"], "dp_replicate": 2}}
    cfg_path = _write(tmp_path, tree)
    proc = _cli("--config", cfg_path, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for r in out["ranks"]:
        assert r["params_bytes"] == 2 * _hand_count(r["pp_stage"])["params_bytes"], r
    planner = planner_layout_bytes(load_config(cfg_path))
    largest = max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in out["ranks"])
    assert planner["states"] == pytest.approx(largest, rel=0.10)


@pytest.mark.slow
def test_a100_13b_fits_with_headroom_and_agrees_with_the_planner():
    proc = _cli("--config", A100, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 1024 and out["fits"] is True
    # tp 1 pp 1 dp 1024: every rank has the same shape, so one rank stands for all
    assert [r["rank"] for r in out["ranks"]] == [0]
    # ep 8 x tp 1 = 8 consecutive ranks: the expert-parallel group is one node of 8
    assert (out["ep_group_nodes"], out["tp_group_nodes"]) == (1, 1)
    largest = max(out["ranks"], key=lambda r: r["total_bytes"])
    assert largest["total_bytes"] <= 0.9 * out["device_bytes"]
    states = max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in out["ranks"])
    assert out["planner_states_bytes"] == pytest.approx(states, rel=0.10)
    # FSDP2 shards every parameter over dp: far below the ~45 GB of experts the old engine held
    assert largest["params_bytes"] < 1e9


@pytest.mark.slow
def test_a100_13b_interleaved_1f1b_fits_and_agrees_with_the_planner():
    sets = [a for kv in [*PP_LAYOUT, "parallel.pp_schedule=interleaved_1f1b"] for a in ("--set", kv)]
    proc = _cli("--config", A100, *sets, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 1024 and out["fits"] is True
    # 32 layers in pp 2 x 2 virtual stages of 8: each rank holds two chunks, 16 layers
    assert [r["layers"] for r in out["ranks"]] == [16, 16]
    largest = max(out["ranks"], key=lambda r: r["total_bytes"])
    assert largest["total_bytes"] <= 0.9 * out["device_bytes"]
    states = max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in out["ranks"])
    assert out["planner_states_bytes"] == pytest.approx(states, rel=0.10)


def test_group_spans_count_nodes():
    from r1zero.train.parallel_dims import ParallelDims

    dims = ParallelDims(dp=128, tp=4, pp=2, ep=8, world_size=1024)
    assert (dims.group_nodes("ep", 8), dims.group_nodes("tp", 8)) == (4, 1)
    assert ParallelDims(dp=256, tp=4, pp=1, ep=2, world_size=1024).group_nodes("ep", 8) == 1
    assert ParallelDims(dp=64, tp=16, pp=1, ep=1, world_size=1024).group_nodes("tp", 8) == 2


def test_interleaved_in_flight_follows_the_schedule():
    # pp 2, v 2, 8 micro-batches: rank 0 warms up (2-1)*2 + 2*1 = 4 chunk forwards, holds 5 chunks
    # of half its layers = 2.5 micro-batches (Korthikanti et al. 2022: 2 * (1 + 1/4)); rank 1 holds 1.5
    assert interleaved_in_flight(0, 2, 2, 8) == 2.5
    assert interleaved_in_flight(1, 2, 2, 8) == 1.5
    # pp 4, v 2, 4 micro-batches: the warmup (4 + 6) reaches every chunk of every micro-batch
    assert interleaved_in_flight(0, 4, 2, 4) == 4.0
    # the schedule's own warmup count (torch.distributed.pipelining), over a grid of layouts
    from torch.distributed.pipelining.schedules import _get_warmup_ops

    for pp, v, m in [(2, 2, 2), (2, 2, 8), (2, 3, 6), (4, 2, 4), (4, 2, 12), (4, 4, 8), (8, 2, 16), (2, 2, 5)]:
        for rank in range(pp):
            want = min(_get_warmup_ops(rank, v, m // max(1, m // pp), pp, m) + 1, m * v) / v
            assert interleaved_in_flight(rank, pp, v, m) == want, (rank, pp, v, m)


@pytest.mark.parametrize("sets, phrase", [
    (["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=3"],
     "n_layers(32) not divisible by pp(2) * pp_virtual_stages(3)"),
    (["parallel.pp_virtual_stages=2"], "pp_virtual_stages(2) > 1 needs parallel.pp_schedule: interleaved_1f1b"),
    (["parallel.pp_schedule=interleaved_1f1b", "pretrain.grad_accum=1", "cluster.global_batch=128"],
     "grad_accum(1) must be >= pp(2)"),
    (["parallel.pp_schedule=interleaved_1f1b", "pretrain.grad_accum=5", "cluster.global_batch=640"],
     "grad_accum(5) must be a multiple of its 2 rounds"),
    (["parallel.pp_schedule=interleaved_1f1b", "parallel.pp=1", "parallel.dp=256", "cluster.global_batch=2048"],
     "interleaved_1f1b needs pp >= 2"),
    (["parallel.dp_replicate=32"], "dp_replicate(32) * ep(8) must divide dp(128)"),
    (["parallel.ep_across_nodes=false"], "an expert-parallel group (ep(8) x tp(4) = 32 ranks) spans 4 nodes of 8"),
])
def test_bad_interleaved_layouts_exit_2_in_one_line(capsys, sets, phrase):
    argv = ["plan", "--config", A100]
    for kv in [*PP_LAYOUT, *sets]:
        argv += ["--set", kv]
    rc = main([*argv, "--dry-run", "--json"])
    assert rc == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.count("\n") == 0 and phrase in err, err
    assert cap.out == ""


@pytest.mark.slow
def test_a_layout_that_does_not_fit_is_refused_in_one_line():
    # the 13B model on 4 GPUs of one node (dp 4, ZeRO-1-style: parameters stay gathered): ~80 GB
    proc = _cli("--config", A100, "--set", "cluster.nodes=1", "--set", "cluster.gpus_per_node=4",
                "--set", "parallel.dp=4", "--set", "parallel.tp=1", "--set", "parallel.pp=1", "--set", "parallel.ep=1",
                "--set", "cluster.global_batch=32", "--set", "pretrain.grad_accum=8", "--dry-run", "--json")
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
    argv = ["plan", "--config", A100]
    for kv in [*PP_LAYOUT, override]:
        argv += ["--set", kv]
    rc = main([*argv, "--dry-run", "--json"])
    assert rc == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.count("\n") == 0 and phrase in err, err
    assert cap.out == ""


def test_layout_checks_and_default_ranks():
    cfg = load_config(A100)
    assert layout_problems(cfg, 1024) == []
    check_layout(cfg, 1024)
    assert default_ranks(cfg, 1024) == [0]
    assert default_ranks(load_config(A100, PP_LAYOUT), 1024) == [0, 512]  # one rank per pipeline stage
    assert any("world size is 8" in p for p in layout_problems(cfg, 8))


def test_ranks_outside_the_world_and_unknown_stage_are_user_errors(capsys):
    assert main(["plan", "--config", A100, "--dry-run", "--ranks", "0,4096"]) == 2
    assert "outside the world of 1024" in capsys.readouterr().err
    assert main(["plan", "--config", A100, "--dry-run", "--ranks", "zero"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["plan", "--config", A100, "--dry-run", "--stage", "grpo", "--ranks", "1024"]) == 2
    assert "outside the world of 1024" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --stage grpo: the sharded update (r1zero.grpo.sharded)


def _grpo_hand_count(world: int, ep: int) -> tuple[int, int]:
    """(elements rank 0 holds, elements of the whole model) for SMALL under the GRPO layout:
    dp = world, tp = pp = 1; the rank keeps E/ep experts per layer; FSDP2 shards each parameter's
    dim 0 (torch.chunk: rank 0 gets ceil(d0/n) rows) over every rank, experts over edp = world/ep."""
    h, kv, V, E, F, L = 64, 32, 256, 4, 32, 4

    def rank0(shape, n):
        rows = min(-(-shape[0] // n), shape[0])
        rest = 1
        for d in shape[1:]:
            rest *= d
        return rows * rest

    dense = [(h, h), (kv, h), (kv, h), (h, h), (h,), (h,), (E, h)]  # q k v o, two norms, router gate
    expert = [(2 * F, h), (h, F)]  # w_gate_up.<e>, w_down.<e>
    ends = [(V, h), (h,), (V, h)]  # embedding, final norm, untied LM head
    mine = L * (sum(rank0(s, world) for s in dense) + (E // ep) * sum(rank0(s, world // ep) for s in expert))
    mine += sum(rank0(s, world) for s in ends)
    numel = lambda s: s[0] * (s[1] if len(s) > 1 else 1)  # noqa: E731
    whole = L * (sum(map(numel, dense)) + E * sum(map(numel, expert))) + sum(map(numel, ends))
    return mine, whole


def test_grpo_small_model_bytes_equal_a_hand_count(tmp_path):
    tree = {**SMALL, "grpo": {"beta": 0.01, "prompts_per_step": 16, "group_size": 4, "micro_batch": 2,
                              "max_new_tokens": 32}}
    proc = _cli("--config", _write(tmp_path, tree), "--stage", "grpo", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stage"] == "grpo" and out["world_size"] == 16 and [r["rank"] for r in out["ranks"]] == [0]
    r = out["ranks"][0]
    n, whole = _grpo_hand_count(16, 2)
    # fp32 master weights and gradients, AdamW's two moments; bf16 reference shards, no grads/optimizer
    assert (r["params_bytes"], r["grads_bytes"], r["optimizer_bytes"]) == (4 * n, 4 * n, 8 * n)
    assert 2 * n <= r["reference_bytes"] <= 2 * n + r["buffers_bytes"]
    assert r["unsharded_grads_bytes"] == 0 and r["layers"] == 4
    assert (r["micro_batch"], r["micro_batches"]) == (2, 2)  # 1 prompt x 4 completions per rank
    # the rollout engine: whole model in bf16, u x 80 GB, K and V of 4 layers x 2 kv-heads x 16
    assert r["rollout_weights_bytes"] == 2 * whole
    assert r["rollout_engine_bytes"] == int(0.5 * 80e9)
    assert r["kv_bytes_per_token"] == 2 * 4 * 2 * 16 * 2
    assert r["kv_cache_bytes"] == r["rollout_engine_bytes"] - r["rollout_weights_bytes"]
    resident = r["params_bytes"] + r["optimizer_bytes"] + r["buffers_bytes"] + r["reference_bytes"]
    assert r["rollout_bytes"] == resident + r["rollout_engine_bytes"]
    assert r["update_bytes"] == resident + r["grads_bytes"] + r["fsdp_buffers_bytes"] + r["activations_bytes"]
    assert r["total_bytes"] == max(r["update_bytes"], r["rollout_bytes"], r["reference_phase_bytes"])
    assert out["reference_gb"] == round(r["reference_bytes"] / 1e9, 3)


def test_a100_13b_grpo_stage_fits_in_80_gb():
    proc = _cli("--config", A100, "--stage", "grpo", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 1024 and out["fits"] is True and out["device_bytes"] == 80e9
    r = out["ranks"][0]
    assert r["total_bytes"] < 80e9 and r["total_bytes"] <= out["usable_bytes"], r
    # sharded over 1,024 ranks: the policy's states and the reference are small beside the engine
    assert r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] < 1e9
    assert out["reference_gb"] < 0.1 and r["reference_bytes"] > 0
    # the KV cache left by vLLM's share holds every local completion (16 at 4,096 positions)
    assert out["kv_cache_tokens"] >= out["kv_tokens_needed"] == 16 * 4096
    assert r["micro_batch"] == 4 and r["micro_batches"] == 4


@pytest.mark.parametrize("override, phrase", [
    ("grpo.max_new_tokens=4096", "grpo.max_new_tokens(4096) leaves 0 of model.max_seq_len(4096)"),
    ("grpo.prompts_per_step=1000", "grpo.prompts_per_step (1000) must be divisible by the GRPO world size"),
    ("parallel.ep=16", "n_experts(8) not divisible by ep(16)"),
    ("grpo.rollout.gpu_memory_utilization=0.2", "leaves no KV cache"),
])
def test_grpo_bad_input_exits_2_with_one_line(override, phrase):
    proc = _cli("--config", A100, "--stage", "grpo", "--set", override, "--dry-run", "--json")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and phrase in err and "Traceback" not in err, err
    assert proc.stdout.strip() == ""
