"""The aha experiment harness: N seeds x a sweep of variants through the whole tiny pipeline.

    r1zero experiment aha --config configs/tiny.yaml --runs 5 --out runs/aha
    r1zero experiment aha --config configs/tiny.yaml --runs 5 --sweep grpo.algorithm=grpo,ppo,rloo --out runs/aha
    r1zero experiment aha --config configs/tiny.yaml --runs 3 --sweep model.d_model=64,128 \\
        --sweep 'data.mix={math: 0.3, code: 0.25, cross: 0.15, general: 0.3}|{math: 0.45, code: 0.25, cross: 0.15, general: 0.15}' \\
        --out runs/aha_sizes

Turns the article's claims into measurements: for every variant (one point of the sweep's
cartesian product) it runs data mix -> pretrain -> RL -> eval for ``--runs`` seeds, detects events
on all the RL curves at once (:func:`r1zero.insight.detect.run_detect`, one ``run`` per
variant/seed) and reports, per variant, how many runs show each event (the "4 of 5 runs"), when,
how fast RL accuracy converges, and the final eval accuracy (``experiment.json``,
``experiment.md``, ``experiment.png``).

Seeds: with ``seed_scope="rl"`` (default) the data artifact and the pretrained base model are
shared by all seeds of a variant (built with the config's seed) and only RL and eval are reseeded;
``"all"`` reseeds every stage. Artifacts are cached by the hash of the config sections they depend
on, so variants that only change RL reuse one base model.

The stage functions are injected (:class:`Stages`); the defaults import the real entry points
lazily, tests pass fakes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from r1zero import store
from r1zero.config import load_config
from r1zero.errors import UserError
from r1zero.insight import changepoint as cp
from r1zero.progress import print0

ACC_METRICS = ("grpo/accuracy", "grpo/reward/mean")  # the RL curve used for convergence, first found
KEY_METRICS = ("grpo/accuracy", "eval/accuracy", "grpo/reflection_rate", "grpo/completion_length/mean")
CONVERGED_FRAC = 0.9  # converged = the smoothed curve reached 90% of its total rise


@dataclass
class Stages:
    mix: Callable | None = None  # (cfg, out_uri) -> manifest
    pretrain: Callable | None = None  # (cfg, data_uri, out_uri) -> summary
    rl: Callable | None = None  # (cfg, policy_uri, data_uri, out_uri) -> summary
    evaluate: Callable | None = None  # (cfg, model_uri, data_uri, out_uri, baseline_uri=, curves=) -> flat
    detect: Callable | None = None  # (metrics_path, out_path, cfg) -> {"events", "summary"}

    def resolved(self) -> Stages:
        """Fill unset stages with the real entry points (imported now, lazily)."""
        s = Stages(**self.__dict__)
        if s.mix is None:
            from r1zero.data.mix import run_mix as s_mix

            s.mix = s_mix
        if s.pretrain is None:
            from r1zero.train.pretrain import run_pretrain

            s.pretrain = run_pretrain
        if s.rl is None:
            from r1zero.grpo.trainer import run_grpo

            s.rl = run_grpo
        if s.evaluate is None:
            from r1zero.eval.evaluate import run_eval

            s.evaluate = run_eval
        if s.detect is None:
            from r1zero.insight.detect import run_detect

            s.detect = run_detect
        return s


# ---------------------------------------------------------------------------------------------
# sweep


def parse_sweep(specs: list[str]) -> dict[str, list[str]]:
    """``["grpo.algorithm=grpo,ppo"]`` -> ``{"grpo.algorithm": ["grpo", "ppo"]}`` (order kept).

    Values are split on ``|`` when the spec contains one (for values holding commas, such as a
    whole mixture: ``data.mix={math: 0.45, code: 0.25, cross: 0.15, general: 0.15}|{...}``),
    otherwise on ``,``.
    """
    out: dict[str, list[str]] = {}
    for spec in specs or []:
        key, sep, vals = spec.partition("=")
        values = [v.strip() for v in vals.split("|" if "|" in vals else ",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise UserError(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. grpo.algorithm=grpo,ppo,rloo)")
        if key.strip() in out:
            raise UserError(f"--sweep {key.strip()} given twice")
        out[key.strip()] = values
    return out


def variants(sweep: dict[str, list[str]]) -> list[dict[str, str]]:
    """Cartesian product of the sweep (a single empty variant when there is none)."""
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))] or [{}]


def variant_label(v: dict[str, str]) -> str:
    return ",".join(f"{k}={val}" for k, val in v.items()) or "base"


def _hash(cfg, sections: tuple[str, ...]) -> str:
    d = cfg.to_dict()
    blob = json.dumps({s: d[s] for s in sections}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# measurements (pure)


def convergence_step(t: np.ndarray, y: np.ndarray, frac: float = CONVERGED_FRAC,
                     min_sigma: float = 2.5) -> float | None:
    """First step where the smoothed curve reaches ``frac`` of its start-to-end rise.

    None when there is no real rise: the end level must exceed the start level by ``min_sigma``
    noise standard deviations, so a flat noisy curve is "not converged", not "converged at once".
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if y.size < 3:
        return None
    smooth = cp.running_median(y, max(3, y.size // 10) | 1)
    edge = max(1, y.size // 10)
    start, end = float(np.median(smooth[:edge])), float(np.median(smooth[-edge:]))
    if end - start < min_sigma * cp.robust_sigma(y):
        return None
    idx = np.nonzero(smooth >= start + frac * (end - start))[0]
    return float(t[idx[0]]) if idx.size else None


def _stats(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return None
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), "n": len(xs)}


def aggregate(runs: list[dict], events: list[dict], series: dict, min_sigma: float = 2.5) -> dict:
    """Per-variant table: event counts over runs, event steps, convergence, final accuracy.

    ``runs``: ``{"variant", "run", "seed", "accuracy"}`` per run; ``events``: run_detect events
    (their ``run`` is the run id); ``series``: ``{(run, metric): (t, y)}`` of the RL curves.
    """
    out = {}
    for label in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == label]
        ids = {r["run"] for r in rs}
        kinds = {}
        for kind in ("jump", "reflection", "length_growth", "aha", "knee"):
            first: dict[str, float] = {}
            for e in events:
                if e["run"] in ids and e["kind"] == kind and (kind != "jump" or "accuracy" in e["metric"]):
                    first[e["run"]] = min(first.get(e["run"], np.inf), e["step"])
            kinds[kind] = {"runs_with_event": len(first), "n_runs": len(ids), "step": _stats(list(first.values()))}
        conv = []
        for r in rs:
            for m in ACC_METRICS:
                if (r["run"], m) in series:
                    conv.append(convergence_step(*series[(r["run"], m)], min_sigma=min_sigma))
                    break
        out[label] = {"n_runs": len(rs), "events": kinds, "convergence_step": _stats(conv),
                      "not_converged": sum(c is None for c in conv),
                      "final_accuracy": _stats([r.get("accuracy") for r in rs]),
                      "runs": sorted(ids)}
    return out


def markdown_table(agg: dict) -> str:
    head = ("| variant | runs | aha | accuracy jump | reflection rise | length growth | aha step | "
            "converged by step | final eval accuracy |\n|---|---|---|---|---|---|---|---|---|")

    def frac(e):
        return f"{e['runs_with_event']}/{e['n_runs']}"

    def ms(s, fmt="{:.0f}"):
        return "-" if s is None else f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}"

    lines = [head]
    for label, a in agg.items():
        ev = a["events"]
        lines.append(f"| {label} | {a['n_runs']} | {frac(ev['aha'])} | {frac(ev['jump'])} | {frac(ev['reflection'])} "
                     f"| {frac(ev['length_growth'])} | {ms(ev['aha']['step'])} "
                     f"| {ms(a['convergence_step'])} ({a['n_runs'] - a['not_converged']}/{a['n_runs']} runs) "
                     f"| {ms(a['final_accuracy'], '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def plot_experiment(agg: dict, series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, a) in enumerate(agg.items()):
        for j, run in enumerate(a["runs"]):
            for m in ACC_METRICS:
                if (run, m) in series:
                    t, y = series[(run, m)]
                    ax1.plot(t, y, color=colors[i % len(colors)], lw=0.9, alpha=0.8, label=label if j == 0 else None)
                    break
    ax1.set_xlabel("RL step")
    ax1.set_ylabel("RL accuracy / reward")
    ax1.set_title("RL curves per variant")
    ax1.legend(fontsize=7)
    kinds = ["aha", "jump", "reflection", "length_growth"]
    x = np.arange(len(kinds))
    w = 0.8 / max(len(agg), 1)
    for i, (label, a) in enumerate(agg.items()):
        ax2.bar(x + i * w, [a["events"][k]["runs_with_event"] / max(a["n_runs"], 1) for k in kinds], w, label=label)
    ax2.set_xticks(x + w * (len(agg) - 1) / 2, kinds)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("fraction of runs")
    ax2.set_title("runs showing each event")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# orchestration


def run_experiment(config_path: str | None, overrides: list[str], runs: int, sweep: dict[str, list[str]],
                   out_dir: str, stages: Stages | None = None, seed_scope: str = "rl") -> dict:
    """Run every variant x seed, detect events on all RL curves, aggregate; returns ``experiment.json``."""
    if runs < 1:
        raise UserError(f"--runs must be >= 1 (got {runs})")
    if seed_scope not in ("rl", "all"):
        raise UserError(f"seed scope must be 'rl' or 'all' (got {seed_scope!r})")
    st = (stages or Stages()).resolved()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(config_path, overrides)  # validates the base config before any work
    for v in variants(sweep):  # ... and every variant's, so a bad sweep value fails before hours of work
        load_config(config_path, [*overrides, *(f"{k}={val}" for k, val in v.items())])
    records, all_rows = [], []
    cache: dict[str, str] = {}
    for v in variants(sweep):
        label = variant_label(v)
        for i in range(runs):
            seed = base_cfg.seed + i
            cfg = load_config(config_path, [*overrides, *(f"{k}={val}" for k, val in v.items()), f"seed={seed}"])
            shared = cfg if seed_scope == "all" else load_config(
                config_path, [*overrides, *(f"{k}={val}" for k, val in v.items()), f"seed={base_cfg.seed}"])
            run_id = f"{label}/seed{seed}"
            print0(f"experiment: {run_id}")
            data_key = "data-" + _hash(shared, ("seed", "data"))
            if data_key not in cache:
                cache[data_key] = str(out / "_cache" / data_key)
                if not store.exists(cache[data_key]):
                    st.mix(shared, cache[data_key])
            data_uri = cache[data_key]
            base_key = "base-" + _hash(shared, ("seed", "data", "model", "parallel", "pretrain"))
            if base_key not in cache:
                cache[base_key] = str(out / "_cache" / base_key)
                if not store.exists(cache[base_key]):
                    st.pretrain(shared, data_uri, cache[base_key])
            base_uri = cache[base_key]
            run_dir = out / label.replace("/", "_") / f"seed{seed}"
            rl_uri = str(run_dir / "rl")
            st.rl(cfg, base_uri, data_uri, rl_uri)
            metrics = Path(store.materialize(rl_uri)) / "metrics.jsonl"
            curves = [str(metrics)] if metrics.is_file() else None
            flat = st.evaluate(cfg, rl_uri, data_uri, str(run_dir / "eval"), baseline_uri=base_uri, curves=curves)
            if curves:
                for line in metrics.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        row = json.loads(line)
                        row["run"] = run_id
                        all_rows.append(row)
            records.append({"variant": label, "run": run_id, "seed": seed, "accuracy": (flat or {}).get("accuracy"),
                            "eval": flat, "dir": str(run_dir)})
    if not all_rows:
        raise UserError("experiment: the RL stage wrote no metrics.jsonl; nothing to analyse")
    metrics_all = out / "metrics_all.jsonl"
    store.atomic_write_text(metrics_all, "".join(json.dumps(r, sort_keys=True) + "\n" for r in all_rows))
    doc = st.detect(str(metrics_all), str(out / "events.json"), base_cfg)
    from r1zero.insight.detect import parse_metrics

    series, _ = parse_metrics(json.dumps(r) for r in all_rows)
    agg = aggregate(records, doc["events"], series, min_sigma=base_cfg.insight.min_sigma)
    result = {"config": config_path, "overrides": overrides, "runs": runs, "sweep": sweep, "seed_scope": seed_scope,
              "variants": agg, "records": records, "events": str(out / "events.json")}
    store.atomic_write_text(out / "experiment.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    store.atomic_write_text(out / "experiment.md", markdown_table(agg))
    plot_experiment(agg, series, out / "experiment.png")
    return result
