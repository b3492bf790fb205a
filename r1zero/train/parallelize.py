"""Compose tp (+ sequence parallel), ep, pp and FSDP2 on the r1zero MoE, the way torchtitan's
``parallelize_llama`` composes them; the model is built on the meta device and each rank then
materialises only its own shards.

    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=W)
    mesh = build_mesh(dims, "cpu")                  # named dims: pp, edp, ep, tp (+ flattened dp)
    model = build_meta_model(cfg, eos_token_id=.., pad_token_id=..)
    pm = parallelize(model, mesh, cfg)              # meta device: no memory, no communication
    materialize(pm, torch.device("cpu"), seed=cfg.seed)   # this rank's shards, world-1 values

Order (torchtitan): pipeline split (prune the other stages' layers) -> tensor parallelism with
sequence parallelism (``parallelize_module``) -> expert parallelism (drop the experts this rank
does not own; tokens move by all-to-all, :mod:`r1zero.train.expert_parallel`) -> activation
checkpointing -> FSDP2 ``fully_shard`` per block (experts in their own group on the
expert-data-parallel mesh), then the root.

Mesh: ``(pp, edp, ep, tp)`` with tp innermost (adjacent ranks; they talk every layer), then ep
(so an ep group is ``ep * tp`` consecutive ranks: inside one node whenever that fits the node),
then edp, pp outermost. ``dp`` is the flattened ``(edp, ep)``; dense parameters shard over it,
routed experts over ``edp`` (each ep rank owns ``E / ep`` experts, replicated ``dp / ep`` times).
Routed experts are replicated over tp (their input is all-gathered to the full sequence).

Precision: ``MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32)`` from
``pretrain.precision``: fp32 master weights and optimizer state, low-precision compute, fp32
gradient reduction. FSDP2 is applied whenever dp > 1 or the precision is not fp32 (a world-1
bf16 run is a one-rank FSDP group, so every layout casts the same way).

``parallel.zero_stage``: FSDP2 always shards optimizer state and gradients over dp (ZeRO-2);
stages 0-2 keep the gathered parameters between forward and backward
(``reshard_after_forward=False``: one all-gather per step, as ZeRO-1/2 hold full parameters), 3
frees them after forward and gathers again in backward (``reshard_after_forward=True``: ZeRO-3).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from r1zero.train.parallel_dims import ParallelDims

MESH_DIMS = ("pp", "edp", "ep", "tp")
HSDP_MESH_DIMS = ("pp", "dpr", "edp", "ep", "tp")  # parallel.dp_replicate > 1


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The world's DeviceMesh with named dims ``pp, edp, ep, tp`` and the flattened ``dp``; with
    HSDP (``dp_replicate > 1``) ``pp, dpr, edp, ep, tp``, ``dp = dpr x edp x ep`` and the
    flattened shard dim ``dp_shard = edp x ep`` (the replicas are the outer, cross-node dim).

    Needs an initialised default process group of ``dims.world_size`` ranks (a fake one works).
    """
    r = dims.dp_replicate
    if r > 1:
        shape = (dims.pp, r, dims.dp // (r * dims.ep), dims.ep, dims.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=HSDP_MESH_DIMS)
        mesh["dpr", "edp", "ep"]._flatten("dp")
        mesh["edp", "ep"]._flatten("dp_shard")
        return mesh
    shape = (dims.pp, dims.dp // dims.ep, dims.ep, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh["edp", "ep"]._flatten("dp")
    return mesh


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    return mesh[name]


# ---------------------------------------------------------------------------------------------
# model on meta


def build_meta_model(cfg, hf_config=None, **overrides) -> nn.Module:
    """``R1ZeroForCausalLM`` of ``cfg.model`` (or of ``hf_config``) on the meta device (no memory)."""
    from r1zero.model.config import R1ZeroConfig
    from r1zero.model.modeling import R1ZeroForCausalLM

    hf_cfg = hf_config if hf_config is not None else R1ZeroConfig.from_model_config(cfg.model, **overrides)
    with torch.device("meta"):
        return R1ZeroForCausalLM(hf_cfg)


@dataclass
class ParallelModel:
    """What :func:`parallelize` hands the engine.

    ``model``: the module whose ``named_parameters`` carry the world-1 FQNs (checkpoints and the
    export use it): the ``R1ZeroForCausalLM`` itself, or under pp a :class:`StageModule` with the
    same attribute names (``model.embed_tokens``, ``model.layers.<i>``, ``model.norm``,
    ``lm_head``). ``stage``: the ``PipelineStage`` (pp > 1) or None.
    """

    model: nn.Module
    dims: ParallelDims
    mesh: DeviceMesh
    precision: str
    fsdp: bool
    pp_rank: int = 0
    ep_rank: int = 0
    tp_rank: int = 0
    stage: object | None = None
    config: object = None  # the HF config

    # computed on use: materialising from meta replaces the parameter objects
    @property
    def expert_params(self) -> set[int]:
        """``id()`` of the routed-expert parameters this rank holds."""
        return {id(p) for layer in decoder_layers(self.model) if hasattr(layer.mlp, "experts")
                for p in layer.mlp.experts.parameters()}

    @property
    def tied(self) -> nn.Parameter | None:
        """The tied embedding when pp splits it over the first and the last stage, else None."""
        if not (self.config.tie_word_embeddings and self.dims.pp > 1):
            return None
        if self.first:
            return self.model.model.embed_tokens.weight
        return self.model.lm_head.weight if self.last else None

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


# ---------------------------------------------------------------------------------------------
# pipeline split


def _run_stage(owner, layers, first: bool, last: bool, x, aux_B):
    """Forward of one pipeline stage (``owner`` holds ``model`` / ``lm_head`` / coefficients)."""
    from r1zero.model.layers import attention_mask_4d

    body = owner.model
    h_BSD = body.embed_tokens(x) if first else x
    B, S = x.shape[0], x.shape[1] * (1 if first else owner.sp_degree)
    if aux_B is None:
        aux_B = torch.zeros(B, device=h_BSD.device, dtype=torch.float32)
    pos_BS = torch.arange(S, device=h_BSD.device)[None].expand(B, S)
    cos_sin = body.rotary(pos_BS, h_BSD.dtype)
    mask = attention_mask_4d(None, S, 0, B, h_BSD.device)
    for layer in layers:
        h_BSD = layer(h_BSD, cos_sin, mask, None)
    owner.compute_dtype = h_BSD.dtype
    moes = [layer.mlp for layer in layers if hasattr(layer.mlp, "aux_loss")]
    if moes:
        aux = owner.aux_coef * torch.stack([m.aux_loss for m in moes]).sum()
        aux = aux + owner.z_coef * torch.stack([m.z_loss for m in moes]).sum()
        aux_B = aux_B + aux.float()  # every row carries the micro-batch's aux term
    if last:
        return owner.lm_head(body.norm(h_BSD)), aux_B
    return h_BSD, aux_B


class StageModule(nn.Module):
    """This rank's pipeline stage(s) of ``R1ZeroForCausalLM`` with the same FQNs: ``model.embed_tokens``
    (first stage), ``model.layers.<global index>`` (this rank's layers), ``model.norm`` and
    ``lm_head`` (last stage). The stage's forward carries the MoE aux/z terms down the pipe as a
    ``[B]`` tensor beside the hidden states, so the last stage's loss is LM + every stage's aux.

    ``virtual > 1`` (interleaved 1F1B): the model splits into ``pp * virtual`` stages of equal
    layers; rank ``r`` holds stages ``r, r + pp, ...`` (torch's interleaved placement, so stage 0
    is on rank 0 and the last stage on rank ``pp - 1``) and runs each as a :class:`StageChunk`
    (``self.chunks``) sharing this module's parameters; this module itself is then only the
    container that names them (optimizer, checkpoints, export)."""

    def __init__(self, full, pp_rank: int, pp_size: int, virtual: int = 1):
        super().__init__()
        cfg = full.config
        n_stages = pp_size * virtual
        per = cfg.num_hidden_layers // n_stages
        self.stage_ids = [pp_rank + i * pp_size for i in range(virtual)]
        ids = [i for s in self.stage_ids for i in range(s * per, (s + 1) * per)]
        self.first, self.last = pp_rank == 0, pp_rank == pp_size - 1
        body = full.model
        body.layers = nn.ModuleDict({str(i): body.layers[i] for i in ids})
        if not self.first:
            body.embed_tokens = None
        if not self.last:
            body.norm = None
        self.model = body
        self.lm_head = full.lm_head if self.last else None
        self.config = cfg
        self.compute_dtype: torch.dtype | None = None  # of the last forward's hidden states
        self.sp_degree = 1  # tensor/sequence parallel degree: hidden states between stages are sequence shards
        self.aux_coef, self.z_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        # a plain list: the chunks are views of this module's children, not children themselves
        self.chunks: list[StageChunk] = [] if virtual == 1 else [
            StageChunk(self, s, [body.layers[str(i)] for i in range(s * per, (s + 1) * per)], n_stages)
            for s in self.stage_ids]

    def forward(self, x, aux_B=None):
        if self.chunks:
            raise RuntimeError("an interleaved StageModule runs through its chunks (StageModule.chunks)")
        return _run_stage(self, self.decoder_layers(), self.first, self.last, x, aux_B)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.layers.values())


class StageChunk(nn.Module):
    """One virtual pipeline stage (interleaved 1F1B) of a :class:`StageModule`: its layers, and the
    embedding / final norm + LM head when it is the first / last stage of the whole pipeline.
    Its own ``PipelineStage`` runs it; FSDP2 shards it as its own root."""

    def __init__(self, parent: StageModule, stage_id: int, layers: list[nn.Module], n_stages: int):
        super().__init__()
        object.__setattr__(self, "_parent", parent)  # not a child: the parent names the parameters
        self.stage_id = stage_id
        self.is_first, self.is_last = stage_id == 0, stage_id == n_stages - 1
        self.layers = nn.ModuleList(layers)
        self.embed_tokens = parent.model.embed_tokens if self.is_first else None
        self.norm = parent.model.norm if self.is_last else None
        self.lm_head = parent.lm_head if self.is_last else None
        self.rotary = parent.model.rotary

    def forward(self, x, aux_B=None):
        return _run_stage(self._parent, list(self.layers), self.is_first, self.is_last, x, aux_B)


def decoder_layers(model) -> list[nn.Module]:
    if isinstance(model, StageModule):
        return model.decoder_layers()
    return list(model.model.layers)


# ---------------------------------------------------------------------------------------------
# tensor + sequence parallelism


def _tp_plan_layer(layer) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {
        "attn_norm": SequenceParallel(use_local_output=True),
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None), use_local_output=True),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(use_local_output=True),
    }
    mlp = layer.mlp
    if hasattr(mlp, "experts"):
        # routed experts run on the full sequence, replicated over tp; the shared expert is a
        # Megatron MLP (one all-reduce), and the block output goes back to sequence shards
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
        if mlp.shared is not None:
            plan.update({"mlp.shared.gate_proj": ColwiseParallel(), "mlp.shared.up_proj": ColwiseParallel(),
                         "mlp.shared.down_proj": RowwiseParallel()})
    else:
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
        plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                     "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))})
    return plan


