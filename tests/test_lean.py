"""Tests for r1zero.lean: the lean decode path and training forward against model(...)."""

from __future__ import annotations

import pytest
import torch

from r1zero.generate import left_pad, sample

EOS, PAD = 1, 0  # of the tiny LMs in tests/conftest.py


@pytest.fixture(scope="module")
def model(tiny_lms):
    return tiny_lms["llama"]()


# ---------------------------------------------------------------------------------------------
# lean (static-cache) decode path vs the generic model(...) path


@pytest.fixture(scope="module", params=["llama", "qwen2", "r1zero_moe"])
def any_model(request, model, tiny_lms):
    return model if request.param == "llama" else tiny_lms[request.param]()


@pytest.mark.parametrize("fuse", [True, False])
def test_lean_logits_match_full_forward(any_model, fuse, monkeypatch):
    """Prefill + decode-step logits of the static-cache path == logits of one uncached forward."""
    import r1zero.lean as gen
    from r1zero.lean import lean_decoder

    if not fuse:  # large models keep q/k/v and gate/up as separate matmuls
        monkeypatch.setattr(gen, "_FUSE_MAX_BYTES", 0)

    m = any_model
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [10, 11]]
    uniq = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    src = torch.tensor([0, 1, 2, 1])
    ids, mask = left_pad(uniq, PAD)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dec = lean_decoder(m)
    steps = 6
    with torch.inference_mode():
        logits = [dec.prefill(ids, mask, pos, src, steps)]
        assert bool(dec.fused) == fuse
        toks = []
        next_pos = pos[:, -1].index_select(0, src) + 1
        for t in range(steps - 1):
            tok = logits[-1].argmax(-1)
            if t == 2:  # perturb so rows of the same prompt diverge
                tok = (tok + torch.arange(4)) % 40
            toks.append(tok)
            logits.append(dec.step(tok, next_pos))
            next_pos = next_pos + 1
        full = torch.cat([ids.index_select(0, src), torch.stack(toks, 1)], 1)
        fmask = torch.cat([mask.index_select(0, src), torch.ones(4, steps - 1, dtype=torch.long)], 1)
        ref = m(input_ids=full, attention_mask=fmask, position_ids=(fmask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False).logits
    L = ids.shape[1]
    for t, lg in enumerate(logits):
        torch.testing.assert_close(lg, ref[:, L - 1 + t], atol=1e-5, rtol=1e-5)
    assert prompts  # (rows 1 and 3 share a prompt: prefilled once, expanded)


def test_lean_and_generic_paths_sample_the_same_tokens(any_model):
    m = any_model
    import copy

    m = copy.deepcopy(m)
    with torch.no_grad():  # EOS likely, so rows finish at different steps and the batch compacts
        m.lm_head.weight[EOS] = 0.0
        if m.lm_head.bias is not None:
            m.lm_head.bias[EOS] = 0.0
    prompts = [[i % 37 + 2, (i * 7) % 37 + 2, 3][: 1 + i % 3] for i in range(12)] * 2
    for temp, top_p in ((1.0, 1.0), (0.7, 0.9), (0.0, 1.0)):
        a = sample(m, prompts, 14, temp, top_p, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5))
        b = sample(m, prompts, 14, temp, top_p, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5),
                   lean=False)
        assert a == b
        if temp == 1.0:
            assert len({len(c) for c in a.completion_ids}) > 1, "expected rows to finish at different steps"


