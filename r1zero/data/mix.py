"""The data-mixing stage: imports + procedural generators -> filtered, deduplicated, decontaminated
train/eval shards, a BPE tokenizer and a manifest.

    r1zero data mix --config configs/tiny.yaml --out runs/tiny/data
    python -c "from r1zero.config import load_config; from r1zero.data.mix import run_mix; \\
               run_mix(load_config('configs/tiny.yaml'), 'runs/tiny/data')"

Order of work (so that decontamination sees every eval item before any train item):
0. import each named benchmark (``eval.benchmarks``) whole into ``bench/<name>/``: no quota, no
   quality filter; only unparseable lines and exact repeats are quarantined (split ``bench/<name>``);
   a benchmark with no parseable row is a :class:`UserError` before any work (the wrong ``format``);
1. stream every import file once: bad lines -> quarantine; eval-bound rows are screened into the
   eval split now, train-bound rows are spilled to a temp JSONL (no memory growth);
2. generate eval items until the per-domain eval quotas are met;
3. screen the spilled train imports, then generate train items until the train quotas are met.

Quotas: train = ``n_train`` split over ``data.mix`` by largest remainder (so achieved ratios are
exact up to one row), eval = ``n_eval`` over the verifiable domains in the same proportions.
Generated rows fill the slots imports left; a rejected candidate leaves its slot open for the
next batch. Every candidate is counted: ``rows_in == rows_kept + sum(rows_quarantined)``.
Screening (per batch of ``data.chunk_rows``): filters -> overlap with eval and the benchmarks
(``contaminated_*``, train only) ->
within-split duplicates (``duplicate_*``) -> quota (``over_quota``, imports only).
Determinism: each (split, domain) has its own seeded ``random.Random``; no clocks, no paths.

Tokenizer: a byte-level BPE trained on the train split, or, with ``model.base``, the base's own
tokenizer saved as is (:mod:`r1zero.data.base`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from r1zero import store
from r1zero.data.batches import BatchProducer, Features, row_features
from r1zero.data.dedup import DedupIndex, MinHasher, batch_near_pairs
from r1zero.data.documents import pretrain_text
from r1zero.data.generators import CellSampler
from r1zero.data.importers import check_format, check_import, iter_import, source_name
from r1zero.data.manifest import build_manifest, write_manifest
from r1zero.data.schema import DOMAINS, QUARANTINE_SCHEMA, ROW_SCHEMA, VERIFIABLE, quarantine_row
from r1zero.data.shards import ShardWriter, bench_split, iter_rows
from r1zero.data.tokenizer import check_vocab_size, train_tokenizer
from r1zero.errors import UserError
from r1zero.progress import print0, progress

MIN_ROWS_FOR_WORKERS = 20_000


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method); ties by key order."""
    wsum = sum(w for w in weights.values() if w > 0)
    if total <= 0 or wsum <= 0:
        return {k: 0 for k in weights}
    exact = {k: total * max(w, 0) / wsum for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: (-(exact[k] - out[k]), list(weights).index(k)))
    for k in order[: total - sum(out.values())]:
        out[k] += 1
    return out


def interleave(counts: dict[str, int]) -> list[str]:
    """Smooth weighted round-robin order with exactly ``counts[k]`` of each key (nginx SWRR)."""
    total = sum(counts.values())
    current = {k: 0 for k in counts}
    out = []
    for _ in range(total):
        for k, c in counts.items():
            current[k] += c
        best = max(current, key=lambda k: current[k])
        current[best] -= total
        out.append(best)
    return out


class _Screen:
    """Per-split screening state: dedup index, quotas, kept counts and the shard writer."""

    def __init__(self, split: str, quotas: dict[str, int], writer: ShardWriter, num_perm: int):
        self.split, self.quotas, self.writer = split, quotas, writer
        self.index = DedupIndex(num_perm)
        self.samplers: dict[str, CellSampler] = {}
        self.kept: Counter = Counter()

    def room(self, domain: str) -> int:
        return self.quotas.get(domain, 0) - self.kept[domain]


