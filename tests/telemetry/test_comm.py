"""CommTimer: every collective counted once under real gloo ranks; accuracy vs torch.profiler."""

from __future__ import annotations

import json
import statistics

import pytest
import torch.distributed as dist

from r1zero.telemetry.comm import OPS, PURPOSES, CommTimer, host_time, purpose_of


def test_interval_union_counts_overlap_once():
    t = CommTimer()
    t.add_interval("all_reduce", 0.0, 1.0)
    t.add_interval("all_reduce", 0.5, 1.5)  # overlaps the first by 0.5 s
    t.add_interval("all_gather", 1.2, 1.4)  # entirely inside what is already counted
    t.add_interval("broadcast", 3.0, 3.25)
    snap = t.snapshot()
    assert snap["all_reduce"] == (pytest.approx(1.5), 2)
    assert snap["all_gather"] == (0.0, 1)
    assert snap["broadcast"] == (pytest.approx(0.25), 1)
    assert t.total_seconds() == pytest.approx(1.75)
    assert set(snap) == set(OPS)


def test_seconds_between_charges_only_ops_ending_in_the_window():
    t = CommTimer()
    t.add_interval("barrier", 0.0, 0.5)  # e.g. a checkpoint barrier between steps
    t.add_interval("all_reduce", 1.2, 1.5)
    t.add_interval("all_reduce", 1.6, 1.7)
    assert t.seconds_between(1.0, 2.0) == pytest.approx(0.4)
    assert t.seconds_between(1.55, 2.0) == pytest.approx(0.1)  # older records are dropped
    assert t.total_seconds() == pytest.approx(0.9)  # the counters keep everything


def test_install_uninstall_restores_functions():
    orig = dist.all_reduce, dist.all_to_all_single, dist.Work.wait
    t = CommTimer().install()
    assert dist.all_reduce is not orig[0] and dist.all_reduce.__r1zero_timed__ is orig[0]
    assert dist.distributed_c10d.all_reduce is dist.all_reduce
    t.install()  # idempotent
    second = CommTimer().install()  # a second timer does not wrap the wrappers
    assert dist.all_reduce.__r1zero_timed__ is orig[0]
    second.uninstall()
    t.uninstall()
    assert (dist.all_reduce, dist.all_to_all_single, dist.Work.wait) == orig
    assert dist.distributed_c10d.all_reduce is orig[0]


@pytest.mark.slow
def test_every_collective_counted_once(tmp_path, torchrun):
    torchrun("ops", tmp_path)
    for rank in (0, 1):
        d = json.loads((tmp_path / f"ops-{rank}.json").read_text())
        calls = {op: n for op, (_, n) in d["snap"].items()}
        # all_reduce: sync + async + DeepSpeed's (forwarded to torch: once); all_gather: list,
        # into_tensor, and all_gather_object (which calls all_gather twice inside: counted once)
        expected = {"all_reduce": 3, "all_gather": 3, "reduce_scatter": 1, "all_to_all": 1, "broadcast": 1,
                    "barrier": 1, "send": 2 if rank == 0 else 0, "recv": 0 if rank == 0 else 2}
        assert {op: n for op, n in calls.items() if n} == {op: n for op, n in expected.items() if n}, calls
        assert all(s > 0 for s, n in d["snap"].values() if n)
        assert d["restored"] and d["after"] == d["snap"]  # nothing counted after uninstall


@pytest.mark.slow
def test_comm_ratio_matches_injected_delay_and_profiler(tmp_path, torchrun):
    """Rank 0 computes C s, rank 1 C + D s, then all-reduce: rank 0 spends ~D s per step in it."""
    torchrun("delay", tmp_path)
    d = json.loads((tmp_path / "delay-0.json").read_text())
    steps = d["step_s"]
    exported = sum(r * s for r, s in zip(d["ratios"], steps, strict=True)) / sum(steps)  # time-weighted
    profiler = d["profiler_comm_s"] / sum(steps)
    # truth from the design: D / (C + D); the collective's own cost is small on loopback
    truth = d["delay_s"] / (d["compute_s"] + d["delay_s"])
    print(f"exported {exported:.3f}  profiler {profiler:.3f}  design {truth:.3f}")
    assert abs(exported - profiler) / profiler < 0.20
    assert abs(statistics.median(d["ratios"]) - truth) / truth < 0.20
    # rank 1 arrives last and barely waits: its ratio is far below rank 0's
    d1 = json.loads((tmp_path / "delay-1.json").read_text())
    assert statistics.median(d1["ratios"]) < 0.5 * statistics.median(d["ratios"])


