"""Full-scale dry run: build the real parallelised model and optimizer of chosen ranks, count bytes.

    r1zero plan --config configs/a100-13b.yaml --dry-run --json
    r1zero plan --config configs/a100-13b.yaml --dry-run --ranks 0,1023 --json

For each named rank (default: one rank per distinct shape, i.e. the first rank of every pipeline
stage), a fresh Python process joins torch's *fake* process group at the configured world size
(``torch.testing._internal.distributed.fake_pg``: collectives return at once, nothing is sent),
builds the model on the meta device, parallelises it with the training engine's own
:func:`r1zero.train.parallelize.parallelize` (FSDP2 + DTensor TP/SP + EP + pipeline stages),
builds the engine's optimizer and runs one ``optimizer.step()`` on meta gradients so AdamW
allocates its real state. Nothing is materialised: the byte counts are the local shard shapes the
rank would hold on its GPU.

What is measured and what is computed:

- ``params_bytes``, ``grads_bytes``, ``optimizer_bytes``: *measured* from the rank's local
  tensors (``DTensor.to_local()`` shapes x element sizes) after parallelising and one optimizer
  step; gradients are the sharded ones FSDP2 keeps (same dtype and shape as the sharded params).
- ``fsdp_buffers_bytes``: *computed* from the measured FSDP units: the unsharded compute-dtype
  copy of the largest unit twice (the current one and the prefetched next), or of every unit when
  parameters stay unsharded between forward and backward (``reshard_after_forward=False``).
- ``unsharded_grads_bytes``: *computed* from the measured FSDP units: with gradient accumulation
  the engine (and the pipeline schedule) turn FSDP's gradient sync off until the last micro-batch,
  and FSDP2 keeps every unit's unsharded gradient in fp32 (``reduce_dtype``) until then.
- ``activations_bytes``: *computed* with the planner's per-layer formula
  (:func:`r1zero.sizing.activation_bytes_per_layer`: Korthikanti et al. 2022, with the configured
  micro-batch, sequence length, tensor/sequence parallelism and activation checkpointing), times
  the layers this rank holds and the micro-batches 1F1B keeps in flight on it. Running the
  forward is not possible here: FSDP2 refuses meta parameters, and the MoE dispatch needs real
  routing counts.

The fake process group is global state, hence one process per rank. The layout checks
(:func:`layout_problems`) are shared with ``r1zero validate`` (rendered jobs) and run before
any process starts; a layout that does not divide or does not fit is a one-line UserError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from r1zero.errors import UserError

STAGES = ("pretrain", "grpo")  # grpo: policy + reference + rollout engine (r1zero.grpo.sharded)


# ---------------------------------------------------------------------------------------------
# layout checks (shared with r1zero validate)


def world_size_of(cfg) -> int:
    """World size the config's cluster section launches: nodes x processes per node."""
    return cfg.cluster.nodes * ranks_per_node(cfg)


def layout_problems(cfg, world_size: int) -> list[str]:
    """Every divisibility constraint the config's layout violates at ``world_size``, one phrase each.

    Heads, kv-heads, expert width, layers, experts and world size come from the engine's own
    :class:`~r1zero.train.parallel_dims.ParallelDims` checks; the batch checks are added here:
    ``cluster.global_batch`` must equal ``micro_batch x grad_accum x dp`` (sequences per step).
    """
    from r1zero.train.parallel_dims import ParallelDims

    p, pre = cfg.parallel, cfg.pretrain
    dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, ep=p.ep, world_size=world_size, v=p.virtual_stages(),
                        schedule=p.pp_schedule, dp_replicate=p.dp_replicate)
    out = dims.problems(cfg.model, grad_accum=pre.grad_accum)
    if not out:
        out += span_problems(cfg, dims)
    per_step = pre.micro_batch * pre.grad_accum * p.dp
    if cfg.cluster.gpu != "cpu" and per_step != cfg.cluster.global_batch:
        out.append(f"cluster.global_batch({cfg.cluster.global_batch}) != pretrain.micro_batch({pre.micro_batch})"
                   f" * pretrain.grad_accum({pre.grad_accum}) * dp({p.dp}) = {per_step}")
    return out


def ranks_per_node(cfg) -> int:
    c = cfg.cluster
    return c.gpus_per_node if c.gpu != "cpu" and c.gpus_per_node else c.procs_per_node


def group_spans(cfg, dims) -> dict[str, int]:
    """Nodes an expert-parallel and a tensor-parallel group span (the largest group of each)."""
    per = ranks_per_node(cfg)
    return {"ep_group_nodes": dims.group_nodes("ep", per), "tp_group_nodes": dims.group_nodes("tp", per)}


