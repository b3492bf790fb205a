"""Fixtures for the eval tests: a small data artifact and two tiny Llama policies built in-process.

``trained`` is fitted for a few hundred steps on the eval problems' formatted solutions, so its
greedy answers are mostly right (a model whose expected accuracy we know); ``untrained`` is the
same architecture at random init (accuracy about 0). Both share one byte-level BPE tokenizer with
the contract's special tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from r1zero.data import gen_cross, gen_math
from r1zero.data.schema import ROW_SCHEMA, make_row
from r1zero.data.tokenizer import train_tokenizer, wrap
from r1zero.template import render_completion, render_prompt


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        dom, gen = (("math", gen_math), ("cross", gen_cross))[i % 2]
        it = gen.generate(rng, 1)
        rows.append(make_row(f"ev-{i}", dom, it["prompt"], it["answer"], it["solution"], 1, "test", it["meta"]))
    rows.append(make_row("ev-g0", "general", "Rivers run to the sea.", source="test"))  # not evaluated
    return rows


def write_split(root: Path, split: str, rows: list[dict]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), root / split / "part-00000.parquet")


def fit(model, tok, texts: list[str], steps: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(texts, min(8, len(texts)))
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The test machine is shared by many processes: one intra-op thread avoids oversubscription
    # (measured 8x faster than 2 threads under load for this tiny model).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def eval_base(tmp_path_factory):
    """(data_dir, untrained_model_dir, tokenizer, llama_config, training_texts): cheap, about 1 s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("eval_env")
    data = root / "data"
    rows = make_rows(8, 3)
    write_split(data, "train", rows)
    write_split(data, "eval", rows)
    scored = [r for r in rows if r["answer"]]
    texts = [render_prompt(r["prompt"]) + " " + render_completion(r["solution"], r["answer"]) for r in scored]
    tok = wrap(train_tokenizer(texts * 4, 300, data / "tokenizer.json"))
    tok.save_pretrained(str(data))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    untrained = root / "untrained"
    LlamaForCausalLM(cfg).save_pretrained(str(untrained))
    tok.save_pretrained(str(untrained))
    return data, untrained, tok, cfg, texts


@pytest.fixture(scope="session")
def eval_env(eval_base):
    """(data_dir, trained_model_dir, untrained_model_dir); fitting takes ~20-30 s on a loaded CPU."""
    from transformers import LlamaForCausalLM

    data, untrained, tok, cfg, texts = eval_base
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    fit(model, tok, [t + tok.eos_token for t in texts], 200)
    trained = untrained.parent / "trained"
    model.save_pretrained(str(trained))
    tok.save_pretrained(str(trained))
    return data, trained, untrained
