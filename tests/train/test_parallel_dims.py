"""Layout validation and rank/group arithmetic of r1zero.train.parallel_dims."""

from __future__ import annotations

import pytest

from r1zero.config import build_config
from r1zero.errors import UserError
from r1zero.train.parallel_dims import ParallelDims


def _cfg(**par):
    return build_config({"parallel": par, "model": {"n_layers": 4, "n_heads": 4, "moe": {"n_experts": 4}}})


def test_product_must_equal_world_and_message_lists_every_factor():
    cfg = _cfg(dp=2, tp=2, pp=1)
    with pytest.raises(UserError) as e:
        ParallelDims.from_config(cfg.parallel, cfg.model, world_size=2)
    msg = str(e.value)
    assert "dp(2) * tp(2) * pp(1) = 4 but world size is 2" in msg
    assert "\n" not in msg


def test_divisibility_problems_are_all_reported():
    cfg = build_config({"parallel": {"dp": 1, "tp": 3, "pp": 3, "ep": 1},
                        "model": {"n_layers": 4, "d_model": 96, "n_heads": 4, "moe": {"n_experts": 4, "d_expert": 32}}})
    with pytest.raises(UserError) as e:
        ParallelDims.from_config(cfg.parallel, cfg.model, world_size=9)
    msg = str(e.value)
    for part in ("n_heads(4) not divisible by tp(3)", "n_layers(4) not divisible by pp(3)",
                 "d_expert(32) not divisible by tp(3)"):
        assert part in msg


def test_ep_must_divide_dp_and_experts():
    cfg = build_config({"parallel": {"dp": 2, "ep": 4}, "model": {"moe": {"n_experts": 6}}})
    errs = ParallelDims(dp=2, tp=1, pp=1, ep=4, world_size=2).problems(cfg.model)
    assert any("ep(4) must divide dp(2)" in e for e in errs)
    assert any("n_experts(6) not divisible by ep(4)" in e for e in errs)


def test_pipeline_needs_enough_micro_batches():
    dims = ParallelDims(dp=1, tp=1, pp=2, ep=1, world_size=2)
    assert any("grad_accum(1) must be >= pp(2)" in e for e in dims.problems(grad_accum=1))
    assert dims.problems(grad_accum=2) == []


def test_valid_layout_passes_and_coords_cover_every_rank_once():
    cfg = _cfg(dp=2, tp=2, pp=2, ep=2)
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=8, grad_accum=2)
    seen = {tuple(sorted(dims.coords(r).items())) for r in range(8)}
    assert len(seen) == 8
    for r in range(8):
        c = dims.coords(r)
        assert dims.rank_of(c["dp"], c["tp"], c["pp"]) == r


def test_groups_partition_the_world():
    dims = ParallelDims(dp=4, tp=2, pp=1, ep=2, world_size=8)
    for kind in ("dp", "tp", "pp", "ep", "edp"):
        flat = sorted(r for g in dims.group_ranks(kind) for r in g)
        assert flat == list(range(8)), kind
    assert dims.group_of("tp", 0) == [0, 1]  # tensor peers are adjacent ranks
    assert dims.group_of("dp", 0) == [0, 2, 4, 6]
    assert dims.group_of("ep", 0) == [0, 2]  # experts shard over consecutive dp ranks
    assert dims.group_of("edp", 0) == [0, 4]  # same expert shard, other ep block