def test_lean_path_leaves_training_mode_and_grad_state(model):
    import copy

    m = copy.deepcopy(model).train()
    sample(m, [[4, 5, 6]] * 3, 4, 1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert m.training and all(x.training for x in m.modules())


def test_shared_prompt_training_forward_matches_generic_update(model, monkeypatch):
    """policy_update with the lean shared-prompt forward == with one model(...) forward."""
    import copy

    import r1zero.grpo.update as U
    from r1zero.config import GRPOConfig
    from r1zero.lean import lean_decoder

    m0 = copy.deepcopy(model)
    m0.model.embed_tokens.padding_idx = PAD  # as in transformers' Llama: no lookup gradient into the pad row
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    rows = [p for p in prompts for _ in range(3)]
    # varying lengths (right padding) and PAD/EOS sampled as real tokens in the completions
    comps = [[4, PAD, 6, EOS], [7, 8], [9], [PAD, 3, 2, 2, 5], [6, EOS], [2, 2, 2], [8, 9, 10], [3], [EOS]]
    batch = U.build_batch(rows, comps, PAD)
    assert batch.prompt_src_B.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert lean_decoder(m0.train(), training=True) is not None
    cfg = GRPOConfig(group_size=3, max_new_tokens=5, beta=0.0, mu=2, loss_agg="token", lr=1e-2)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5, 1.0, 0.0, -1.0])
    res = {}
    for lean in (True, False):
        monkeypatch.setattr(U, "LEAN_FORWARD", lean)
        m = copy.deepcopy(m0)
        params = list(m.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        logp = U.sequence_logprobs(m, batch)
        stats = U.policy_update(m, opt, batch, adv, cfg, params=params, guard=U.NanGuard(3))
        res[lean] = (logp, stats, [p.detach().clone() for p in params])
    real = batch.mask_BT.bool()  # padding positions are masked out everywhere downstream
    torch.testing.assert_close(res[True][0][real], res[False][0][real], atol=1e-5, rtol=1e-5)
    for k in ("loss", "grad_norm", "entropy_sum", "tokens"):
        assert res[True][1][k] == pytest.approx(res[False][1][k], rel=1e-5, abs=1e-6), k
    for a, b in zip(res[True][2], res[False][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prompt_training_forward_for_r1zero_moe(monkeypatch, tiny_lms):
    """r1zero's dropless MoE: the shared-prompt forward gives the generic forward's logits and
    policy-gradient gradients; only the aux loss differs (unique prompt tokens counted once)."""
    import copy

    import r1zero.grpo.update as U
    from r1zero.lean import lean_decoder

    m0 = tiny_lms["r1zero_moe"]().train()
    assert lean_decoder(m0, training=True) is not None
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    rows = [p for p in prompts for _ in range(3)]
    comps = [[4, 6, 6, EOS], [7, 8], [9], [3, 3, 2, 2, 5], [6, EOS], [2, 2, 2], [8, 9, 10], [3], [EOS]]
    batch = U.build_batch(rows, comps, PAD)
    real = batch.mask_BT.bool()
    adv_B1 = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.2, -0.5, 1.0, 0.0, -1.0])[:, None]
    res = {}
    for lean in (True, False):
        monkeypatch.setattr(U, "LEAN_FORWARD", lean)
        m = copy.deepcopy(m0)
        logits_NV, out = U.forward_completion(m, batch)
        assert logits_NV.shape[0] == int(real.sum())  # real positions only, row-major
        logp_N = torch.log_softmax(logits_NV, -1).gather(-1, batch.targets_BT[real][:, None])[:, 0]
        (-(logp_N * adv_B1.expand_as(real)[real]).sum()).backward()
        res[lean] = (logp_N.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                       for p in m.parameters()], out.aux_loss)
    torch.testing.assert_close(res[True][0], res[False][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(res[True][1], res[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert res[True][2] is not None and res[True][2].requires_grad  # the balance loss still trains the router
    # a capacity factor makes dropping depend on the batch: generic path
    m_cap = copy.deepcopy(m0)
    for moe in m_cap.moe_layers():
        moe.capacity_factor = 1.0
    assert lean_decoder(m_cap, training=True) is None


def test_lean_training_forward_skips_padding_and_handles_short_completions(monkeypatch, tiny_lms):
    """The lean forward runs position-wise work on unique prompt tokens + real completion inputs
    only (the MoE feed-forward sees exactly those rows), and matches the generic path when
    completions are empty, one token long, or all of one length (no padding to skip)."""
    import copy

    import r1zero.grpo.update as U
    from r1zero.model.moe import MoELayer

    m0 = tiny_lms["r1zero_moe"]().train()
    seen: list[int] = []
    fwd = MoELayer.forward

    def counting(self, x):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return fwd(self, x)

    monkeypatch.setattr(MoELayer, "forward", counting)
    prompts = [[5, 6, 7, 8], [9, 10]]
    rows = [p for p in prompts for _ in range(3)]
    cases = {
        "ragged": [[4, 6, 6, EOS], [7, 8], [9], [3, 3, 2, 2, 5], [], [2]],
        "short": [[4], [7], [9], [], [6], [EOS]],
        "equal": [[4, 6, 6], [7, 8, 1], [9, 9, 9], [3, 3, 2], [6, 1, 1], [2, 2, 2]],
    }
    for name, comps in cases.items():
        batch = U.build_batch(rows, comps, PAD)
        real = batch.mask_BT.bool()
        out = {}
        for lean in (True, False):
            monkeypatch.setattr(U, "LEAN_FORWARD", lean)
            seen.clear()
            logits_NV, _ = U.forward_completion(copy.deepcopy(m0), batch)
            assert logits_NV.shape[0] == int(real.sum()), name
            out[lean] = (logits_NV, list(seen))
        torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
        # unique prompt tokens (padded to the longest prompt) + completion inputs that predict a real token
        want = len(prompts) * batch.prompt_len + sum(max(len(c) - 1, 0) for c in comps)
        assert set(out[True][1]) == {want}, (name, out[True][1], want)
        assert set(out[False][1]) == {len(rows) * batch.input_ids_BL.shape[1]}  # generic: every padded position


@pytest.mark.parametrize("router,e,k,n_shared,biased", [("softmax", 4, 2, 1, False), ("sigmoid", 4, 2, 2, True),
                                                         ("soft", 4, 4, 0, False), ("softmax", 2, 1, 0, True)])
def test_dense_moe_decode_matches_the_routed_layer(router, e, k, n_shared, biased):
    """The decode-time dense MoE (every expert on every token, unrouted ones weighted 0, shared
    experts as weight-1 blocks) gives ``MoELayer.forward``'s output; it is only built where it
    costs at most ``_MOE_DENSE_MAX_FLOPS`` x the routed FLOPs and nothing depends on the batch."""
    from r1zero.lean import _MOE_DENSE_MAX_FLOPS, _moe_dense, _moe_dense_weights
    from r1zero.model import R1ZeroConfig
    from r1zero.model.moe import MoELayer

    torch.manual_seed(0)
    cfg = R1ZeroConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, n_experts=e,
                       num_experts_per_tok=k, n_shared=n_shared, d_expert=16, router=router, route_scale=1.5)
    moe = MoELayer(cfg, 0).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if biased:
        moe.expert_bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1])[:e])
    x_TD = torch.randn(37, 32)
    w = _moe_dense_weights(moe)
    assert w is not None
    with torch.inference_mode():
        torch.testing.assert_close(_moe_dense(moe, w, x_TD), moe(x_TD[None])[0], atol=1e-5, rtol=1e-5)
    moe.capacity_factor = 1.0  # dropping depends on the batch: routed module
    assert _moe_dense_weights(moe) is None
    moe.capacity_factor = None
    moe.top_k = 1
    moe.n_experts = int(_MOE_DENSE_MAX_FLOPS) + 1  # E > limit * K: more than the allowed extra work
    assert _moe_dense_weights(moe) is None