def test_purpose_of_each_group_kind():
    assert purpose_of("fsdp", "all_gather") == "fsdp_all_gather"
    assert purpose_of("fsdp", "reduce_scatter") == "fsdp_reduce_scatter"
    assert purpose_of("tp", "all_reduce") == "tp" == purpose_of("tp", "all_gather")
    assert purpose_of("pipeline", "send_recv") == "pipeline_send_recv" == purpose_of("pipeline", "recv")
    assert purpose_of("expert", "all_to_all") == "expert_all_to_all"
    assert purpose_of("weight_sync", "broadcast") == "grpo_weight_sync"
    assert purpose_of(None, "all_reduce") == "other" == purpose_of("fsdp", "all_reduce")
    assert set(PURPOSES) >= {"fsdp_all_gather", "fsdp_reduce_scatter", "tp", "pipeline_send_recv",
                             "expert_all_to_all", "grpo_weight_sync", "other"}
    with pytest.raises(ValueError, match="unknown group kind"):
        CommTimer().name_group(object(), "data")


def test_cuda_events_land_in_the_window_the_gpu_ran_them():
    """Event times map onto the host clock from a reference event (t_ref + elapsed): an op the GPU
    finished during step 1 is charged to step 1's window even when resolved during step 2."""
    t_ref = 100.0
    assert host_time(t_ref, 250.0) == pytest.approx(100.25)
    t = CommTimer()
    # resolved late (at t = 102), but ran 100.2-100.5 and 100.4-100.6 on two streams: union 0.4 s
    for t0_ms, t1_ms in ((200.0, 500.0), (400.0, 600.0)):
        t.add_interval("all_gather", host_time(t_ref, t0_ms), host_time(t_ref, t1_ms), "fsdp_all_gather", 10)
    assert t.seconds_between(100.0, 101.0) == pytest.approx(0.4)  # step 1's window
    assert t.seconds_between(101.0, 102.0) == 0.0  # nothing leaks into step 2
    assert t.purposes()["fsdp_all_gather"] == (pytest.approx(0.4), 2, 20)


@pytest.mark.slow
def test_fsdp_tp_pipeline_and_expert_traffic_is_labelled(tmp_path, torchrun):
    torchrun("purposes", tmp_path)
    for rank in (0, 1):
        d = json.loads((tmp_path / f"purposes-{rank}.json").read_text())
        fsdp, snap = d["fsdp_only"], d["all"]
        # FSDP2 step: the root unit's all-gather in forward, reduce-scatter of its gradients in backward
        assert fsdp["fsdp_all_gather"][1] >= 1 and fsdp["fsdp_reduce_scatter"][1] >= 1
        full = (16 * 32 + 32 + 32 * 16 + 16) * 4  # the unsharded parameters, fp32
        assert fsdp["fsdp_all_gather"][2] == full and fsdp["fsdp_reduce_scatter"][2] == full
        assert fsdp["tp"][1] == 0
        assert snap["tp"][1] >= 1 and snap["tp"][2] > 0  # DTensor's functional all-reduce
        assert snap["pipeline_send_recv"][1] == 1 and snap["pipeline_send_recv"][2] == 64 * 4
        assert snap["expert_all_to_all"][1] == 1 and snap["expert_all_to_all"][2] == 8 * 4
        assert snap["other"][1] >= 1
        assert all(s >= 0 for s, _, _ in snap.values())
