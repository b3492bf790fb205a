"""R1ZeroForCausalLM: losses, determinism, HF save/load round trip, KV-cache generation."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from r1zero.config import load_config
from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM, build_model, load_causal_lm

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, n_experts=4,
            num_experts_per_tok=2, n_shared=1, d_expert=16, max_position_embeddings=64, eos_token_id=1,
            pad_token_id=0)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return R1ZeroForCausalLM(R1ZeroConfig(**{**TINY, **kw})).eval()


def test_from_model_config_maps_the_typed_config():
    cfg = load_config("configs/tiny.yaml")
    hf = R1ZeroConfig.from_model_config(cfg.model)
    m = cfg.model
    assert (hf.hidden_size, hf.num_hidden_layers, hf.n_experts, hf.num_experts_per_tok) == (
        m.d_model, m.n_layers, m.moe.n_experts, m.moe.top_k) == (64, 4, 4, 2)
    assert hf.n_shared == 1 and hf.d_expert == 128 and hf.vocab_size == 512 and hf.router == "softmax"
    assert hf.aux_loss_coef == cfg.model.moe.aux_loss_coef and hf.capacity_factor is None
    assert hf.expert_compute == "loop"
    other = load_config("configs/tiny.yaml", ["model.moe.expert_compute=padded"])
    hf = R1ZeroConfig.from_model_config(other.model, capacity_factor=1.25)
    assert hf.expert_compute == "padded" and hf.capacity_factor == 1.25


def test_same_seed_same_weights_and_every_weight_initialised():
    cfg = load_config("configs/tiny.yaml").model
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.experts.w_gate_up.0"], sc["model.layers.0.mlp.experts.w_gate_up.0"])
    for name, p in a.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.dim() == 2:  # matrices drawn from N(0, 0.02): catches uninitialised torch.empty
            assert 0.01 < p.std().item() < 0.03, name


def test_loss_adds_weighted_aux_in_training_only():
    m = tiny_model(aux_loss_coef=0.1, z_loss_coef=0.01)
    ids = torch.randint(2, 64, (2, 12))
    m.train()
    out = m(ids, labels=ids)
    assert out.logits.shape == (2, 12, 64)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    assert m.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    m.eval()
    out = m(ids, labels=ids)
    assert torch.allclose(out.loss, out.lm_loss)
    stats = m.moe_stats()
    assert len(stats) == 2 and {"max_load_ratio", "router_entropy", "dead_experts"} <= set(stats[0])
    assert "moe/L1/max_load_ratio" in m.moe_metrics()


def test_ignore_index_and_dense_first_layers_and_gqa():
    m = tiny_model(n_dense_layers=1, num_key_value_heads=2, router="sigmoid")
    assert not hasattr(m.model.layers[0].mlp, "experts") and hasattr(m.model.layers[1].mlp, "experts")
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (2 * 8, 32)
    ids = torch.randint(2, 64, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    out = m(ids, labels=labels)
    # position t predicts token t+1; labels 0..4 are ignored, so positions 4..8 count
    logits = out.logits[:, 4:-1].reshape(-1, 64)
    ref = torch.nn.functional.cross_entropy(logits, ids[:, 5:].reshape(-1))
    assert torch.allclose(out.lm_loss, ref, atol=1e-6)
    assert len(m.moe_stats()) == 1


def test_kv_cache_matches_full_forward():
    m = tiny_model(num_key_value_heads=2)
    ids = torch.randint(2, 64, (2, 9))
    full = m(ids, use_cache=False).logits
    out = m(ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(5, 9):
        out = m(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # the pre-5.x keyword still works
    again = m(ids[:, 8:9], past_key_values=m(ids[:, :8], use_cache=True).cache, use_cache=True)
    assert torch.allclose(again.logits[:, -1], full[:, -1], atol=1e-5)


def test_backbone_returns_a_transformers_output():
    """``model.model(...)`` returns ``last_hidden_state`` and the cache like transformers'
    backbones (TRL's fused-LM-head path reads it); the LM head over it gives the logits."""
    m = tiny_model()
    ids = torch.randint(2, 64, (2, 7))
    out = m.model(input_ids=ids, use_cache=True)
    assert out.last_hidden_state.shape == (2, 7, 32)
    assert out.cache is not None and out.cache.get_seq_length() == 7
    torch.testing.assert_close(m.lm_head(out.last_hidden_state), m(ids, use_cache=False).logits)
    step = m.model(input_ids=ids[:, -1:], past_key_values=m.model(input_ids=ids[:, :6], use_cache=True).cache,
                   use_cache=True)
    torch.testing.assert_close(step.last_hidden_state[:, -1], out.last_hidden_state[:, -1], atol=1e-5, rtol=1e-5)


def test_generate_greedy_cache_equals_recompute():
    m = tiny_model()
    prompt = torch.randint(2, 64, (3, 6))
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with_cache = m.generate(prompt, use_cache=True, **kw)
    no_cache = m.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape == (3, 12)
    assert torch.equal(with_cache, no_cache)
    # manual recomputation: argmax of a full forward, token by token
    seq = prompt
    for _ in range(6):
        nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(seq, with_cache)


def test_left_padded_batch_generates_like_unpadded_rows():
    m = tiny_model()
    a, b = torch.randint(2, 64, (1, 7)), torch.randint(2, 64, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = m.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 7:], m.generate(a, **kw)[0, 7:])
    assert torch.equal(out[1, 7:], m.generate(b, **kw)[0, 4:])


def test_save_pretrained_round_trip_through_auto_classes(tmp_path):
    m = tiny_model(router="sigmoid", bias_update_rate=1e-3)
    with torch.no_grad():
        m.model.layers[1].mlp.expert_bias_E.copy_(torch.tensor([0.1, -0.1, 0.0, 0.0]))
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and (tmp_path / "config.json").is_file()
    # a standard architecture (sigmoid + bias + shared experts = Glm4Moe), loaded by the Auto classes
    assert AutoConfig.from_pretrained(tmp_path).model_type == "glm4_moe"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock).__name__ == "Glm4MoeForCausalLM"
    ids = torch.randint(2, 64, (2, 8))
    assert torch.allclose(stock(ids).logits, m(ids).logits, atol=1e-5)
    loaded, _ = load_causal_lm(tmp_path, require_tokenizer=False)  # mapped back into r1zero's model
    assert isinstance(loaded, R1ZeroForCausalLM)
    assert torch.equal(loaded.model.layers[1].mlp.expert_bias_E, m.model.layers[1].mlp.expert_bias_E)
    assert torch.equal(loaded.model.rotary.inv_freq, m.model.rotary.inv_freq)
    assert torch.allclose(loaded(ids).logits, m(ids).logits, atol=1e-6)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(loaded.generate(ids, **kw), m.generate(ids, **kw))


@pytest.mark.parametrize("router", ["softmax", "soft"])
def test_tiny_preset_trains_a_few_steps(router):
    torch.manual_seed(0)
    m = tiny_model(router=router).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ids = torch.randint(2, 64, (4, 16))
    losses = []
    for _ in range(8):
        out = m(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5