def apply_tp(model, tp_mesh: DeviceMesh) -> None:
    """Megatron TP + sequence parallelism (torchtitan's plan): the residual stream is sharded on
    the sequence between blocks; attention and MLP inputs are all-gathered, their row-parallel
    outputs reduce-scattered back to sequence shards."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    body = model.model
    top: dict = {}
    if body.embed_tokens is not None:
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if body.norm is not None:
        top["model.norm"] = SequenceParallel(use_local_output=True)
    if getattr(model, "lm_head", None) is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    tied = body.embed_tokens is not None and getattr(model, "lm_head", None) is not None \
        and model.lm_head.weight is body.embed_tokens.weight
    parallelize_module(model, tp_mesh, top)
    if isinstance(model, StageModule):
        model.sp_degree = tp_mesh.size()
    if tied:  # both are Shard(0) over the vocabulary: keep them one parameter
        model.lm_head.weight = body.embed_tokens.weight
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, _tp_plan_layer(layer))


# ---------------------------------------------------------------------------------------------
# expert parallelism


def apply_ep(model, ep_mesh: DeviceMesh, ep_rank: int) -> None:
    """Keep only this rank's routed experts (global FQNs ``...experts.w_gate_up.<e>``) and install
    the all-to-all dispatcher; on meta nothing of the others is ever allocated."""
    from r1zero.train.expert_parallel import AllToAllDispatch, owned_experts

    ep = ep_mesh.size()
    group = ep_mesh.get_group()
    for layer in decoder_layers(model):
        moe = layer.mlp
        if not hasattr(moe, "experts"):
            continue
        owned = owned_experts(moe.n_experts, ep_rank, ep)
        for e in range(moe.n_experts):
            if e not in owned:
                moe.experts.w_gate_up.register_parameter(str(e), None)
                moe.experts.w_down.register_parameter(str(e), None)
        moe.experts.local = owned
        moe.ep_dispatch = AllToAllDispatch(group, ep, ep_rank)


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def apply_ac(model) -> None:
    """Recompute each decoder block in backward (``torch.utils.checkpoint``, non-reentrant); the
    block's forward is wrapped in place so FQNs stay those of the world-1 model.

    NOTE: the MoE layer's training-time token counts are accumulated again during recompute;
    the aux-loss-free bias step uses only ``sign(mean - counts)``, which a uniform doubling keeps.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        fwd = layer.forward

        def wrapped(*args, _fwd=fwd, _layer=layer, **kw):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(_fwd, *args, use_reentrant=False, **kw)
            return _fwd(*args, **kw)

        layer.forward = wrapped


