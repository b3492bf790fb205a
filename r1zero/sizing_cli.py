"""``r1zero plan``: the best parallel layout for a model on a GPU cluster, with its estimates.

    r1zero plan --config configs/a100-13b.yaml --gpus 1024
    r1zero plan --layers 96 --hidden 16384 --heads 128 --vocab 51200 --seq 2048 \
        --global-batch 2160 --gpus 1920 --gpu a100-80gb --json

The model comes from the config's ``model`` section (MoE, SwiGLU, RoPE, fused attention) unless
shape flags are given; flags override single fields. Hardware comes from ``cluster`` (gpu,
gpus_per_node, ib_gbps x nics_per_node). The formulas live in :mod:`r1zero.sizing`.
"""

from __future__ import annotations

import json
from dataclasses import replace

from r1zero.cli import add_config_args, config_from_args
from r1zero.errors import UserError
from r1zero.sizing import GPUS, Hardware, Layout, ModelSpec, estimate, plan, spec_from_params, stage_memory, to_json

# What the article this project reproduces claims for its 13B MoE on 1024 A100s. Printed as
# claims next to the planner's predictions, never as facts.
ARTICLE_CLAIMS = {"gpu_utilisation": 0.98, "scaling_efficiency": 0.87, "comm_overhead_max": 0.12}


def spec_from_config(cfg) -> ModelSpec:
    """The r1zero model: SwiGLU experts of width d_expert, RoPE (no position table), SDPA attention.

    With ``model.base`` the base's real shape, read from its config.json.
    """
    m = cfg.model
    if m.base:
        from r1zero.data.base import read_config
        from r1zero.sizing import spec_from_hf_config

        return spec_from_hf_config(read_config(m.base), cfg.pretrain.seq_len)
    return ModelSpec(
        layers=m.n_layers, hidden=m.d_model, heads=m.n_heads, kv_heads=m.n_kv_heads, vocab=m.vocab_size,
        head_dim=m.head_dim,
        seq=cfg.pretrain.seq_len, ffn=m.moe.d_expert * (m.moe.top_k + m.moe.n_shared),
        experts=m.moe.n_experts, top_k=m.moe.top_k, shared_experts=m.moe.n_shared, expert_ffn=m.moe.d_expert,
        gated=True, tied_embeddings=m.tie_embeddings, learned_positions=False, flash_attention=True,
    )


def _resolve(args):
    cfg = config_from_args(args) if args.config else None
    if args.params is not None:
        spec = spec_from_params(args.params * 1e9 if args.params < 1e5 else args.params,
                                seq=args.seq or 2048, vocab=args.vocab or 51200)
    elif cfg is not None:
        spec = spec_from_config(cfg)
    else:
        missing = [f"--{n}" for n in ("layers", "hidden", "heads") if getattr(args, n) is None]
        if missing:
            raise UserError(f"plan needs --config, --params or the model shape ({', '.join(missing)} missing)")
        spec = ModelSpec(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab or 51200,
                         seq=args.seq or 2048)
    shape = {k: v for k, v in {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "ffn": args.ffn,
                               "vocab": args.vocab, "seq": args.seq, "experts": args.experts,
                               "top_k": args.top_k}.items() if v is not None}
    if shape:
        spec = replace(spec, **shape)
        if args.experts == 1:
            spec = replace(spec, shared_experts=0, top_k=1)
    for name in ("layers", "hidden", "heads", "vocab", "seq", "experts", "top_k"):
        if getattr(spec, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(spec, name)})")
    if spec.hidden % spec.heads:
        raise UserError(f"hidden ({spec.hidden}) must be divisible by heads ({spec.heads})")
    if spec.top_k > spec.experts:
        raise UserError(f"top-k ({spec.top_k}) must be <= experts ({spec.experts})")

    gpu_name = args.gpu or (cfg.cluster.gpu if cfg else None)
    if gpu_name in (None, "cpu"):
        raise UserError(f"plan sizes GPU clusters: pass --gpu {'|'.join(GPUS)} (config cluster.gpu is {gpu_name!r})")
    gpus_per_node = args.gpus_per_node or (cfg.cluster.gpus_per_node if cfg and cfg.cluster.gpus_per_node else 8)
    gpus = args.gpus or (cfg.cluster.nodes * gpus_per_node if cfg else gpus_per_node)
    if gpus < 1 or gpus_per_node < 1:
        raise UserError("--gpus and --gpus-per-node must be >= 1")
    inter = args.inter_node_gbps or ((cfg.cluster.ib_gbps * cfg.cluster.nics_per_node / 8) if cfg else 200.0)
    gpu = GPUS[gpu_name]
    if args.nvlink_gbps:
        gpu = replace(gpu, nvlink_gbps=args.nvlink_gbps)
    if inter <= 0 or gpu.nvlink_gbps <= 0:
        raise UserError("bandwidths must be positive")
    hw = Hardware(gpu, gpus, gpus_per_node, inter)
    global_batch = args.global_batch or (cfg.cluster.global_batch if cfg else 1024)
    precision = args.precision or (cfg.pretrain.precision if cfg else "bf16")
    return spec, hw, global_batch, precision, cfg