def span_problems(cfg, dims) -> list[str]:
    """An ep group across nodes (its all-to-all runs every MoE layer, forward and backward) is
    refused unless ``parallel.ep_across_nodes`` (a tp group's span is reported, not refused)."""
    spans, per, out = group_spans(cfg, dims), ranks_per_node(cfg), []
    if dims.ep > 1 and spans["ep_group_nodes"] > 1 and not cfg.parallel.ep_across_nodes:
        out.append(f"an expert-parallel group (ep({dims.ep}) x tp({dims.tp}) = {dims.ep * dims.tp} ranks) spans "
                   f"{spans['ep_group_nodes']} nodes of {per}: make ep * tp <= {per} or set parallel.ep_across_nodes: true")
    return out


def check_layout(cfg, world_size: int) -> None:
    """Raise a one-line UserError naming every violated layout constraint."""
    errs = layout_problems(cfg, world_size)
    if errs:
        p = cfg.parallel
        raise UserError(f"layout dp={p.dp} tp={p.tp} pp={p.pp} ep={p.ep} at world size {world_size} does not divide: "
                        + "; ".join(errs))


def default_ranks(cfg, world_size: int) -> list[int]:
    """One rank per distinct shape: the first rank of every pipeline stage (pp is the outermost
    mesh dimension, so stage s starts at s x world/pp); other coordinates hold equal shapes."""
    pp = cfg.parallel.pp
    return sorted({s * (world_size // pp) for s in range(pp)})


# ---------------------------------------------------------------------------------------------
# one rank (runs inside its own process)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t) -> int:
    loc = _local(t)
    return loc.numel() * loc.element_size()


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def count_state_bytes(modules, optimizer) -> dict[str, int]:
    """Local bytes of parameters, their gradients and the optimizer state (tensors only)."""
    params = _unique(p for m in modules for p in m.parameters())
    buffers = _unique(b for m in modules for b in m.buffers())
    opt = 0
    for state in optimizer.state.values():
        for v in state.values():
            if hasattr(v, "numel") and v.dim() > 0:  # AdamW's scalar step counters are not state bytes
                opt += _nbytes(v)
    return {
        "params_bytes": sum(_nbytes(p) for p in params),
        "grads_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": opt,
        "buffers_bytes": sum(_nbytes(b) for b in buffers),
    }


def fsdp_buffer_bytes(modules, grad_accum: int = 1, pipeline: bool = False) -> tuple[int, int]:
    """(gathered, unsharded-gradient) bytes of FSDP2's unsharded copies, from the measured units
    (tp-local shapes).

    Gathered parameters (compute dtype): every unit that stays gathered between forward and
    backward (``reshard_after_forward=False``, the root, and every unit of a pipeline stage, whose
    schedule sets ``reshard_after_backward=False`` between micro-batches: an upper bound), plus,
    for resharding units, twice the largest decoder block (current + prefetched; a block = its own
    unit + its experts' unit). Unsharded gradients: with ``grad_accum > 1`` the engine and the
    pipeline schedule turn gradient sync off until the last micro-batch, and FSDP2 keeps every
    unit's unsharded gradient in ``reduce_dtype`` (fp32) until then.
    """
    from torch.distributed.fsdp import FSDPModule

    from r1zero.model.modeling import DecoderLayer

    def unit(m) -> tuple[int, int, bool]:
        group = m._get_fsdp_state()._fsdp_param_group
        if group is None:
            return 0, 0, False
        dtype = group.mp_policy.param_dtype
        numel = sum(fp._orig_size.numel() for fp in group.fsdp_params)
        size = (dtype or group.fsdp_params[0].sharded_param.dtype).itemsize if group.fsdp_params else 0
        return numel * size, numel, group.post_forward_mesh_info is None

    held, blocks, numel_all = 0, [], 0
    for root in modules:
        in_blocks = set()
        for m in root.modules():
            if isinstance(m, DecoderLayer):
                units = [unit(u) for u in m.modules() if isinstance(u, FSDPModule)]
                in_blocks.update(id(u) for u in m.modules())
                numel_all += sum(n for _, n, _ in units)
                held += sum(b for b, _, keep in units if keep or pipeline)
                blocks.append(sum(b for b, _, keep in units if not (keep or pipeline)))
        for m in root.modules():
            if isinstance(m, FSDPModule) and id(m) not in in_blocks:
                b, n, _ = unit(m)
                held += b  # the root stays gathered from its forward to its backward
                numel_all += n
    gathered = held + 2 * max(blocks, default=0)
    return gathered, (numel_all * 4 if grad_accum > 1 else 0)


def rank_layers(modules) -> int:
    """Decoder layers this rank holds (pipeline stages keep a subset)."""
    from r1zero.model.modeling import DecoderLayer

    return sum(1 for root in modules for m in root.modules() if isinstance(m, DecoderLayer))


def activation_bytes(cfg, layers: int, stage_index: int, holds_logits: bool) -> int:
    """Stored activations of this rank (computed; see the module docstring)."""
    from r1zero.sizing import activation_bytes_per_layer
    from r1zero.sizing_cli import spec_from_config

    spec = spec_from_config(cfg)
    p, pre = cfg.parallel, cfg.pretrain
    recompute = "full" if pre.activation_checkpointing else "none"
    sp = p.tp > 1
    # 1F1B: stage i keeps (pp - i) micro-batches in flight (Narayanan et al. 2021 sec. 2.2);
    # GPipe keeps all of them.
    in_flight = min(p.pp - stage_index, pre.grad_accum) if p.pp > 1 else 1
    if p.pp > 1 and p.pp_schedule == "gpipe":
        in_flight = pre.grad_accum
    if p.pp > 1 and p.pp_schedule == "interleaved_1f1b":
        from r1zero.sizing import interleaved_in_flight

        in_flight = interleaved_in_flight(stage_index, p.pp, p.virtual_stages(), pre.grad_accum)
    # routed experts run on the tp-gathered sequence (r1zero.train.parallelize): not split over tp
    act = activation_bytes_per_layer(spec, pre.micro_batch, p.tp, recompute, sp, False) * layers * in_flight
    if recompute == "full" and layers:  # the layer being recomputed holds its full activations once
        act += activation_bytes_per_layer(spec, pre.micro_batch, p.tp, "none", sp, False)
    if holds_logits:  # compute-dtype logits, their fp32 copy and cross_entropy's fp32 log-softmax
        low = 4 if cfg.pretrain.precision == "fp32" else 2
        act += pre.seq_len * pre.micro_batch * cfg.model.vocab_size / p.tp * (low + 8)
    return int(act)


def _optimizer(pm, cfg):
    """The engine's optimizer when it exposes a builder, else AdamW over the trainable parameters
    (same state per element: exp_avg and exp_avg_sq)."""
    import torch

    try:
        from r1zero.train import engine
    except ImportError:
        engine = None
    build = getattr(engine, "build_optimizer", None)
    if build is not None:
        return build(pm.model, cfg.pretrain)
    return torch.optim.AdamW(_unique(p for p in pm.model.parameters() if p.requires_grad), lr=cfg.pretrain.lr)


def measure_rank(cfg, rank: int, world_size: int, stage: str = "pretrain") -> dict:
    """Bytes one rank holds, measured under the fake process group on the meta device."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from r1zero.train import parallelize as P
    from r1zero.train.parallel_dims import ParallelDims

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        if stage == "grpo":
            return _measure_grpo(cfg, rank, world_size)
        dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=world_size,
                                        grad_accum=cfg.pretrain.grad_accum)
        mesh = P.build_mesh(dims, "cpu")
        if cfg.pretrain.precision == "fp8":
            # torchao's float8 training casts inside the matmuls and keeps bf16 compute copies of
            # the same shapes: size it as bf16 (fp8 conversion needs a Hopper GPU to run at all)
            cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"precision": "bf16"})})
        pm = P.parallelize(P.build_meta_model(cfg), mesh, cfg)
        # interleaved stages: the chunks are the FSDP roots (the container holds the same parameters)
        modules = getattr(pm.model, "chunks", None) or [pm.model]
        optimizer = _optimizer(pm, cfg)
        for m in modules:
            for prm in m.parameters():
                if prm.requires_grad:
                    prm.grad = torch.zeros_like(prm)
        optimizer.step()  # AdamW allocates exp_avg / exp_avg_sq (meta) on its first step
        out = count_state_bytes(modules, optimizer)
        gathered, grads = (fsdp_buffer_bytes(modules, cfg.pretrain.grad_accum, pipeline=dims.pp > 1) if pm.fsdp
                           else (0, 0))
        out["fsdp_buffers_bytes"], out["unsharded_grads_bytes"] = gathered, grads
        stage_index = pm.pp_rank
        holds_logits = pm.last
        out["layers"] = rank_layers(modules)
        out["activations_bytes"] = activation_bytes(cfg, out["layers"], stage_index, holds_logits)
        out["total_bytes"] = sum(out[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "buffers_bytes",
                                                  "fsdp_buffers_bytes", "unsharded_grads_bytes", "activations_bytes"))
        return {"rank": rank, "pp_stage": stage_index, **out}
    finally:
        dist.destroy_process_group()


def _measure_grpo(cfg, rank: int, world_size: int) -> dict:
    """One rank of the sharded GRPO update (r1zero.grpo.sharded), under the fake process group.

    Update phase: the policy's sharded states (measured, as for pretraining), FSDP2's gathered
    copies, the activations of one micro-batch of full-context sequences with their logits, and
    the reference's resident shards. Rollout phase: the policy's and reference's resident shards
    (gradients freed) plus the rollout engine's share of the device (it sleeps during the update).
    ``total_bytes`` is the larger phase.
    """
    import torch

    from r1zero.grpo import sharded as S
    from r1zero.train import parallelize as P
    from r1zero.train.parallel_dims import ParallelDims

    ecfg = S.engine_config(cfg, world_size)
    dims = ParallelDims.from_config(ecfg.parallel, ecfg.model, world_size=world_size)
    mesh = P.build_mesh(dims, "cpu")
    pm = S.build_policy(ecfg, mesh)
    optimizer = S.build_optimizer(pm.model, cfg.grpo)
    for prm in pm.model.parameters():
        if prm.requires_grad:
            prm.grad = torch.zeros_like(prm)
    optimizer.step()
    out = count_state_bytes([pm.model], optimizer)
    # gradients are reduce-scattered after every micro-batch: no unsharded gradients are kept
    out["fsdp_buffers_bytes"] = fsdp_buffer_bytes([pm.model], 1)[0] if pm.fsdp else 0
    out["unsharded_grads_bytes"] = 0
    out["layers"] = rank_layers([pm.model])
    out["activations_bytes"] = activation_bytes(ecfg, out["layers"], 0, True)
    ref = {"reference_bytes": 0, "reference_buffers_bytes": 0}
    if cfg.grpo.beta > 0:
        rm = S.build_reference(ecfg, mesh)
        st = count_state_bytes([rm.model], torch.optim.SGD([torch.zeros(1)]))
        ref = {"reference_bytes": st["params_bytes"] + st["buffers_bytes"],
               "reference_buffers_bytes": fsdp_buffer_bytes([rm.model], 1)[0] if rm.fsdp else 0}
    out.update(ref)
    gpu = _grpo_device_bytes(cfg)
    roll = S.rollout_budget(ecfg, cfg, world_size, gpu)
    S.check_rollout(roll)
    out.update(roll)
    # the trainer's full fp32 policy beside the shards (native sampler under fsdp2): every phase
    out["rollout_copy_bytes"] = S.rollout_copy_bytes(ecfg, cfg)
    resident = out["params_bytes"] + out["optimizer_bytes"] + out["buffers_bytes"] + out["reference_bytes"] \
        + out["rollout_copy_bytes"]
    # the reference's forward (gathered blocks) runs before the update, not during it
    # (gradients are freed by zero_grad(set_to_none=True) after each step; no_grad: logits only)
    out["reference_phase_bytes"] = resident + out["reference_buffers_bytes"] + activation_bytes(ecfg, 0, 0, True)
    out["update_bytes"] = resident + sum(out[k] for k in ("grads_bytes", "fsdp_buffers_bytes", "activations_bytes"))
    out["rollout_bytes"] = resident + roll["rollout_engine_bytes"]
    out["total_bytes"] = max(out["update_bytes"], out["rollout_bytes"], out["reference_phase_bytes"])
    out["micro_batch"] = ecfg.pretrain.micro_batch
    out["micro_batches"] = ecfg.pretrain.grad_accum
    return {"rank": rank, "pp_stage": 0, **out}


def _grpo_device_bytes(cfg) -> float:
    """The GPU the rollout engine's ``gpu_memory_utilization`` is a fraction of (set by the parent)."""
    from r1zero.sizing import GPUS

    name = os.environ.get("R1ZERO_DRYRUN_GPU") or cfg.cluster.gpu
    return GPUS[name].hbm_gb * 1e9


# ---------------------------------------------------------------------------------------------
# orchestration


def _run_rank(cfg, rank: int, world_size: int, stage: str, gpu: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"R1ZERO_DRYRUN_GPU": gpu} if gpu else {})}
    payload = json.dumps({"config": cfg.to_dict(), "rank": rank, "world_size": world_size, "stage": stage})
    proc = subprocess.run([sys.executable, "-m", "r1zero.train.dryrun"], input=payload, capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"dry run of rank {rank} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dry_run(cfg, ranks: list[int] | None = None, stage: str = "pretrain", world_size: int | None = None,
            gpu: str | None = None, headroom: float = 0.10) -> dict:
    """The ``r1zero plan --dry-run --json`` object (see the module docstring)."""
    from r1zero.sizing import GPUS, usable_bytes
    from r1zero.sizing_cli import planner_layout_bytes

    if stage not in STAGES:
        raise UserError(f"--stage {stage}: the dry run supports {', '.join(STAGES)}")
    world = world_size or world_size_of(cfg)
    if stage == "grpo":
        from r1zero.grpo.sharded import grpo_layout_problems

        errs = grpo_layout_problems(cfg, world)
        if errs:
            raise UserError(f"GRPO stage at world size {world} (dp={world}, ep={cfg.parallel.ep}): " + "; ".join(errs))
        # dp = world, tp = pp = 1: every rank holds the same shapes (ep ranks: other experts, same sizes)
        default = [0]
    else:
        check_layout(cfg, world)
        default = default_ranks(cfg, world)
    ranks = default if not ranks else sorted(set(ranks))
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        raise UserError(f"--ranks {','.join(map(str, bad))}: outside the world of {world} ranks")
    gpu_name = gpu or cfg.cluster.gpu
    if gpu_name not in GPUS:
        raise UserError(f"the dry run sizes a GPU: pass --gpu {'|'.join(GPUS)} (config cluster.gpu is {gpu_name!r})")
    from r1zero.progress import progress

    # two ranks at a time: each process is mostly interpreter and import time on one core
    with ThreadPoolExecutor(max_workers=min(2, len(ranks))) as pool:
        futures = [pool.submit(_run_rank, cfg, r, world, stage, gpu_name) for r in ranks]
        results = [f.result() for f in progress(futures, desc="dry run: ranks", unit="rank")]
    if stage == "grpo":
        from r1zero.grpo.sharded import engine_config

        planner = planner_layout_bytes(engine_config(cfg, world))  # the update's layout, policy only
    else:
        planner = planner_layout_bytes(cfg)
    device = GPUS[gpu_name].hbm_gb * 1e9
    usable = usable_bytes(GPUS[gpu_name], headroom)
    largest = max(results, key=lambda x: x["total_bytes"])
    extra = {}
    if stage == "grpo":  # the per-GPU figures, in GB, of the largest rank
        extra = {"reference_gb": round(largest["reference_bytes"] / 1e9, 3),
                 "rollout_copy_gb": round(largest["rollout_copy_bytes"] / 1e9, 3),
                 "kv_cache_gb": round(largest["kv_cache_bytes"] / 1e9, 3),
                 "kv_cache_tokens": largest["kv_cache_tokens"], "kv_tokens_needed": largest["kv_tokens_needed"],
                 "phases": "total_bytes = max(update_bytes, rollout_bytes, reference_phase_bytes): the rollout "
                           "engine sleeps during the update (r1zero.grpo.sharded)"}
    from r1zero.train.parallel_dims import ParallelDims

    p = cfg.parallel
    spans = group_spans(cfg, ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, ep=p.ep, world_size=world,
                                          dp_replicate=p.dp_replicate)) if stage == "pretrain" else {}
    return {
        **extra, **spans,
        "world_size": world, "stage": stage, "gpu": gpu_name,
        "ranks": results,
        "planner_total_bytes": planner["total"], "planner_states_bytes": planner["states"],
        "device_bytes": int(device), "usable_bytes": int(usable), "headroom": headroom,
        "fits": largest["total_bytes"] <= usable,
        "activations": "computed (Korthikanti et al. 2022 per-layer formula x layers x 1F1B in-flight micro-batches)"
                       if stage == "pretrain" else
                       "computed (Korthikanti et al. 2022 per-layer formula x layers, one update micro-batch of "
                       "full-context sequences, with its logits)",
    }


def refuse_if_not_fitting(result: dict) -> None:
    """One-line UserError when the largest rank does not fit the usable device memory."""
    if not result["fits"]:
        worst = max(result["ranks"], key=lambda x: x["total_bytes"])
        raise UserError(f"layout does not fit: rank {worst['rank']} needs {worst['total_bytes'] / 1e9:.1f} GB > "
                        f"{result['usable_bytes'] / 1e9:.1f} GB usable of {result['device_bytes'] / 1e9:.0f} GB "
                        f"({result['gpu']}, {result['headroom']:.0%} headroom)")


def _child_main() -> int:
    from r1zero.config import build_config

    req = json.loads(sys.stdin.read())
    try:
        out = measure_rank(build_config(req["config"]), req["rank"], req["world_size"], req["stage"])
    except UserError as err:
        print(str(err), file=sys.stderr)
        return 2
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
