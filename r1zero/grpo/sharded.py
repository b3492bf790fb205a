"""The GRPO update's layout on the pretraining engine: the policy, the reference and the optimizer
as the sharded update holds them, and the rollout engine's memory beside them.

    ecfg = engine_config(cfg, world_size)           # the pretraining engine's config for the update
    pm = build_policy(ecfg, mesh)                   # FSDP2 (+ EP) policy on meta: materialise to use
    ref = build_reference(ecfg, mesh)               # bf16, fully_shard, no grads, no optimizer
    opt = build_optimizer(pm.model, cfg.grpo)       # the RL AdamW over the sharded parameters

Layout. Every GRPO rank samples its own share of prompts (``grpo.prompts_per_step / world``),
so the update is data parallel over the whole world: ``dp = world``, ``tp = pp = 1``, experts
split over ``parallel.ep`` ranks (EP, all-to-all dispatch) and FSDP2-sharded over the others
(``edp = world / ep``), dense parameters FSDP2-sharded over every rank. ``parallel.zero_stage``
and ``pretrain.precision`` / ``activation_checkpointing`` apply as in pretraining (fp32 master
weights, compute in the low precision, fp32 gradient reduction), through the same
:func:`r1zero.train.parallelize.parallelize`.

Micro-batching. ``grpo.micro_batch`` completions per forward/backward: the logits of a rank's
whole batch are never materialised at once. Gradients are reduce-scattered after each
micro-batch (FSDP2's default) rather than accumulated unsharded: an unsharded fp32 gradient of
the rank's dense and expert parameters (12 GB for a100-13b) would cost more than the extra
reduce-scatters.

Reference (``grpo.beta > 0``): sharded like the policy with ``fully_shard`` but stored in bf16
(no fp32 master: it never steps), gathered one block at a time and freed after each block's
forward (``reshard_after_forward=True``), no gradients and no optimizer state. Why sharded and
not CPU-offloaded: at scale its shard is a few tens of MB per GPU, and its all-gathers are the
ones the policy's forward already does; offloading would copy the whole reference over PCIe
every step instead.

Rollout engine (vLLM, colocated): one engine per GPU holds the whole model in the compute dtype
and a KV cache; with ``gpu_memory_utilization`` it takes that fraction of the device during
rollouts and sleeps (weights offloaded, KV cache freed) during the update, so the two phases do
not add up (:func:`rollout_budget`).
"""

from __future__ import annotations

import math

import torch

from r1zero.errors import UserError

# ---------------------------------------------------------------------------------------------
# layout


