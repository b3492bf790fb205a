"""Tests for r1zero.data.dedup: normalisation, datasketch-compatible MinHash, LSH, indexes."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from r1zero.data.dedup import (
    LSH_WEIGHTS,
    DedupIndex,
    HashIndex,
    KeyedIndex,
    MinHasher,
    batch_near_pairs,
    exact_key,
    normalise,
    token_hashes,
    tokens,
)


def test_normalisation_keeps_math_symbols_drops_sentence_punctuation():
    assert normalise("What is 2+3?") == normalise("  what   IS 2 + 3 ") == "what is 2 + 3"
    assert exact_key("What is 2+3?") == exact_key("what is 2 + 3")
    assert exact_key("What is 2+3?") != exact_key("What is 2-3?")
    assert tokens("Ｆｕｌｌ width") == ["full", "width"]  # NFKC


def _rows(n: int, rng: random.Random) -> list[list[int]]:
    return [[rng.getrandbits(32) for _ in range(rng.randint(1, 30))] for _ in range(n)]


def test_signatures_are_datasketch_affine32_bit_for_bit():
    hasher = MinHasher(num_perm=64, shingle=5)
    th = _rows(50, random.Random(0))
    sig = hasher.signatures(th)
    hv, starts = hasher.shingle_hashes(th)
    ends = [*starts[1:], hv.size]
    for i, (s, e) in enumerate(zip(starts, ends)):
        assert e - s == max(1, len(th[i]) - 4)
        m = MinHash(num_perm=64, seed=1, hashfunc=int)
        m.update_batch(hv[s:e].tolist())
        assert m.scheme == "affine32"
        np.testing.assert_array_equal(m.hashvalues, sig[i])


def test_band_parameters_are_datasketchs():
    for thr, p in [(0.8, 64), (0.5, 128), (0.9, 32)]:
        h = MinHasher(num_perm=p, threshold=thr)
        assert (h.bands, h.rows_per_band) == _optimal_param(thr, p, *LSH_WEIGHTS)
    assert (MinHasher(64, threshold=0.8).bands, MinHasher(64, threshold=0.8).rows_per_band) == (9, 7)


def test_near_duplicate_decisions_match_datasketch_lsh():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(300)]
    texts = []
    for _ in range(150):
        base = [rng.choice(words) for _ in range(30)]
        texts.append(" ".join(base))
        edited = list(base)
        for _ in range(rng.choice([0, 1, 3, 8])):  # near copies with a few edits, or far ones
            edited[rng.randrange(30)] = rng.choice(words)
        texts.append(" ".join(edited))
    hasher = MinHasher(num_perm=64, shingle=3, threshold=0.7)
    th = token_hashes([tokens(t) for t in texts])
    sig = hasher.signatures(th)
    bands = hasher.band_keys(sig)
    ours, idx = [], DedupIndex(64)
    for i in range(len(texts)):  # one row at a time: the index path only
        hit = bool(idx.near_hits(sig[i:i + 1], bands[i:i + 1], 0.7)[0])
        ours.append(hit)
        if not hit:
            idx.add(np.zeros(1, dtype=np.uint64), sig[i:i + 1], bands[i:i + 1])
    lsh = MinHashLSH(num_perm=64, params=(hasher.bands, hasher.rows_per_band))
    stored, theirs = {}, []
    hv, starts = hasher.shingle_hashes(th)
    ends = [*starts[1:], hv.size]
    for i, (s, e) in enumerate(zip(starts, ends)):
        m = MinHash(num_perm=64, seed=1, hashfunc=int)
        m.update_batch(hv[s:e].tolist())
        dup = any(m.jaccard(stored[k]) >= 0.7 for k in lsh.query(m))
        theirs.append(dup)
        if not dup:
            lsh.insert(i, m)
            stored[i] = m
    assert ours == theirs
    assert 20 < sum(ours) < 150  # the planted near copies are found, the far ones are not


def test_hash_index_matches_a_python_set():
    rng = np.random.default_rng(0)
    idx, ref = HashIndex(), set()
    for _ in range(40):
        keys = rng.integers(0, 5000, size=rng.integers(1, 300), dtype=np.uint64)
        probe = rng.integers(0, 5000, size=200, dtype=np.uint64)
        np.testing.assert_array_equal(idx.contains(probe), np.array([int(k) in ref for k in probe]))
        idx.add(keys)
        ref.update(int(k) for k in keys)
    assert set(np.concatenate(idx.runs).tolist()) == ref
    assert len(ref) <= len(idx) <= len(ref) + 2000  # a key re-added later may sit in two runs
    assert len(idx.runs) <= 12  # LSM merges keep the run count logarithmic


def test_keyed_index_lookup_returns_all_ids_under_a_key():
    idx = KeyedIndex()
    idx.add(np.array([5, 7, 5], dtype=np.uint64), np.array([0, 1, 2]))
    idx.add(np.array([9, 5], dtype=np.uint64), np.array([3, 4]))
    rows, ids = idx.lookup(np.array([[5, 1], [9, 7], [2, 3]], dtype=np.uint64), cap=10)
    pairs = sorted(zip(rows.tolist(), ids.tolist()))
    assert pairs == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3)]
    rows, ids = idx.lookup(np.array([[5, 5]], dtype=np.uint64), cap=1)  # cap: first id per key and run
    assert ids.tolist() == [0, 0] and rows.tolist() == [0, 0]  # the runs merged: one run


def test_batch_near_pairs_matches_brute_force():
    rng = random.Random(3)
    words = [f"w{i}" for i in range(60)]
    base = [[rng.choice(words) for _ in range(25)] for _ in range(30)]
    texts = []
    for _ in range(300):
        t = list(rng.choice(base))
        for _ in range(rng.choice([0, 1, 2, 6])):
            t[rng.randrange(25)] = rng.choice(words)
        texts.append(" ".join(t))
    hasher = MinHasher(num_perm=64, shingle=3, threshold=0.8)
    sig = hasher.signatures(token_hashes([tokens(t) for t in texts]))
    bands = hasher.band_keys(sig)
    got = batch_near_pairs(sig, bands, 0.8, cap=10_000, pair_slice=97)  # no cap; odd slices
    shared = [set(r) for r in bands.tolist()]
    for j in range(len(texts)):
        want = [i for i in range(j) if shared[i] & shared[j] and (sig[i] == sig[j]).mean() >= 0.8]
        assert got[j] == want
    assert sum(map(len, got)) > 100
    capped = batch_near_pairs(sig, bands, 0.8, cap=2)
    assert all(set(c) <= set(g) for c, g in zip(capped, got)) and sum(map(len, capped)) < sum(map(len, got))
