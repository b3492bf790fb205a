"""r1zero.train.parallelize on the meta device under torch's fake process group (no communication):
what each rank holds, and world-1 initial values whatever the layout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from r1zero.train.parallel_dims import ParallelDims
from r1zero.train.parallelize import build_mesh, build_meta_model, init_weights, materialize, parallelize


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(world: int, rank: int):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def _local_numel(t) -> int:
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def _build(make_config, world: int, rank: int, fake_world, **parallel):
    cfg = make_config(parallel=parallel, pretrain={"grad_accum": 2})
    fake_world(world, rank)
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=world, grad_accum=2)
    pm = parallelize(build_meta_model(cfg), build_mesh(dims, "cpu"), cfg)
    return cfg, pm


def test_ep_rank_holds_only_its_experts_with_global_names(make_config, fake_world):
    cfg, pm = _build(make_config, 4, 3, fake_world, dp=4, ep=2)
    names = [n for n, _ in pm.model.named_parameters() if ".experts." in n]
    # 4 experts over ep=2: rank 3 is ep rank 1 and owns experts 2 and 3 of each of the 2 layers
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["2", "3"]
    assert len(names) == 2 * 2 * 2  # layers x owned experts x (gate_up, down)
    assert all(p.device.type == "meta" for p in pm.model.parameters())
    # experts shard over the expert-data-parallel mesh (dp / ep = 2), dense weights over all of dp
    p = dict(pm.model.named_parameters())
    assert _local_numel(p["model.layers.0.mlp.experts.w_gate_up.2"]) == 2 * 32 * 64 // 2
    assert _local_numel(p["model.layers.0.self_attn.q_proj.weight"]) == 64 * 64 // 4


def test_pp_and_tp_ranks_hold_only_their_stage_and_shards(make_config, fake_world):
    cfg, pm = _build(make_config, 4, 3, fake_world, tp=2, pp=2)
    names = {n for n, _ in pm.model.named_parameters()}
    assert not any(n.startswith("model.layers.0.") for n in names)  # stage 1 holds layer 1 only
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    p = dict(pm.model.named_parameters())
    assert p["model.layers.1.self_attn.q_proj.weight"].to_local().shape == (32, 64)  # heads split over tp
    assert p["model.layers.1.self_attn.o_proj.weight"].to_local().shape == (64, 32)


def test_bad_layout_is_refused_before_any_shard(make_config, fake_world):
    from r1zero.errors import UserError

    with pytest.raises(UserError, match="n_experts"):
        _build(make_config, 3, 0, fake_world, dp=3, ep=3)


def test_world1_initial_weights_do_not_depend_on_the_layout(make_config, fake_world):
    """The same FQN gets the same full tensor from its own seeded generator: a 2-way tp shard
    is exactly the matching half of the world-1 tensor."""
    cfg = make_config()
    one = build_meta_model(cfg)
    one.to_empty(device="cpu")
    one.lm_head.weight = one.model.embed_tokens.weight
    init_weights(one, cfg.seed, one.config)
    again = build_meta_model(cfg)
    again.to_empty(device="cpu")
    init_weights(again, cfg.seed, again.config)
    for (n, a), (_, b) in zip(one.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    # a tp rank's local shard on a real (one-process gloo) mesh would need two processes; the
    # slicing is DTensor's own (distribute_tensor): check that the shard of a Shard(0) placement
    # is the world-1 tensor's chunk
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    full = one.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    local = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None).to_local()
    assert torch.equal(local, full.chunk(2)[1])


def test_materialize_on_meta_allocates_nothing(make_config, fake_world):
    cfg, pm = _build(make_config, 8, 5, fake_world, dp=2, tp=2, pp=2)
    materialize(pm, torch.device("meta"), cfg.seed)
    assert all(p.device.type == "meta" for p in pm.model.parameters())


def test_hsdp_shards_within_a_replica_and_replicates_across(make_config, fake_world):
    from torch.distributed.tensor import Replicate, Shard

    # dp 8 = 2 replicas x 4 shards, ep 2: dense weights shard over the 4 ranks of a replica,
    # experts over the 2 expert-data-parallel ranks of a replica; both replicated over dpr
    cfg, pm = _build(make_config, 8, 5, fake_world, dp=8, ep=2, dp_replicate=2)
    p = dict(pm.model.named_parameters())
    q = p["model.layers.0.self_attn.q_proj.weight"]
    assert q.device_mesh.mesh_dim_names == ("dpr", "dp_shard") and tuple(q.placements) == (Replicate(), Shard(0))
    assert _local_numel(q) == 64 * 64 // 4
    ex = p["model.layers.0.mlp.experts.w_gate_up.2"]  # rank 5: replica 1, ep rank 1 owns experts 2, 3
    assert ex.device_mesh.mesh_dim_names == ("dpr", "edp") and tuple(ex.placements) == (Replicate(), Shard(0))
    assert _local_numel(ex) == 2 * 32 * 64 // 2


def test_interleaved_stages_hold_every_vth_chunk_with_world1_names(make_config, fake_world):
    cfg = make_config(model={"n_layers": 4}, parallel={"pp": 2, "pp_schedule": "interleaved_1f1b"},
                      pretrain={"grad_accum": 2, "precision": "bf16"})
    fake_world(2, 1)
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=2, grad_accum=2)
    pm = parallelize(build_meta_model(cfg), build_mesh(dims, "cpu"), cfg)
    # pp 2 x 2 virtual stages of one layer: rank 1 runs stages 1 and 3 (layers 1 and 3, the LM head)
    assert [c.stage_id for c in pm.model.chunks] == [1, 3]
    assert sorted(pm.model.model.layers) == ["1", "3"]
    assert [c.is_last for c in pm.model.chunks] == [False, True] and pm.model.chunks[1].lm_head is pm.model.lm_head
    from torch.distributed.fsdp import FSDPModule

    assert all(isinstance(c, FSDPModule) for c in pm.model.chunks)  # each chunk its own FSDP2 root
