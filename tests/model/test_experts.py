"""The fused grouped expert op: exact gradients (gradcheck) and agreement with plain autograd."""

import pytest
import torch

from r1zero.model.experts import RoutedExperts, _GroupedSwiGLU, _PaddedSwiGLU

OPS = {"loop": _GroupedSwiGLU, "padded": _PaddedSwiGLU}


def _setup(dtype, counts=(3, 0, 4, 2), T=5, D=4, Fd=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    N = sum(counts)
    x = torch.randn(T, D, generator=g, dtype=dtype, requires_grad=True)
    tok = torch.randint(0, T, (N,), generator=g)
    w = torch.rand(N, generator=g, dtype=dtype).requires_grad_(True)
    experts = RoutedExperts(E, D, Fd).to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return x, tok, w, experts, list(counts)


@pytest.mark.parametrize("mode", ["loop", "padded"])
def test_gradcheck_grouped_swiglu_float64(mode):
    x, tok, w, ex, counts = _setup(torch.float64)
    params = [p for p in ex.parameters()]
    fn = lambda x, w, *ps: OPS[mode].apply(x, w, tok, counts, *ps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["loop", "padded"])
def test_grouped_matches_autograd_path(mode):
    x, tok, w, ex, counts = _setup(torch.float32, counts=(7, 5, 0, 9, 3), T=11, D=16, Fd=8, seed=1)
    gout = torch.randn(11, 16)
    out = ex.forward_grouped(x, tok, counts, w, mode)
    out.backward(gout)
    grads = [x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    x.grad = w.grad = None
    ex.zero_grad(set_to_none=True)
    y = ex(x.index_select(0, tok), counts, w)
    ref = torch.zeros_like(x).index_add(0, tok, y)
    ref.backward(gout)
    ref_grads = [x.grad, w.grad] + [p.grad for p in ex.parameters()]
    assert torch.allclose(out, ref, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # the expert with no rows still reports a (zero) gradient
    assert ex.w_gate_up[2].grad is not None and not ex.w_gate_up[2].grad.any()
