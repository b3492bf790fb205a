"""Change-point primitives for training curves: noise level, rises (jumps vs trends), sustained growth, knees.

Pure numpy/scipy/ruptures functions on one series ``(t, y)`` (steps, values); no I/O. The event
logic that names things ``jump``/``knee``/``aha`` lives in :mod:`r1zero.insight.detect`.

How a *jump* is told apart from a trend or noise (definition in docs/eval.md):

1. noise sigma from the median absolute deviation of first differences (robust to steps and to a
   linear trend; Gaussian consistency factor 1.4826 and the sqrt(2) of a difference);
2. candidate change points from ruptures' kernel change-point search with a linear kernel (the
   least-squares mean-shift cost) and a penalty ``PENALTY_PER_LOG_N * log(n)`` in units of
   sigma^2 (a BIC-style penalty; Killick et al. 2012 use ``k log n``);
3. consecutive change points whose level moves the same way are merged into one transition, and
   a logistic-plus-linear model is fitted by least squares on the window around it; the fit gives
   the centre, the height and the 10-90% width of the rise.

A rise is a *jump* when its height is at least ``min_sigma`` noise standard deviations and its
10-90% width is at most ``max_width_frac`` of the run length; a wider rise is a trend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ruptures as rpt
from scipy.stats import kendalltau

# 10-90% width of the logistic 1/(1+exp(-t/s)) is 2*ln(9)*s.
WIDTH80_PER_SCALE = 2.0 * np.log(9.0)
# Penalty per log(n) for a new change point, in sigma^2 units. BIC for one mean parameter is
# 1*log(n) per parameter; we use 3 (a conservative choice, cf. Killick et al. 2012 sec. 3) because
# the height/width tests after it decide what is reported anyway.
PENALTY_PER_LOG_N = 3.0
MIN_POINTS = 12  # shorter series are not analysed
# a jump needs this many samples of its "before" and "after" levels: fewer cannot tell a level
# shift from a short excursion (a 2-3 point dip and its return look like a step on short series)
MIN_SIDE = 8
MAD_TO_SIGMA = 1.4826  # Gaussian consistency factor of the MAD


@dataclass(frozen=True)
class Rise:
    """A fitted monotone transition (rise when ``height > 0``, drop when ``< 0``)."""

    center: float  # step at 50% of the transition
    width80: float  # steps between the 10% and 90% points
    height: float  # fitted height, metric units (signed)
    before: float  # fitted level just before (at the centre, without the sigmoid)
    after: float  # before + height
    sigma: float  # noise standard deviation of the series

    @property
    def height_sigma(self) -> float:
        return abs(self.height) / self.sigma

    @property
    def start(self) -> float:
        return self.center - self.width80 / 2

    @property
    def end(self) -> float:
        return self.center + self.width80 / 2


def robust_sigma(y: np.ndarray) -> float:
    """Noise standard deviation from the MAD of first differences (steps and trends barely move it)."""
    y = np.asarray(y, dtype=np.float64)
    if y.size < 3:
        return float(np.std(y)) or 1e-12
    d = np.diff(y)
    mad = np.median(np.abs(d - np.median(d)))
    s = MAD_TO_SIGMA * mad / np.sqrt(2.0)
    if s <= 0:  # quantised or constant series: fall back to the plain std of differences
        s = float(np.std(d)) / np.sqrt(2.0)
    return float(s) if s > 0 else 1e-12


def change_points(y: np.ndarray, sigma: float, min_size: int = 3,
                  penalty_per_log_n: float = PENALTY_PER_LOG_N) -> list[int]:
    """Indices where the mean shifts (exclusive segment ends, without the final ``len(y)``)."""
    n = len(y)
    if n < 2 * min_size:
        return []
    z = (np.asarray(y, dtype=np.float64) / sigma).reshape(-1, 1)
    algo = rpt.KernelCPD(kernel="linear", min_size=min_size).fit(z)
    bkps = algo.predict(pen=penalty_per_log_n * np.log(n))
    return [int(b) for b in bkps[:-1]]


N_SCALES = 28  # log-spaced logistic scales tried per centre
EDGE_POINTS = 2


def fit_rise(t: np.ndarray, y: np.ndarray, sigma: float) -> Rise:
    """Least-squares fit of ``a + b*t + h*logistic((t - c) / s)`` on a window.

    The model is linear in (a, b, h) for fixed (c, s), so (c, s) are searched exhaustively on a
    grid (every half sample for c, ``N_SCALES`` log-spaced scales for s) and (a, b, h) solved in
    closed form for each (variable projection, Golub & Pereyra 1973): no local minima, no
    starting point, and fast because the grid is vectorised.
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    t_lo, t_hi = float(t[0]), float(t[-1])
    span = max(t_hi - t_lo, 1e-9)
    u = (t - t_lo) / span
    z = (y - y.mean()) / sigma
    v = u - 0.5
    n = u.size
    du = float(np.median(np.diff(u))) if n > 1 else 1.0
    # centres keep at least EDGE_POINTS samples on each side: a "rise" at the very edge of the
    # window is indistinguishable from the slope of whatever lies outside it.
    c_grid = np.unique(np.concatenate([u, 0.5 * (u[1:] + u[:-1])]))
    c_grid = c_grid[(c_grid > u[min(EDGE_POINTS, n - 1)]) & (c_grid < u[max(n - 1 - EDGE_POINTS, 0)])]
    if c_grid.size == 0:
        c_grid = np.array([0.5])
    s_grid = np.geomspace(max(du / 8, 1e-5), 1.0, N_SCALES)
    s1, sv, svv, sz, svz = float(n), v.sum(), (v * v).sum(), z.sum(), (v * z).sum()
    best = (np.inf, 0.0, 0.0, 0.0, 0.5, s_grid[0])
    for sc in s_grid:
        g = 1.0 / (1.0 + np.exp(-np.clip((u[None, :] - c_grid[:, None]) / sc, -60, 60)))  # (C, n)
        sg, sgg, sgv, sgz = g.sum(1), (g * g).sum(1), g @ v, g @ z
        xtx = np.empty((c_grid.size, 3, 3))
        xtx[:, 0, 0], xtx[:, 0, 1], xtx[:, 1, 1] = s1, sv, svv
        xtx[:, 0, 2] = xtx[:, 2, 0] = sg
        xtx[:, 1, 2] = xtx[:, 2, 1] = sgv
        xtx[:, 1, 0] = sv
        xtx[:, 2, 2] = sgg
        xtz = np.stack([np.full(c_grid.size, sz), np.full(c_grid.size, svz), sgz], axis=1)
        xtx[:, [0, 1, 2], [0, 1, 2]] += 1e-9  # keep the solve defined when g is constant
        beta = np.linalg.solve(xtx, xtz[..., None])[..., 0]
        sse = (z * z).sum() - (beta * xtz).sum(1)  # residual sum of squares at the LS optimum
        i = int(np.argmin(sse))
        if sse[i] < best[0]:
            best = (float(sse[i]), *beta[i], float(c_grid[i]), float(sc))
    _, a, b, h, c, sc = best
    center = t_lo + c * span
    width80 = WIDTH80_PER_SCALE * sc * span
    before = y.mean() + sigma * (a + b * (c - 0.5))
    return Rise(float(center), float(width80), float(h * sigma), float(before), float(before + h * sigma), sigma)


