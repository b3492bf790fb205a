"""CommTimer: every collective counted once under real gloo ranks; accuracy vs torch.profiler."""

from __future__ import annotations

import json
import statistics

import pytest
import torch.distributed as dist

from r1zero.telemetry.comm import OPS, CommTimer


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