def test_attention_buckets_cover_each_real_completion_slot_once():
    """Ragged batches split into length-sorted buckets (less padded attention work); every real
    (row, position) lands in exactly one bucket slot and the permutation restores packed order."""
    from r1zero.lean import _BUCKET_GAIN, _attention_buckets, _packed_index

    lens = torch.tensor([1, 9, 2, 0, 9, 3, 8, 1])
    B, S, P = lens.numel(), 9, 5
    keep_BS = torch.arange(S)[None, :] < lens[:, None]
    src_B = torch.arange(B) // 2
    keys_UP = torch.ones(4, P, dtype=torch.bool)
    buckets, inv = _attention_buckets(keep_BS, src_B, keys_UP, _packed_index(keep_BS))
    assert 1 < len(buckets) <= 4 and inv is not None
    work = sum(b.src.numel() * b.width * (P + b.width) for b in buckets)
    assert work <= _BUCKET_GAIN * B * S * (P + S)
    n = int(lens.sum())
    got = torch.cat([b.gather.index_select(0, b.real) for b in buckets])  # packed row of each real slot
    assert sorted(got.tolist()) == list(range(n))
    assert torch.equal(got.index_select(0, inv), torch.arange(n))  # inv puts bucket order back in packed order
    for b in buckets:
        assert b.allow.shape == (b.src.numel(), 1, b.width, P + b.width)
    # no padding: one bucket, no gathers
    full = torch.ones(B, S, dtype=torch.bool)
    buckets, inv = _attention_buckets(full, src_B, keys_UP, None)
    assert len(buckets) == 1 and buckets[0].gather is None and inv is None
    # nearly uniform lengths: splitting would not pay, one padded block
    near = torch.arange(S)[None, :] < torch.tensor([9, 9, 9, 9, 9, 9, 9, 8])[:, None]
    buckets, inv = _attention_buckets(near, src_B, keys_UP, _packed_index(near))
    assert len(buckets) == 1 and inv is None and buckets[0].gather is not None
