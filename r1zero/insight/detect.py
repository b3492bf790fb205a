"""Insight detection: find jumps, knees, reflection rises, length growth and "aha" moments in metrics.

    r1zero insight detect --metrics runs/tiny/grpo/metrics.jsonl --out runs/tiny/insight/events.json

Input is the project's metrics JSONL (``{"step", "name", "value"}`` per line, optional ``"run"``;
several runs or seeds may share a file). Output is ``{"events": [...], "summary": {...}}`` and one
PNG per metric with the events marked, next to the output file.

Event kinds (full definitions in docs/eval.md):

- ``jump``: an abrupt rise (a drop for ``*loss*`` metrics) of at least ``insight.min_sigma`` noise
  standard deviations whose 10-90% width is at most ``insight.max_width_frac`` of the run
  (:func:`r1zero.insight.changepoint.find_jumps`); ``score`` = height / noise sigma.
- ``knee``: the bend of a ``*loss*`` curve (Kneedle); ``before``/``after`` are slopes per step.
- ``reflection``: a sustained rise of a ``*reflection*`` metric; ``length_growth``: the same for a
  ``*length*`` metric (Kendall trend test + end level >= ``min_sigma`` sigma above the start).
- ``aha``: a jump of an ``*accuracy*`` metric within ``insight.window`` steps of a reflection
  rise of the same run.

Repeatability: ``summary.by_metric[metric][kind]`` says how many runs show the event and the spread
of its steps (the article's "4 of 5 runs"). Task specificity comes from per-domain metric names
(``eval/accuracy/math`` vs ``eval/accuracy/general``).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from r1zero import store
from r1zero.config import InsightConfig
from r1zero.errors import UserError
from r1zero.insight import changepoint as cp
from r1zero.progress import progress

KINDS = ("jump", "knee", "reflection", "length_growth", "aha")
DEFAULT_RUN = "default"

Series = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (run, metric) -> (steps, values)


# ---------------------------------------------------------------------------------------------
# input


def parse_metrics(lines: Iterable[str]) -> tuple[Series, dict]:
    """Parse metrics JSONL lines into sorted series; bad rows are counted by reason, never dropped silently.

    Duplicate (run, metric, step) rows are averaged. Returns ``(series, rows)`` where ``rows`` is
    ``{"in", "kept", "quarantined": {reason: count}}`` with ``in == kept + sum(quarantined)``.
    """
    acc: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    bad: Counter = Counter()
    n_in = kept = 0
    for line in lines:
        if not line.strip():
            continue
        n_in += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad["bad_json"] += 1
            continue
        if not isinstance(row, dict) or not {"step", "name", "value"} <= row.keys():
            bad["missing_field"] += 1
            continue
        try:
            step = int(row["step"])
            value = float(row["value"])
        except (TypeError, ValueError):
            bad["bad_type"] += 1
            continue
        if not math.isfinite(value):
            bad["non_finite"] += 1
            continue
        run = str(row.get("run") or DEFAULT_RUN)
        acc[(run, str(row["name"]))][step].append(value)
        kept += 1
    series: Series = {}
    for key, by_step in acc.items():
        steps = np.array(sorted(by_step), dtype=np.float64)
        series[key] = (steps, np.array([np.mean(by_step[int(s)]) for s in steps], dtype=np.float64))
    return series, {"in": n_in, "kept": kept, "quarantined": dict(sorted(bad.items()))}


def load_metrics(path: str | Path) -> tuple[Series, dict]:
    """Read a metrics JSONL file (local path or s3:// URI)."""
    try:
        text = store.read_bytes(str(path)).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"metrics file {path}: not UTF-8 text") from None
    series, rows = parse_metrics(text.splitlines())
    if not series:
        raise UserError(f"metrics file {path}: no valid rows ({rows['in']} lines, "
                        f"quarantined {rows['quarantined'] or 'none'}); expected JSONL "
                        '{"step": int, "name": str, "value": float}')
    return series, rows


# ---------------------------------------------------------------------------------------------
# per-series detection


def direction_of(metric: str) -> int:
    """+1 when higher is better (accuracy, reward, ...), -1 for losses."""
    return -1 if "loss" in metric.lower() else 1


def _event(run, metric, kind, step, before, after, width, score) -> dict:
    return {"run": run, "metric": metric, "kind": kind, "step": float(step), "before": float(before),
            "after": float(after), "width_steps": float(width), "score": float(score)}


