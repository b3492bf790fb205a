"""Tests for r1zero.data.tokenizer: special tokens, round trips, model-dir save/load, determinism."""

from __future__ import annotations

import random

import pytest

from r1zero.data.documents import pretrain_text
from r1zero.data.generators import CellSampler
from r1zero.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from r1zero.errors import UserError
from r1zero.template import render_completion, render_prompt


def _docs(n=600):
    rng = random.Random(0)
    out = []
    for i in range(n):
        dom = ("math", "code", "cross", "general")[i % 4]
        _, _, item = CellSampler(dom, 2, random.Random(i)).generate()
        out.append(pretrain_text({"domain": dom, **item}, rng))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(_docs(), 400, d / "tokenizer.json")
    return d


def test_special_tokens_are_single_tokens_and_text_round_trips(data_dir):
    tok = load_tokenizer(data_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) == 400
    text = render_prompt("What is 12 + 30?") + render_completion("12 + 30 = 42.", "42")
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        assert pieces.count(t) == text.count(t)
    assert tok.decode(ids) == text
    assert tok.decode(tok("naïve ünïcödé 🙂")["input_ids"]) == "naïve ünïcödé 🙂"  # byte-level: no unk
    assert len(ids) < len(text) / 2  # BPE merges learnt the template


def test_save_pretrained_model_dir_loads_back(data_dir, tmp_path):
    tok = load_tokenizer(data_dir)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "Assistant: <think> 2 + 2 = 4 </think> <answer> 4 </answer><|endoftext|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert load_tokenizer(data_dir / "tokenizer.json")(text)["input_ids"] == tok(text)["input_ids"]


def test_training_is_deterministic(tmp_path):
    train_tokenizer(_docs(300), 320, tmp_path / "a.json")
    train_tokenizer(_docs(300), 320, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer"):
        load_tokenizer(tmp_path)
    assert SPECIAL_TOKENS[:2] == ["<|endoftext|>", "<|pad|>"]
