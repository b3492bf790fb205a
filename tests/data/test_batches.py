"""Tests for r1zero.data.batches: worker processes change nothing but speed."""

from __future__ import annotations

import json
import random

import numpy as np

from r1zero.config import FilterConfig, load_config
from r1zero.data import batches, mix
from r1zero.data.batches import BatchProducer, split_groups
from r1zero.data.dedup import MinHasher
from r1zero.data.generators import CellSampler
from r1zero.data.mix import interleave, largest_remainder


def _samplers():
    return {d: CellSampler(d, 3, random.Random(f"t/{d}")) for d in ("math", "code", "cross", "general")}


def test_split_groups_cover_every_domain_once():
    counts = {"math": 30, "code": 25, "cross": 15, "general": 30}
    for w in (1, 2, 3, 4, 8):
        groups = split_groups(counts, w)
        assert sorted(d for g in groups for d in g) == sorted(counts)
        assert len(groups) == min(w, 4)
    assert split_groups({"math": 5}, 2) == [["math"]]


def test_two_workers_produce_the_same_batches_as_one(monkeypatch):
    monkeypatch.setattr(batches, "FORK_WITH_TORCH", True)  # other tests in this process may load torch
    hasher, fc = MinHasher(), FilterConfig()
    results = []
    for workers in (1, 2):
        prod, samplers, made = BatchProducer(workers, hasher, fc), _samplers(), {d: 0 for d in _samplers()}
        assert prod.workers == workers and (prod._pool is not None) == (workers == 2)
        try:
            out = []
            for _ in range(3):
                order = interleave(largest_remainder(300, {"math": 3, "code": 2.5, "cross": 1.5, "general": 3}))
                rows, cells, feats = prod.produce("train", samplers, order, made)
                for d in order:
                    made[d] += 1
                out.append((rows, cells, feats, [s.rng.random() for s in samplers.values()]))
        finally:
            prod.close()
        results.append(out)
    for (r1, c1, f1, s1), (r2, c2, f2, s2) in zip(*results):
        assert r1 == r2 and c1 == c2 and s1 == s2
        np.testing.assert_array_equal(f1.sig_CP, f2.sig_CP)
        np.testing.assert_array_equal(f1.bands_CB, f2.bands_CB)
        np.testing.assert_array_equal(f1.ekeys_C, f2.ekeys_C)
        assert f1.bad == f2.bad
    rows = results[0][0][0]
    assert [r["domain"] for r in rows[:4]] != ["math"] * 4  # interleaved, not grouped by domain


def test_mix_output_identical_with_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(mix, "MIN_ROWS_FOR_WORKERS", 0)
    monkeypatch.setattr(batches, "FORK_WITH_TORCH", True)
    used = []
    real_init = batches.BatchProducer.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        used.append(self.workers)

    monkeypatch.setattr(batches.BatchProducer, "__init__", spy)
    base = ["data.n_train=800", "data.n_eval=100", "data.vocab_size=300", "data.tokenizer_rows=300",
            "data.chunk_rows=300"]
    for w in (1, 2):
        mix.build_mix(load_config(None, [*base, f"data.workers={w}"]), tmp_path / f"w{w}")
    assert used == [1, 2]
    a = {p.relative_to(tmp_path / "w1"): p.read_bytes() for p in (tmp_path / "w1").rglob("*") if p.is_file()}
    b = {p.relative_to(tmp_path / "w2"): p.read_bytes() for p in (tmp_path / "w2").rglob("*") if p.is_file()}
    assert a.keys() == b.keys()
    assert [str(k) for k in a if a[k] != b[k]] == ["manifest.json"]
    ma, mb = (json.loads((tmp_path / w / "manifest.json").read_text()) for w in ("w1", "w2"))
    # only the config (data.workers) and its hash differ
    assert ma["data_config"].pop("workers") == 1 and mb["data_config"].pop("workers") == 2
    ma.pop("config_hash"), mb.pop("config_hash")
    assert ma == mb


def test_no_fork_once_torch_is_loaded(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", object())
    prod = BatchProducer(2, MinHasher(), FilterConfig())
    assert prod.workers == 1 and prod._pool is None