class _MixRun:
    """One mix: counters, writers and screening (orchestration only; math lives in the helpers)."""

    def __init__(self, cfg, out_dir: Path):
        d = cfg.data
        self.cfg, self.d, self.out = cfg, d, out_dir
        self.hasher = MinHasher(d.dedup.num_perm, d.dedup.shingle, d.dedup.threshold)
        self.train = _Screen("train", largest_remainder(d.n_train, d.mix.as_dict()),
                             ShardWriter(out_dir, "train", ROW_SCHEMA, d.shard_rows, d.shard_format), d.dedup.num_perm)
        eval_w = {k: v for k, v in d.mix.as_dict().items() if k in VERIFIABLE}
        self.eval = _Screen("eval", largest_remainder(d.n_eval, eval_w),
                            ShardWriter(out_dir, "eval", ROW_SCHEMA, d.shard_rows, d.shard_format), d.dedup.num_perm)
        self.qwriter = ShardWriter(out_dir, "quarantine", QUARANTINE_SCHEMA, d.shard_rows, d.shard_format)
        self.benches: dict[str, _Screen] = {}  # named benchmarks, imported whole (run_benchmarks)
        self.rows_in = 0
        self.quarantined: Counter = Counter()
        self.q_by_split: dict[str, Counter] = {s: Counter() for s in ("import", "eval", "train")}
        self.sources: Counter = Counter()
        self.bar = progress(total=d.n_train + d.n_eval, desc="data mix", unit="row")
        # worker processes pay off only when there is enough to generate (fork + pickling cost)
        workers = d.workers if d.n_train + d.n_eval >= MIN_ROWS_FOR_WORKERS else 1
        self.producer = BatchProducer(workers, self.hasher, d.filter)

    # -- bookkeeping -----------------------------------------------------------------------

    def quarantine(self, qrow: dict) -> None:
        self.quarantined[qrow["reason"]] += 1
        self.q_by_split.setdefault(qrow["split"], Counter())[qrow["reason"]] += 1
        self.qwriter.write(qrow)

    # -- screening -------------------------------------------------------------------------

    def screen(self, rows: list[dict], sc: _Screen, enforce_quota: bool, feats: Features | None = None,
               whole: bool = False) -> list[bool]:
        """Filter, decontaminate, deduplicate and keep/quarantine a batch of rows into ``sc``.

        ``whole`` (a named benchmark): no quality filter and no near-duplicate removal, so a
        benchmark keeps every parseable, distinct row.
        """
        if not rows:
            return []
        self.rows_in += len(rows)
        dd, thr = self.d.dedup, self.d.dedup.threshold
        near = dd.near and not whole
        feats = feats or row_features(rows, self.hasher, self.d.filter)
        ekeys_C, sig_CP, bands_CB = feats.ekeys_C, feats.sig_CP, feats.bands_CB
        # train is screened against the eval split and every named benchmark
        against = [("an eval item", self.eval.index)] if sc is self.train else []
        if sc is self.train:
            against += [(f"benchmark {name}", b.index) for name, b in self.benches.items()]
        cont_C = [(what, idx.exact.contains(ekeys_C).tolist(), idx.near_hits(sig_CP, bands_CB, thr).tolist())
                  for what, idx in against]
        dup_exact_C = sc.index.exact.contains(ekeys_C).tolist()
        dup_near_C = sc.index.near_hits(sig_CP, bands_CB, thr).tolist() if near else None
        ekeys = ekeys_C.tolist()  # Python ints: fast per-row access below
        # earlier rows of this batch that each row is a near duplicate of (kept or not: checked below)
        near_prev = batch_near_pairs(sig_CP, bands_CB, thr, DedupIndex.CAND_CAP) if near else None
        kept_mask = [False] * len(rows)
        seen_exact: set[int] = set()
        keep: list[int] = []
        for i, row in enumerate(rows):
            ek = ekeys[i]
            bad = None if whole else feats.bad[i]
            for what, exact_C, near_C in cont_C:
                if bad is None and exact_C[i]:
                    bad = ("contaminated_exact", f"same normalised prompt as {what}")
                elif bad is None and near_C[i]:
                    bad = ("contaminated_near", f"MinHash Jaccard >= {thr} with {what}")
            if bad is None and (dd.exact or whole) and (dup_exact_C[i] or ek in seen_exact):
                bad = ("duplicate_exact", f"same normalised prompt as an earlier {sc.split} row")
            if bad is None and near:
                if dup_near_C[i] or any(kept_mask[j] for j in near_prev[i]):
                    bad = ("duplicate_near", f"MinHash Jaccard >= {thr} with an earlier {sc.split} row")
            if bad is None and enforce_quota and sc.room(row["domain"]) <= 0:
                bad = ("over_quota", f"{sc.split} quota for {row['domain']} ({sc.quotas.get(row['domain'], 0)}) is full")
            if bad is not None:
                self.quarantine(quarantine_row(row, bad[0], bad[1], sc.split))
                continue
            seen_exact.add(ek)
            kept_mask[i] = True
            keep.append(i)
            sc.kept[row["domain"]] += 1
            self.sources[row["source"]] += 1
            sc.writer.write(row)
        if keep:
            sc.index.add(ekeys_C[keep], sig_CP[keep], bands_CB[keep])
        self.bar.update(len(keep))
        return kept_mask

    # -- named benchmarks (evaluated whole) ------------------------------------------------

    def run_benchmarks(self) -> None:
        d = self.d
        for b in self.cfg.eval.benchmarks:
            split = bench_split(b.name)
            sc = _Screen(split, {}, ShardWriter(self.out, split, ROW_SCHEMA, d.shard_rows, d.shard_format),
                         d.dedup.num_perm)
            self.benches[b.name] = sc
            batch: list[dict] = []
            for kind, row in iter_import(b.uri, b.format, source=f"bench:{b.name}"):
                if kind == "bad":
                    self.rows_in += 1
                    self.quarantine({**row, "split": split})
                    continue
                batch.append(row)
                if len(batch) >= d.chunk_rows:
                    self.screen(batch, sc, enforce_quota=False, whole=True)
                    batch = []
            self.screen(batch, sc, enforce_quota=False, whole=True)

    def benchmark_report(self) -> dict:
        """Per benchmark: rows kept and quarantined by reason (every line accounted for)."""
        out = {}
        for b in self.cfg.eval.benchmarks:
            sc = self.benches[b.name]
            q = self.q_by_split.get(sc.split, Counter())
            out[b.name] = {"format": b.format, "file": source_name(b.uri), "split": sc.split,
                           "rows_kept": sum(sc.kept.values()),
                           "rows_quarantined": {k: int(q[k]) for k in sorted(q) if q[k]}}
        return out

    # -- imports ---------------------------------------------------------------------------

    def run_imports(self, spill_path: Path) -> None:
        d = self.d
        p_eval = d.n_eval / (d.n_train + d.n_eval)
        batch: list[dict] = []
        with open(spill_path, "w", encoding="utf-8") as spill:
            for idx, spec in enumerate(d.imports):
                for kind, row in iter_import(spec.uri, spec.format, idx):
                    if kind == "bad":
                        self.rows_in += 1
                        self.quarantine(row)
                        continue
                    split = spec.split
                    if split == "auto":  # stable per prompt: a hash, not the rng stream
                        u = int.from_bytes(hashlib.blake2b(row["prompt"].encode(), digest_size=8).digest(), "little")
                        split = "eval" if u / 2**64 < p_eval else "train"
                    if split == "eval" and row["domain"] in VERIFIABLE:
                        batch.append(row)
                        if len(batch) >= d.chunk_rows:
                            self.screen(batch, self.eval, enforce_quota=True)
                            batch = []
                    else:
                        spill.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.screen(batch, self.eval, enforce_quota=True)

    def screen_spilled(self, spill_path: Path) -> None:
        batch: list[dict] = []
        with open(spill_path, encoding="utf-8") as spill:
            for line in spill:
                batch.append(json.loads(line))
                if len(batch) >= self.d.chunk_rows:
                    self.screen(batch, self.train, enforce_quota=True)
                    batch = []
        self.screen(batch, self.train, enforce_quota=True)

    # -- generation ------------------------------------------------------------------------

    def generate(self, sc: _Screen) -> None:
        d = self.d
        for dom in DOMAINS:
            sc.samplers[dom] = CellSampler(dom, d.max_difficulty, random.Random(f"{self.cfg.seed}/{sc.split}/{dom}"))
        made: Counter = Counter()
        while True:
            deficit = {dom: sc.room(dom) for dom in DOMAINS if not sc.samplers[dom].exhausted}
            deficit = {k: v for k, v in deficit.items() if v > 0}
            total = sum(deficit.values())
            if total == 0:
                break
            order = interleave(largest_remainder(min(total, d.chunk_rows), deficit))
            rows, cells, feats = self.producer.produce(sc.split, sc.samplers, order, made)
            made.update(order)
            for dom, cell, ok in zip(order, cells, self.screen(rows, sc, enforce_quota=False, feats=feats)):
                sc.samplers[dom].record(cell, ok)

    def generation_report(self) -> dict:
        """Per split and domain: kept rows by difficulty and family, retired cells, exhaustion."""
        out = {}
        for sc in (self.train, self.eval):
            rep = {}
            for dom, smp in sc.samplers.items():
                if not sum(smp.kept.values()) and not smp.retired:
                    continue
                diff, fam = Counter(), Counter()
                for (dif, f), n in smp.kept.items():
                    diff[str(dif)] += n
                    fam[f] += n
                rep[dom] = {"difficulty": dict(sorted(diff.items())), "family": dict(sorted(fam.items())),
                            "retired_cells": [f"{dif}/{f}" for dif, f in smp.retired], "exhausted": smp.exhausted}
            out[sc.split] = rep
        return out

    # -- tokenizer + manifest --------------------------------------------------------------

    def train_tokenizer(self) -> dict:
        if self.cfg.model.base:  # the base's tokenizer, never a new BPE (no vocab mismatch)
            from r1zero.data.base import save_base_tokenizer

            return save_base_tokenizer(self.cfg.model.base, self.out, self.d.chat_template)
        rng = random.Random(f"{self.cfg.seed}/tokenizer")
        frac = self.d.template_fraction

        def docs():
            for i, row in enumerate(iter_rows(self.out, "train")):
                if i >= self.d.tokenizer_rows:
                    return
                yield pretrain_text(row, rng, frac, solution_style=self.d.solution_style)

        tok = train_tokenizer(docs(), self.d.vocab_size, self.out / "tokenizer.json")
        return {"file": "tokenizer.json", "vocab_size": tok.get_vocab_size(), "trained_on_rows":
                min(self.d.tokenizer_rows, self.train.writer.rows)}

    def close(self) -> dict:
        self.bar.close()
        self.producer.close()
        files = {}
        for w in (self.train.writer, self.eval.writer, self.qwriter, *(b.writer for b in self.benches.values())):
            files.update(dict(w.close()))
        return files