# ---------------------------------------------------------------------------------------------
# FSDP2


def mp_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from r1zero.train.precision import param_dtype

    low = param_dtype(precision)
    if low == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


def apply_fsdp(model, mesh: DeviceMesh, dims: ParallelDims, precision: str, zero_stage: int, ep: bool) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    policy = mp_policy(precision)
    reshard = zero_stage >= 3
    if dims.dp_replicate > 1:  # HSDP: 2-D (replicate, shard) meshes, sharded within a replica
        dp_mesh, expert_mesh = mesh["dpr", "dp_shard"], mesh["dpr", "edp"]
    else:
        dp_mesh, expert_mesh = mesh["dp"], mesh["edp"]
    for layer in decoder_layers(model):
        moe = layer.mlp
        if hasattr(moe, "experts"):
            fully_shard(moe.experts, mesh=expert_mesh, mp_policy=policy, reshard_after_forward=reshard)
            register_fsdp_forward_method(moe.experts, "forward_grouped")
            if ep and dims.ep > 1:
                # the all-to-all backward already sums each expert's gradient over its ep group;
                # FSDP's mean over edp must divide by the whole dp to give the global mean
                moe.experts.set_gradient_divide_factor(float(dims.dp))
                if mesh.device_type == "cpu" and expert_mesh.size() > 1:
                    # gloo has no PREMUL_SUM: sum, then divide. Not on a one-rank group: there FSDP
                    # (torch 2.13) divides the copied gradient and then post-divides it again
                    moe.experts.set_force_sum_reduction_for_comms(True)
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    # interleaved stages: each chunk is its own FSDP root (embedding / norm / LM head with it), so
    # each PipelineStage drives the gradient sync of its own layers
    for root in getattr(model, "chunks", None) or [model]:
        fully_shard(root, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)