def detect_series(run: str, metric: str, t: np.ndarray, y: np.ndarray, cfg: InsightConfig) -> list[dict]:
    """All single-series events (every kind but ``aha``) of one metric of one run."""
    if y.size < cp.MIN_POINTS:
        return []
    sigma = cp.robust_sigma(y)
    pen = cfg.penalty if cfg.penalty is not None else cp.PENALTY_PER_LOG_N
    name = metric.lower()
    out = []
    direction = direction_of(metric)
    for r in cp.find_jumps(t, y, cfg.min_sigma, cfg.max_width_frac, direction=direction, sigma=sigma,
                           penalty_per_log_n=pen):
        out.append(_event(run, metric, "jump", r.center, r.before, r.after, r.width80, r.height_sigma))
    if "loss" in name:
        k = cp.find_knee(t, y, cfg.min_sigma, sigma=sigma)
        if k is not None:
            out.append(_event(run, metric, "knee", k.step, k.slope_before, k.slope_after, k.width, k.drop_sigma))
    kind = "reflection" if "reflection" in name else "length_growth" if "length" in name else None
    if kind is not None:
        g = cp.sustained_growth(t, y, cfg.min_sigma, sigma=sigma)
        if g is not None:
            out.append(_event(run, metric, kind, g.center, g.before, g.after, g.end - g.start, g.score))
    return out


def find_aha(events: list[dict], window: float) -> list[dict]:
    """``aha``: an accuracy jump within ``window`` steps of a reflection rise's 10-90% span, same run."""
    out = []
    refl = [e for e in events if e["kind"] == "reflection"]
    for j in events:
        if j["kind"] != "jump" or "accuracy" not in j["metric"].lower():
            continue
        for r in refl:
            if r["run"] != j["run"]:
                continue
            lo = r["step"] - r["width_steps"] / 2 - window
            hi = r["step"] + r["width_steps"] / 2 + window
            if lo <= j["step"] <= hi:
                out.append({**j, "kind": "aha"})
                break
    return out


def detect_all(series: Series, cfg: InsightConfig) -> list[dict]:
    """Events of every series plus the cross-metric ``aha`` events, sorted by run, metric, step."""
    events: list[dict] = []
    for (run, metric), (t, y) in progress(sorted(series.items()), desc="insight", unit="series"):
        events.extend(detect_series(run, metric, t, y, cfg))
    events.extend(find_aha(events, cfg.window))
    return sorted(events, key=lambda e: (e["run"], e["metric"], e["step"], KINDS.index(e["kind"])))


# ---------------------------------------------------------------------------------------------
# summary


def _spread(steps: list[float]) -> dict:
    x = np.asarray(steps, dtype=np.float64)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def summarize(series: Series, events: list[dict]) -> dict:
    """Repeatability across runs per (metric, kind) and per kind; noise level per series."""
    runs = sorted({r for r, _ in series})
    metrics = sorted({m for _, m in series})
    by_metric: dict[str, dict] = {}
    for m in metrics:
        runs_with_metric = sorted({r for r, mm in series if mm == m})
        kinds: dict[str, dict] = {}
        for kind in KINDS:
            evs = [e for e in events if e["metric"] == m and e["kind"] == kind]
            if not evs:
                continue
            first = {}
            for e in evs:  # first occurrence per run
                first.setdefault(e["run"], e["step"])
            kinds[kind] = {"runs_with_event": len(first), "n_runs": len(runs_with_metric),
                           "fraction": len(first) / len(runs_with_metric), "events": len(evs),
                           "first_step": _spread(list(first.values()))}
        by_metric[m] = kinds
    by_kind = {}
    for kind in KINDS:
        first: dict[str, float] = {}
        for e in events:
            if e["kind"] == kind:
                first[e["run"]] = min(first.get(e["run"], math.inf), e["step"])
        if first:
            by_kind[kind] = {"runs_with_event": len(first), "n_runs": len(runs), "fraction": len(first) / len(runs),
                             "first_step": _spread(list(first.values()))}
    noise = {f"{r}|{m}": cp.robust_sigma(y) for (r, m), (_, y) in sorted(series.items())}
    return {"n_runs": len(runs), "runs": runs, "metrics": metrics, "n_events": len(events),
            "by_kind": by_kind, "by_metric": by_metric, "noise_sigma": noise}


# ---------------------------------------------------------------------------------------------
# entry point


def run_detect(metrics_path: str | Path, out_path: str | Path, cfg=None, plots: bool = True) -> dict:
    """Detect events in ``metrics_path`` and write ``out_path`` (JSON) plus one PNG per metric beside it.

    ``cfg`` is a full :class:`r1zero.config.Config`, an :class:`InsightConfig`, or None (defaults).
    Returns the written document ``{"events": [...], "summary": {...}}``.
    """
    icfg = cfg.insight if hasattr(cfg, "insight") else (cfg or InsightConfig())
    series, rows = load_metrics(metrics_path)
    events = detect_all(series, icfg)
    summary = summarize(series, events)
    summary["rows"] = rows
    summary["detector"] = {"min_sigma": icfg.min_sigma, "max_width_frac": icfg.max_width_frac,
                           "window": icfg.window,
                           "penalty_per_log_n": icfg.penalty if icfg.penalty is not None else cp.PENALTY_PER_LOG_N}
    doc = {"events": events, "summary": summary}
    if plots:
        from r1zero.insight.plots import write_metric_plots

        summary["plots"] = write_metric_plots(series, events, str(out_path))
    store.write_bytes(str(out_path), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return doc
