"""Self-contained HTML evaluation report: tables plus matplotlib PNGs embedded as base64.

Built by :func:`r1zero.eval.evaluate.run_eval` (``report.html``); no external assets, so it opens
from a KFP artifact, an S3 console or an email attachment. Sections: overall and per-domain rates
with 95% bootstrap CIs, accuracy by domain, named benchmarks (each evaluated whole; model,
baseline and paired difference per benchmark), base vs RL (with ``--baseline``), response-length
distributions, training curves with detected events (with ``--curves``), a few greedy completions.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np

ROWS = [("pass@1", "greedy pass@1"), ("pass@k", "pass@k (unbiased)"), ("maj@k", "maj@k"),
        ("mean@n", "sampled accuracy"), ("format_rate", "format (greedy)"),
        ("format_rate_sampled", "format (sampled)"), ("reflection_rate", "reflection-keyword rate"),
        ("truncated_rate", "truncated")]
MAX_CURVES = 12  # curve panels in the report (most relevant names first)
CURVE_PREFERENCE = ("grpo/accuracy", "grpo/reward/mean", "eval/accuracy", "grpo/reflection_rate",
                    "grpo/completion_length/mean", "grpo/format_rate", "grpo/kl", "train/loss")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return '<img alt="plot" src="data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode() + '">'


def _fmt(est: dict) -> str:
    if est is None or est.get("n", 0) == 0 or not np.isfinite(est.get("mean", np.nan)):
        return "&ndash;"
    return f"{est['mean']:.3f} <small>[{est['lo']:.3f}, {est['hi']:.3f}]</small>"


def _rate_table(overall: dict, domains: dict, k: int, lengths: bool = True) -> str:
    blocks = {"all": overall, **domains}
    head = "".join(f"<th>{html.escape(d)} <small>(n={b.get('n_problems', b.get('n_paired'))})</small></th>"
                   for d, b in blocks.items())
    body = []
    for key, label in ROWS:
        label = label.replace("@k", f"@{k}")
        body.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_fmt(b.get(key))}</td>"
                                                                  for b in blocks.values()) + "</tr>")
    if lengths:
        body.append("<tr><td>length mean / p90 (sampled, tokens)</td>" + "".join(
            f"<td>{b['length_sampled']['mean']:.1f} / {b['length_sampled']['p90']:.0f}</td>" for b in blocks.values())
            + "</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def _bench_table(benchmarks: dict, k: int) -> str:
    """One column per benchmark (and per baseline / difference when present)."""
    cols: dict[str, dict] = {}
    for name, b in benchmarks.items():
        cols[name] = b
        if b.get("baseline") is not None:
            cols[f"{name} baseline"] = b["baseline"]
        if b.get("delta") is not None:
            cols[f"{name} &Delta;"] = b["delta"]
    head = "".join(f"<th>{html.escape(c).replace('&amp;Delta;', '&Delta;')} <small>(n={b.get('n_problems', b.get('n_paired'))})"
                   "</small></th>" for c, b in cols.items())
    body = []
    for key, label in ROWS:
        label = label.replace("@k", f"@{k}")
        body.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_fmt(b.get(key))}</td>" for b in cols.values())
                    + "</tr>")
    body.append("<tr><td>length mean / p90 (sampled, tokens)</td>" + "".join(
        f"<td>{b['length_sampled']['mean']:.1f} / {b['length_sampled']['p90']:.0f}</td>" if "length_sampled" in b
        else "<td>&ndash;</td>" for b in cols.values()) + "</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def accuracy_figure(doc: dict) -> str:
    plt = _plt()
    doms = ["all", *doc["by_domain"]]
    blocks = [doc["overall"], *doc["by_domain"].values()]
    keys = [("pass@1", "pass@1"), ("pass@k", f"pass@{doc['k']}"), ("maj@k", f"maj@{doc['k']}")]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(doms))
    w = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        m = np.array([b[key]["mean"] for b in blocks])
        err = np.array([[b[key]["mean"] - b[key]["lo"] for b in blocks], [b[key]["hi"] - b[key]["mean"] for b in blocks]])
        ax.bar(x + (i - 1) * w, np.nan_to_num(m), w, yerr=np.nan_to_num(err), capsize=3, label=label)
    ax.set_xticks(x, doms)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy by domain (95% bootstrap CI)")
    ax.legend(fontsize=8)
    return _png(fig)


def baseline_figure(doc: dict) -> str:
    plt = _plt()
    doms = ["all", *doc["by_domain"]]
    cur = [doc["overall"], *doc["by_domain"].values()]
    base = [doc["baseline"]["overall"], *[doc["baseline"]["by_domain"].get(d) for d in doc["by_domain"]]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(doms))
    for off, blocks, label in ((-0.2, base, "baseline"), (0.2, cur, "model")):
        m = [b["pass@1"]["mean"] if b else np.nan for b in blocks]
        lo = [b["pass@1"]["mean"] - b["pass@1"]["lo"] if b else 0 for b in blocks]
        hi = [b["pass@1"]["hi"] - b["pass@1"]["mean"] if b else 0 for b in blocks]
        ax.bar(x + off, np.nan_to_num(m), 0.4, yerr=np.nan_to_num([lo, hi]), capsize=3, label=label)
    ax.set_xticks(x, doms)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("greedy pass@1")
    ax.set_title("base vs RL")
    ax.legend(fontsize=8)
    return _png(fig)


def length_figure(recs: Sequence[dict], base: Sequence[dict] | None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    cur = [x for r in recs for x in r["sample_lengths"]] or [r["length"] for r in recs]
    sets = [("model", cur)]
    if base:
        sets.insert(0, ("baseline", [x for r in base for x in r.get("sample_lengths", [])] or [r["length"] for r in base]))
    hi = max(max(v) if v else 1 for _, v in sets)
    bins = np.linspace(0, hi + 1, 30)
    for label, v in sets:
        ax.hist(v, bins=bins, alpha=0.55, label=label)
    ax.set_xlabel("completion length (tokens)")
    ax.set_ylabel("completions")
    ax.set_title("response length distribution (sampled)")
    ax.legend(fontsize=8)
    return _png(fig)


def _curve_order(metric: str) -> tuple[int, str]:
    for i, p in enumerate(CURVE_PREFERENCE):
        if metric.startswith(p):
            return (i, metric)
    return (len(CURVE_PREFERENCE), metric)


def curves_figure(series: dict, events: Sequence[dict]) -> str:
    plt = _plt()
    metrics = sorted({m for _, m in series}, key=_curve_order)[:MAX_CURVES]
    cols = 3
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for (run, m), (t, y) in sorted(series.items()):
            if m == metric:
                ax.plot(t, y, lw=1, label=run)
        for e in events:
            if e["metric"] == metric:
                ax.axvline(e["step"], color="red" if e["kind"] in ("jump", "aha") else "grey", ls="--", lw=1)
        ax.set_title(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    return _png(fig)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}
pre{background:#f6f6f6;padding:6px;white-space:pre-wrap;font-size:12px}small{color:#666}"""