# ---------------------------------------------------------------------------------------------


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg) -> ParallelModel:
    """Apply pp split, tp+sp, ep, activation checkpointing and FSDP2 to a meta ``model``.

    Works with a fake process group on the meta device (no communication, no memory). The
    returned :class:`ParallelModel` is still on meta: call :func:`materialize` to allocate.
    """
    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=mesh.size(), grad_accum=cfg.pretrain.grad_accum)
    coords = {name: mesh[name].get_local_rank() for name in MESH_DIMS}
    hf_cfg = model.config
    if dims.pp > 1:
        model = StageModule(model, coords["pp"], dims.pp, dims.v)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if dims.ep > 1:
        apply_ep(model, mesh["ep"], coords["ep"])
    if cfg.pretrain.activation_checkpointing:
        apply_ac(model)
    if cfg.pretrain.precision == "fp8":
        from r1zero.train.precision import apply_fp8

        apply_fp8(model, torch.device(mesh.device_type))
    use_fsdp = dims.dp > 1 or cfg.pretrain.precision != "fp32"
    if use_fsdp:
        apply_fsdp(model, mesh, dims, cfg.pretrain.precision, cfg.parallel.zero_stage, ep=True)
    return ParallelModel(model=model, dims=dims, mesh=mesh, precision=cfg.pretrain.precision, fsdp=use_fsdp,
                         pp_rank=coords["pp"], ep_rank=coords["ep"], tp_rank=coords["tp"],
                         config=hf_cfg)


