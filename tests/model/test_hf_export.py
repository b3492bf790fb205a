"""Standard checkpoints (r1zero.model.hf_export, loading): every layout r1zero maps writes a stock
transformers architecture whose fp32 logits match r1zero's to 1e-5 in a process that never imports
r1zero; the inverse map restores r1zero's model; stock-saved checkpoints load (mapped where exact,
the stock model otherwise); layouts with no standard architecture are refused with the reason.

    .venv/bin/python -m pytest tests/model/test_hf_export.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open

from r1zero.cli import main
from r1zero.config import load_config
from r1zero.errors import UserError
from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM, load_causal_lm
from r1zero.model.hf_export import export_hf

BASE = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            d_expert=24, rope_theta=500.0, rms_norm_eps=1e-6, max_position_embeddings=64, eos_token_id=1,
            pad_token_id=0)
# name -> (R1ZeroConfig fields, stock class it must load as)
LAYOUTS = {
    "qwen2_moe": (dict(router="softmax", n_experts=4, num_experts_per_tok=2, n_shared=1, n_dense_layers=1),
                  "Qwen2MoeForCausalLM"),  # the tiny preset's layout (plus a dense first layer)
    "qwen2_moe_top1": (dict(router="softmax", n_experts=4, num_experts_per_tok=1, n_shared=2), "Qwen2MoeForCausalLM"),
    "qwen2_moe_soft": (dict(router="soft", n_experts=4, num_experts_per_tok=2, n_shared=1), "Qwen2MoeForCausalLM"),
    "mixtral": (dict(router="softmax", n_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
                "MixtralForCausalLM"),  # the a100-13b preset's layout
    # heads wider than hidden / heads (4 of 32 on 64: what vLLM's CPU attention needs), Mixtral
    # reads head_dim
    "mixtral_wide_heads": (dict(router="softmax", n_experts=4, num_experts_per_tok=2, hidden_size=64,
                                num_attention_heads=4, head_dim=32), "MixtralForCausalLM"),
    "mixtral_soft": (dict(router="soft", n_experts=3, num_experts_per_tok=1), "MixtralForCausalLM"),
    "glm4_moe": (dict(router="sigmoid", n_experts=6, num_experts_per_tok=2, n_shared=2, n_dense_layers=1,
                      bias_update_rate=1e-3, route_scale=2.5), "Glm4MoeForCausalLM"),
    "llama": (dict(n_dense_layers=3, d_dense=80), "LlamaForCausalLM"),
}

# Run by a fresh interpreter in a folder outside the repo: stock transformers only.
STOCK = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    ids = torch.load(jobs["ids"])
    out = {}
    for d in jobs["dirs"]:
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = m(ids).logits
            gen = m.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.save({"logits": logits, "gen": gen}, d + "/stock_out.pt")
        out[d] = type(m).__name__
    assert not [k for k in sys.modules if k == "r1zero" or k.startswith("r1zero.")], "r1zero was imported"
    print(json.dumps(out))
""")


