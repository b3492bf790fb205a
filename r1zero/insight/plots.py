"""Plots of metric curves with detected events marked (one PNG per metric, all runs overlaid).

Used by :func:`r1zero.insight.detect.run_detect`; matplotlib's Agg backend, no display needed.
"""

from __future__ import annotations

import io
import re

import numpy as np

from r1zero import store

KIND_STYLE = {"jump": ("tab:red", "-"), "knee": ("tab:purple", "--"), "reflection": ("tab:green", ":"),
              "length_growth": ("tab:orange", ":"), "aha": ("black", "-.")}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def metric_figure_png(metric: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], events: list[dict]) -> bytes:
    """PNG bytes of one metric: every run's curve, events as vertical lines coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
    for run, (t, y) in sorted(curves.items()):
        ax.plot(t, y, lw=1, alpha=0.85, label=run if len(curves) > 1 else None)
    seen = set()
    for e in events:
        color, ls = KIND_STYLE.get(e["kind"], ("grey", "-"))
        ax.axvline(e["step"], color=color, ls=ls, lw=1.2, label=e["kind"] if e["kind"] not in seen else None)
        if e["kind"] == "jump":
            ax.axvspan(e["step"] - e["width_steps"] / 2, e["step"] + e["width_steps"] / 2, color=color, alpha=0.12)
        seen.add(e["kind"])
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_metric_plots(series, events: list[dict], out_path: str) -> list[str]:
    """Write ``<out stem>.<metric>.png`` beside ``out_path`` for every metric; returns the URIs."""
    base = out_path[: -len(".json")] if out_path.endswith(".json") else out_path
    written = []
    for metric in sorted({m for _, m in series}):
        curves = {r: tv for (r, m), tv in series.items() if m == metric}
        evs = [e for e in events if e["metric"] == metric]
        uri = f"{base}.{_safe(metric)}.png"
        store.write_bytes(uri, metric_figure_png(metric, curves, evs))
        written.append(uri)
    return written
