"""Tests for r1zero.generate: agreement with transformers' generate(), stopping, determinism."""

from __future__ import annotations

import pytest
import torch

from r1zero.generate import left_pad, sample, sample_next

EOS, PAD = 1, 0  # of the tiny LMs in tests/conftest.py


@pytest.fixture(scope="module")
def model(tiny_lms):
    return tiny_lms["llama"]()


def _hf_greedy(model, prompts, max_new):
    ids, mask = left_pad(prompts, PAD)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                         eos_token_id=EOS, pad_token_id=PAD)
    res = []
    for row in out[:, ids.shape[1]:].tolist():
        toks = []
        for t in row:
            toks.append(t)
            if t == EOS:
                break
        res.append(toks)
    return res


def test_greedy_matches_hf_generate_with_left_padding(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [5, 6, 7, 8, 9], [30]]
    ours = sample(model, prompts, max_new_tokens=12, temperature=0.0, eos_id=EOS, pad_id=PAD)
    ref = _hf_greedy(model, prompts, 12)
    assert ours.completion_ids == ref
    for c, tr in zip(ours.completion_ids, ours.truncated):
        assert tr == (len(c) == 12 and c[-1] != EOS)


def test_eos_stops_and_compaction_keeps_rows_aligned(model):
    # bias EOS strongly for a copy of the model so most rows stop early at different steps
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight[EOS] = m.model.embed_tokens.weight[7] * 0.0 + 0.3
    prompts = [[i % 37 + 2, (i * 7) % 37 + 2] for i in range(24)]
    g = torch.Generator().manual_seed(1)
    ours = sample(m, prompts, max_new_tokens=16, temperature=1.0, eos_id=EOS, pad_id=PAD, generator=g)
    lens = [len(c) for c in ours.completion_ids]
    assert len(set(lens)) > 1, "expected rows to stop at different lengths"
    for c, tr in zip(ours.completion_ids, ours.truncated):
        assert EOS not in c[:-1]
        assert tr == (c[-1] != EOS)
        assert tr == (len(c) == 16 and c[-1] != EOS)
    # greedy per row == greedy batched (compaction must not mix rows up)
    batched = sample(m, prompts, 16, temperature=0.0, eos_id=EOS, pad_id=PAD)
    single = [sample(m, [p], 16, temperature=0.0, eos_id=EOS, pad_id=PAD).completion_ids[0] for p in prompts]
    assert batched.completion_ids == single


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds(model):
    prompts = [[3, 4, 5]] * 8
    a = sample(model, prompts, 10, 1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    b = sample(model, prompts, 10, 1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    c = sample(model, prompts, 10, 1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(4))
    assert a == b
    assert a.completion_ids != c.completion_ids
    assert len({tuple(x) for x in a.completion_ids}) > 1, "G copies of a prompt should differ"


def test_top_p_tiny_is_greedy_and_sample_next_distribution():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 4)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1.0, 1e-6, g).tolist() == [1, 1, 1, 1]
    assert sample_next(logits, 0.0, 1.0, g).tolist() == [1, 1, 1, 1]
    # top_p = 0.8 keeps the two most likely tokens (p = .66, .24 -> cum .90 >= .8)
    many = sample_next(logits.repeat(500, 1), 1.0, 0.8, g)
    assert set(many.tolist()) == {1, 2}
    frac1 = (many == 1).float().mean().item()
    assert 0.66 < frac1 < 0.80  # renormalised .66/.90 = .73


def test_edge_cases(model):
    assert sample(model, [], 5, eos_id=EOS, pad_id=PAD).completion_ids == []
    out = sample(model, [[4, 5]], 1, 0.0, eos_id=EOS, pad_id=PAD)
    assert len(out.completion_ids[0]) == 1
    with pytest.raises(ValueError):
        sample(model, [[]], 3, eos_id=EOS, pad_id=PAD)
    assert model.training is False


