"""MoE layer: sort-based dispatch agrees with a mask-loop reference; balancing state and stats."""

import pytest
import torch
import torch.nn.functional as F

from r1zero.model import router as R
from r1zero.model.config import R1ZeroConfig
from r1zero.model.moe import MoELayer, flat_moe_metrics


def make_layer(seed=0, **kw):
    base = dict(hidden_size=16, num_attention_heads=2, n_experts=4, num_experts_per_tok=2, d_expert=8)
    base.update(kw)
    cfg = R1ZeroConfig(**base)
    torch.manual_seed(seed)
    layer = MoELayer(cfg, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


def mask_loop_reference(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """Obviously-correct dispatch (HF Mixtral style): loop over experts with a boolean mask."""
    x = x_BSD.reshape(-1, x_BSD.shape[-1])
    T, K, E = x.shape[0], layer.top_k, layer.n_experts
    logits = x.float() @ layer.gate.weight.float().t()
    bias = layer.expert_bias_E if bool(layer.expert_bias_E.any()) else None
    w, ids, _ = R.route(logits, K, layer.kind, bias, layer.route_scale)
    cap = R.capacity(T, K, E, layer.capacity_factor) if layer.capacity_factor else None
    out = torch.zeros_like(x)
    for e in range(E):
        t_idx, k_idx = torch.where(ids == e)  # row-major: token order, like the stable sort
        if cap is not None:
            t_idx, k_idx = t_idx[:cap], k_idx[:cap]
        g, u = F.linear(x[t_idx], layer.experts.w_gate_up[e]).chunk(2, -1)
        y = F.linear(F.silu(g) * u, layer.experts.w_down[e])
        out = out.index_add(0, t_idx, y * w[t_idx, k_idx, None])
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out.view(x_BSD.shape)


def _grads(layer, x, out, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out.backward(g)
    return [x.grad.clone()] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]


@pytest.mark.parametrize(
    "kw",
    [
        dict(router="softmax"),
        dict(router="softmax", n_shared=2),
        dict(router="sigmoid", n_experts=8, num_experts_per_tok=3),
        dict(router="soft"),
        dict(router="softmax", capacity_factor=0.5),
        dict(router="sigmoid", capacity_factor=1.0, n_experts=6, num_experts_per_tok=2),
        dict(router="softmax", num_experts_per_tok=1, n_experts=5),
    ],
    ids=["softmax", "shared", "sigmoid", "soft", "capacity", "sigmoid-capacity", "top1"],
)
@pytest.mark.parametrize("mode", ["loop", "padded"])
def test_sort_dispatch_matches_mask_loop(kw, mode):
    layer = make_layer(expert_compute=mode, **kw)
    x = torch.randn(3, 7, 16, requires_grad=True)
    g = torch.randn(3, 7, 16)
    out = layer(x)
    ref = mask_loop_reference(layer, x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    for a, b in zip(_grads(layer, x, out, g), _grads(layer, x, mask_loop_reference(layer, x), g), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_capacity_drops_are_reported():
    layer = make_layer(capacity_factor=0.5)
    layer(torch.randn(2, 16, 16))
    s = layer.stats()
    # capacity 0.5 keeps at most half the T*K slots
    assert s["dropped_frac"] >= 0.5 - 1e-9
    assert make_layer()(torch.randn(2, 4, 16)) is not None


def test_selection_bias_shifts_load_and_counts_only_in_training():
    layer = make_layer(router="sigmoid", bias_update_rate=1e-2)
    x = torch.randn(4, 32, 16)
    layer.eval()
    layer(x)
    assert layer.tokens_per_expert_E.sum() == 0  # eval forwards do not count
    layer.train()
    layer(x)
    first = layer.stats()["max_load_ratio"]
    assert layer.tokens_per_expert_E.sum() == 4 * 32 * 2
    for _ in range(200):
        layer(x)
        layer.update_expert_bias()
    assert layer.tokens_per_expert_E.sum() == 0
    assert layer.stats()["bias_abs_max"] > 0
    # aux-loss-free balancing alone (no gradient step) evens the load on a fixed batch
    assert layer.stats()["max_load_ratio"] < first
    assert layer.stats()["max_load_ratio"] < 1.25


def test_bias_update_is_noop_when_rate_zero():
    layer = make_layer()
    layer.train()
    layer(torch.randn(2, 8, 16))
    assert layer.update_expert_bias() == 0.0
    assert not layer.expert_bias_E.any()


def test_stats_and_flat_metrics():
    layer = make_layer(n_experts=4)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0] += 10.0  # send everything to expert 0 (plus one runner-up)
    layer(torch.ones(1, 8, 16))
    s = layer.stats()
    assert sum(s["load"]) == 8 * 2
    assert s["load"][0] == 8 and s["dead_experts"] == 2
    assert s["max_load_ratio"] == pytest.approx(8 / 4)
    assert s["aux_loss"] > 1.0 and s["z_loss"] > 0 and s["router_entropy"] >= 0
    flat = flat_moe_metrics([s])
    assert flat["moe/L0/max_load_ratio"] == pytest.approx(2.0)
    assert flat["moe/L0/load/E0"] == pytest.approx(0.5)
    assert flat["moe/L0/dead_experts"] == 2.0


@pytest.mark.parametrize("router,e,k,n_shared,biased", [("softmax", 4, 2, 1, False), ("sigmoid", 4, 2, 2, True),
                                                         ("soft", 4, 4, 0, False), ("softmax", 2, 1, 0, True)])
def test_dense_decode_matches_the_routed_path(router, e, k, n_shared, biased):
    """A decode step (one token per row, eval, no autograd) runs every expert densely (unrouted ones
    weighted 0, shared experts as weight-1 blocks) and gives the routed path's output; it is taken
    only where it costs at most ``_DENSE_DECODE_MAX_FLOPS`` x the routed FLOPs and nothing depends on
    the batch (no capacity dropping) and a decode passed its weight store (``KVCache.derived``)."""
    from r1zero.model import R1ZeroConfig
    from r1zero.model.moe import _DENSE_DECODE_MAX_FLOPS, MoELayer

    torch.manual_seed(0)
    cfg = R1ZeroConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, n_experts=e,
                       num_experts_per_tok=k, n_shared=n_shared, d_expert=16, router=router, route_scale=1.5)
    moe = MoELayer(cfg, 0).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if biased:
        moe.expert_bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1])[:e])
    x_T1D = torch.randn(37, 1, 32)
    with torch.inference_mode():
        assert moe._dense_decode(x_T1D)
        store: dict = {}
        dense = moe(x_T1D, store)
        assert moe.aux_loss is None and store  # the dense path ran and skipped the routed bookkeeping
        routed = moe(x_T1D)  # no decode store: the routed path
        assert moe.aux_loss is not None
    torch.testing.assert_close(dense, routed, atol=1e-5, rtol=1e-5)
    moe.capacity_factor = 1.0  # dropping depends on the batch: routed path
    assert not moe._dense_decode(x_T1D)
    moe.capacity_factor = None
    moe.train()
    assert not moe._dense_decode(x_T1D)
    moe.eval()
    moe.top_k = 1
    moe.n_experts = int(_DENSE_DECODE_MAX_FLOPS) + 1  # E > limit * K: more than the allowed extra work
    with torch.no_grad():
        assert not moe._dense_decode(x_T1D)