# ---------------------------------------------------------------------------------------------
# materialisation with world-1 values


def _param_seed(seed: int, fqn: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63)


def canonical_fqn(fqn: str, tie: bool) -> str:
    """The FQN whose seed initialises this parameter: strip wrappers; a tied LM head is the embedding."""
    fqn = fqn.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    if tie and fqn == "lm_head.weight":
        return "model.embed_tokens.weight"
    return fqn


@torch.no_grad()
def _fill(param: torch.Tensor, full_fn) -> None:
    """Write this rank's shard of the full tensor ``full_fn()`` (made on CPU, one at a time)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full_fn()
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, config) -> None:
    """World-1 initial values for every parameter and buffer, whatever the layout: each full
    tensor comes from its own generator seeded by ``(seed, FQN)``; ranks keep their shard."""
    from r1zero.model.layers import RMSNorm, RotaryEmbedding
    from r1zero.model.moe import MoELayer

    std = config.initializer_range
    tie = bool(config.tie_word_embeddings)
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(module.compute_inv_freq())
        if isinstance(module, MoELayer):
            module.expert_bias_E.zero_()
            module.tokens_per_expert_E.zero_()
        for pname, p in module.named_parameters(recurse=False):
            fqn = canonical_fqn(prefix + pname, tie)
            shape = tuple(p.shape)
            if isinstance(module, RMSNorm):
                _fill(p, lambda shape=shape: torch.ones(shape))
            else:
                def normal(shape=shape, fqn=fqn):
                    g = torch.Generator().manual_seed(_param_seed(seed, fqn))
                    return torch.empty(shape).normal_(0.0, std, generator=g)
                _fill(p, normal)


def materialize(pm: ParallelModel, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards on ``device`` and initialise them (no-op on meta)."""
    if device.type == "meta":
        return
    # interleaved stages: through the chunks (FSDP roots), which together hold every parameter
    # and buffer of the container, so FSDP2 re-registers its sharded parameters
    for root in getattr(pm.model, "chunks", None) or [pm.model]:
        root.to_empty(device=device)
    m = pm.model
    if pm.config.tie_word_embeddings and m.model.embed_tokens is not None and getattr(m, "lm_head", None) is not None:
        # to_empty from meta makes a new Parameter per module, which unties a tied LM head
        m.lm_head.weight = m.model.embed_tokens.weight
    init_weights(pm.model, seed, pm.config)


def build_stage(pm: ParallelModel, device: torch.device):
    """The ``PipelineStage`` of this rank (pp > 1), on the pp mesh dimension's group; a list of
    them, one per chunk, for interleaved 1F1B."""
    from torch.distributed.pipelining import PipelineStage

    group = pm.mesh["pp"].get_group()
    chunks = getattr(pm.model, "chunks", None)
    if chunks:
        n = pm.dims.pp * pm.dims.v
        pm.stage = [PipelineStage(c, c.stage_id, n, device, group=group) for c in chunks]
    else:
        pm.stage = PipelineStage(pm.model, pm.pp_rank, pm.dims.pp, device, group=group)
    return pm.stage