def local_completions(cfg, world_size: int) -> int:
    """Completions one rank holds per step (its prompts x the group size)."""
    g = cfg.grpo
    per_rank = max(1, g.prompts_per_step // max(world_size, 1))
    return per_rank * (g.adaptive.max_group if g.adaptive.enabled else g.group_size)


def micro_batch(cfg, world_size: int) -> int:
    """Completions per forward/backward of the update (``grpo.micro_batch``; None: all at once)."""
    n = local_completions(cfg, world_size)
    return min(cfg.grpo.micro_batch or n, n)


def grpo_layout_problems(cfg, world_size: int) -> list[str]:
    """What stops the sharded GRPO update at ``world_size`` ranks, one phrase each."""
    from r1zero.train.parallel_dims import ParallelDims

    out = list(cfg.grpo_world_problems(world_size))
    dims = ParallelDims(dp=world_size, tp=1, pp=1, ep=cfg.parallel.ep, world_size=world_size)
    out += dims.problems(cfg.model)
    room = cfg.model.max_seq_len - cfg.grpo.max_new_tokens
    if cfg.model.base is None and room < 8:  # trainer.train refuses the same at start
        out.append(f"grpo.max_new_tokens({cfg.grpo.max_new_tokens}) leaves {room} of model.max_seq_len"
                   f"({cfg.model.max_seq_len}) positions for prompts (at least 8)")
    return out


def engine_config(cfg, world_size: int):
    """The config the pretraining engine's :func:`parallelize` builds the update from: the GRPO
    layout (module docstring) and the update's micro-batch of full-context sequences."""
    p = cfg.parallel
    n, mb = local_completions(cfg, world_size), micro_batch(cfg, world_size)
    # no pipeline: the pretraining schedule's options do not apply
    parallel = p.model_copy(update={"dp": world_size, "tp": 1, "pp": 1, "ep": p.ep, "pp_schedule": "1f1b",
                                    "pp_virtual_stages": None})
    pre = cfg.pretrain.model_copy(update={"micro_batch": mb, "grad_accum": math.ceil(n / mb),
                                          "seq_len": cfg.model.max_seq_len})
    if pre.precision == "fp8":
        # torchao's float8 casts inside the matmuls and keeps bf16 compute copies of the same shapes
        pre = pre.model_copy(update={"precision": "bf16"})
    return cfg.model_copy(update={"parallel": parallel, "pretrain": pre})


def build_policy(ecfg, mesh):
    """The policy parallelised as the update runs it (on meta; :func:`r1zero.train.parallelize.materialize`)."""
    from r1zero.train import parallelize as P

    return P.parallelize(P.build_meta_model(ecfg), mesh, ecfg)


def reference_dtype(ecfg) -> torch.dtype:
    from r1zero.train.precision import param_dtype

    return param_dtype(ecfg.pretrain.precision)


def build_reference(ecfg, mesh, hf_config=None):
    """The frozen reference: the policy's layout in the compute dtype, resharded after each
    block's forward, no activation checkpointing (it runs under no_grad), no gradients."""
    from r1zero.train import parallelize as P

    model = P.build_meta_model(ecfg, hf_config=hf_config).to(reference_dtype(ecfg))
    for moe in model.moe_layers():  # the selection bias routes in fp32, as the policy's (and loading.py's)
        moe.expert_bias_E = moe.expert_bias_E.float()
    pre = ecfg.pretrain.model_copy(update={"activation_checkpointing": False})
    rcfg = ecfg.model_copy(update={"parallel": ecfg.parallel.model_copy(update={"zero_stage": 3}), "pretrain": pre})
    pm = P.parallelize(model, mesh, rcfg)
    pm.model.requires_grad_(False)
    return pm


def build_optimizer(model: torch.nn.Module, gcfg) -> torch.optim.Optimizer:
    """The RL update's AdamW (``r1zero.grpo.update.RL_BETAS``, no weight decay) over the sharded
    parameters, foreach over groups of one DeviceMesh each (the pretraining engine's
    :func:`r1zero.train.engine.by_mesh`: FSDP2 puts the experts on their own mesh, and one foreach
    kernel cannot mix meshes, or DTensors and tensors; one mixed group fell back to AdamW's
    per-parameter loop)."""
    from r1zero.grpo.update import RL_BETAS
    from r1zero.train.engine import by_mesh

    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    return torch.optim.AdamW(by_mesh([{"params": params}]), lr=gcfg.lr, betas=RL_BETAS, weight_decay=0.0,
                             foreach=True)


# ---------------------------------------------------------------------------------------------
# rollout engine memory


def model_numel(ecfg) -> int:
    """Parameters of the whole model (every expert), counted on the meta device."""
    from r1zero.train.parallelize import build_meta_model

    model = build_meta_model(ecfg)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def kv_bytes_per_token(model_cfg, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 x layers x kv-heads x head dim x element size."""
    kv = model_cfg.n_kv_heads or model_cfg.n_heads
    return 2 * model_cfg.n_layers * kv * model_cfg.head_width * dtype_bytes


def rollout_budget(ecfg, cfg, world_size: int, device_bytes: float) -> dict:
    """Bytes the colocated rollout engine takes on one GPU and the KV cache left in them.

    vLLM (``gpu_memory_utilization`` u): u x device for weights + KV cache + its activations;
    weights are the whole model in the compute dtype (one engine per GPU, no tensor parallelism).
    The KV budget is u x device - weights (vLLM's own activation peak, measured by its profiling
    run at start, comes out of it too: not modelled here). ``kv_cache_tokens`` is what that holds;
    ``kv_tokens_needed`` is every local completion at full context at once.
    """
    r = cfg.grpo.rollout
    dtype_bytes = torch.empty((), dtype=reference_dtype(ecfg)).element_size()
    weights = model_numel(ecfg) * dtype_bytes
    engine = r.gpu_memory_utilization * device_bytes
    kv = engine - weights
    per_tok = kv_bytes_per_token(cfg.model, dtype_bytes)
    return {
        "rollout_engine_bytes": int(engine),
        "rollout_weights_bytes": int(weights),
        "kv_cache_bytes": int(max(kv, 0)),
        "kv_bytes_per_token": per_tok,
        "kv_cache_tokens": int(max(kv, 0) // per_tok),
        "kv_tokens_needed": local_completions(cfg, world_size) * cfg.model.max_seq_len,
        "gpu_memory_utilization": r.gpu_memory_utilization,
    }


def rollout_copy_bytes(ecfg, cfg) -> int:
    """Bytes of the full fp32 policy the GRPO trainer keeps per rank beside the shards
    (:class:`ShardedGRPO`): the native sampler's whole weights under ``update_engine: fsdp2`` (4
    bytes x every parameter: 52 GB for a100-13b, so native + fsdp2 is for small models); none
    with ``rollout.engine: vllm`` (the engine takes the shards' tensors one at a time). The dry run
    sizes the fsdp2 update; ``replicated`` (a full policy, reference and AdamW per rank) is not sized."""
    g = cfg.grpo
    if g.update_engine != "fsdp2" or g.rollout.engine == "vllm":
        return 0
    return model_numel(ecfg) * 4


def check_rollout(budget: dict) -> None:
    if budget["kv_cache_bytes"] <= 0:
        raise UserError(f"grpo.rollout.gpu_memory_utilization ({budget['gpu_memory_utilization']}) leaves no KV "
                        f"cache: the engine's {budget['rollout_engine_bytes'] / 1e9:.1f} GB do not hold the "
                        f"{budget['rollout_weights_bytes'] / 1e9:.1f} GB of weights")


# ---------------------------------------------------------------------------------------------
# the micro-batched update on the sharded policy


def _rows(batch, lo: int, hi: int, dummy: bool = False):
    """Rows ``lo:hi`` of ``batch`` as a batch of its own (full-batch forward, no prompt sharing:
    FSDP2 gathers parameters in the modules' forward, which only ``model(...)`` runs). ``dummy``:
    the same rows with no real token, for a rank that has run out of rows (every rank must run
    the same number of forwards and backwards: FSDP2's and EP's collectives)."""
    from r1zero.grpo.update import Batch

    mask = batch.mask_BT[lo:hi]
    return Batch(batch.input_ids_BL[lo:hi], batch.attention_BL[lo:hi], batch.position_BL[lo:hi],
                 batch.targets_BT[lo:hi], mask * 0 if dummy else mask, batch.prompt_len)


def _micro_slices(B: int, size: int) -> tuple[list[tuple[int, int, bool]], int]:
    """This rank's ``(lo, hi, dummy)`` micro-batches, padded with dummies to the ranks' maximum."""
    from r1zero.train import dist as rdist

    own = [(lo, min(lo + size, B), False) for lo in range(0, B, size)]
    n = torch.tensor([len(own)], dtype=torch.long)
    n_all = int(rdist.all_reduce(n, None, op="max")[0])
    return own + [(0, min(1, B), True)] * (n_all - len(own)), n_all


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax input in at least fp32 (bf16/fp16 compute: the log-probs of a 32k vocabulary
    need fp32's mantissa)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of sharded gradients (each element lives on exactly one rank under the GRPO
    layout: FSDP2 shards over dp, experts over ep x edp, tp = pp = 1), one all-reduce of the
    local squares; scaled by ``max_norm / (norm + 1e-6)`` when above (torch's clip_grad_norm_)."""
    from r1zero.train import dist as rdist

    grads = [_local(p.grad) for p in params if p.grad is not None]
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    total = float(rdist.all_reduce(sq.reshape(1), None)[0].sqrt())
    if max_norm > 0 and math.isfinite(total):
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return total


@torch.no_grad()
def sharded_logprobs(model, batch, temperature: float, micro_batch: int) -> torch.Tensor:
    """Per-token log-probs (B, T) of the completions (0 at padding), micro-batched: the reference's
    and the rollout policy's log-probs on the sharded models."""
    from r1zero.grpo.losses import token_logprobs
    from r1zero.grpo.update import forward_completion, unpack

    was = model.training
    model.eval()
    try:
        B = batch.mask_BT.shape[0]
        out_BT = torch.zeros(batch.mask_BT.shape, dtype=torch.promote_types(_param_dtype(model), torch.float32))
        for lo, hi, dummy in _micro_slices(B, micro_batch)[0]:
            mb = _rows(batch, lo, hi, dummy)
            logits_NV, _ = forward_completion(model, mb, temperature)
            real_BT = mb.mask_BT.bool()
            if not dummy:
                out_BT[lo:hi] = unpack(token_logprobs(_wide(logits_NV), mb.targets_BT[real_BT]), real_BT).cpu()
        return out_BT
    finally:
        model.train(was)
        reshard(model)


def reshard(model) -> None:
    """Free FSDP2's gathered parameters after forwards without a backward: with
    ``reshard_after_forward=False`` (zero_stage < 3) a no_grad forward leaves them gathered, and
    the next training forward would then compute on them without FSDP2's gradient hooks (its
    gradients came out zero: the parity test)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def sharded_policy_update(model, optimizer, batch, adv_B: torch.Tensor, gcfg, *, guard, micro_batch: int,
                          dp: int, old_logp_BT: torch.Tensor | None = None,
                          ref_logp_BT: torch.Tensor | None = None, local_fraction: float = 1.0) -> dict:
    """``gcfg.mu`` optimizer steps of the GRPO loss on the FSDP2 (+ EP) policy, ``micro_batch``
    completions per forward/backward; same objective and stats as
    :func:`r1zero.grpo.update.policy_update` (which holds the whole batch's logits at once).

    The loss is ``sum over this rank's tokens / global denominator`` (the denominator all-reduced
    first): scaled by ``dp`` because FSDP2 averages gradients over dp (experts: the all-to-all
    sums over ep, FSDP2 divides by dp), so the step uses the sum over ranks, as world 1 does.
    The MoE aux loss of each micro-batch (a mean over its real tokens) is weighted by its share
    of every rank's real tokens; ``local_fraction`` is not used any more (accepted for callers).
    Needs the same number of micro-batches on every rank: ranks with fewer rows run dummies.
    """
    from r1zero.grpo.losses import entropy_of, log_probs, pick, policy_loss
    from r1zero.grpo.update import _denominator, all_sum, aux_tokens, forward_completion, unpack

    model.train()
    B = batch.mask_BT.shape[0]
    # the MoE aux loss's tokens (real ones: the MoE layer skips padding) over every rank
    den, n_aux = all_sum([_denominator(batch.mask_BT, gcfg)[1], aux_tokens(None, batch)])
    slices, _ = _micro_slices(B, micro_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    stats = {"loss": 0.0, "tokens": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl_sum": 0.0, "entropy_sum": 0.0,
             "grad_norm": 0.0, "skipped": 0, "value_loss": 0.0}
    for it in range(gcfg.mu):
        optimizer.zero_grad(set_to_none=True)
        loss_local, st_it = 0.0, {"tokens": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl_sum": 0.0, "entropy": 0.0}
        for lo, hi, dummy in slices:
            mb = _rows(batch, lo, hi, dummy)
            real_BT = mb.mask_BT.bool()
            logits_NV, out = forward_completion(model, mb, gcfg.temperature)
            logp_NV = log_probs(_wide(logits_NV))
            logp_BT = unpack(pick(logp_NV, mb.targets_BT[real_BT]), real_BT)
            old = logp_BT.detach() if old_logp_BT is None else old_logp_BT[lo:hi]
            ref = None if ref_logp_BT is None else ref_logp_BT[lo:hi]
            num, _, st = policy_loss(logp_BT, old, adv_B[lo:hi], mb.mask_BT, eps_low=gcfg.eps_low,
                                     eps_high=gcfg.eps_high, beta=gcfg.beta, ref_logp_BT=ref, agg=gcfg.loss_agg,
                                     max_len=gcfg.max_new_tokens)
            loss = num / max(den, 1e-12)
            aux = getattr(out, "aux_loss", None)
            if aux is not None and torch.is_tensor(aux) and aux.requires_grad:
                # weight: the micro-batch's share of all ranks' real tokens (as policy_update)
                loss = loss + aux * ((0.0 if dummy else aux_tokens(out, mb)) / max(n_aux, 1.0))
            (loss * dp).backward()
            loss_local += float(loss.detach())
            for k in ("tokens", "clip_low", "clip_high", "kl_sum"):
                st_it[k] += st[k]
            if it == 0:
                st_it["entropy"] += float(entropy_of(logp_NV.detach()).sum())
        gnorm = clip_grad_norm(params, gcfg.grad_clip)
        loss_sum = all_sum([loss_local])[0]
        if guard.ok(loss_sum, gnorm):
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            stats["skipped"] += 1
        stats["loss"] += loss_sum / gcfg.mu
        stats["grad_norm"] += gnorm / gcfg.mu
        for k in ("tokens", "clip_low", "clip_high"):
            stats[k] += st_it[k] / gcfg.mu
        if it == 0:
            stats["kl_sum"], stats["entropy_sum"] = st_it["kl_sum"], st_it["entropy"]
    red = all_sum([stats["tokens"], stats["clip_low"], stats["clip_high"], stats["kl_sum"], stats["entropy_sum"]])
    stats.update(tokens=red[0], clip_low=red[1], clip_high=red[2], kl_sum=red[3], entropy_sum=red[4])
    return stats


def full_state(model) -> dict[str, torch.Tensor]:
    """``{world-1 FQN: full fp32 CPU tensor}`` of the parameters this rank holds (collective over
    each parameter's FSDP2 mesh; under EP a rank holds only its own experts)."""
    from r1zero.train.parallelize import canonical_fqn

    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[canonical_fqn(name, False)] = full.detach().float().cpu().clone()
    return out


# ---------------------------------------------------------------------------------------------
# the trainer's side (grpo.update_engine: fsdp2)


def fill_from_rank0(model, full_sd: dict[str, torch.Tensor]) -> None:
    """Collective: this rank's shards of ``model`` (parameters and persistent buffers) take the
    full (world-1 FQN) tensors that only rank 0 holds; the other ranks pass ``{}``.

    torch's ``set_model_state_dict(..., StateDictOptions(full_state_dict=True,
    broadcast_from_rank0=True))``: rank 0 broadcasts one tensor at a time over the default group,
    every rank copies its slice into its local shard (an expert that expert parallelism keeps on
    another rank is received and dropped), so no rank but 0 ever holds the whole policy.
    Every key a rank holds must come from rank 0 (checked first, on every rank: a missing tensor is
    an error, not a silently random weight); torch's own ``strict`` cannot say that under EP, where
    rank 0's full dict holds experts its model does not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from r1zero.train import dist as rdist

    sd = dict(full_sd) if rdist.world()[0] == 0 else {}
    have = set(rdist.broadcast_object(sorted(sd), src=0))
    missing = sorted({k for part in rdist.all_gather_object(sorted(set(model.state_dict()) - have)) for k in part})
    if missing:
        raise RuntimeError(f"the policy's state dict lacks {len(missing)} tensors of the sharded model: {missing[:3]}")
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                              strict=False))


def stream_full(model, dtype: torch.dtype | None = None):
    """Collective generator: ``(world-1 FQN, full CPU tensor)`` for every parameter and persistent
    buffer of the sharded ``model``, ONE tensor at a time (the whole policy is never held).

    Each tensor is the ``full_tensor()`` of this rank's shard (an all-gather over the parameter's
    FSDP2 mesh), cast to ``dtype`` (None: as stored); an expert that expert parallelism keeps on
    other ranks is broadcast from the lowest rank holding it. Every rank must run the generator
    to its end in step (a rank that only serves others drains it: ``for _ in stream_full(m): pass``).
    A tied LM head is left out (it is the embedding; :func:`r1zero.model.hf_export.to_hf_tensors`
    writes it). Order: rank 0's ``state_dict`` order, then the experts it does not hold in their
    owners' order (the same on every rank).
    """
    from r1zero.train import dist as rdist
    from r1zero.train.parallelize import canonical_fqn

    sd = model.state_dict(keep_vars=True)
    local: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        fqn = canonical_fqn(name, False)
        if fqn == "lm_head.weight" and any(t is v for k, v in sd.items() if k.endswith("embed_tokens.weight")):
            continue  # tied to the embedding
        local[fqn] = t
    rank, ws = rdist.world()
    meta = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in local.items()}
    parts = rdist.all_gather_object(meta, None) if ws > 1 else [meta]
    owners: dict[str, int] = {}
    for r, names in enumerate(parts):
        for n in names:
            owners.setdefault(n, r)
    everywhere = {n for n in owners if all(n in p for p in parts)}
    for name in owners:
        with torch.no_grad():
            if name in everywhere or name in local:
                t = local[name]
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                full = full.detach().to("cpu", dtype or full.dtype)
                if full.data_ptr() == _local_ptr(t):
                    full = full.clone()  # never hand out the live parameter's storage
            if name not in everywhere:  # an expert held by one EP group: its owner sends it
                owner = owners[name]
                shape, dt = parts[owner][name]
                buf = full if rank == owner else torch.empty(shape, dtype=dtype or getattr(torch, dt))
                full = rdist.broadcast(buf.contiguous(), src=owner)
        yield name, full
        del full


def _local_ptr(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.data_ptr()


def stream_hf(model, hf_config, dtype: torch.dtype | None = None):
    """Collective generator: the sharded policy's tensors under the standard architecture's names
    (:func:`r1zero.model.hf_export.to_hf_tensors`), one at a time: the vLLM engine's in-place
    weight update and the streamed export take this."""
    from r1zero.model.hf_export import to_hf_tensors

    return to_hf_tensors(stream_full(model, dtype), hf_config)


def drain(it) -> None:
    """Run a collective generator to its end (the ranks that only serve the others)."""
    for _ in it:
        pass


class ShardedGRPO:
    """The GRPO loop's policy update on the pretraining engine (``grpo.update_engine: fsdp2``).

    Holds the sharded policy, the sharded reference (``beta > 0``) and the RL AdamW over the
    shards. Where the weights go after each update:
    - ``rollout_model`` given (the native sampler, which needs whole weights): it gets the new full
      weights in place, one tensor at a time (:meth:`sync`); the trainer keeps that full copy,
      which ``r1zero plan --stage grpo --dry-run`` counts (``rollout_copy_bytes``);
    - ``rollout_model=None`` (vLLM rollouts): no full copy anywhere; the engine takes
      :meth:`hf_tensors` (one tensor at a time from the shards) and the export is streamed
      (:meth:`export`).
    Needs r1zero's MoE policy (the engine parallelises it), an initialised process group (the
    trainer starts a one-rank group at world 1) and the ``replicated`` path for PPO.
    ``policy``: the loaded policy; rank 0's is read once to fill every rank's shards (broadcast one
    tensor at a time, :func:`fill_from_rank0`; the caller may drop it after); the other ranks'
    may be the same model on meta (:func:`r1zero.model.load_causal_lm` with ``weights=False``), as
    under vLLM rollouts, where they never hold the whole policy.
    """

    def __init__(self, cfg, policy, world_size: int, device: torch.device, *, keep_rollout_model: bool = True):
        from r1zero.model.modeling import R1ZeroForCausalLM
        from r1zero.train import dist as rdist
        from r1zero.train import parallelize as P
        from r1zero.train.parallel_dims import ParallelDims

        if not isinstance(policy, R1ZeroForCausalLM):
            raise UserError(f"grpo.update_engine=fsdp2 runs r1zero's MoE policy on the pretraining engine; the policy is "
                            f"a {type(policy).__name__} (use grpo.update_engine=replicated)")
        if cfg.grpo.algorithm == "ppo":
            raise UserError("grpo.update_engine=fsdp2 does not run PPO's value head (use grpo.update_engine=replicated)")
        for problem in grpo_layout_problems(cfg, world_size):
            raise UserError(problem)
        self.cfg, self.g = cfg, cfg.grpo
        self.ecfg = engine_config(cfg, world_size)
        self.dims = ParallelDims.from_config(self.ecfg.parallel, self.ecfg.model, world_size=world_size)
        self.mesh = P.build_mesh(self.dims, device.type)
        self.micro = micro_batch(cfg, world_size)
        self.hf_config = policy.config
        # only rank 0's policy holds weights (the others may pass it on meta: its config)
        full = policy.state_dict() if rdist.world()[0] == 0 else {}
        self.pm = P.parallelize(P.build_meta_model(self.ecfg, hf_config=self.hf_config), self.mesh, self.ecfg)
        P.materialize(self.pm, device, cfg.seed)
        fill_from_rank0(self.pm.model, full)
        self.ref = None
        if self.g.beta > 0:
            self.ref = build_reference(self.ecfg, self.mesh, hf_config=self.hf_config)
            P.materialize(self.ref, device, cfg.seed)
            fill_from_rank0(self.ref.model, full)
        del full
        self.optimizer = build_optimizer(self.pm.model, self.g)
        self.rollout_model = policy if keep_rollout_model else None

    def engine_dtype(self) -> torch.dtype:
        """The rollout engine's weights: the update's compute dtype (bf16 at scale, fp32 on the CPU preset)."""
        return reference_dtype(self.ecfg)

    def hf_tensors(self, dtype: torch.dtype | None = None):
        """Collective generator: the policy's full tensors, standard names, ``dtype``, one at a time."""
        return stream_hf(self.pm.model, self.hf_config, dtype)

    def export(self, out_dir, dtype: torch.dtype = torch.float32) -> None:
        """Collective: rank 0 writes the policy as a standard HF checkpoint (safetensors shards +
        index, :func:`r1zero.model.hf_export.export_hf`) streamed from the shards; the others
        serve their shards and write nothing."""
        from r1zero.model.hf_export import export_hf
        from r1zero.train import dist as rdist

        if rdist.world()[0] == 0:
            export_hf(stream_full(self.pm.model, dtype), self.hf_config, out_dir, dtype=dtype)
        else:
            drain(stream_full(self.pm.model, dtype))

    def logprobs(self, batch) -> torch.Tensor:
        return sharded_logprobs(self.pm.model, batch, self.g.temperature, self.micro)

    def ref_logprobs(self, batch) -> torch.Tensor | None:
        return None if self.ref is None else sharded_logprobs(self.ref.model, batch, self.g.temperature, self.micro)

    def update(self, batch, adv, *, guard, old_logp_BT=None, ref_logp_BT=None, local_fraction: float = 1.0) -> dict:
        """One :func:`sharded_policy_update`, then the rollout model takes the new weights."""
        stats = sharded_policy_update(self.pm.model, self.optimizer, batch, adv, self.g, guard=guard,
                                      micro_batch=self.micro, dp=self.dims.dp, old_logp_BT=old_logp_BT,
                                      ref_logp_BT=ref_logp_BT, local_fraction=local_fraction)
        self.sync()
        return stats

    @torch.no_grad()
    def sync(self) -> None:
        """Collective: the rollout model (when kept) takes the shards' full weights in place, one
        tensor at a time; its buffers (RoPE, the routers' aux-free bias, which GRPO does not
        step) stay as they are."""
        if self.rollout_model is None:
            return
        params = dict(self.rollout_model.named_parameters())
        seen = set()
        for name, full in stream_full(self.pm.model):
            p = params.get(name)
            if p is not None:
                p.copy_(full.to(p.device, p.dtype))
                seen.add(name)
        if set(params) - seen:
            raise RuntimeError(f"sharded policy lacks {sorted(set(params) - seen)[:3]}")

    # -- checkpoints: torch.distributed.checkpoint, every rank its own shards ---------------------
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.pm.model, self.optimizer,
                                            options=StateDictOptions(flatten_optimizer_state_dict=True))
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(directory))

    def load(self, directory) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.pm.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(flatten_optimizer_state_dict=True))
        self.sync()
