"""Pure routing math for the MoE layer: scores, top-k selection, balancing losses, capacity.

Every function here is a pure function of tensors (no modules, no state), so the MoE layer, the
expert-parallel path and the tests share one definition. Router math runs in fp32, as in
torchtitan, DeepSpeed and HF (bf16 logits flip top-k choices).

Shape legend:
    T: tokens, E: routed experts, K: experts per token (top-k), N = T*K routed slots
"""

from __future__ import annotations

import math

import torch


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    kind: str = "softmax",
    bias_E: torch.Tensor | None = None,
    route_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose experts per token.

    Returns ``(weights_TK, ids_TK, probs_TE)``: gate weights of the chosen experts, their ids,
    and the per-token routing distribution (rows sum to 1) used by the balancing loss.

    * ``softmax``: Mixtral -- softmax over all experts, top-k, renormalise the k weights to sum 1
      (``MixtralSparseMoeBlock``; with k=1 the weight stays the raw probability as in Switch).
    * ``sigmoid``: DeepSeek-V3 (arXiv 2412.19437 eq. 15-16) -- sigmoid affinities, top-k on
      affinity + bias, weights = affinities of the chosen experts normalised by their sum.
    * ``soft``: the dense soft mixture -- every expert runs, weighted by the softmax (K = E).

    NOTE: ``bias_E`` (auxiliary-loss-free balancing, arXiv 2408.15664) shifts *selection only*;
    gate weights always come from the un-biased scores.
    """
    logits_TE = logits_TE.float()
    T, E = logits_TE.shape
    if kind == "soft":
        probs_TE = torch.softmax(logits_TE, dim=-1)
        ids_TK = torch.arange(E, device=logits_TE.device).expand(T, E)
        return probs_TE, ids_TK, probs_TE
    if kind == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
        probs_TE = scores_TE
    elif kind == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        # V3's sequence-wise balance loss uses affinities normalised per token (eq. 19).
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
    else:
        raise ValueError(f"unknown router {kind!r}")
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    ids_TK = torch.topk(select_TE, top_k, dim=-1, sorted=True).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if kind == "sigmoid" or top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    if kind == "sigmoid" and route_scale != 1.0:
        weights_TK = weights_TK * route_scale
    return weights_TK, ids_TK, probs_TE


def expert_counts(ids_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (before any capacity drop): ``counts_E``."""
    return torch.bincount(ids_TK.reshape(-1), minlength=n_experts)


def switch_aux_loss(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), un-scaled.

    ``E * sum_i f_i * P_i`` with f_i the fraction of routed slots sent to expert i and P_i the
    mean routing probability of expert i. Equals 1.0 at perfectly uniform routing for any k
    (f is normalised over T*K slots, as DeepSpeed's top-k form ``mean(me*ce)*E*E/k``).
    """
    T, E = probs_TE.shape
    f_E = expert_counts(ids_TK, E).float() / ids_TK.numel()
    P_E = probs_TE.float().mean(0)
    return E * torch.sum(f_E * P_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, arXiv 2202.08906, eq. 5): mean(logsumexp^2)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the routing distribution (nats); log(E) is uniform."""
    p = probs_TE.float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()


def capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Expert capacity ``ceil(T*K/E * factor)`` (GShard / Switch sec. 2.1; DeepSpeed's
    ``top2gating`` uses the same ``capacity_factor * k`` scaling)."""
    return max(1, math.ceil(n_tokens * top_k / n_experts * factor))


def sort_by_expert(ids_TK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened routed slots by expert id.

    Returns ``(order_N, counts_E)``: ``order_N`` indexes the flattened ``(T*K)`` slots so that
    slots of expert 0 come first, in token order (stability makes earlier tokens win capacity,
    as in Switch without random token selection, and keeps results deterministic).
    """
    flat_N = ids_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    return order_N, torch.bincount(flat_N, minlength=n_experts)


def capacity_keep(order_N: torch.Tensor, ids_TK: torch.Tensor, counts_E: torch.Tensor, cap: int) -> torch.Tensor:
    """Boolean mask over the sorted slots: True where the slot fits its expert's capacity."""
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_N = ids_TK.reshape(-1)[order_N]
    rank_N = torch.arange(order_N.numel(), device=order_N.device) - starts_E[expert_N]
    return rank_N < cap


def bias_update_delta(counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free bias step (arXiv 2408.15664 alg. 1; torchtitan's optimizer pre-hook).

    ``delta = rate * sign(mean(counts) - counts)``, centred so the bias stays zero-mean:
    overloaded experts go down, underloaded ones go up.
    """
    c = counts_E.float()
    delta_E = rate * torch.sign(c.mean() - c)
    return delta_E - delta_E.mean()