def find_rises(t: np.ndarray, y: np.ndarray, sigma: float | None = None, min_size: int = 3,
               penalty_per_log_n: float = PENALTY_PER_LOG_N, merge_gap_frac: float = 0.1,
               min_level_sigma: float = 1.0) -> list[Rise]:
    """Monotone transitions (rises and drops) with their fitted shape, in step order.

    Transitions whose raw level change is below ``min_level_sigma`` noise sigmas are not fitted.
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    if n < MIN_POINTS:
        return []
    sigma = robust_sigma(y) if sigma is None else sigma
    cps = change_points(y, sigma, min_size=min_size, penalty_per_log_n=penalty_per_log_n)
    if not cps:
        return []
    bounds = [0, *cps, n]
    means = [y[bounds[i]:bounds[i + 1]].mean() for i in range(len(bounds) - 1)]
    # group consecutive change points that move the level the same way
    # (a rise split into several steps by the search), as long as the plateau between them is
    # shorter than ``merge_gap`` steps; longer plateaus separate distinct transitions.
    merge_gap = merge_gap_frac * float(t[-1] - t[0])
    groups: list[list[int]] = []
    for j in range(len(cps)):
        sign = np.sign(means[j + 1] - means[j])
        if groups:
            k = groups[-1][-1]
            gap = float(t[cps[j] - 1] - t[cps[k]])
            if np.sign(means[k + 1] - means[k]) == sign and gap <= merge_gap:
                groups[-1].append(j)
                continue
        groups.append([j])
    rises = []
    for g in groups:
        if abs(means[g[-1] + 1] - means[g[0]]) < min_level_sigma * sigma:
            continue  # too small to matter to any caller: skip the fit
        lo = bounds[g[0]]  # start of the segment before the first change point
        hi = bounds[g[-1] + 2]  # end of the segment after the last change point
        rises.append(fit_rise(t[lo:hi], y[lo:hi], sigma))
    return rises


def running_median(y: np.ndarray, window: int) -> np.ndarray:
    """Centred running median with a window shrinking at the edges."""
    y = np.asarray(y, dtype=np.float64)
    half = max(window // 2, 0)
    return np.array([np.median(y[max(0, i - half):i + half + 1]) for i in range(y.size)])


@dataclass(frozen=True)
class Growth:
    """A sustained rise found by a trend test (reflection rate, response length)."""

    center: float  # step where the smoothed curve first reaches 50% of the rise
    start: float  # ... 10%
    end: float  # ... 90%
    before: float  # level at the start of the run (median of the first 10%)
    after: float  # level at the end (median of the last 10%)
    score: float  # rise / sigma
    tau: float  # Kendall's tau of value vs step
    p_value: float


def sustained_growth(t: np.ndarray, y: np.ndarray, min_sigma: float, sigma: float | None = None,
                     p_max: float = 1e-3) -> Growth | None:
    """A significant monotone rise that holds to the end of the run, or None.

    Needs a Mann-Kendall-style trend (Kendall's tau > 0, p < ``p_max``) *and* an end level at least
    ``min_sigma`` noise standard deviations above the start level, so a flat noisy curve or a rise
    that falls back does not count.
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    if n < MIN_POINTS:
        return None
    sigma = robust_sigma(y) if sigma is None else sigma
    edge = max(3, n // 10)
    before = float(np.median(y[:edge]))
    after = float(np.median(y[-edge:]))
    rise = after - before
    if rise < min_sigma * sigma:
        return None
    tau, p = kendalltau(t, y)
    if not (tau > 0 and p < p_max):
        return None
    smooth = running_median(y, max(3, n // 20) | 1)

    def crossing(q: float) -> float:
        idx = np.nonzero(smooth >= before + q * rise)[0]
        return float(t[idx[0]]) if idx.size else float(t[-1])

    return Growth(crossing(0.5), crossing(0.1), crossing(0.9), before, after, rise / sigma, float(tau), float(p))


@dataclass(frozen=True)
class Knee:
    step: float
    slope_before: float  # least-squares slope per step before the knee
    slope_after: float
    width: float  # steps where the curve stays within 90% of its maximal distance to the chord
    drop_sigma: float  # total decrease / sigma
    bend: float  # maximal distance to the chord on the normalised curve (0..1)


def find_knee(t: np.ndarray, y: np.ndarray, min_sigma: float, sigma: float | None = None,
              min_bend: float = 0.1) -> Knee | None:
    """The knee of a decreasing convex curve (a loss), Kneedle-style (Satopaa et al. 2011).

    On the smoothed, min-max normalised curve the knee is the point farthest below the chord from
    the first to the last point; it is reported when that distance is at least ``min_bend`` and
    the total drop is at least ``min_sigma`` noise standard deviations.
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    if n < MIN_POINTS:
        return None
    sigma = robust_sigma(y) if sigma is None else sigma
    smooth = running_median(y, max(3, n // 20) | 1)
    drop = smooth[0] - smooth[-1]
    if drop < min_sigma * sigma:
        return None
    rng = smooth.max() - smooth.min()
    u = (t - t[0]) / max(t[-1] - t[0], 1e-9)
    yn = (smooth - smooth.min()) / rng
    chord = yn[0] + (yn[-1] - yn[0]) * u
    dist = chord - yn
    i = int(np.argmax(dist))
    if dist[i] < min_bend or i < 2 or i > n - 3:
        return None
    near = np.nonzero(dist >= 0.9 * dist[i])[0]
    slope_b = float(np.polyfit(t[: i + 1], y[: i + 1], 1)[0])
    slope_a = float(np.polyfit(t[i:], y[i:], 1)[0])
    return Knee(float(t[i]), slope_b, slope_a, float(t[near[-1]] - t[near[0]]), float(drop / sigma), float(dist[i]))


def _raw_shift(t: np.ndarray, y: np.ndarray, r: Rise, limit: float) -> float:
    """Model-free level change: median after the rise minus median before it (``MIN_SIDE``+ samples each).

    Guards the logistic+linear fit against explaining a short excursion as "trend + step" (the
    linear term can cancel most of a step, so a dip-and-return can fit as a large rise).
    """
    pre_idx = np.nonzero(t < r.start)[0]
    post_idx = np.nonzero(t > r.end)[0]
    pre = pre_idx[t[pre_idx] >= r.start - 2 * limit]
    post = post_idx[t[post_idx] <= r.end + 2 * limit]
    pre = pre if pre.size >= MIN_SIDE else pre_idx[-MIN_SIDE:]
    post = post if post.size >= MIN_SIDE else post_idx[:MIN_SIDE]
    return float(np.median(y[post]) - np.median(y[pre]))


def find_jumps(t: np.ndarray, y: np.ndarray, min_sigma: float, max_width_frac: float = 0.1,
               direction: int = 1, sigma: float | None = None,
               penalty_per_log_n: float = PENALTY_PER_LOG_N) -> list[Rise]:
    """Abrupt rises (``direction=1``) or drops (``-1``): height >= ``min_sigma`` sigma, width <= frac * run.

    Each candidate from :func:`find_rises` is refitted on a wide window (the candidate's width plus
    ``2 * max_width_frac`` of the run on each side): a piece of a slow trend that looked like a
    step between two neighbouring plateaus of the change-point search then shows up as part of a
    smooth slope (wide fit or small height) and is dropped.
    """
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sigma = robust_sigma(y) if sigma is None else sigma
    span = float(t[-1] - t[0])
    limit = max_width_frac * span
    out = []
    for r in find_rises(t, y, sigma, min_level_sigma=0.5 * min_sigma, penalty_per_log_n=penalty_per_log_n):
        if np.sign(r.height) != direction or r.height_sigma < min_sigma or r.width80 > limit:
            continue
        half = r.width80 / 2 + 2 * limit
        m = (t >= r.center - half) & (t <= r.center + half)
        if m.sum() < MIN_POINTS:
            continue
        w = fit_rise(t[m], y[m], sigma)
        if (np.sign(w.height) == direction and w.height_sigma >= min_sigma and w.width80 <= limit
                and abs(w.center - r.center) <= limit
                and np.sum(t < w.start) >= MIN_SIDE and np.sum(t > w.end) >= MIN_SIDE
                and _raw_shift(t, y, w, limit) * direction >= 0.5 * abs(w.height)):
            out.append(w)
    return out