@pytest.mark.parametrize("router", ["softmax", "sigmoid", "soft"])
def test_token_mask_counts_real_tokens_only_in_aux_losses_and_stats(router):
    """Padding tokens (token_mask 0) are routed and run, but the balance loss, the z-loss and the
    load statistics are those of the real tokens alone, with the same router gradient; no mask and
    an all-real mask give the same figures (issue 16: the GRPO update's padded batches)."""
    layer = make_layer(seed=3, router=router).train()
    x_BSD = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4))
    real_BS = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.long)

    def run(x, mask=None):
        layer.zero_grad(set_to_none=True)
        layer.tokens_per_expert_E.zero_()
        out = layer(x, token_mask=mask)
        (layer.aux_loss + layer.z_loss).backward()
        return out, layer.aux_loss.detach(), layer.z_loss.detach(), layer.gate.weight.grad.clone(), layer.stats(), \
            layer.tokens_per_expert_E.clone()

    out_m, aux_m, z_m, g_m, st_m, cnt_m = run(x_BSD, real_BS)
    out_r, aux_r, z_r, g_r, st_r, cnt_r = run(x_BSD[real_BS.bool()][None])  # the real tokens only
    torch.testing.assert_close(out_m[real_BS.bool()], out_r[0], rtol=1e-6, atol=1e-6)  # outputs untouched
    torch.testing.assert_close(aux_m, aux_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(z_m, z_r, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_m, g_r, rtol=1e-5, atol=1e-7)
    assert st_m["load"] == st_r["load"] and sum(st_m["load"]) == int(real_BS.sum()) * layer.top_k
    assert torch.equal(cnt_m, cnt_r)
    out_n, aux_n, z_n, g_n, *_ = run(x_BSD)
    out_o, aux_o, z_o, g_o, *_ = run(x_BSD, torch.ones_like(real_BS))
    assert torch.equal(aux_n, aux_o) and torch.equal(z_n, z_o) and torch.equal(g_n, g_o) and torch.equal(out_n, out_o)
    # the padding did count without the mask (soft routing's balance loss is 1 for any tokens)
    assert not torch.allclose(z_n, z_m) and (router == "soft" or not torch.allclose(aux_n, aux_m))
    _, aux_0, z_0, g_0, st_0, _ = run(x_BSD, torch.zeros_like(real_BS))  # no real token: zero, still a graph
    assert float(aux_0) == 0.0 and float(z_0) == 0.0 and float(g_0.abs().max()) == 0.0 and sum(st_0["load"]) == 0
