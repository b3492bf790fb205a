"""Mixture-of-Experts feed-forward: router, sort-based dropless/capacity dispatch, balancing, stats.

``MoELayer`` replaces the dense FFN of a decoder block (DeepSeekMoE layout: fine-grained routed
experts plus always-on shared experts). Dispatch follows torchtitan / MegaBlocks: sort the T*K
routed slots by expert once (stable), then each expert runs on its contiguous run of slots (one
fused gate+up matmul, one down matmul) and results scatter back with ``index_add_``
(``experts.py``).
Tests compare it against a mask-loop reference (``tests/model/test_moe.py``).

Shape legend:
    T: tokens, D: d_model, E: routed experts (local experts El under expert parallelism),
    K: experts per token, N: routed slots kept (T*K minus capacity drops), F: expert FFN width
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1zero.model import router as R
from r1zero.model.experts import RoutedExperts
from r1zero.model.layers import SwiGLU

# Decode a MoE feed-forward densely (every expert on every token, weight 0 where not routed) when
# that costs at most this many times the routed FLOPs: at decode sizes (one new token per row) the
# routed path's sort / gather / scatter bookkeeping and its host sync (``counts.tolist()``) cost
# more than the extra matmul work (BENCHMARKS.md, "GRPO on the tiny preset": sampling 1.4-1.5x).
# The tiny preset routes 2 of 4 experts (2x); the 13B preset's 2 of 8 (4x) keeps the routed path.
# Prefill keeps the routed path too: over many tokens the extra FLOPs cost more than they save.
_DENSE_DECODE_MAX_FLOPS = 2.0


class MoELayer(nn.Module):
    """Routed + shared experts with Switch aux loss, z-loss, capacity and aux-loss-free bias."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_experts = config.n_experts
        self.top_k = config.n_experts if config.router == "soft" else config.num_experts_per_tok
        self.kind = config.router
        self.capacity_factor = None if config.router == "soft" else config.capacity_factor
        self.bias_update_rate = config.bias_update_rate
        self.route_scale = getattr(config, "route_scale", 1.0)
        self.expert_compute = getattr(config, "expert_compute", "loop")
        D = config.hidden_size
        self.gate = nn.Linear(D, config.n_experts, bias=False)
        self.experts = RoutedExperts(config.n_experts, D, config.d_expert)
        # DeepSeekMoE shared experts isolation: K_s always-on experts of width d_expert are one
        # SwiGLU of width K_s * d_expert (the sum of K_s SwiGLUs is a block-diagonal SwiGLU).
        self.shared = SwiGLU(D, config.n_shared * config.d_expert) if config.n_shared > 0 else None
        # Aux-loss-free balancing (arXiv 2408.15664): a persistent selection bias, and the
        # routed-token counts accumulated over training forwards until update_expert_bias().
        self.register_buffer("expert_bias_E", torch.zeros(config.n_experts), persistent=True)
        self.register_buffer("tokens_per_expert_E", torch.zeros(config.n_experts), persistent=False)
        # Expert parallelism (r1zero.model.parallel): a callable replacing local dispatch.
        self.ep_dispatch = None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x_BSD: torch.Tensor, decode_weights: dict | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``decode_weights``: the decode's store for derived weights (``KVCache.derived``), given
        by a decode step; enables the dense decode path (:meth:`_dense_decode`).

        ``token_mask`` (the shape of ``x_BSD`` without D; nonzero = a real token): the balance
        loss, the z-loss and the load statistics count the real tokens only, as HF Mixtral's
        ``load_balancing_loss_func(attention_mask=...)`` does; padding is still routed and run
        (its outputs are ignored) but does not move the router's aux gradient. None: every token
        counts (pretraining's unpadded batches, bit-identical to no mask)."""
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        if decode_weights is not None and self._dense_decode(x_BSD):
            return self._forward_dense(x_TD, decode_weights).view(shape)
        T, K, E = x_TD.shape[0], self.top_k, self.n_experts
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        weights_TK, ids_TK, probs_TE = R.route(logits_TE, K, self.kind, self.selection_bias(), self.route_scale)
        real_T = None if token_mask is None else token_mask.reshape(-1).to(x_TD.device).bool()
        self.aux_loss, self.z_loss, real_counts_E, entropy = _aux_terms(logits_TE, probs_TE, ids_TK, E, real_T)

        order_N, counts_E = R.sort_by_expert(ids_TK, E)
        real_counts_E = counts_E if real_counts_E is None else real_counts_E
        kept_E = counts_E
        if self.capacity_factor is not None:
            cap = R.capacity(T, K, E, self.capacity_factor)
            order_N = order_N[R.capacity_keep(order_N, ids_TK, counts_E, cap)]
            kept_E = counts_E.clamp(max=cap)
        tok_N = order_N // K
        w_N = weights_TK.reshape(-1)[order_N].to(x_TD.dtype)
        if self.ep_dispatch is not None:
            y_ND = self.ep_dispatch(self, x_TD.index_select(0, tok_N), kept_E, w_N)
            out_TD = torch.zeros_like(x_TD).index_add_(0, tok_N, y_ND)
        else:
            out_TD = self.experts.forward_grouped(x_TD, tok_N, kept_E.tolist(), w_N, self.expert_compute)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        with torch.no_grad():
            if self.training:
                self.tokens_per_expert_E += real_counts_E.float()
            self.last_stats = {
                "counts_E": real_counts_E.detach(),
                "dropped": (counts_E - kept_E).sum().detach(),
                "slots": torch.tensor(T * K),
                "entropy": entropy.detach(),
                "aux_loss": self.aux_loss.detach(),
                "z_loss": self.z_loss.detach(),
            }
        return out_TD.view(shape)

    def _dense_decode(self, x_BSD: torch.Tensor) -> bool:
        """Whether this forward is a decode step that :meth:`_forward_dense` serves: one new token
        per row, no autograd, eval mode, dropless, local experts, E <= 2K."""
        return (x_BSD.dim() == 3 and x_BSD.shape[1] == 1 and not self.training and not torch.is_grad_enabled()
                and self.capacity_factor is None and self.ep_dispatch is None
                and self.n_experts <= _DENSE_DECODE_MAX_FLOPS * self.top_k
                and type(self.experts) is RoutedExperts and (self.shared is None or type(self.shared) is SwiGLU)
                # plain weights only: sharded (DTensor) ones would be gathered per call by the stacking
                and type(self.gate.weight) is nn.Parameter and type(self.experts.w_gate_up[0]) is nn.Parameter)

    def _dense_weights(self, store: dict) -> tuple:
        """(stacked gate|up (Eb*2F, D), stacked down (D, Eb*F), shared blocks, bias) for
        :meth:`_forward_dense`, built once per decode and kept in its ``store`` (weights and bias
        do not change while sampling).

        Eb = routed experts + shared blocks: the shared SwiGLU of width n_shared*F is n_shared
        always-on experts of width F (block-diagonal), appended with weight 1.
        """
        key = (id(self), "dense")
        if key in store:
            return store[key]
        ex = self.experts
        Fd = ex.d_ff
        gu, dn = list(ex.w_gate_up), list(ex.w_down)
        n_sh = 0
        if self.shared is not None:
            sh = self.shared
            wg, wu, wd = sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight
            n_sh = wg.shape[0] // Fd
            for j in range(n_sh):
                gu.append(torch.cat([wg[j * Fd:(j + 1) * Fd], wu[j * Fd:(j + 1) * Fd]]))
                dn.append(wd[:, j * Fd:(j + 1) * Fd])
        # resolved once here: selection_bias() syncs with the host (bool(any()))
        store[key] = (torch.cat(gu), torch.cat(dn, 1), n_sh, self.selection_bias())
        return store[key]

    def _forward_dense(self, x_TD: torch.Tensor, store: dict) -> torch.Tensor:
        """The same routing and expert math as the routed path, as two dense matmuls over all
        experts (unrouted ones weighted 0); no aux-loss or statistics bookkeeping (inference)."""
        gu_CD, dn_DC, n_sh, bias_E = self._dense_weights(store)
        T, E = x_TD.shape[0], self.n_experts
        logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        weights_TK, ids_TK, _ = R.route(logits_TE, self.top_k, self.kind, bias_E, self.route_scale)
        w_TB = x_TD.new_zeros((T, E + n_sh))
        if n_sh:
            w_TB[:, E:] = 1.0
        w_TB.scatter_(1, ids_TK, weights_TK.to(x_TD.dtype))
        h_TB2F = F.linear(x_TD, gu_CD).view(T, E + n_sh, -1)
        Fd = h_TB2F.shape[-1] // 2
        a_TBF = F.silu(h_TB2F[..., :Fd]) * h_TB2F[..., Fd:] * w_TB[..., None]
        self.aux_loss = self.z_loss = None
        return F.linear(a_TBF.reshape(T, -1), dn_DC)

    def selection_bias(self) -> torch.Tensor | None:
        """The aux-loss-free selection bias for :func:`r1zero.model.router.route`, or None while
        balancing is off and the bias is all zero (routing then skips the add)."""
        return self.expert_bias_E if self.bias_update_rate > 0 or bool(self.expert_bias_E.any()) else None

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> float:
        """Apply one aux-loss-free bias step from the accumulated counts; returns max |delta|.

        Call after the optimizer step (torchtitan does it in an optimizer pre-hook so gradient
        accumulation sees one update per step). ``group``: all-reduce the counts over it first
        so every data/expert-parallel rank applies the same bias.
        """
        counts_E = self.tokens_per_expert_E
        if self.bias_update_rate <= 0 or counts_E.sum() == 0:
            counts_E.zero_()
            return 0.0
        if group is not None and torch.distributed.is_initialized():
            from r1zero.train import dist as rdist

            rdist.all_reduce(counts_E, group)
        delta_E = R.bias_update_delta(counts_E, self.bias_update_rate)
        self.expert_bias_E += delta_E
        counts_E.zero_()
        return float(delta_E.abs().max())

    def stats(self) -> dict:
        """Telemetry of the last forward: load histogram and balance/loss figures (floats)."""
        s = self.last_stats
        if not s:
            return {}
        counts_E = s["counts_E"].float()
        mean = counts_E.mean().clamp_min(1e-12)
        return {
            "layer": self.layer_idx,
            "load": [int(c) for c in s["counts_E"].tolist()],
            "mean_load": float(counts_E.mean()),
            "max_load": float(counts_E.max()),
            # MaxVio of arXiv 2408.15664 is max/mean - 1; we report the ratio itself.
            "max_load_ratio": float(counts_E.max() / mean),
            "load_cv": float(counts_E.std(unbiased=False) / mean),
            "dropped_frac": float(s["dropped"]) / max(1, int(s["slots"])),
            "router_entropy": float(s["entropy"]),
            "aux_loss": float(s["aux_loss"]),
            "z_loss": float(s["z_loss"]),
            "bias_abs_max": float(self.expert_bias_E.abs().max()),
            "dead_experts": int((s["counts_E"] == 0).sum()),
        }


def _aux_terms(logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor, n_experts: int,
               real_T: torch.Tensor | None) -> tuple:
    """(Switch balance loss, z-loss, routed-slot counts_E, router entropy) over the real tokens
    (``real_T``; None: all of them, and counts_E None: the dispatch's own counts are those). A forward with no real token gives zero losses that still
    belong to the graph (its backward then adds nothing)."""
    if real_T is not None:
        idx_N = real_T.nonzero().squeeze(1)  # one host sync; the selections below need none
        if idx_N.numel() == 0:
            zero = logits_TE.sum() * 0.0
            return zero, zero, torch.zeros(n_experts, dtype=torch.long, device=ids_TK.device), zero.detach()
        logits_TE, probs_TE, ids_TK = (t.index_select(0, idx_N) for t in (logits_TE, probs_TE, ids_TK))
    with torch.no_grad():  # statistics only
        counts_E = None if real_T is None else R.expert_counts(ids_TK, n_experts)  # None: the dispatch's counts
        entropy = R.router_entropy(probs_TE)
    return R.switch_aux_loss(probs_TE, ids_TK), R.router_z_loss(logits_TE), counts_E, entropy


def flat_moe_metrics(stats: list[dict]) -> dict[str, float]:
    """``[{layer stats}]`` -> ``{"moe/L{i}/max_load_ratio": ..., "moe/L{i}/load/E{j}": frac}``."""
    out: dict[str, float] = {}
    for s in stats:
        i = s["layer"]
        for k, v in s.items():
            if k in ("layer", "load"):
                continue
            out[f"moe/L{i}/{k}"] = float(v)
        total = max(1, sum(s["load"]))
        for j, c in enumerate(s["load"]):
            out[f"moe/L{i}/load/E{j}"] = c / total
    return out