def test_other_causal_lms_take_their_own_forward_and_cache(model, tiny_lms):
    """Any transformers causal LM (GPT-2 here) samples through its own forward and cache, hooks
    included (tensor parallelism and telemetry hook modules), and agrees with generate()."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)).eval()
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7]]
    assert sample(gpt2, prompts, 6, 0.0, eos_id=EOS, pad_id=PAD).completion_ids == _hf_greedy(gpt2, prompts, 6)
    calls = []
    h = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        sample(model, [[4, 5]], 3, 0.0, eos_id=EOS, pad_id=PAD)
    finally:
        h.remove()
    assert calls, "a forward hook must not be bypassed"


# ---------------------------------------------------------------------------------------------
# decoding with the model's own forward and cache == one uncached forward (ported from the lean
# decoder's tests: r1zero's KVCache, RoPE tables and dense MoE decode are now the model's)


@pytest.fixture(scope="module", params=["llama", "qwen2", "r1zero_moe"])
def any_model(request, model, tiny_lms):
    return model if request.param == "llama" else tiny_lms[request.param]()


def test_cached_decode_logits_match_full_forward(any_model):
    """Prefill + decode-step logits of the sampler's path (r1zero: preallocated KVCache, dense MoE
    decode; transformers: its own cache) == logits of one uncached forward, within 1e-5."""
    from r1zero.generate import _Decoder

    m = any_model
    uniq = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    src = torch.tensor([0, 1, 2, 1])
    ids, mask = left_pad(uniq, PAD)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dec = _Decoder(m)
    steps = 6
    with torch.inference_mode():
        logits = [dec.prefill(ids, mask, pos, src, steps)]
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


def test_static_and_dynamic_cache_sample_the_same_tokens(tiny_lms, monkeypatch):
    """r1zero's model: the preallocated KVCache path and transformers' DynamicCache give the same
    tokens for a generator seed, with rows finishing at different steps (batch compaction)."""
    import copy

    import r1zero.generate as G

    m = copy.deepcopy(tiny_lms["r1zero_moe"]())
    with torch.no_grad():  # EOS likely, so rows finish at different steps and the batch compacts
        m.lm_head.weight[EOS] = 0.0
    prompts = [[i % 37 + 2, (i * 7) % 37 + 2, 3][: 1 + i % 3] for i in range(12)] * 2
    for temp, top_p in ((1.0, 1.0), (0.7, 0.9), (0.0, 1.0)):
        a = sample(m, prompts, 14, temp, top_p, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5))
        monkeypatch.setattr(G, "_STATIC_CACHE", False)
        b = sample(m, prompts, 14, temp, top_p, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(5))
        monkeypatch.setattr(G, "_STATIC_CACHE", True)
        assert a == b
        if temp == 1.0:
            assert len({len(c) for c in a.completion_ids}) > 1, "expected rows to finish at different steps"


def test_sampling_leaves_training_mode(tiny_lms):
    m = tiny_lms["r1zero_moe"]().train()
    sample(m, [[4, 5, 6]] * 3, 4, 1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    assert m.training and all(x.training for x in m.modules())


def test_decode_sees_weights_changed_in_place_by_fused_adamw(tiny_lms):
    """Weights derived for decoding (stacked q|k|v, the dense MoE's stacked experts) are rebuilt for
    every sample() call: fused AdamW steps the parameters in place without bumping their version
    counters, so a cache keyed on versions would sample from stale weights."""
    import copy

    m = tiny_lms["r1zero_moe"]()
    prompts = [[5, 6, 7], [8, 9]] * 3
    sample(m, prompts, 8, 0.0, eos_id=EOS, pad_id=PAD)  # a decode before the step
    params = list(m.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    versions = [p._version for p in params]
    opt.step()
    assert [p._version for p in params] == versions  # (why the store is per decode)
    fresh = copy.deepcopy(m)
    got = sample(m, prompts, 8, 0.0, eos_id=EOS, pad_id=PAD)
    assert got == sample(fresh, prompts, 8, 0.0, eos_id=EOS, pad_id=PAD)
    with torch.inference_mode():
        ids, mask = left_pad(prompts, PAD)
        ref = m(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert [c[0] for c in got.completion_ids] == ref[:, -1].argmax(-1).tolist()