def layout_from_config(cfg) -> Layout:
    """The config's own ``parallel`` section as the planner's :class:`Layout` (r1zero's engine)."""
    p = cfg.parallel
    recompute = "full" if cfg.pretrain.activation_checkpointing else "none"
    return Layout(tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep, zero_stage=p.zero_stage, micro_batch=cfg.pretrain.micro_batch,
                  recompute=recompute, schedule=getattr(p, "pp_schedule", "1f1b"), interleave=p.virtual_stages(), dp_replicate=p.dp_replicate)


def config_layout(cfg, spec: ModelSpec, hw: Hardware, global_batch: int, precision: str, headroom: float):
    """Estimate of the config's own ``parallel`` section, or None when it does not span ``hw.gpus``."""
    p = cfg.parallel
    if p.dp * p.tp * p.pp != hw.gpus or global_batch % p.dp or (global_batch // p.dp) % cfg.pretrain.micro_batch:
        return None
    return estimate(spec, hw, layout_from_config(cfg), global_batch, precision, headroom)


def planner_layout_bytes(cfg) -> dict:
    """The planner's bytes per rank of the config's own layout, worst pipeline stage
    (:func:`r1zero.sizing.stage_memory`): ``{"total", "states", "parts"}``, states = weights +
    gradients + optimizer."""
    spec, layout = spec_from_config(cfg), layout_from_config(cfg)
    precision = "bf16" if cfg.pretrain.precision == "fp8" else cfg.pretrain.precision
    p = layout.pp
    stages = [stage_memory(spec, layout, cfg.pretrain.grad_accum, precision, first=i == 0, last=i == p - 1)
              for i in sorted({0, p - 1})]
    worst = max(stages, key=lambda m: sum(m.values()))
    return {"total": int(sum(worst.values())),
            "states": int(max(m["weights"] + m["gradients"] + m["optimizer"] for m in stages)),
            "parts": {k: int(v) for k, v in worst.items()}}


def _dry_run(args) -> int:
    from r1zero.train.dryrun import dry_run, refuse_if_not_fitting

    if not args.config:
        raise UserError("--dry-run builds the config's own layout: pass --config")
    cfg = config_from_args(args)
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()] if args.ranks else None
    except ValueError:
        raise UserError(f"--ranks {args.ranks!r}: expected comma-separated integers, e.g. 0,7,1023") from None
    out = dry_run(cfg, ranks=ranks, stage=args.stage, world_size=args.gpus, gpu=args.gpu, headroom=args.headroom)
    refuse_if_not_fitting(out)  # before any output: a refused layout prints its one line only
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for r in out["ranks"]:
            print(f"rank {r['rank']} (pp stage {r['pp_stage']}): params {r['params_bytes'] / 1e9:.2f} GB, grads "
                  f"{r['grads_bytes'] / 1e9:.2f} GB, optimizer {r['optimizer_bytes'] / 1e9:.2f} GB, FSDP buffers "
                  f"{r['fsdp_buffers_bytes'] / 1e9:.2f} GB, unsharded grads {r['unsharded_grads_bytes'] / 1e9:.2f} GB, "
                  f"activations {r['activations_bytes'] / 1e9:.2f} GB, "
                  f"total {r['total_bytes'] / 1e9:.2f} GB")
            if out["stage"] == "grpo":
                print(f"  reference {r['reference_bytes'] / 1e9:.3f} GB; full policy copy "
                      f"{r['rollout_copy_bytes'] / 1e9:.1f} GB; rollout engine {r['rollout_engine_bytes'] / 1e9:.1f}"
                      f" GB: weights {r['rollout_weights_bytes'] / 1e9:.1f} GB, KV cache {r['kv_cache_bytes'] / 1e9:.1f} GB"
                      f" ({r['kv_cache_tokens']} tokens, {r['kv_tokens_needed']} needed); phases: update "
                      f"{r['update_bytes'] / 1e9:.1f} GB, rollout {r['rollout_bytes'] / 1e9:.1f} GB")
        print(f"planner: {out['planner_total_bytes'] / 1e9:.2f} GB per rank; device {out['device_bytes'] / 1e9:.0f} GB, "
              f"usable {out['usable_bytes'] / 1e9:.1f} GB: fits")
    return 0