def build_mix(cfg, out_dir: str | Path) -> dict:
    """Write the whole data artifact into the local directory ``out_dir``; return the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    if d.n_eval and not any(getattr(d.mix, k) > 0 for k in VERIFIABLE):
        raise UserError("data.n_eval > 0 needs a non-zero mix ratio for math, code or cross")
    if cfg.model.base:  # fail fast: a base without tokenizer/EOS/pad or of an unknown architecture
        from r1zero.data.base import check_base

        check_base(cfg.model.base, d.chat_template)
    else:
        check_vocab_size(d.vocab_size)  # fail fast, before any work or progress output
    for spec in [*d.imports, *cfg.eval.benchmarks]:
        check_import(spec.uri)
    for b in cfg.eval.benchmarks:  # a benchmark in the wrong format fails now, not row by row
        check_format(b.uri, b.format, f"eval.benchmarks {b.name}")
    run = _MixRun(cfg, out)
    spill_dir = Path(tempfile.mkdtemp(prefix="r1zero-spill-"))
    try:
        spill = spill_dir / "train-imports.jsonl"
        run.run_benchmarks()
        run.run_imports(spill)
        run.generate(run.eval)
        run.screen_spilled(spill)
        run.generate(run.train)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
        shard_rows = run.close()
    tok = run.train_tokenizer()
    manifest = build_manifest(cfg, out, run, shard_rows, tok, [source_name(s.uri) for s in d.imports])
    write_manifest(out, manifest)
    return manifest


def summary_lines(m: dict) -> list[str]:
    q = m["rows_quarantined"]
    lines = [f"data mix: {m['rows_in']} rows in -> {m['rows_kept']} kept "
             f"(train {sum(m['counts']['train'].values())}, eval {sum(m['counts']['eval'].values())}), "
             f"{sum(q.values())} quarantined" + (" (" + ", ".join(f"{k} {v}" for k, v in q.items()) + ")" if q else "")]
    for name, b in m.get("benchmarks", {}).items():
        bq = b["rows_quarantined"]
        lines.append(f"benchmark {name}: {b['rows_kept']} rows kept whole, {sum(bq.values())} quarantined"
                     + (" (" + ", ".join(f"{k} {v}" for k, v in bq.items()) + ")" if bq else ""))
    lines.append("train ratios: " + ", ".join(f"{k} {100 * v:.1f}% (target {100 * m['target_ratios'][k]:.1f}%)"
                                              for k, v in m["ratios"].items()))
    for split, doms in m["generation"].items():
        ex = [dom for dom, rep in doms.items() if rep["exhausted"]]
        if ex:
            lines.append(f"warning: {split} generators exhausted for {', '.join(ex)} "
                         f"(too few distinct items at max_difficulty {m['data_config']['max_difficulty']})")
    return lines


def run_mix(cfg, out_uri: str) -> dict:
    """Build the data artifact in a temp staging dir and publish it to ``out_uri``; return the manifest."""
    staging = Path(tempfile.mkdtemp(prefix="r1zero-mix-"))
    try:
        manifest = build_mix(cfg, staging)
        store.publish(staging, out_uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for line in summary_lines(manifest):
        print0(line)
    print0(f"wrote {out_uri}")
    return manifest
