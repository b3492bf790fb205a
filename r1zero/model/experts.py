"""Routed SwiGLU experts: per-expert weights and a fused grouped forward/backward.

Two ways to run the same experts on tokens already sorted by expert (see ``moe.py``):

* :meth:`RoutedExperts.forward_grouped` -- the fast path. A ``torch.autograd.Function`` that walks
  the experts once, gathering each expert's rows from ``x_TD``, running gate+up / SwiGLU / down,
  and ``index_add_``-ing the gate-weighted result straight into the output; its backward does the
  same walk with hand-derived gradients. Every temporary is one expert's slice (cache-sized), so
  no ``(T*K, D)`` tensor is ever materialised (on CPU, fresh 100 MB buffers cost page faults and
  memory passes that rival the matmuls in the fine-grained regime).
* :meth:`RoutedExperts.forward` -- plain autograd over an already gathered ``x_ND``; used by the
  expert-parallel path (rows arrive from other ranks) and as a cross-check in the tests.

Shape legend:
    T: tokens, D: d_model, F: expert FFN width, E: (local) experts, N: routed slots (sorted by
    expert), n: rows of one expert
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class _GroupedSwiGLU(torch.autograd.Function):
    """``out_TD = sum_slots w_N * SwiGLU_e(x_TD[tok_N])`` scattered back to the tokens."""

    @staticmethod
    def forward(ctx, x_TD, w_N, tok_N, counts, *weights):
        E = len(counts)
        w_gu, w_d = weights[:E], weights[E:]
        out_TD = torch.zeros_like(x_TD)
        hs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                hs.append(None)
                continue
            idx_n = tok_N[start:start + n]
            x_nD = x_TD.index_select(0, idx_n)
            h_n2F = torch.mm(x_nD, w_gu[e].t())
            Fd = h_n2F.shape[1] // 2
            a_nF = F.silu(h_n2F[:, :Fd]).mul_(h_n2F[:, Fd:]).mul_(w_N[start:start + n, None])
            out_TD.index_add_(0, idx_n, torch.mm(a_nF, w_d[e].t()))
            hs.append(h_n2F)
            start += n
        # h is all backward needs per expert; saving it through save_for_backward (not as a ctx
        # attribute) lets activation checkpointing drop and recompute it.
        ctx.save_for_backward(x_TD, w_N, tok_N, *weights, *[h for h in hs if h is not None])
        ctx.counts = counts
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_TD):
        counts = ctx.counts
        E = len(counts)
        x_TD, w_N, tok_N, *rest = ctx.saved_tensors
        w_gu, w_d, saved_h = rest[:E], rest[E:2 * E], iter(rest[2 * E:])
        hs = [next(saved_h) if n else None for n in counts]
        dout_TD = dout_TD.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dw_N = torch.zeros_like(w_N) if need_w else None
        dw_gu, dw_d = [], []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                dw_gu.append(torch.zeros_like(w_gu[e]))
                dw_d.append(torch.zeros_like(w_d[e]))
                continue
            idx_n, s_n1 = tok_N[start:start + n], w_N[start:start + n, None]
            dy_nD = dout_TD.index_select(0, idx_n)
            das_nF = torch.mm(dy_nD, w_d[e])  # grad wrt the gate-scaled activation
            a_nF, dh_n2F, ds_n = _swiglu_grads(hs[e], das_nF, s_n1)
            dw_d.append(torch.mm(dy_nD.t(), a_nF.mul_(s_n1)))
            if need_w:
                dw_N[start:start + n] = ds_n
            x_nD = x_TD.index_select(0, idx_n)
            dw_gu.append(torch.mm(dh_n2F.t(), x_nD))
            if need_x:
                dx_TD.index_add_(0, idx_n, torch.mm(dh_n2F, w_gu[e]))
            start += n
        return dx_TD, dw_N, None, None, *dw_gu, *dw_d


def _swiglu_grads(h_2F, das_F, s_1):
    """Shared backward algebra of ``a = silu(g) * u`` scaled by ``s``, given dL/d(a*s).

    Returns ``(a, dh, ds)``: the un-scaled activation (for the down-weight grad), the gradient
    wrt ``h = [g, u]`` and the per-row gradient wrt the gate weight ``s``.
    """
    Fd = h_2F.shape[-1] // 2
    g, u = h_2F[..., :Fd], h_2F[..., Fd:]
    sig = torch.sigmoid(g)
    silu = g * sig
    a = silu * u
    ds = (das_F * a).sum(-1)
    da = das_F.mul_(s_1)
    dh = torch.empty_like(h_2F)
    torch.mul(da, silu, out=dh[..., Fd:])
    # d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g)))
    dsilu = sig.mul_(g * (1 - sig) + 1)
    torch.mul(da.mul_(u), dsilu, out=dh[..., :Fd])
    return a, dh, ds


class _PaddedSwiGLU(torch.autograd.Function):
    """Same op as :class:`_GroupedSwiGLU`, as two ``torch.bmm`` over experts padded to the
    largest expert (M rows each). Padding rows point at token 0 with gate weight 0, so they add
    exactly zero to outputs and gradients without any masking. Fewer, larger kernels: ``bmm``
    parallelises over experts instead of inside each small GEMM, which keeps both cores busy when
    experts are small (fine-grained) -- at the cost of computing the padding."""

    @staticmethod
    def forward(ctx, x_TD, w_N, tok_N, counts, *weights):
        E = len(counts)
        M = max(counts)
        N = tok_N.numel()
        counts_E = torch.tensor(counts, device=x_TD.device)
        expert_N = torch.repeat_interleave(torch.arange(E, device=x_TD.device), counts_E)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        dest_N = expert_N * M + torch.arange(N, device=x_TD.device) - starts_E[expert_N]
        idx_P = torch.zeros(E * M, dtype=tok_N.dtype, device=x_TD.device).index_copy_(0, dest_N, tok_N)
        s_P = torch.zeros(E * M, dtype=w_N.dtype, device=x_TD.device).index_copy_(0, dest_N, w_N)
        w_gu_E2FD = torch.stack(weights[:E])
        w_d_EDF = torch.stack(weights[E:])
        x_EMD = x_TD.index_select(0, idx_P).view(E, M, -1)
        h_EM2F = torch.bmm(x_EMD, w_gu_E2FD.transpose(1, 2))
        Fd = h_EM2F.shape[-1] // 2
        a_EMF = F.silu(h_EM2F[..., :Fd]).mul_(h_EM2F[..., Fd:]).mul_(s_P.view(E, M, 1))
        y_EMD = torch.bmm(a_EMF, w_d_EDF.transpose(1, 2))
        out_TD = torch.zeros_like(x_TD).index_add_(0, idx_P, y_EMD.view(E * M, -1))
        ctx.save_for_backward(x_TD, idx_P, s_P, dest_N, h_EM2F, w_gu_E2FD, w_d_EDF)
        ctx.shape = (E, M)
        return out_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_TD):
        x_TD, idx_P, s_P, dest_N, h_EM2F, w_gu_E2FD, w_d_EDF = ctx.saved_tensors
        E, M = ctx.shape
        s_EM1 = s_P.view(E, M, 1)
        dy_EMD = dout_TD.contiguous().index_select(0, idx_P).view(E, M, -1)
        das_EMF = torch.bmm(dy_EMD, w_d_EDF)
        a_EMF, dh_EM2F, ds_EM = _swiglu_grads(h_EM2F, das_EMF, s_EM1)
        dw_d_EDF = torch.bmm(dy_EMD.transpose(1, 2), a_EMF.mul_(s_EM1))
        x_EMD = x_TD.index_select(0, idx_P).view(E, M, -1)
        dw_gu_E2FD = torch.bmm(dh_EM2F.transpose(1, 2), x_EMD)
        dx_TD = None
        if ctx.needs_input_grad[0]:
            dx_TD = torch.zeros_like(x_TD).index_add_(0, idx_P, torch.bmm(dh_EM2F, w_gu_E2FD).view(E * M, -1))
        dw_N = ds_EM.reshape(-1)[dest_N] if ctx.needs_input_grad[1] else None
        return dx_TD, dw_N, None, None, *dw_gu_E2FD.unbind(0), *dw_d_EDF.unbind(0)


class RoutedExperts(nn.Module):
    """``n_experts`` SwiGLU experts with fused gate+up weights ``(2F, D)`` and down ``(D, F)``.

    NOTE: one ``nn.Parameter`` per expert rather than a stacked ``(E, ...)`` tensor: slicing a
    stacked weight inside a Python loop makes autograd materialise a full-size gradient per
    expert (that is what slows ``MixtralExperts`` down at E=64).
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.w_gate_up = nn.ParameterList([nn.Parameter(torch.empty(2 * d_ff, d_model)) for _ in range(n_experts)])
        self.w_down = nn.ParameterList([nn.Parameter(torch.empty(d_model, d_ff)) for _ in range(n_experts)])
        # the experts this module holds: all of them, or under expert parallelism this rank's
        # slice (the others' entries are None, so FQNs keep their global expert index)
        self.local = range(n_experts)

    def forward_grouped(self, x_TD: torch.Tensor, tok_N: torch.Tensor, counts: list[int],
                        w_N: torch.Tensor, mode: str = "loop") -> torch.Tensor:
        """Fused path: ``out_TD[t] = sum over t's slots of w * expert(x_TD[t])``.

        ``mode``: ``loop`` (per-expert GEMMs, no padding; fastest on a quiet CPU) or ``padded``
        (one ``bmm`` per projection over experts padded to the largest; faster when the cores are
        oversubscribed). See BENCHMARKS.md "MoE layer".
        """
        counts = list(counts)
        if sum(counts) == 0:
            mode = "loop"
        fn = _PaddedSwiGLU if mode == "padded" else _GroupedSwiGLU
        return fn.apply(x_TD.contiguous(), w_N.contiguous(), tok_N, counts, *self.w_gate_up, *self.w_down)

    def forward(self, x_ND: torch.Tensor, counts: list[int], scale_N: torch.Tensor | None = None) -> torch.Tensor:
        """Autograd path over gathered rows; local expert j takes rows ``[sum(counts[:j]), +counts[j])``.

        ``scale_N`` multiplies the hidden activation (same result as scaling the output, on F
        instead of D values). Experts with no rows still run on an empty slice so every
        parameter gets a (zero) gradient, as DDP/ZeRO reducers expect.
        """
        xs = torch.split(x_ND, counts)
        ss = torch.split(scale_N, counts) if scale_N is not None else [None] * len(counts)
        ys = []
        w_gus = [self.w_gate_up[e] for e in self.local]
        w_ds = [self.w_down[e] for e in self.local]
        for x_nD, s_n, w_gu, w_d in zip(xs, ss, w_gus, w_ds, strict=True):
            gate_nF, up_nF = F.linear(x_nD, w_gu).chunk(2, dim=-1)
            h_nF = F.silu(gate_nF) * up_nF
            if s_n is not None:
                h_nF = h_nF * s_n[:, None]
            ys.append(F.linear(h_nF, w_d))
        return torch.cat(ys, dim=0)