def run_stock(dirs, ids, tmp_path) -> dict:
    torch.save(ids, tmp_path / "ids.pt")
    job = json.dumps({"dirs": [str(d) for d in dirs], "ids": str(tmp_path / "ids.pt")})
    res = subprocess.run([sys.executable, "-c", STOCK, job], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def random_model(fields: dict, seed: int = 0) -> R1ZeroForCausalLM:
    """Weights large enough that routing, norms and the selection bias all move the logits."""
    torch.manual_seed(seed)
    m = R1ZeroForCausalLM(R1ZeroConfig(**{**BASE, **fields})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.15 * torch.randn_like(p))
        for moe in m.moe_layers():
            if moe.kind == "sigmoid":
                moe.expert_bias_E.copy_(0.1 * torch.randn_like(moe.expert_bias_E))
    return m


def test_every_layout_matches_stock_transformers_and_maps_back(tmp_path):
    ids = torch.randint(0, BASE["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))
    models, dirs = {}, []
    for name, (fields, _) in LAYOUTS.items():
        models[name] = random_model(fields)
        models[name].save_pretrained(tmp_path / name)
        dirs.append(tmp_path / name)
    classes = run_stock(dirs, ids, tmp_path)
    for name, (fields, cls) in LAYOUTS.items():
        d = tmp_path / name
        assert classes[str(d)] == cls, name
        m = models[name]
        with torch.no_grad():
            ref = m(ids).logits
            gen = m.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        stock = torch.load(d / "stock_out.pt")
        assert ref.abs().max() > 1.0, name  # non-trivial logits
        err = (stock["logits"] - ref).abs().max().item()
        assert err <= 1e-5, f"{name}: stock vs r1zero max |dlogit| {err:.2e}"
        assert torch.equal(stock["gen"], gen), name  # KV-cache decoding agrees too
        back, _ = load_causal_lm(d, require_tokenizer=False)
        assert isinstance(back, R1ZeroForCausalLM), name
        assert back.config.router == m.config.router and back.config.n_shared == m.config.n_shared
        with torch.no_grad():
            assert torch.equal(back(ids).logits, ref), name
        conf = json.loads((d / "config.json").read_text())
        assert conf["r1zero"]["router"] == fields.get("router", "softmax")
        shape = {**BASE, **fields}
        assert conf["head_dim"] == shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
        assert back.config.head_dim == conf["head_dim"]


def test_glm4_moe_config_is_deepseek_v3_moe_with_plain_gqa(tmp_path):
    random_model(LAYOUTS["glm4_moe"][0]).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == "glm4_moe" and conf["architectures"] == ["Glm4MoeForCausalLM"]
    assert (conf["use_qk_norm"], conf["attention_bias"], conf["rope_parameters"]["partial_rotary_factor"],
            conf["partial_rotary_factor"], conf["rope_theta"]) == (False, False, 1.0, 1.0, 500.0)
    assert (conf["n_group"], conf["topk_group"], conf["norm_topk_prob"], conf["routed_scaling_factor"]) == \
        (1, 1, True, 2.5)
    assert (conf["first_k_dense_replace"], conf["n_shared_experts"], conf["num_nextn_predict_layers"]) == (1, 2, 0)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0


def test_streamed_sharded_bf16_export(tmp_path):
    m = random_model(LAYOUTS["qwen2_moe"][0])
    seen = []

    def stream():  # one tensor at a time, as a sharded engine would gather them
        for name, t in m.state_dict().items():
            seen.append(name)
            yield name, t.clone()

    out = tmp_path / "bf16"
    family = export_hf(stream(), m.config, out, dtype=torch.bfloat16, max_shard_bytes=40_000)
    assert family == "qwen2_moe" and len(seen) == len(m.state_dict())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    stored, total = {}, 0
    for s in shards:
        with safe_open(str(s), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16, k
                stored[k] = s.name
                total += t.numel() * 2
    assert stored == index["weight_map"] and index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back, _ = load_causal_lm(out, require_tokenizer=False)
    for name, t in m.state_dict().items():
        assert torch.equal(back.state_dict()[name], t.to(torch.bfloat16).float()), name
    # re-exporting into the same dir replaces the shards: no stale files from the larger shard count
    export_hf(m.state_dict().items(), m.config, out)
    assert not list(out.glob("model-*-of-*.safetensors")) and (out / "model.safetensors").is_file()


def test_to_hf_tensors_gives_the_checkpoint_names(tmp_path):
    from r1zero.model.hf_export import to_hf_tensors

    m = random_model(LAYOUTS["glm4_moe"][0])
    m.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    live = dict(to_hf_tensors(m.state_dict().items(), m.config))
    assert set(live) == set(index["weight_map"])
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), t) for k, t in live.items())


def test_legacy_r1zero_moe_dirs_still_load(tmp_path):
    from transformers import PreTrainedModel

    m = random_model(LAYOUTS["qwen2_moe"][0])
    PreTrainedModel.save_pretrained(m, tmp_path)  # what save_pretrained wrote before standard checkpoints
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "r1zero_moe"
    back, _ = load_causal_lm(tmp_path, require_tokenizer=False)
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert isinstance(back, R1ZeroForCausalLM) and torch.equal(back(ids).logits, m(ids).logits)


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    m = random_model(LAYOUTS["mixtral"][0])

    def broken():
        yield from list(m.state_dict().items())[:5]
        yield "model.layers.0.no_such.weight", torch.zeros(2)

    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="unexpected r1zero tensor"):
        export_hf(broken(), m.config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def _stock(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, **kw)
    return cls(cfg).eval()


STOCK_SAVED = {
    # exact r1zero layouts saved by stock transformers: mapped into R1ZeroForCausalLM
    "glm4_plain": (lambda: _stock(transformers.Glm4MoeForCausalLM, transformers.Glm4MoeConfig, intermediate_size=64,
                                  moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                                  first_k_dense_replace=1, partial_rotary_factor=1.0, num_mtp_layers=0,
                                  head_dim=12), True),
    "mixtral": (lambda: _stock(transformers.MixtralForCausalLM, transformers.MixtralConfig, intermediate_size=32,
                               num_local_experts=4, num_experts_per_tok=2), True),
    "llama": (lambda: _stock(transformers.LlamaForCausalLM, transformers.LlamaConfig, intermediate_size=64), True),
    # what r1zero's model cannot represent runs as the stock model
    "glm4_default": (lambda: _stock(transformers.Glm4MoeForCausalLM, transformers.Glm4MoeConfig, intermediate_size=64,
                                    moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                                    use_qk_norm=True, num_mtp_layers=0), False),  # qk-norm, partial RoPE
    "qwen2_moe_gated": (lambda: _stock(transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                                       intermediate_size=64, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
                        False),  # learned shared-expert gate, q/k/v biases
    "qwen2_dense": (lambda: _stock(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, intermediate_size=64),
                    False),
}


@pytest.mark.parametrize("name", list(STOCK_SAVED))
def test_checkpoints_saved_by_stock_transformers_load(name, tmp_path):
    build, mapped = STOCK_SAVED[name]
    stock = build()
    with torch.no_grad():
        for p in stock.parameters():
            p.add_(0.1 * torch.randn_like(p))
    stock.save_pretrained(tmp_path)
    model, _ = load_causal_lm(tmp_path, require_tokenizer=False)
    assert isinstance(model, R1ZeroForCausalLM) == mapped
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = (model(ids).logits - stock(ids).logits).abs().max().item()
    assert err <= 1e-5, f"{name}: {err:.2e}"


@pytest.mark.parametrize("override,reason", [
    ("model.moe.capacity_factor=1.25", "drops tokens"),
    ("model.moe.bias_update_rate=0.001", "no standard architecture has a selection bias on softmax"),
    ("model.moe.n_shared=0", "has no standard HF architecture"),  # with n_dense_layers=1 below
])
def test_layouts_without_a_standard_architecture_are_refused_at_config_time(override, reason, capsys):
    sets = [override] + (["model.moe.n_dense_layers=1"] if override.endswith("n_shared=0") else [])
    with pytest.raises(UserError, match=reason):
        load_config("configs/tiny.yaml", sets)
    argv = ["config", "show", "--config", "configs/tiny.yaml"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err


def test_router_refusals_and_the_presets_map():
    with pytest.raises(UserError, match="n_shared >= 1"):
        load_config("configs/tiny.yaml", ["model.moe.router=sigmoid", "model.moe.n_shared=0"])
    load_config("configs/tiny.yaml", ["model.moe.router=sigmoid", "model.moe.bias_update_rate=0.001"])
    from r1zero.model.hf_export import hf_family, r1zero_config

    assert hf_family(r1zero_config(load_config("configs/tiny.yaml").model)) == "qwen2_moe"
    assert hf_family(r1zero_config(load_config("configs/a100-13b.yaml").model)) == "mixtral"
    # heads wider than d_model / n_heads: Qwen2-MoE (vLLM derives its head width from hidden_size)
    # is refused at config time with the reason; Mixtral's layout reads head_dim
    with pytest.raises(UserError, match="vLLM's Qwen2-MoE derives the head width"):
        load_config("configs/tiny.yaml", ["model.n_heads=4", "model.head_dim=32"])
    wide = load_config("configs/tiny.yaml", ["model.n_heads=4", "model.head_dim=32", "model.moe.n_shared=0"]).model
    assert hf_family(r1zero_config(wide)) == "mixtral" and r1zero_config(wide).head_dim == 32
    with pytest.raises(UserError, match="must be even"):
        load_config("configs/tiny.yaml", ["model.head_dim=33", "model.moe.n_shared=0"])


@pytest.mark.parametrize("conf", [{"model_type": "no_such_arch"}, {"model_type": "t5"}])
def test_a_policy_of_an_unsupported_architecture_is_one_line_exit_2(conf, tmp_path, capsys):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text(json.dumps(conf))
    rc = main(["grpo", "--config", "configs/tiny.yaml", "--set", "telemetry.enabled=false", "--policy", str(policy),
               "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unsupported architecture" in err, err
