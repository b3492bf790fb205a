"""Pure evaluation metrics: pass@k, maj@k, reflection-keyword hits, bootstrap confidence intervals.

Everything here is a pure function of plain Python/numpy values (no model, no I/O), so it is unit
tested exhaustively and reused by :mod:`r1zero.eval.evaluate`, the GRPO trainer and the insight
detectors.

    from r1zero.eval.metrics import pass_at_k, bootstrap_ci
    pass_at_k(n=16, c=3, k=4)            # unbiased estimator, Chen et al. 2021
    bootstrap_ci([0, 1, 1, 0], n_boot=1000, seed=0)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# ---------------------------------------------------------------------------------------------
# pass@k / maj@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as a product (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    arXiv 2107.03374, Fig. 3) so large ``n`` never overflows.
    """
    if n < 1 or k < 1:
        raise ValueError(f"pass_at_k needs n >= 1 and k >= 1 (got n={n}, k={k})")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n (got c={c}, n={n})")
    if k > n:
        raise ValueError(f"pass_at_k needs k <= n (got k={k}, n={n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


_WS = re.compile(r"\s+")
_BOXED = re.compile(r"^\\boxed\{(.*)\}$")


def normalize_answer(answer: str | None) -> str | None:
    """Canonical form for voting: trimmed, lower-case, single spaces, no ``$``/``\\boxed{}``/final dot."""
    if answer is None:
        return None
    s = _WS.sub(" ", str(answer)).strip()
    s = s.strip("$").strip()
    m = _BOXED.match(s)
    if m:
        s = m.group(1).strip()
    s = s.rstrip(".").strip().lower()
    return s or None


def vote_classes(answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None = None) -> list[int | None]:
    """Equivalence class of each answer (index of its class's first answer; None for no answer).

    Two answers share a class when they normalise equally or ``equivalent(representative, answer)``
    (the verifier's equivalence, so ``1/2`` and ``0.5`` are one vote). Classes are formed greedily
    in order: an answer joins the first class whose representative it is equivalent to.
    """
    normed = [normalize_answer(a) for a in answers]
    reps: list[int] = []  # index of each class's first answer
    out: list[int | None] = []
    for i, n in enumerate(normed):
        if n is None:
            out.append(None)
            continue
        cls = next((r for r in reps if normed[r] == n
                    or (equivalent is not None and equivalent(str(answers[r]), str(answers[i])))), None)
        if cls is None:
            reps.append(i)
            cls = i
        out.append(cls)
    return out


def majority_vote(answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None = None) -> str | None:
    """The normalised representative of the largest answer class; ties go to the earliest class."""
    classes = vote_classes(answers, equivalent)
    counts = Counter(c for c in classes if c is not None)
    if not counts:
        return None
    best = max(counts.values())
    return normalize_answer(answers[next(c for c in classes if c is not None and counts[c] == best)])


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int,
             equivalent: Callable[[str, str], bool] | None = None) -> bool:
    """maj@k: is the majority answer among the first ``k`` samples a correct one?

    ``correct[i]`` is the verifier's verdict on ``answers[i]``. Votes are grouped by
    :func:`vote_classes` (``equivalent``: the verifier's answer equivalence; None = normalised
    string equality); the winning class counts as correct when any sample in it was verified correct.
    """
    if len(answers) != len(correct):
        raise ValueError("answers and correct must have the same length")
    if k < 1:
        raise ValueError(f"maj_at_k needs k >= 1 (got {k})")
    classes = vote_classes(list(answers[:k]), equivalent)
    counts = Counter(c for c in classes if c is not None)
    if not counts:
        return False
    best = max(counts.values())
    winner = next(c for c in classes if c is not None and counts[c] == best)
    return any(bool(ok) and c == winner for c, ok in zip(classes, correct[:k]))


# ---------------------------------------------------------------------------------------------
# reflection keywords


@lru_cache(maxsize=32)
def _keyword_regex(keywords: tuple[str, ...]) -> re.Pattern:
    # Word-bounded so "wait" does not match "awaited"; multi-word keywords match any whitespace.
    parts = [r"\s+".join(re.escape(w) for w in kw.lower().split()) for kw in keywords if kw.strip()]
    if not parts:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"(?<![\w-])(?:" + "|".join(sorted(parts, key=len, reverse=True)) + r")(?![\w-])",
                      re.IGNORECASE)


def count_reflection(text: str, keywords: Iterable[str]) -> int:
    """Number of reflection-keyword occurrences in ``text`` (case-insensitive, whole words)."""
    return len(_keyword_regex(tuple(keywords)).findall(text or ""))


def has_reflection(text: str, keywords: Iterable[str]) -> bool:
    """Does ``text`` contain at least one reflection keyword (DeepSeek / oat-zero lists)?"""
    return _keyword_regex(tuple(keywords)).search(text or "") is not None


# ---------------------------------------------------------------------------------------------
# bootstrap


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap confidence interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """Mean of ``values`` with a (1 - alpha) percentile bootstrap CI (Efron & Tibshirani 1993, ch. 13).

    Resamples items with replacement ``n_boot`` times; deterministic for a given ``seed``. An empty
    input gives NaNs; a single value gives a zero-width interval.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.size))


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over paired items (same problems) with a percentile bootstrap CI."""
    if len(a) != len(b):
        raise ValueError(f"paired bootstrap needs equal lengths (got {len(a)} and {len(b)})")
    diff = np.asarray(list(a), dtype=np.float64) - np.asarray(list(b), dtype=np.float64)
    return bootstrap_ci(diff, n_boot=n_boot, alpha=alpha, seed=seed)


def unpaired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, alpha: float = 0.05,
                            seed: int = 0) -> Estimate:
    """Difference of means ``mean(a) - mean(b)`` of independent samples with a bootstrap CI."""
    xa = np.asarray(list(a), dtype=np.float64)
    xb = np.asarray(list(b), dtype=np.float64)
    if xa.size == 0 or xb.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    ma = xa[rng.integers(0, xa.size, size=(n_boot, xa.size))].mean(axis=1)
    mb = xb[rng.integers(0, xb.size, size=(n_boot, xb.size))].mean(axis=1)
    lo, hi = np.quantile(ma - mb, [alpha / 2, 1 - alpha / 2])
    return Estimate(float(xa.mean() - xb.mean()), float(lo), float(hi), int(min(xa.size, xb.size)))


def length_summary(lengths: Sequence[int | float]) -> dict[str, float]:
    """Mean / median / p90 / max of response lengths (tokens); zeros for an empty list."""
    x = np.asarray(list(lengths), dtype=np.float64)
    if x.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    return {"mean": float(x.mean()), "p50": float(np.median(x)), "p90": float(np.quantile(x, 0.9)),
            "max": float(x.max())}
