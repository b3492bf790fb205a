"""Synthetic training curves with planted events, for measuring the insight detectors' quality.

Three families, all seeded and deterministic:

- ``jump``: a noisy plateau with one or two planted logistic rises whose 10-90% width is at most
  ``JUMP_MAX_WIDTH_FRAC`` of the run (often a pure step), of height 3-12 noise standard deviations,
  sometimes on a gentle linear drift. These are the events a detector must find.
- ``sigmoid``: a smooth, slow logistic trend (10-90% width 30-80% of the run), as large as a jump.
  By the project's definition (docs/eval.md) this is a *trend*, not a jump: it must not be reported.
- ``plateau``: no rise at all; Gaussian or heavy-tailed (Student-t, 5 dof) noise.

    from r1zero.insight.synthetic import make_suite
    curves = make_suite(n_per_kind=200, seed=0)
    curves[0].steps, curves[0].values, curves[0].jumps   # planted jump centres (steps)

Run ``python benchmarks/bench_insight.py`` to score :mod:`r1zero.insight.detect` on a suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# 10-90% width of a logistic 1/(1+exp(-t/w)) is 2*ln(9)*w.
WIDTH80_PER_SCALE = 2.0 * np.log(9.0)
JUMP_MAX_WIDTH_FRAC = 0.05  # planted jumps: width80 <= 5% of the run (detector limit is 10%)
TREND_MIN_WIDTH_FRAC = 0.30  # planted trends: width80 >= 30% of the run
MIN_HEIGHT_SIGMA = 3.0  # the quality goal covers jumps of at least 3 noise standard deviations
HEIGHT_BINS = ((0.0, 3.0), (3.0, 4.0), (4.0, 6.0), (6.0, np.inf))  # recall reported per bin (sigmas)


@dataclass(frozen=True)
class PlantedJump:
    step: float  # centre (50% of the rise), in steps
    height: float  # in metric units
    width_steps: float  # 10-90% width
    height_sigma: float  # height / noise sigma


@dataclass
class SyntheticCurve:
    kind: str  # jump | sigmoid | plateau
    steps: np.ndarray
    values: np.ndarray
    sigma: float
    jumps: list[PlantedJump] = field(default_factory=list)

    @property
    def run_length(self) -> float:
        return float(self.steps[-1] - self.steps[0])


def logistic(t: np.ndarray, center: float, width80: float) -> np.ndarray:
    """0 -> 1 logistic with its 10-90% rise spanning ``width80``; a unit step when ``width80 == 0``."""
    if width80 <= 0:
        return (t >= center).astype(np.float64)
    scale = width80 / WIDTH80_PER_SCALE
    return 1.0 / (1.0 + np.exp(-np.clip((t - center) / scale, -60, 60)))


def _noise(rng: np.random.Generator, n: int, sigma: float, heavy: bool) -> np.ndarray:
    if heavy:
        # Student-t with 5 dof rescaled to unit variance (var = dof / (dof - 2)).
        return sigma * rng.standard_t(5, size=n) / np.sqrt(5.0 / 3.0)
    return sigma * rng.normal(size=n)


def _axis(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(100, 401))
    stride = int(rng.choice([1, 1, 5, 10]))  # metrics logged every step or every few steps
    return np.arange(n, dtype=np.float64) * stride


def make_jump_curve(rng: np.random.Generator) -> SyntheticCurve:
    t = _axis(rng)
    span = t[-1] - t[0]
    sigma = float(rng.uniform(0.005, 0.05))
    base = float(rng.uniform(0.05, 0.5))
    y = np.full(t.size, base)
    n_jumps = 2 if rng.random() < 0.2 else 1
    if n_jumps == 1:
        centers = [rng.uniform(0.15, 0.85) * span]
    else:
        a = rng.uniform(0.15, 0.45) * span
        centers = [a, a + rng.uniform(0.3, 0.4) * span]
    jumps = []
    for c in centers:
        h_sigma = float(rng.uniform(MIN_HEIGHT_SIGMA, 12.0))
        width = 0.0 if rng.random() < 0.3 else float(rng.uniform(0.0, JUMP_MAX_WIDTH_FRAC) * span)
        y = y + h_sigma * sigma * logistic(t, c, width)
        jumps.append(PlantedJump(float(c), h_sigma * sigma, width, h_sigma))
    if rng.random() < 0.5:  # gentle drift: at most 1.5 sigma over the whole run
        y = y + rng.uniform(-1.5, 1.5) * sigma * (t - t[0]) / span
    y = y + _noise(rng, t.size, sigma, heavy=rng.random() < 0.2)
    return SyntheticCurve("jump", t, y, sigma, jumps)


def make_sigmoid_curve(rng: np.random.Generator) -> SyntheticCurve:
    t = _axis(rng)
    span = t[-1] - t[0]
    sigma = float(rng.uniform(0.005, 0.05))
    width = float(rng.uniform(TREND_MIN_WIDTH_FRAC, 0.8) * span)
    center = float(rng.uniform(0.3, 0.7) * span)
    h = float(rng.uniform(MIN_HEIGHT_SIGMA, 12.0)) * sigma
    y = rng.uniform(0.05, 0.5) + h * logistic(t, center, width) + _noise(rng, t.size, sigma, heavy=False)
    return SyntheticCurve("sigmoid", t, y, sigma, [])


def make_plateau_curve(rng: np.random.Generator) -> SyntheticCurve:
    t = _axis(rng)
    sigma = float(rng.uniform(0.005, 0.05))
    y = rng.uniform(0.05, 0.9) + _noise(rng, t.size, sigma, heavy=rng.random() < 0.3)
    return SyntheticCurve("plateau", t, y, sigma, [])


_MAKERS = {"jump": make_jump_curve, "sigmoid": make_sigmoid_curve, "plateau": make_plateau_curve}


def make_suite(n_per_kind: int = 200, seed: int = 0, kinds: tuple[str, ...] = ("jump", "sigmoid", "plateau")
               ) -> list[SyntheticCurve]:
    """``n_per_kind`` curves of each kind; curve i of a kind depends only on (seed, kind, i)."""
    out = []
    for ki, kind in enumerate(kinds):
        for i in range(n_per_kind):
            rng = np.random.default_rng([seed, ki, i])
            out.append(_MAKERS[kind](rng))
    return out


def aha_run_rows(seed: int, n_steps: int = 120, jump_step: int | None = 60, run: str | None = None,
                 reflection_lag: int = 2, domains: tuple[str, ...] = ("math",)) -> list[dict]:
    """Metrics rows of a simulated GRPO run: accuracy jump + reflection rise + length growth.

    With ``jump_step=None`` the run has no aha moment (flat accuracy and reflection, no growth).
    Used by tests and the docs example; values follow the metrics JSONL contract.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_steps, dtype=np.float64)
    rows = []

    def emit(name, values):
        for s, v in zip(t, values):
            row = {"step": int(s), "name": name, "value": float(v)}
            if run is not None:
                row["run"] = run
            rows.append(row)

    if jump_step is None:
        acc = 0.3 + 0.02 * rng.normal(size=t.size)
        refl = 0.05 + 0.01 * rng.normal(size=t.size)
        length = 30 + 1.0 * rng.normal(size=t.size)
    else:
        acc = 0.3 + 0.3 * logistic(t, jump_step, 2.0) + 0.02 * rng.normal(size=t.size)
        refl = 0.05 + 0.2 * logistic(t, jump_step + reflection_lag, 4.0) + 0.01 * rng.normal(size=t.size)
        length = 30 + 15 * logistic(t, n_steps / 2, n_steps * 0.6) + 1.0 * rng.normal(size=t.size)
    for d in domains:
        emit(f"eval/accuracy/{d}", acc)
    emit("eval/accuracy/general", 0.4 + 0.02 * rng.normal(size=t.size))
    emit("grpo/reflection_rate", refl)
    emit("grpo/completion_length/mean", length)
    emit("train/loss", 2.5 * np.exp(-t / 15.0) + 0.5 + 0.01 * rng.normal(size=t.size))
    return rows


