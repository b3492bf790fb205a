"""Packing pretraining documents into fixed-length sequences: deterministic, seekable, layout-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from r1zero.errors import UserError
from r1zero.train.data import PackedSequences, build_documents, tokenize_documents
from r1zero.train.pretrain import load_rows, load_tokenizer


def _docs(n=50, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 100, size=rng.integers(3, 30)).astype(np.int32) for _ in range(n)]


def test_every_token_is_used_once_per_epoch_without_padding():
    docs = _docs()
    p = PackedSequences(docs, seq_len=16, seed=0)
    epoch = np.concatenate([p.sequence(i) for i in range(p.n_windows)])
    assert len(epoch) == p.n_windows * 16 and p.n_windows == p.n_tokens // 16
    # same multiset of tokens as the documents, minus the dropped tail (< one window)
    full = np.concatenate(docs)
    assert len(full) - len(epoch) < 16
    assert all(len(p.sequence(i)) == 16 for i in range(3 * p.n_windows))


def test_deterministic_and_seekable():
    a = PackedSequences(_docs(), 16, seed=3)
    b = PackedSequences(_docs(), 16, seed=3)
    later = b.micro_batch(step=7, micro=1, micro_batch=4, n_micro=2)  # seek directly, no replay
    for s in range(7):
        a.micro_batch(s, 0, 4, 2)
    assert torch.equal(a.micro_batch(7, 1, 4, 2), later)
    c = PackedSequences(_docs(), 16, seed=4)
    assert not torch.equal(c.micro_batch(7, 1, 4, 2), later)


def test_epochs_reshuffle_documents():
    p = PackedSequences(_docs(), 16, seed=0)
    assert not np.array_equal(p.sequence(0), p.sequence(p.n_windows))


def test_micro_batches_partition_the_global_batch():
    """dp=2 x grad_accum=1 sees exactly the micro-batches of world=1 x grad_accum=2."""
    p = PackedSequences(_docs(), 16, seed=0)
    whole = p.sequences(5 * 8, 8)
    parts = torch.cat([p.micro_batch(5, m, 4, 2) for m in range(2)])
    assert torch.equal(whole, parts)


def test_empty_or_too_short_data_is_a_user_error():
    with pytest.raises(UserError):
        PackedSequences([], 16, 0)
    with pytest.raises(UserError, match="fewer than one sequence"):
        PackedSequences([np.arange(5, dtype=np.int32)], 16, 0)


def test_documents_from_the_artifact(data_dir):
    tok = load_tokenizer(data_dir)
    rows = load_rows(data_dir, "train")
    docs = build_documents(rows, seed=0)
    assert docs == build_documents(rows, seed=0)
    ids = tokenize_documents(docs, tok)
    assert all(d[-1] == tok.eos_token_id for d in ids)
    assert any(r["answer"] in d for r, d in zip(rows, docs) if r["domain"] == "math")
