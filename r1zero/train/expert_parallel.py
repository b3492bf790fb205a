"""Expert parallelism for the r1zero MoE: experts sharded over an ep group, tokens moved by all-to-all.

    layer.ep_dispatch = AllToAllDispatch(group, ep_size, ep_rank)   # r1zero.train.parallelize.apply_ep

Rank ``r`` of an ep group of size P owns routed experts ``[r*E/P, (r+1)*E/P)`` (DeepSpeed-MoE /
GShard layout). ``MoELayer`` sorts the routed slots by expert and calls the dispatcher with
``x_ND`` (tokens in global expert order), ``counts_E`` and the gate weights ``w_N``. The dispatcher
(torchtitan ``ExpertParallel`` pattern, with the differentiable
``torch.distributed.nn.functional.all_to_all_single``):

1. exchanges per-expert counts (all-to-all of ``counts_E``),
2. sends each owner its rows with the gate weight as an extra column (so the owner applies the
   weight inside the expert exactly as the local path does),
3. regroups the received rows by local expert, runs the local experts (``layer.experts``: FSDP2
   gathers them first),
4. returns the outputs by the reverse all-to-all (its backward carries the gradients home).

Legend: N routed rows of this rank, D d_model, E experts, El = E/P local experts, P ep ranks.
"""

from __future__ import annotations

import torch
from torch.distributed.nn.functional import all_to_all_single

from r1zero.train import dist as rdist


def owned_experts(n_experts: int, ep_rank: int, ep_size: int) -> range:
    per = n_experts // ep_size
    return range(ep_rank * per, (ep_rank + 1) * per)


def _a2a(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    return all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=group)


class AllToAllDispatch:
    """The ``MoELayer.ep_dispatch`` callable for one ep group."""

    def __init__(self, group, ep_size: int, ep_rank: int):
        self.group, self.P, self.rank = group, ep_size, ep_rank

    def __call__(self, layer, x_ND: torch.Tensor, counts_E: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        P, E = self.P, layer.n_experts
        El = E // P
        counts_PEl = counts_E.to(torch.long).view(P, El)
        send_rows = counts_PEl.sum(1).tolist()
        # recv_PEl[p, e]: rows source rank p sends for my local expert e
        recv_PEl = torch.empty_like(counts_PEl)
        rdist.all_to_all_single(recv_PEl, counts_PEl.contiguous(), self.group)
        recv_rows = recv_PEl.sum(1).tolist()
        xw_ND1 = torch.cat([x_ND, w_N.to(x_ND.dtype)[:, None]], dim=1)
        got_MD1 = _a2a(xw_ND1, recv_rows, send_rows, self.group)
        # rows arrive grouped by source then by expert; regroup by expert (stable, so the order of
        # rows inside an expert is source-major, which the reverse permutation undoes exactly)
        src_expert_M = torch.repeat_interleave(
            torch.arange(P * El, device=x_ND.device) % El, recv_PEl.reshape(-1))
        order_M = torch.argsort(src_expert_M, stable=True)
        sorted_MD1 = got_MD1[order_M]
        local_counts = recv_PEl.sum(0).tolist()
        # through the module call, so FSDP2 gathers the (edp-sharded) local experts first
        y_sorted_MD = layer.experts(sorted_MD1[:, :-1], local_counts, sorted_MD1[:, -1])
        y_MD = torch.empty_like(y_sorted_MD).index_copy(0, order_M, y_sorted_MD)
        return _a2a(y_MD, send_rows, recv_rows, self.group)


def moe_layers(model) -> list:
    from r1zero.model.moe import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]