def _plan(args) -> int:
    if args.dry_run:
        return _dry_run(args)
    spec, hw, global_batch, precision, cfg = _resolve(args)
    est = plan(spec, hw, global_batch, precision, headroom=args.headroom)
    out = to_json(est, hw)
    busy = 1 - est.bubble_fraction
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    kind = f"MoE {spec.experts} experts top-{spec.top_k}" if spec.moe else "dense"
    print(f"model: {spec.total_params() / 1e9:.2f}B parameters ({spec.active_params() / 1e9:.2f}B active, {kind}), "
          f"{spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads, seq {spec.seq}, vocab {spec.vocab}")
    print(f"hardware: {hw.gpus} x {hw.gpu.name} ({hw.nodes} nodes x {hw.gpus_per_node}), {precision}, "
          f"global batch {global_batch}")
    L = est.layout
    print(f"layout: tp={L.tp} pp={L.pp} dp={L.dp} ep={L.ep} zero={L.zero_stage} micro_batch={L.micro_batch} "
          f"grad_accum={est.grad_accum} recompute={L.recompute}")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in est.memory_gb.items())
    print(f"memory per GPU: {est.memory_per_gpu_gb:.1f} GB of {est.usable_gb:.1f} usable ({parts})")
    print(f"step: {est.step_seconds:.2f} s; {est.tflops_per_gpu:.0f} TFLOP/s per GPU; MFU {est.mfu:.1%}; "
          f"bubble {est.bubble_fraction:.1%}; communication {est.comm_fraction:.1%}; "
          f"scaling efficiency {est.scaling_efficiency:.2f}")
    mine = config_layout(cfg, spec, hw, global_batch, precision, args.headroom) if cfg and args.params is None else None
    if mine is not None:
        C = mine.layout
        print(f"config's own layout (parallel section) tp={C.tp} pp={C.pp} dp={C.dp} ep={C.ep} zero={C.zero_stage} "
              f"micro_batch={C.micro_batch} recompute={C.recompute}: {'fits' if mine.fits else 'does NOT fit'}, "
              f"{mine.memory_per_gpu_gb:.1f} GB, {mine.tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {mine.mfu:.1%}, "
              f"bubble {mine.bubble_fraction:.1%}, communication {mine.comm_fraction:.1%}")
        spans = to_json(mine, hw)
        print(f"  an expert-parallel group spans {spans['ep_group_nodes']} node(s), a tensor-parallel group "
              f"{spans['tp_group_nodes']} (of {hw.gpus_per_node} GPUs each)")
    if spec.moe and hw.gpus == 1024 and "a100" in hw.gpu.name:
        c = ARTICLE_CLAIMS
        print("article's claims (not verified here) vs this planner's predictions:")
        print(f"  GPU utilisation: claimed {c['gpu_utilisation']:.0%}; predicted busy (non-bubble) time "
              f"{busy:.1%}, MFU {est.mfu:.1%}")
        print(f"  scaling efficiency: claimed {c['scaling_efficiency']:.2f}; predicted {est.scaling_efficiency:.2f}")
        print(f"  communication overhead: claimed at most {c['comm_overhead_max']:.0%}; predicted {est.comm_fraction:.1%}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="size a parallel layout (tp/pp/dp/ep/ZeRO) for a model on GPUs")
    add_config_args(p)
    p.add_argument("--gpus", type=int, help="total GPUs (default: cluster.nodes x cluster.gpus_per_node)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: cluster.gpus_per_node or 8)")
    p.add_argument("--gpu", choices=sorted(GPUS), help="GPU type (default: cluster.gpu)")
    p.add_argument("--nvlink-gbps", type=float, help="NVLink GB/s per GPU per direction (A100: 300, H100: 450)")
    p.add_argument("--inter-node-gbps", type=float,
                   help="inter-node GB/s per node (default: cluster.ib_gbps x nics_per_node / 8 = 200 for 8x HDR)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp8", "fp32"], help="default: pretrain.precision")
    p.add_argument("--global-batch", type=int, help="sequences per step (default: cluster.global_batch)")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--ffn", type=int, help="MLP width (default 4 x hidden)")
    p.add_argument("--vocab", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--experts", type=int, help="1 = dense")
    p.add_argument("--top-k", type=int)
    p.add_argument("--params", type=float, help="parameter count (e.g. 13 for 13B, or 1.3e10) for a GPT shape")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free (default 0.10)")
    p.add_argument("--json", action="store_true", help="print the layout and estimates as JSON")
    p.add_argument("--dry-run", action="store_true",
                   help="build the config's real parallelised model and optimizer per rank under a fake process "
                        "group on the meta device and report bytes per rank (r1zero.train.dryrun)")
    p.add_argument("--ranks", help="with --dry-run: comma-separated ranks (default: first rank of each pipeline stage)")
    p.add_argument("--stage", default="pretrain", choices=["pretrain", "grpo"],
                   help="with --dry-run: the training stage to size (grpo: policy, reference and rollout engine)")
    p.set_defaults(func=_plan)
