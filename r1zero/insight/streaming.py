"""Streaming insight detection inside training: emit an event as soon as it is detectable.

    from r1zero.insight.streaming import StreamingDetector, metrics_callback
    det = StreamingDetector(cfg.insight, on_event=[metrics_callback(writer.write)])
    for step ...:
        det.update(step, "grpo/accuracy", acc)          # returns the events confirmed now

Each (run, metric) series is buffered; every ``insight.stream_every`` new points the batch
detectors of :mod:`r1zero.insight.detect` run on the whole buffer. An event is *confirmed* (and
emitted, once) when at least ``min_after`` points follow its end, so the estimate has settled;
its ``lag_steps`` = step at confirmation - event step. A ``knee`` (relative to the whole curve)
waits until the curve is ``KNEE_SPAN`` times longer than the knee's step. ``aha`` events are emitted as soon as both
the accuracy jump and the reflection rise are confirmed.

Callbacks receive the event dict (the batch schema plus ``detected_at`` and ``lag_steps``). Core
provides :func:`metrics_callback` (event -> metrics JSONL rows); in a cluster, pass
``r1zero.cluster.events.k8s_event_callback(...)`` to post a Kubernetes Event on the job (core
never imports kubernetes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np

from r1zero.config import InsightConfig
from r1zero.insight import changepoint as cp
from r1zero.insight.detect import DEFAULT_RUN, detect_series, find_aha

Callback = Callable[[dict], None]
KNEE_SPAN = 3.0  # a streaming knee is confirmed once the curve is 3x as long as the knee's step


class StreamingDetector:
    """Incremental wrapper around the batch detectors (see module docstring)."""

    def __init__(self, cfg: InsightConfig | None = None, on_event: Callback | Iterable[Callback] | None = None,
                 every: int | None = None, min_after: int = 5, max_points: int = 5000):
        self.cfg = cfg or InsightConfig()
        self.every = every or self.cfg.stream_every
        self.min_after = min_after
        self.max_points = max_points  # oldest points are dropped beyond this (bounded memory and time)
        if on_event is None:
            self.callbacks: list[Callback] = []
        elif callable(on_event):
            self.callbacks = [on_event]
        else:
            self.callbacks = list(on_event)
        self._t: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._y: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._pending: dict[tuple[str, str], int] = defaultdict(int)
        self.events: list[dict] = []

    def _known(self, e: dict) -> bool:
        tol = max(e["width_steps"], 1.0) + self.cfg.window
        return any(o["run"] == e["run"] and o["metric"] == e["metric"] and o["kind"] == e["kind"]
                   and abs(o["step"] - e["step"]) <= tol for o in self.events)

    def _emit(self, e: dict, now: float) -> dict:
        e = {**e, "detected_at": float(now), "lag_steps": float(now - e["step"])}
        self.events.append(e)
        for cb in self.callbacks:
            cb(e)
        return e

    def update(self, step: float, name: str, value: float, run: str | None = None) -> list[dict]:
        """Add one point; returns the events confirmed by it (already passed to the callbacks)."""
        key = (run or DEFAULT_RUN, name)
        if not np.isfinite(value):
            return []
        self._t[key].append(float(step))
        self._y[key].append(float(value))
        if len(self._t[key]) > self.max_points:
            del self._t[key][0], self._y[key][0]
        self._pending[key] += 1
        if self._pending[key] < self.every or len(self._t[key]) < cp.MIN_POINTS:
            return []
        self._pending[key] = 0
        t, y = np.asarray(self._t[key]), np.asarray(self._y[key])
        new = []
        for e in detect_series(key[0], name, t, y, self.cfg):
            end = e["step"] + e["width_steps"] / 2
            if int(np.sum(t > end)) < self.min_after or self._known(e):
                continue
            if e["kind"] == "knee" and (t[-1] - t[0]) < KNEE_SPAN * (e["step"] - t[0]):
                continue  # a knee is relative to the whole curve: wait until it is well inside it
            new.append(self._emit(e, step))
        if new:
            for a in find_aha(self.events, self.cfg.window):
                if not self._known(a):
                    new.append(self._emit(a, step))
        return new

    def update_many(self, rows: Iterable[dict]) -> list[dict]:
        """Feed metrics rows (``{"step", "name", "value"[, "run"]}``) in order."""
        out = []
        for r in rows:
            out += self.update(r["step"], r["name"], r["value"], r.get("run"))
        return out

    def lag_summary(self) -> dict:
        """Detection lag (steps) per kind over the emitted events."""
        by: dict[str, list[float]] = defaultdict(list)
        for e in self.events:
            by[e["kind"]].append(e["lag_steps"])
        return {k: {"n": len(v), "mean": float(np.mean(v)), "max": float(np.max(v))} for k, v in sorted(by.items())}


def metrics_callback(write: Callable[[dict], None], prefix: str = "insight") -> Callback:
    """Event -> metrics rows via ``write(row)``: ``{prefix}/{kind}/{metric}`` = event step, and the lag.

    Each ``aha`` also writes ``insight/aha_events`` = 1, the row the telemetry exporter turns into
    its aha-events counter.

    Rows are stamped with the step at which the event was confirmed, so they land in the
    training metrics JSONL (and from there in dashboards) when the event became known.
    """
    def cb(e: dict) -> None:
        base = {"step": int(e["detected_at"])}
        if e.get("run") and e["run"] != DEFAULT_RUN:
            base["run"] = e["run"]
        write({**base, "name": f"{prefix}/{e['kind']}/{e['metric']}", "value": float(e["step"])})
        write({**base, "name": f"{prefix}/{e['kind']}/{e['metric']}/lag_steps", "value": float(e["lag_steps"])})
        if e["kind"] == "aha":  # the telemetry exporter counts these rows (r1zero_aha_events_total)
            write({**base, "name": f"{prefix}/aha_events", "value": 1.0})

    return cb
