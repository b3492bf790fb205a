"""The one home of the collectives (r1zero.train.dist): a tensor on the wrong device for its
backend is caught before it reaches the backend, and the training code has no other home."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from r1zero.train import dist as rdist

REPO = Path(__file__).resolve().parents[2]
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list",
               "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all",
               "all_to_all_single", "send", "recv", "barrier", "gather", "scatter"}


@pytest.fixture
def fake2():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def test_backend_device_map():
    assert rdist._BACKEND_DEVICE == {"nccl": "cuda", "gloo": "cpu"}


def test_planted_cpu_tensor_is_caught(fake2):
    """The fake backend stands in for NCCL with the meta device standing in for CUDA: every
    helper takes a meta tensor, and a planted CPU tensor fails with one clear line."""
    with rdist.expect_device("fake", "meta"):
        t = torch.zeros(3, device="meta")
        rdist.all_reduce(t)
        rdist.broadcast(t, src=0)
        rdist.all_to_all_single(torch.zeros(2, device="meta"), torch.zeros(2, device="meta"))
        planted = torch.zeros(3)  # the bug the issue found: a CPU tensor handed to NCCL
        with pytest.raises(RuntimeError, match="tensor on cpu handed to the fake backend, which needs meta"):
            rdist.all_reduce(planted)
        with pytest.raises(RuntimeError, match="tensor on cpu"):
            rdist.broadcast_flag(True, torch.device("cpu"))


def test_gloo_takes_cpu_tensors(tmp_path):
    """A world of one on gloo: CPU tensors pass the check (the collective is skipped)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert rdist.expected_device_type() == "cpu"
        rdist.check_device(torch.zeros(1))
        with pytest.raises(RuntimeError, match="needs cpu"):
            rdist.check_device(torch.zeros(1, device="meta"))
    finally:
        dist.destroy_process_group()


def test_world_of_one_leaves_the_environment_alone(monkeypatch):
    """An unlaunched run's one-rank group writes nothing to os.environ: child processes (a test's
    subprocess, a spawned rollout server) once inherited RANK/WORLD_SIZE/MASTER_PORT as a launch
    and tried to listen on the port this process's store still held (EADDRINUSE)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    before = dict(os.environ)
    env = rdist.read_env()
    assert not env.launched
    rdist.init_default_group(env, torch.device("cpu"))
    try:
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        t = torch.ones(2)
        rdist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0]
        assert dict(os.environ) == before
        assert not rdist.read_env().launched
    finally:
        dist.destroy_process_group()


def _direct_collectives(path: Path) -> list[str]:
    """``dist.<collective>(...)`` / ``torch.distributed.<collective>(...)`` calls in a module."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in ("dist", "torch.distributed"):
                hits.append(f"{path.relative_to(REPO)}:{node.lineno} {base}.{node.func.attr}")
    return hits


def test_training_code_issues_collectives_only_through_the_home():
    home = REPO / "r1zero" / "train" / "dist.py"
    files = [p for d in ("train", "grpo", "model") for p in (REPO / "r1zero" / d).rglob("*.py") if p != home]
    hits = [h for p in files for h in _direct_collectives(p)]
    assert not hits, hits
    assert _direct_collectives(home)  # the check would see them
