"""The GRPO policy loss and its pieces (pure tensor functions).

Per token (DeepSeekMath eq. 3 with DAPO's decoupled clip, arXiv 2503.14476 eq. 8):

    rho_t  = exp(logp_t - old_logp_t)
    l_t    = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3, Schulman 2020,
             "Approximating KL divergence"; unbiased, always >= 0)

Aggregation over a batch of completions (``loss_agg``), returned as (numerator, denominator) so
data-parallel ranks can all-reduce the denominator and get exactly the single-process loss:

- ``sequence`` (GRPO paper): (1/N) sum_i (1/|o_i|) sum_t l_{i,t}
- ``token``    (DAPO):       sum_i sum_t l_{i,t} / sum_i |o_i|
- ``constant`` (Dr. GRPO):   sum_i sum_t l_{i,t} / (N * L_max)

Log-ratios are clamped to [-20, 20] before exp (verl ``compute_policy_loss``), so a stale or
diverged token cannot produce inf.

Legend: B = completions, T = completion tokens, V = vocab.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0  # verl core_algos


def log_probs(logits_BTV: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary in float32 (shared by the log-prob and entropy below)."""
    return torch.log_softmax(logits_BTV.float(), dim=-1)


def pick(logp_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target) per position from :func:`log_probs` output."""
    return logp_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def entropy_of(logp_BTV: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) per position from :func:`log_probs` output."""
    return -(logp_BTV.exp() * logp_BTV).sum(-1)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, computed in float32 for stability."""
    return pick(log_probs(logits_BTV), targets_BT)


def entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the predictive distribution per position."""
    return entropy_of(log_probs(logits_BTV))


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: e^{ref-logp} - (ref-logp) - 1 (>= 0)."""
    d = (ref_logp_BT - logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return d.exp() - d - 1.0


def clipped_surrogate(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped policy-gradient loss and where the clip was active.

    Returns (loss_BT, clipped_low_BT, clipped_high_BT): the clip is *active* (gradient zero) when
    A < 0 and rho < 1 - eps_low, or A > 0 and rho > 1 + eps_high.
    """
    log_ratio = (logp_BT - old_logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = ratio * adv_BT
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_BT
    loss = -torch.minimum(unclipped, clipped)
    low = (adv_BT < 0) & (ratio < 1.0 - eps_low)
    high = (adv_BT > 0) & (ratio > 1.0 + eps_high)
    return loss, low, high


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str,
              max_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(numerator, denominator) of the batch loss for ``mode`` in {sequence, token, constant}.

    Empty completions (no real tokens) contribute nothing; with ``sequence`` they still count in N
    (they are completions of the group, with zero tokens to update).
    """
    m = mask_BT.to(loss_BT.dtype)
    per_seq_sum_B = (loss_BT * m).sum(-1)
    n_tokens_B = m.sum(-1)
    if mode == "sequence":
        return (per_seq_sum_B / n_tokens_B.clamp(min=1)).sum(), float(loss_BT.shape[0])
    if mode == "token":
        return per_seq_sum_B.sum(), float(n_tokens_B.sum())
    if mode == "constant":
        if max_len is None:
            raise ValueError("loss_agg 'constant' needs max_len (Dr. GRPO normaliser)")
        return per_seq_sum_B.sum(), float(loss_BT.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor, mask_BT: torch.Tensor, *,
                eps_low: float, eps_high: float, beta: float = 0.0, ref_logp_BT: torch.Tensor | None = None,
                agg: str = "token", max_len: int | None = None) -> tuple[torch.Tensor, float, dict]:
    """Full GRPO loss -> (numerator, denominator, stats). loss = numerator / denominator.

    ``adv_B`` is per completion (GRPO) or ``adv_BT`` per token (PPO); stats hold token sums for the
    clip fractions and KL so callers can reduce them across ranks.
    """
    adv_BT = adv_B[:, None].expand_as(logp_BT) if adv_B.dim() == 1 else adv_B
    loss_BT, low_BT, high_BT = clipped_surrogate(logp_BT, old_logp_BT, adv_BT, eps_low, eps_high)
    m = mask_BT.to(logp_BT.dtype)
    kl_sum = 0.0
    if beta > 0:
        if ref_logp_BT is None:
            raise ValueError("beta > 0 needs reference log-probs")
        kl_BT = k3_kl(logp_BT, ref_logp_BT)
        loss_BT = loss_BT + beta * kl_BT
        kl_sum = float((kl_BT.detach() * m).sum())
    num, den = aggregate(loss_BT, mask_BT, agg, max_len)
    stats = {
        "tokens": float(m.sum()),
        "clip_low": float((low_BT.to(m.dtype) * m).sum()),
        "clip_high": float((high_BT.to(m.dtype) * m).sum()),
        "kl_sum": kl_sum,
    }
    return num, den, stats
