"""Fixtures for the GRPO tests: a small data artifact and tiny policies (Llama and r1zero MoE).

The policies are warm-started with a few supervised steps on template-formatted solutions so that
rollouts contain some well-formatted and some correct answers (otherwise every reward is 0 and
the update is a no-op).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from r1zero.config import load_config
from r1zero.data import gen_code, gen_cross, gen_math
from r1zero.data.schema import ROW_SCHEMA, make_row
from r1zero.data.tokenizer import train_tokenizer, wrap
from r1zero.template import render_completion, render_prompt

GENS = {"math": gen_math, "code": gen_code, "cross": gen_cross}


def make_rows(n: int, seed: int, prefix: str, general: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    doms = ["math", "math", "code", "cross"]
    for i in range(n):
        d = doms[i % len(doms)]
        it = GENS[d].generate(rng, 1)
        rows.append(make_row(f"{prefix}-{i}", d, it["prompt"], it["answer"], it["solution"], 1, "test", it["meta"]))
    for i in range(general):
        rows.append(make_row(f"{prefix}-g{i}", "general", "Some general text about rivers and hills.", source="test"))
    return rows


def write_split(root: Path, split: str, rows: list[dict]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), root / split / "part-00000.parquet")


def warm_start(model, tok, rows, steps: int, seed: int = 0) -> None:
    """A few SFT steps on prompt + formatted solution (teaches the template, not the answers)."""
    torch.manual_seed(seed)
    # short reasoning (first 4 words) so a few steps teach the tag structure
    texts = [render_prompt(r["prompt"]) + " " + render_completion(" ".join(r["solution"].split()[:4]), r["answer"])
             + tok.eos_token for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(texts, 8)
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.isfinite(p).all() for p in model.parameters()), "warm start diverged"


@pytest.fixture(scope="session")
def grpo_env(tmp_path_factory):
    """(data_dir, llama_policy_dir, r1zero_policy_dir)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("grpo_env")
    data = root / "data"
    train_rows = make_rows(80, 1, "tr", general=4)
    eval_rows = make_rows(32, 2, "ev")
    write_split(data, "train", train_rows)
    write_split(data, "eval", eval_rows)
    corpus = [render_prompt(r["prompt"]) + " " + render_completion(r["solution"], r["answer"]) for r in train_rows]
    tk = train_tokenizer(corpus * 3, 400, data / "tokenizer.json")
    tok = wrap(tk)
    tok.save_pretrained(str(data))

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    llama = LlamaForCausalLM(cfg)
    warm_start(llama, tok, train_rows, 60)
    llama_dir = root / "llama"
    llama.save_pretrained(str(llama_dir))
    tok.save_pretrained(str(llama_dir))

    from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM

    mcfg = load_config(None, [f"model.vocab_size={len(tok)}", "model.d_model=64", "model.n_layers=2",
                              "model.n_heads=4", "model.moe.n_experts=4", "model.moe.top_k=2",
                              "model.moe.d_expert=64"]).model
    torch.manual_seed(0)
    moe = R1ZeroForCausalLM(R1ZeroConfig.from_model_config(mcfg, eos_token_id=tok.eos_token_id,
                                                           pad_token_id=tok.pad_token_id))
    warm_start(moe, tok, train_rows, 10)  # a few steps: the MoE tests check mechanics, not rewards
    moe_dir = root / "moe"
    moe.save_pretrained(str(moe_dir))
    tok.save_pretrained(str(moe_dir))
    return data, llama_dir, moe_dir


def tiny_cfg(*overrides: str):
    base = ["grpo.steps=3", "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=24",
            "grpo.lr=1e-3", "grpo.eval_every=2", "grpo.eval_problems=8", "grpo.sample_every=1",
            "grpo.checkpoint_every=2", "telemetry.enabled=false"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def make_cfg():
    """``make_cfg(*overrides)`` -> a small GRPO config (tests cannot import conftest directly)."""
    return tiny_cfg
