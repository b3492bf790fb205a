"""Startup of the sharded GRPO update from an HF policy dir (r1zero.grpo.sharded.ShardedGRPO).

    torchrun --nproc-per-node N tests/grpo/sharded_load_worker.py OUT MODEL_DIR EP SIZES_JSON [--every-rank]

Rank 0 loads the policy's weights, the other ranks its config on meta (``load_causal_lm(...,
weights=False)``), as the trainer does under vLLM rollouts; ``--every-rank``: every rank loads the
weights (the layout before rank-0 broadcast, for the memory figure). ShardedGRPO then builds the
FSDP2 (+ EP) policy and the reference (``grpo.beta > 0``) and fills them. Rank r writes
OUT/rank<r>.pt: the full tensors of the policy's and the reference's parameters and buffers it
holds (under EP only its own experts), its peak host RSS (VmHWM) after startup, and the GRPO
AdamW's check against AdamW's per-parameter loop (:func:`optimizer_check`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from r1zero.config import build_config
from r1zero.grpo import sharded as S
from r1zero.model import load_causal_lm


def config(ep: int, sizes: dict):
    """The GRPO config of a small MoE policy (``sizes``: vocab_size, d_model, n_layers, n_experts,
    d_expert; optional precision, fp32 by default)."""
    return build_config({
        "seed": 3,
        "model": {"vocab_size": sizes["vocab_size"], "d_model": sizes["d_model"], "n_layers": sizes["n_layers"],
                  "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32,
                  "moe": {"n_experts": sizes["n_experts"], "top_k": 2, "n_shared": 1, "d_expert": sizes["d_expert"],
                          "router": "sigmoid"}},
        "parallel": {"ep": ep},
        "pretrain": {"activation_checkpointing": False, "precision": sizes.get("precision", "fp32")},
        "grpo": {"prompts_per_step": 4, "group_size": 4, "micro_batch": 4, "beta": 0.04, "max_new_tokens": 8},
    })


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _held(model) -> dict[str, torch.Tensor]:
    """Full tensors (world-1 names) of the parameters and persistent buffers this rank holds."""
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = full.detach().cpu().clone()
    return out


def optimizer_check(model, lr: float, steps: int = 3) -> dict:
    """The GRPO AdamW (one group per mesh, foreach) against AdamW's per-parameter loop over the
    same shards and the same fixed gradients: both run ``steps`` steps from the same weights.
    Returns the groups' and meshes' counts, the largest difference of the local shards after the
    steps and the seconds of each optimizer step of either."""
    import time

    from torch.distributed.tensor import DTensor

    from r1zero.config import GRPOConfig
    from r1zero.grpo.update import RL_BETAS

    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().to_local().clone() if isinstance(p, DTensor) else p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(dist.get_rank())
    grads = [torch.randn(s.shape, generator=g) * 1e-2 for s in start]

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p

    def run(opt) -> tuple[list[torch.Tensor], list[float]]:
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                local(p).copy_(s)
        secs = []
        for _ in range(steps):
            for p, gr in zip(params, grads, strict=True):
                p.grad = DTensor.from_local(gr.clone(), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride()) if isinstance(p, DTensor) else gr.clone()
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            secs.append(time.perf_counter() - t0)
        return [local(p).detach().clone() for p in params], secs

    grouped = S.build_optimizer(model, GRPOConfig(lr=lr))
    got, t_grouped = run(grouped)
    loop = torch.optim.AdamW(params, lr=lr, betas=RL_BETAS, weight_decay=0.0, foreach=False)
    want, t_loop = run(loop)
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    return {"groups": len(grouped.param_groups), "meshes": len(meshes),
            "group_meshes": [len({p.device_mesh for p in gr["params"]}) for gr in grouped.param_groups],
            "foreach": [gr["foreach"] for gr in grouped.param_groups],
            "max_diff": max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)),
            "moved": max(float((a - s).abs().max()) for a, s in zip(got, start, strict=True)),
            "step_s_grouped": t_grouped, "step_s_loop": t_loop}


def main(out: Path, model_dir: str, ep: int, sizes: dict, every_rank: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(ep, sizes)
    rss_before = _status("VmRSS")
    weights = every_rank or rank == 0
    policy, _ = load_causal_lm(model_dir, require_tokenizer=False, **({} if every_rank else {"weights": weights}))
    sg = S.ShardedGRPO(cfg, policy, world, torch.device("cpu"), keep_rollout_model=False)
    del policy
    hwm = _status("VmHWM")
    out.mkdir(parents=True, exist_ok=True)
    held = {"policy": _held(sg.pm.model), "reference": _held(sg.ref.model)}
    opt = optimizer_check(sg.pm.model, cfg.grpo.lr, steps=int(os.environ.get("OPT_STEPS", "3")))
    torch.save({**held, "vm_hwm": hwm, "rss_before_load": rss_before, "fsdp": sg.pm.fsdp, "optimizer": opt},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    every = "--every-rank" in args
    root, model_dir, ep, sizes = [a for a in args if a != "--every-rank"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        main(Path(root), model_dir, int(ep), json.loads(sizes), every)
        dist.barrier()
    finally:
        dist.destroy_process_group()
