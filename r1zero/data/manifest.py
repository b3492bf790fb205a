"""The data artifact's ``manifest.json``: counts, achieved ratios, quarantine by reason, hashes.

Top-level keys include ``rows_in``, ``rows_kept``, ``rows_quarantined`` (reason -> count),
``ratios`` (domain -> achieved fraction of train), ``counts`` (split -> domain -> rows),
``files`` (relative path -> sha256/bytes/rows), ``content_hash`` and ``config_hash``, and with
named benchmarks ``benchmarks`` (name -> rows kept, quarantined by reason, shard split). It holds no
timestamps and no absolute paths (imports appear by file name only), so the same config and seed
give a byte-identical manifest. :func:`check_accounting` re-verifies the invariant
``rows_in == rows_kept + sum(rows_quarantined)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from r1zero import store
from r1zero.data.schema import DOMAINS, VERIFIABLE
from r1zero.data.tokenizer import SPECIAL_TOKENS
from r1zero.errors import UserError

FORMAT = "r1zero-data/1"


def _sorted(counter) -> dict:
    return {k: int(counter[k]) for k in sorted(counter) if counter[k]}


def build_manifest(cfg, out: Path, run, shard_rows: dict[str, int], tokenizer: dict, import_names: list[str]) -> dict:
    d = cfg.data
    train_n = sum(run.train.kept.values())
    counts = {"train": {k: int(run.train.kept[k]) for k in DOMAINS},
              "eval": {k: int(run.eval.kept[k]) for k in VERIFIABLE}}
    targets = d.mix.as_dict()
    ratios = {k: round(counts["train"][k] / train_n, 6) if train_n else 0.0 for k in DOMAINS}
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = p.relative_to(out).as_posix()
            files[rel] = {"sha256": store.sha256_file(p), "bytes": p.stat().st_size}
            if rel in shard_rows:
                files[rel]["rows"] = shard_rows[rel]
    content = hashlib.sha256("".join(f"{k} {v['sha256']}\n" for k, v in files.items()).encode()).hexdigest()
    data_cfg = d.model_dump(mode="json")
    # import URIs may be absolute paths: keep only their file names (see module docstring)
    data_cfg["imports"] = [{"name": n, "format": s.format, "split": s.split} for n, s in zip(import_names, d.imports)]
    benchmarks = run.benchmark_report()
    rows_kept = train_n + sum(counts["eval"].values()) + sum(b["rows_kept"] for b in benchmarks.values())
    quarantined = _sorted(run.quarantined)
    manifest = {
        "format": FORMAT,
        "config_hash": cfg.hash(),
        "seed": cfg.seed,
        "rows_in": run.rows_in,
        "rows_kept": rows_kept,
        "rows_quarantined": quarantined,
        "quarantine_by_split": {s: _sorted(c) for s, c in run.q_by_split.items()},
        "counts": counts,
        "quotas": {"train": run.train.quotas, "eval": run.eval.quotas},
        "ratios": ratios,
        "target_ratios": targets,
        "ratio_error_pp": round(max(abs(ratios[k] - targets[k]) for k in DOMAINS) * 100, 4) if train_n else None,
        "generation": run.generation_report(),
        "sources": _sorted(run.sources),
        "dedup": {"bands": run.hasher.bands, "rows_per_band": run.hasher.rows_per_band,
                  "train_index": run.train.index.stats(), "eval_index": run.eval.index.stats()},
        "tokenizer": {"special_tokens": SPECIAL_TOKENS, **tokenizer,
                      "sha256": files.get("tokenizer.json", {}).get("sha256")},
        "files": files,
        "content_hash": content,
        "data_config": data_cfg,
    }
    if benchmarks:  # named benchmarks (eval.benchmarks), imported whole: bench/<name>/ shards
        manifest["benchmarks"] = benchmarks
    check_accounting(manifest)
    return manifest


def check_accounting(manifest: dict) -> None:
    """Raise if rows in != rows kept + rows quarantined (a bug, never user error)."""
    q = sum(manifest["rows_quarantined"].values())
    if manifest["rows_in"] != manifest["rows_kept"] + q:
        raise AssertionError(f"rows_in {manifest['rows_in']} != kept {manifest['rows_kept']} + quarantined {q}")


def write_manifest(out: Path, manifest: dict) -> None:
    store.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_manifest(data_uri: str) -> dict:
    root = store.materialize(data_uri)
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{data_uri}: no manifest.json (not a data artifact)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"{data_uri}: manifest.json is not valid JSON ({err})") from None
