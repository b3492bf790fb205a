"""The stages' own checkpoints are standard: what ``r1zero pretrain`` and ``r1zero grpo`` write loads
with stock ``AutoModelForCausalLM.from_pretrained`` in a process that never imports r1zero, with fp32
logits equal to r1zero's forward (1e-5), and GRPO starts from a stock-transformers-saved Glm4Moe.

    .venv/bin/python -m pytest tests/model/test_stage_checkpoints.py -q     # ~1-2 min on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "reliability"))
sys.path.insert(0, str(REPO / "tests" / "model"))
from relutil import TINY_DATA, TINY_TRAIN, run_cli  # noqa: E402
from test_hf_export import run_stock  # noqa: E402

GRPO = ["--set", "grpo.steps=2", "--set", "grpo.prompts_per_step=2", "--set", "grpo.group_size=2",
        "--set", "grpo.max_new_tokens=8", "--set", "grpo.eval_every=100", "--set", "grpo.eval_problems=4",
        "--set", "grpo.time_budget_s=null"]


@pytest.mark.slow
def test_pretrain_and_grpo_checkpoints_load_in_stock_transformers(tmp_path):
    from r1zero.model import R1ZeroForCausalLM, load_causal_lm

    cfg = ["--config", "configs/tiny.yaml"]
    steps = [
        ["data", "mix", *cfg, *TINY_DATA, "--out", tmp_path / "data"],
        ["pretrain", *cfg, *TINY_TRAIN, "--set", "pretrain.steps=4", "--data", tmp_path / "data",
         "--out", tmp_path / "pretrain"],
        ["grpo", *cfg, *TINY_TRAIN, *GRPO, "--policy", tmp_path / "pretrain", "--data", tmp_path / "data",
         "--out", tmp_path / "grpo"],
    ]
    for args in steps:
        res = run_cli(*args, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    dirs = [tmp_path / "pretrain", tmp_path / "grpo"]
    for d in dirs:  # the tiny preset's layout (softmax + a shared expert) is Qwen2-MoE
        assert json.loads((d / "config.json").read_text())["model_type"] == "qwen2_moe", d
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    classes = run_stock(dirs, ids, tmp_path)
    for d in dirs:
        assert classes[str(d)] == "Qwen2MoeForCausalLM"
        model, _ = load_causal_lm(d)
        assert isinstance(model, R1ZeroForCausalLM)
        with torch.no_grad():
            ref = model(ids).logits
        err = (torch.load(d / "stock_out.pt")["logits"] - ref).abs().max().item()
        assert err <= 1e-5, f"{d.name}: {err:.2e}"
    a, b = (load_causal_lm(d)[0].state_dict() for d in dirs)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # GRPO changed the weights it wrote


@pytest.mark.slow
def test_grpo_starts_from_a_stock_saved_glm4_moe(tmp_path):
    import transformers

    from r1zero.data.tokenizer import load_tokenizer

    res = run_cli("data", "mix", "--config", "configs/tiny.yaml", *TINY_DATA, "--out", tmp_path / "data")
    assert res.returncode == 0, res.stderr[-3000:]
    tok = load_tokenizer(tmp_path / "data")
    torch.manual_seed(0)
    hf = transformers.Glm4MoeConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, partial_rotary_factor=1.0, num_mtp_layers=0, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    transformers.Glm4MoeForCausalLM(hf).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    res = run_cli("grpo", "--config", "configs/tiny.yaml", "--set", "telemetry.enabled=false", *GRPO,
                  "--policy", tmp_path / "base", "--data", tmp_path / "data", "--out", tmp_path / "grpo")
    assert res.returncode == 0, res.stderr[-3000:]
    conf = json.loads((tmp_path / "grpo" / "config.json").read_text())
    assert conf["model_type"] == "glm4_moe" and conf["first_k_dense_replace"] == 1
