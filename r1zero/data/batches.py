"""Candidate batches: generate rows and compute their screening features, optionally in parallel.

A batch is a list of domains in interleaved order (from the quotas). Each domain's rows come from
its own :class:`~r1zero.data.generators.CellSampler` stream, so domains are independent within a
batch: with ``data.workers > 1`` the domains are split into groups, one group is generated in this
process and the others in worker processes (fork), each together with the rows' *features*
(normalised-prompt key, MinHash signature, LSH band keys, rule/quality verdict), which are pure
functions of a row. The parent merges the groups back into the interleaved order and advances each
sampler's RNG to where the worker left it. Output therefore does not depend on the worker count
(a test checks byte equality for 1 and 2 workers); only the sequential keep/quarantine decisions
stay in the parent (:mod:`r1zero.data.mix`).

Shapes: C = rows in a batch, P = permutations, B = LSH bands.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from r1zero.data import filters
from r1zero.data.dedup import MinHasher, token_hashes, tokens
from r1zero.data.generators import CellSampler
from r1zero.data.schema import DOMAINS, make_row

# Relative per-row generation + feature cost by domain (measured with cProfile on the default
# config: code compiles and runs its function), used only to balance the worker groups.
_COST = {"math": 1.0, "code": 1.6, "cross": 0.9, "general": 1.0}
FORK_WITH_TORCH = False  # see BatchProducer.__init__; tests set it to exercise the workers anyway


@dataclass
class Features:
    ekeys_C: np.ndarray  # uint64: 8-byte hash of the normalised prompt
    sig_CP: np.ndarray  # uint32 MinHash signatures
    bands_CB: np.ndarray  # uint64 LSH band keys
    bad: list  # (reason, detail) from the rule filters / quality score, or None

    @staticmethod
    def concat(parts: list[Features], order: np.ndarray) -> Features:
        """Concatenate ``parts`` then reorder rows by ``order`` (indices into the concatenation)."""
        bad = [b for p in parts for b in p.bad]
        return Features(np.concatenate([p.ekeys_C for p in parts])[order],
                        np.concatenate([p.sig_CP for p in parts])[order],
                        np.concatenate([p.bands_CB for p in parts])[order],
                        [bad[i] for i in order])


def row_features(rows: list[dict], hasher: MinHasher, fc) -> Features:
    """Screening features of ``rows`` (pure; ``fc`` is a :class:`r1zero.config.FilterConfig`)."""
    toks = [tokens(r["prompt"]) for r in rows]
    ekeys_C = np.fromiter((int.from_bytes(hashlib.blake2b(" ".join(t).encode(), digest_size=8).digest(), "little")
                           for t in toks), dtype=np.uint64, count=len(rows))
    sig_CP = hasher.signatures(token_hashes(toks))
    bad = [filters.check(r, fc.min_chars, fc.max_chars, fc.min_score) for r in rows]
    return Features(ekeys_C, sig_CP, hasher.band_keys(sig_CP), bad)


def _generate_group(samplers: dict[str, CellSampler], counts: dict[str, int], made: dict[str, int], split: str,
                    hasher: MinHasher, fc):
    """Rows, cells, features and final RNG states for the domains in ``samplers``."""
    rows, cells = [], []
    for dom, smp in samplers.items():
        for k in range(counts[dom]):
            difficulty, family, item = smp.generate()
            rows.append(make_row(id=f"{split}-{dom}-{made[dom] + k:08d}", domain=dom, prompt=item["prompt"],
                                 answer=item["answer"], solution=item["solution"], difficulty=difficulty,
                                 source=f"gen:{dom}/{family}", meta=item["meta"]))
            cells.append((difficulty, family))
    states = {dom: smp.rng.getstate() for dom, smp in samplers.items()}
    return rows, cells, row_features(rows, hasher, fc), states


def split_groups(counts: dict[str, int], workers: int) -> list[list[str]]:
    """Partition the domains with rows into ``workers`` groups of similar cost (greedy, largest first)."""
    doms = sorted((d for d in DOMAINS if counts.get(d)), key=lambda d: (-counts[d] * _COST[d], DOMAINS.index(d)))
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(doms))))]
    load = [0.0] * len(groups)
    for d in doms:
        g = load.index(min(load))
        groups[g].append(d)
        load[g] += counts[d] * _COST[d]
    return [sorted(g, key=DOMAINS.index) for g in groups]


class BatchProducer:
    """Produces interleaved candidate batches with features, in-process or across worker processes."""

    def __init__(self, workers: int, hasher: MinHasher, filter_cfg):
        self.hasher, self.fc = hasher, filter_cfg
        # fork: workers inherit the imported modules (no re-import cost, no re-run of __main__) and
        # run pure Python/numpy code only. Forking once torch has started its native thread pools
        # (e.g. a caller that trained a model first) risks a child stuck on a lock, so then stay
        # in-process: the output is the same either way.
        self.workers = max(1, workers) if FORK_WITH_TORCH or "torch" not in sys.modules else 1
        self._pool = None
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers - 1, mp_context=multiprocessing.get_context("fork"))

    def produce(self, split: str, samplers: dict[str, CellSampler], order: list[str], made: dict[str, int]):
        """``(rows, cells, features)`` for one batch in ``order``; advances the samplers' RNGs."""
        counts = {d: order.count(d) for d in DOMAINS if d in order}
        groups = split_groups(counts, self.workers if self._pool else 1)
        futures = [self._pool.submit(_generate_group, {d: samplers[d] for d in g}, counts, made, split, self.hasher,
                                     self.fc) for g in groups[1:]]
        parts = [_generate_group({d: samplers[d] for d in groups[0]}, counts, made, split, self.hasher, self.fc)]
        parts += [f.result() for f in futures]
        for _, _, _, states in parts[1:]:
            for dom, state in states.items():
                samplers[dom].rng.setstate(state)
        # position of each (domain, k-th row of that domain) in the concatenation of the parts
        start, offset = {}, 0
        for g in groups:
            for d in g:
                start[d] = offset
                offset += counts[d]
        seen = dict.fromkeys(counts, 0)
        index = np.empty(len(order), dtype=np.int64)
        for i, d in enumerate(order):
            index[i] = start[d] + seen[d]
            seen[d] += 1
        all_rows = [r for p in parts for r in p[0]]
        all_cells = [c for p in parts for c in p[1]]
        feats = Features.concat([p[2] for p in parts], index)
        return [all_rows[i] for i in index], [all_cells[i] for i in index], feats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
