"""Advantage estimators for GRPO and its baselines (pure tensor functions).

Groups are given as ``group_B`` (the group index of each completion, ``0..n_groups-1``), so groups
may have different sizes (adaptive GRPO). All functions return one advantage per completion
(``adv_B``), broadcast over its tokens by the loss, except :func:`gae` which is per token.

- ``group``  (GRPO, DeepSeekMath eq. 3 / verl ``compute_grpo_outcome_advantage``):
  A_i = (r_i - mean_g) / (std_g + eps), std unbiased (Bessel), eps = 1e-6; a group of size 1 has
  mean r_i, std treated as 1, hence A = 0.
- ``mean``   (Dr. GRPO, arXiv 2503.20783 sec. 3.1): A_i = r_i - mean_g (no std division).
- ``batch``  (TRL ``scale_rewards="batch"``): A_i = (r_i - mean_g) / (std over the batch + eps).
- ``rloo``   (REINFORCE leave-one-out, Ahmadian et al. 2024): A_i = r_i - mean_{j != i} r_j
  = G/(G-1) (r_i - mean_g); 0 for G = 1.
- :func:`gae` (PPO baseline, Schulman et al. 2016 eq. 16): token-level advantages from a value head.

Legend: B = completions, G = groups, T = completion tokens.
"""

from __future__ import annotations

import torch

GRPO_EPS = 1e-6  # verl core_algos.compute_grpo_outcome_advantage


def group_stats(rewards_B: torch.Tensor, group_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (count_G, mean_G, unbiased std_G); std is 1 for groups of size 1 (verl convention)."""
    n_groups = int(group_B.max()) + 1 if group_B.numel() else 0
    r = rewards_B.double()
    count_G = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_B, torch.ones_like(r))
    sum_G = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_B, r)
    mean_G = sum_G / count_G.clamp(min=1)
    dev_B = r - mean_G[group_B]
    ss_G = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_B, dev_B * dev_B)
    std_G = torch.where(count_G > 1, (ss_G / (count_G - 1).clamp(min=1)).sqrt(), torch.ones_like(ss_G))
    return count_G, mean_G, std_G


def advantages(rewards_B: torch.Tensor, group_B: torch.Tensor, mode: str = "group",
               eps: float = GRPO_EPS, batch_std: float | None = None) -> torch.Tensor:
    """Outcome advantages per completion for ``mode`` in {group, mean, batch, rloo}.

    ``batch_std`` lets data-parallel callers pass the std over the *global* batch (all ranks);
    by default it is the std over ``rewards_B``.
    """
    if rewards_B.numel() == 0:
        return rewards_B.clone().float()
    count_G, mean_G, std_G = group_stats(rewards_B, group_B)
    centred_B = rewards_B.double() - mean_G[group_B]
    if mode == "group":
        out = centred_B / (std_G[group_B] + eps)
        out = torch.where(count_G[group_B] > 1, out, torch.zeros_like(out))
    elif mode == "mean":
        out = centred_B
    elif mode == "batch":
        if batch_std is not None:
            s = batch_std
        else:
            s = float(rewards_B.double().std()) if rewards_B.numel() > 1 else 1.0
        out = centred_B / (s + eps)
    elif mode == "rloo":
        g = count_G[group_B]
        out = torch.where(g > 1, centred_B * g / (g - 1).clamp(min=1), torch.zeros_like(centred_B))
    else:
        raise ValueError(f"unknown advantage mode {mode!r}")
    return out.float()


def zero_std_groups(rewards_B: torch.Tensor, group_B: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Bool per group: all rewards equal (such a group has zero GRPO advantage, no signal)."""
    n_groups = int(group_B.max()) + 1 if group_B.numel() else 0
    r = rewards_B.double()
    big = torch.full((n_groups,), float("inf"), dtype=torch.float64)
    lo_G = big.scatter_reduce(0, group_B, r, reduce="amin")
    hi_G = (-big).scatter_reduce(0, group_B, r, reduce="amax")
    return (hi_G - lo_G) <= tol


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded token sequences.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last real token = 0),
    A_t = sum_k (gamma*lam)^k delta_{t+k}; returns (advantages_BT, returns_BT = A + V), zero on
    padding. Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16.
    """
    m = mask_BT.to(values_BT.dtype)
    v = values_BT * m
    r = rewards_BT * m
    T = v.shape[1]
    adv_BT = torch.zeros_like(v)
    last_B = torch.zeros_like(v[:, 0])
    for t in range(T - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(v[:, 0])
        delta = r[:, t] + gamma * next_v - v[:, t]
        last_B = delta + gamma * lam * last_B * (m[:, t + 1] if t + 1 < T else 0.0)
        last_B = last_B * m[:, t]
        adv_BT[:, t] = last_B
    return adv_BT, (adv_BT + v) * m


def whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening (PPO advantage normalisation; verl ``masked_whiten``)."""
    m = mask_BT.to(x_BT.dtype)
    n = m.sum().clamp(min=1)
    mean = (x_BT * m).sum() / n
    var = (((x_BT - mean) * m) ** 2).sum() / n
    return (x_BT - mean) * torch.rsqrt(var + eps) * m
