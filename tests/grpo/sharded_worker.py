"""GRPO update steps on the sharded policy (r1zero.grpo.sharded) for the parity test.

    torchrun --nproc-per-node N tests/grpo/sharded_worker.py OUT name:ep=E[,precision=P] ...

Every spec builds the policy and the reference with the pretraining engine's parallelize() (FSDP2,
EP when ep > 1) at the launched world size, initialised with the world-1 values of the seed, and
runs STEPS micro-batched update steps on one fixed rollout batch of 4 groups of 4 completions:
world 1 holds every group, world 2 rank 0 groups 0-2 and rank 1 group 3 (uneven on purpose: rank 1
runs dummy micro-batches). Rank r writes OUT/name/rank<r>.pt: per-step stats, the reference's and
the rollout policy's log-probs of its rows, and the full tensors of the parameters it holds after
the steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from r1zero.config import build_config
from r1zero.grpo import sharded as S
from r1zero.grpo.update import NanGuard, build_batch, forward_completion
from r1zero.train import parallelize as P
from r1zero.train.parallel_dims import ParallelDims

STEPS = 3
GROUPS, G, VOCAB = 4, 4, 64
MICRO = 3  # completions per forward/backward: world 1 and world 2 cut the same micro-batches


def config(ep: int, precision: str):
    return build_config({
        "seed": 3,
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32,
                  "moe": {"n_experts": 4, "top_k": 2, "n_shared": 1, "d_expert": 16, "router": "softmax"}},
        "parallel": {"ep": ep},
        "pretrain": {"precision": precision, "activation_checkpointing": False},
        "grpo": {"prompts_per_step": GROUPS, "group_size": G, "micro_batch": MICRO, "beta": 0.04, "lr": 3e-3,
                 "max_new_tokens": 8, "loss_agg": "token"},
    })


def rollout() -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """(prompts, completions, advantages) of GROUPS x G completions, fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    prompts, comps = [], []
    for _ in range(GROUPS):
        p = torch.randint(1, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(G):
            prompts.append(p)
            comps.append(torch.randint(1, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist())
    adv = torch.randn(GROUPS * G, generator=g)
    return prompts, comps, adv


def my_rows(rank: int, world: int) -> tuple[int, int]:
    if world == 1:
        return 0, GROUPS * G
    return (0, 3 * G) if rank == 0 else (3 * G, GROUPS * G)


def _slice(batch, lo: int, hi: int):
    from r1zero.grpo.update import Batch

    return Batch(batch.input_ids_BL[lo:hi], batch.attention_BL[lo:hi], batch.position_BL[lo:hi],
                 batch.targets_BT[lo:hi], batch.mask_BT[lo:hi], batch.prompt_len)


def run(out: Path, ep: int, precision: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = config(ep, precision)
    ecfg = S.engine_config(cfg, world)
    dims = ParallelDims.from_config(ecfg.parallel, ecfg.model, world_size=world)
    mesh = P.build_mesh(dims, "cpu")
    cpu = torch.device("cpu")
    pm = S.build_policy(ecfg, mesh)
    P.materialize(pm, cpu, cfg.seed)
    ref = S.build_reference(ecfg, mesh)
    P.materialize(ref, cpu, cfg.seed)
    opt = S.build_optimizer(pm.model, cfg.grpo)
    prompts, comps, adv = rollout()
    lo, hi = my_rows(rank, world)
    # the rows of one global batch (same padding in every world): the MoE aux loss of a forward
    # over a padded batch counts its padding tokens too, so per-rank padding would change it
    batch = _slice(build_batch(prompts, comps, pad_id=0), lo, hi)
    g = cfg.grpo
    ref_logp = S.sharded_logprobs(ref.model, batch, g.temperature, g.micro_batch)
    old_logp = S.sharded_logprobs(pm.model, batch, g.temperature, g.micro_batch)
    guard = NanGuard(g.nan_abort_after)
    steps = []
    for _ in range(STEPS):
        steps.append(S.sharded_policy_update(pm.model, opt, batch, adv[lo:hi], g, guard=guard,
                                             micro_batch=g.micro_batch, dp=dims.dp, old_logp_BT=old_logp,
                                             ref_logp_BT=ref_logp, local_fraction=(hi - lo) / (GROUPS * G)))
    with torch.no_grad():  # the activations' dtype (FSDP2's MixedPrecisionPolicy casts to bf16)
        compute_dtype = str(forward_completion(pm.model, _slice(batch, 0, 1), 1.0)[1].logits.dtype)
    S.reshard(pm.model)
    weights = S.full_state(pm.model)
    (out / f"rank{rank}.pt").parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rows": (lo, hi), "steps": steps, "ref_logp": ref_logp, "old_logp": old_logp, "weights": weights,
                "fsdp": pm.fsdp, "mask": batch.mask_BT,
                "compute_dtype": compute_dtype}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    root, *specs = [a for a in sys.argv[1:] if not a.startswith("--local")]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for spec in specs:
            name, _, sets = spec.partition(":")
            kv = dict(x.split("=") for x in filter(None, sets.split(",")))
            run(Path(root) / name, int(kv.get("ep", 1)), kv.get("precision", "fp32"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
