"""One rank of the 2-process tensor/expert-parallel parity check (run by test_parallel_parity.py).

    python tests/model/parallel_worker.py RANK WORLD PORT OUT_JSON

Builds the same seeded model as a single-process reference, applies the pretraining engine's
DTensor tensor-parallel plan with sequence parallelism and its expert parallelism (each rank keeps
only its experts; all-to-all dispatch) from ``r1zero.train.parallelize`` and writes the largest
forward and gradient differences against the reference.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM

CFG = dict(vocab_size=48, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           n_experts=4, num_experts_per_tok=2, n_shared=1, d_expert=16, n_dense_layers=1, aux_loss_coef=0.1,
           z_loss_coef=0.01)


def fresh(**kw) -> R1ZeroForCausalLM:
    torch.manual_seed(0)
    return R1ZeroForCausalLM(R1ZeroConfig(**{**CFG, **kw})).train()


def maxdiff(a, b) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def check_tp(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from r1zero.train.parallelize import apply_tp

    torch.manual_seed(1)
    ids = torch.randint(0, 48, (3, 10))
    ref = fresh()
    out_ref = ref(ids, labels=ids)
    out_ref.loss.backward()
    model = fresh()
    apply_tp(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = 0.0
    ref_p = dict(ref.named_parameters())
    n_sharded = 0
    for name, p in model.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
            n_sharded += 1
        grads = max(grads, maxdiff(g, ref_p[name].grad))
    return {"tp_logits": maxdiff(out.logits, out_ref.logits), "tp_loss": maxdiff(out.loss, out_ref.loss),
            "tp_grads": grads, "tp_sharded_params": n_sharded}


def check_ep(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from r1zero.train.parallelize import apply_ep

    torch.manual_seed(2)
    ids = torch.randint(0, 48, (4, 10))
    mine = ids[2 * rank:2 * rank + 2]
    ref = fresh()
    # reference: both ranks' halves through the single-process model, loss = sum of the two
    ref_outs = [ref(ids[2 * r:2 * r + 2], labels=ids[2 * r:2 * r + 2]) for r in range(2)]
    (ref_outs[0].loss + ref_outs[1].loss).backward()
    model = fresh()
    apply_ep(model, init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)), rank)
    owned = {id(p) for n, p in model.named_parameters() if ".experts." in n}  # only this rank's remain
    out = model(mine, labels=mine)
    out.loss.backward()
    ref_p = dict(ref.named_parameters())
    expert_diff = dense_diff = 0.0
    for name, p in model.named_parameters():
        if ".experts." in name:
            if id(p) in owned:  # owned experts already hold both ranks' contributions
                expert_diff = max(expert_diff, maxdiff(p.grad, ref_p[name].grad))
            continue
        g = p.grad.clone()
        dist.all_reduce(g)  # data-parallel sum of the replicated parameters' gradients
        dense_diff = max(dense_diff, maxdiff(g, ref_p[name].grad))
    return {"ep_logits": maxdiff(out.logits, ref_outs[rank].logits),
            "ep_loss": maxdiff(out.loss, ref_outs[rank].loss), "ep_expert_grads": expert_diff,
            "ep_dense_grads": dense_diff, "ep_owned_params": len(owned)}


def main() -> None:
    rank, world, port, out_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {**check_tp(rank), **check_ep(rank)}
        # both ranks done before either tears gloo down: a rank destroying its pairs while the
        # other still reads them aborted a worker in CI ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
