"""Data-mixing throughput and memory, plus our batched MinHash-LSH dedup vs datasketch side by side.

    .venv/bin/python benchmarks/bench_data.py --rows 1000000 --json

Part 1 runs the whole stage (generate + filter + dedup + decontaminate + write Parquet + train
the tokenizer) for ``--rows`` kept rows (1% of them eval) and reports wall seconds, CPU seconds,
rows/s and the process's peak RSS. Part 2 takes ``--peer-rows`` generated prompts and runs
near-duplicate detection two ways on the *same* shingle hashes: r1zero's vectorised
:class:`r1zero.data.dedup.MinHasher` + :class:`DedupIndex`, and datasketch's ``MinHash.update_batch``
+ ``MinHashLSH`` query/insert with Jaccard verification -- the ratio of their times, and whether
their decisions agree. The last stdout line is JSON: ``{"rows", "seconds", "peak_rss_mb", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from r1zero.config import load_config  # noqa: E402
from r1zero.data.dedup import DedupIndex, MinHasher, batch_near_pairs, token_hash, tokens  # noqa: E402
from r1zero.data.generators import CellSampler  # noqa: E402
from r1zero.data.mix import build_mix  # noqa: E402
from r1zero.data.schema import DOMAINS  # noqa: E402


def _cpu() -> float:
    """CPU seconds of this process and its (finished) worker processes."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def bench_mix(rows: int, max_difficulty: int, seed: int, workers: int) -> dict:
    n_eval = rows // 100
    cfg = load_config(None, [f"seed={seed}", f"data.n_train={rows - n_eval}", f"data.n_eval={n_eval}",
                             f"data.max_difficulty={max_difficulty}", f"data.workers={workers}"])
    out = Path(tempfile.mkdtemp(prefix="r1zero-bench-data-"))
    try:
        c0, t0 = _cpu(), time.perf_counter()
        m = build_mix(cfg, out)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": m["rows_kept"], "rows_in": m["rows_in"], "quarantined": sum(m["rows_quarantined"].values()),
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "rows_per_s": round(m["rows_kept"] / seconds),
            "ratio_error_pp": m["ratio_error_pp"], "workers": workers,
            # ru_maxrss is KiB on Linux: the peak of this process (imports included) plus the
            # largest worker's peak -- an upper bound of what was resident at once
            "peak_rss_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)}


def _prompts(n: int, max_difficulty: int) -> list[str]:
    samplers = [CellSampler(d, max_difficulty, random.Random(f"bench/{d}")) for d in DOMAINS]
    return [samplers[i % len(samplers)].generate()[2]["prompt"] for i in range(n)]


def ours(th: list[list[int]], hasher: MinHasher, batch: int = 4096) -> list[bool]:
    idx, flags = DedupIndex(hasher.num_perm), []
    for s in range(0, len(th), batch):
        sig = hasher.signatures(th[s:s + batch])
        bands = hasher.band_keys(sig)
        hit = idx.near_hits(sig, bands, hasher.threshold)
        # sequential within the batch, as in the mix: a near duplicate of an earlier *kept* row
        prev = batch_near_pairs(sig, bands, hasher.threshold, DedupIndex.CAND_CAP)
        kept: list[int] = []
        is_kept = [False] * sig.shape[0]
        for i in range(sig.shape[0]):
            dup = bool(hit[i]) or any(is_kept[j] for j in prev[i])
            flags.append(dup)
            if not dup:
                kept.append(i)
                is_kept[i] = True
        idx.add(np.zeros(len(kept), dtype=np.uint64), sig[kept], bands[kept])
    return flags


def peer(hv_rows: list[np.ndarray], hasher: MinHasher) -> list[bool]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=hasher.num_perm, params=(hasher.bands, hasher.rows_per_band))
    stored, flags = {}, []
    for i, hv in enumerate(hv_rows):
        m = MinHash(num_perm=hasher.num_perm, seed=1, hashfunc=int)
        m.update_batch(hv.tolist())
        dup = any(m.jaccard(stored[k]) >= hasher.threshold for k in lsh.query(m))
        flags.append(dup)
        if not dup:
            lsh.insert(i, m)
            stored[i] = m
    return flags


def bench_dedup(n: int, max_difficulty: int, repeats: int) -> dict:
    hasher = MinHasher()
    th = [[token_hash(t) for t in tokens(p)] for p in _prompts(n, max_difficulty)]
    hv, starts = hasher.shingle_hashes(th)
    ends = list(starts[1:]) + [hv.size]
    hv_rows = [hv[s:e] for s, e in zip(starts, ends)]
    t_ours, t_peer = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f_ours = ours(th, hasher)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        f_peer = peer(hv_rows, hasher)
        t_peer.append(time.perf_counter() - t0)
    agree = sum(a == b for a, b in zip(f_ours, f_peer)) / n
    return {"peer_rows": n, "ours_s": [round(t, 3) for t in t_ours], "datasketch_s": [round(t, 3) for t in t_peer],
            "speedup_median": round(statistics.median(t_peer) / statistics.median(t_ours), 2),
            "near_dups_ours": int(sum(f_ours)), "near_dups_datasketch": int(sum(f_peer)), "decision_agreement": round(agree, 5)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="kept rows to produce (train + 1%% eval)")
    ap.add_argument("--max-difficulty", type=int, default=3, help="data.max_difficulty (config default 3)")
    ap.add_argument("--peer-rows", type=int, default=20_000, help="prompts for the dedup side-by-side")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the dedup side-by-side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="data.workers (generation processes)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = ap.parse_args(argv)
    os.environ.setdefault("R1ZERO_PROGRESS", "0")
    res = bench_mix(args.rows, args.max_difficulty, args.seed, args.workers)
    print(f"data mix ({args.workers} workers): {res['rows']} rows kept of {res['rows_in']} in {res['seconds']} s wall, "
          f"{res['cpu_seconds']} s CPU "
          f"({res['rows_per_s']} rows/s), peak RSS {res['peak_rss_mb']} MB")
    if args.peer_rows > 0:
        res["dedup"] = bench_dedup(args.peer_rows, args.max_difficulty, args.repeats)
        d = res["dedup"]
        print(f"near-dup on {d['peer_rows']} prompts: r1zero {d['ours_s']} s vs datasketch {d['datasketch_s']} s "
              f"-> {d['speedup_median']}x; decisions agree on {100 * d['decision_agreement']:.3f}% "
              f"({d['near_dups_ours']} vs {d['near_dups_datasketch']} near-dups)")
    if args.json:
        print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