def score_jumps(curves: list[SyntheticCurve], detect, tol_frac: float = 0.05) -> dict:
    """Precision/recall/step error of ``detect(steps, values) -> list[step]`` on a suite.

    A detection matches an unmatched planted jump when their steps differ by at most ``tol_frac``
    of the run length (the goal's step-error bound); every other detection is a false positive.
    ``false_curve_rate`` is the share of event-free curves (sigmoid, plateau) with any detection.
    """
    tp = fp = fn = 0
    errors: list[float] = []
    free = {"sigmoid": [0, 0], "plateau": [0, 0]}  # kind -> [curves with a detection, curves]
    bins = {lo: [0, 0] for lo, _ in HEIGHT_BINS}  # height bin -> [found, planted]
    for c in curves:
        found = sorted(float(s) for s in detect(c.steps, c.values))
        if c.kind in free:
            free[c.kind][0] += bool(found)
            free[c.kind][1] += 1
            fp += len(found)
            continue
        used: set[int] = set()
        for j in c.jumps:
            cands = [(abs(s - j.step), k) for k, s in enumerate(found) if k not in used]
            cands = [x for x in cands if x[0] <= tol_frac * c.run_length]
            b = next(lo for lo, hi in HEIGHT_BINS if lo <= j.height_sigma < hi)
            bins[b][1] += 1
            if cands:
                err, k = min(cands)
                used.add(k)
                tp += 1
                bins[b][0] += 1
                errors.append(err / c.run_length)
            else:
                fn += 1
        fp += len(found) - len(used)
    n_free = sum(v[1] for v in free.values())
    return {
        "planted": tp + fn, "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "step_error_frac_max": max(errors) if errors else 0.0,
        "step_error_frac_mean": float(np.mean(errors)) if errors else 0.0,
        "false_curve_rate": sum(v[0] for v in free.values()) / n_free if n_free else 0.0,
        "false_curve_rate_by_kind": {k: (v[0] / v[1] if v[1] else 0.0) for k, v in free.items()},
        "recall_by_height_sigma": {f"{lo:g}-{hi:g}": (bins[lo][0] / bins[lo][1] if bins[lo][1] else None)
                                   for lo, hi in HEIGHT_BINS},
    }