def render_report(doc: dict, recs: Sequence[dict], base: Sequence[dict] | None = None, series: dict | None = None,
                  events: Sequence[dict] | None = None, n_examples: int = 6) -> str:
    """The complete HTML document (a string)."""
    k = doc["k"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>r1zero eval</title><style>{_CSS}</style>"
             "</head><body><h1>r1zero evaluation</h1>",
             f"<p>model <code>{html.escape(doc['model'])}</code> on <code>{html.escape(doc['data'])}</code>: "
             f"{doc['overall']['n_problems']} problems, greedy + {doc['n_samples']} samples at T={doc['temperature']}"
             f", max {doc['max_new_tokens']} new tokens, k={k}, seed {doc['seed']}. Brackets: 95% bootstrap CI.</p>",
             "<h2>Rates</h2>", _rate_table(doc["overall"], doc["by_domain"], k)]
    parts += ["<h2>Accuracy by domain</h2>", accuracy_figure(doc)]
    if doc.get("benchmarks"):
        parts += ["<h2>Named benchmarks</h2><p>each evaluated whole (every imported row with a gold answer)"
                  + ("; model, baseline and model &minus; baseline (paired)" if "baseline" in doc else "") + ".</p>",
                  _bench_table(doc["benchmarks"], k)]
    if "baseline" in doc:
        parts += [f"<h2>Base vs RL</h2><p>baseline <code>{html.escape(doc['baseline']['uri'])}</code> "
                  f"({doc['baseline']['kind']}); differences are model &minus; baseline, paired over problems.</p>",
                  baseline_figure(doc), _rate_table(doc["delta"]["overall"], doc["delta"]["by_domain"], k, False),
                  "<h3>Baseline rates</h3>", _rate_table(doc["baseline"]["overall"], doc["baseline"]["by_domain"], k)]
    parts += ["<h2>Response length</h2>", length_figure(recs, base)]
    if series:
        parts += ["<h2>Training curves</h2>", curves_figure(series, events or [])]
        if events:
            rows = "".join(
                f"<tr><td>{html.escape(str(e['run']))}</td><td>{html.escape(e['metric'])}</td><td>{e['kind']}</td>"
                f"<td>{e['step']:.0f}</td><td>{e['before']:.4g}</td><td>{e['after']:.4g}</td>"
                f"<td>{e['width_steps']:.1f}</td><td>{e['score']:.1f}</td></tr>" for e in events)
            parts.append("<table><tr><th>run</th><th>metric</th><th>kind</th><th>step</th><th>before</th>"
                         f"<th>after</th><th>width</th><th>score</th></tr>{rows}</table>")
    parts.append("<h2>Greedy completions</h2>")
    for r in list(recs)[:n_examples]:
        mark = "correct" if r["pass@1"] else "wrong"
        parts.append(f"<p><b>{html.escape(r['id'])}</b> ({html.escape(r['domain'])}, {mark}; gold "
                     f"<code>{html.escape(r['gold'])}</code>, extracted <code>{html.escape(str(r['answer']))}</code>)"
                     f"</p><pre>{html.escape(r.get('completion', ''))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
