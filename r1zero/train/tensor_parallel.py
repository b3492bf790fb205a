"""Tensor parallelism for the r1zero model with torch DTensor (``parallelize_module``), Megatron layout.

    apply_tensor_parallel(model, tp_mesh)

Per decoder layer (Megatron-LM, Shoeybi et al. 2019, sec. 3): q/k/v projections column-parallel
(each rank holds ``n_heads/tp`` heads; the attention module views with ``-1`` heads so it works on
the local ones), the output projection row-parallel (one all-reduce per attention block); the
shared-expert SwiGLU gate/up column-parallel and down row-parallel (one all-reduce). Norms, the
router, the embedding/LM head and the routed experts stay replicated: their inputs are replicated
after each row-parallel all-reduce, so their gradients are identical on every tp rank (no extra
sync; counted once in the gradient norm). Routed experts are sharded by expert parallelism instead
(:mod:`r1zero.train.expert_parallel`).
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def layer_plan(layer) -> dict:
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
    }
    mlp = layer.mlp
    dense = getattr(mlp, "shared", None) if hasattr(mlp, "experts") else mlp
    prefix = "mlp.shared" if hasattr(mlp, "experts") else "mlp"
    if dense is not None:
        plan.update({f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(),
                     f"{prefix}.down_proj": RowwiseParallel()})
    return plan


def apply_tensor_parallel(model, tp_mesh) -> None:
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, layer_plan(layer))


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (shares storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    """The full tensor (all-gathers a sharded DTensor; collective over its mesh)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
