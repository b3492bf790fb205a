"""Adaptive GRPO: the group size of each prompt follows its measured pass rate.

A group is informative when its rewards differ; for a binary reward with pass rate p the chance
that G samples are *not* all equal is 1 - p^G - (1-p)^G, and the variance of the reward is
p(1-p). We spend samples where p(1-p) is high:

    u_i = 4 * p_i * (1 - p_i)                      (in [0, 1], 1 at p = 0.5)
    G_i = min_group + round((max_group - min_group) * u_i)

``p_i`` is an exponential moving average of the prompt's accuracy over its past groups
(``ALPHA`` = 0.5), initialised on first visit. A prompt not seen yet takes the pass rate of its
*stratum* (``adaptive.stratum_prior``, default on): the prompts from the same source (generator
family or import) at the same difficulty, an EMA over that stratum's recent groups
(``STRATUM_ALPHA``). Without it, or for a stratum not seen yet, the prompt gets the configured
``grpo.group_size``. Why the stratum: an RL run usually visits most prompts once (the tiny preset's
8-minute run draws ~13k of 18k prompts), so per-prompt estimates alone would almost never apply.
The article names adaptive group sizes as GRPO's future direction; this is one concrete rule for it.
"""

from __future__ import annotations

ALPHA = 0.5  # EMA weight of the newest group's pass rate
# a stratum gets several groups per step: weight 0.05 averages over its last ~20 groups
STRATUM_ALPHA = 0.05


def stratum_of(item: dict) -> str:
    """Prompts expected to be alike in difficulty: same source and difficulty (``gen:math/linear/d2``)."""
    return f"{item.get('source') or item.get('domain', '?')}/d{item.get('difficulty', '?')}"


class PassRateTracker:
    """Per-prompt pass-rate estimates (EMA), serialisable for checkpoints."""

    def __init__(self, strata: list[str] | None = None):
        self.rate: dict[int, float] = {}
        self.visits: dict[int, int] = {}
        self.strata = strata  # stratum per prompt index (see stratum_of); None: no stratum prior
        self.stratum_rate: dict[str, float] = {}

    def update(self, prompt: int, accuracy: float) -> None:
        old = self.rate.get(prompt)
        self.rate[prompt] = accuracy if old is None else (1 - ALPHA) * old + ALPHA * accuracy
        self.visits[prompt] = self.visits.get(prompt, 0) + 1
        if self.strata is not None:
            s = self.strata[prompt]
            old = self.stratum_rate.get(s)
            self.stratum_rate[s] = accuracy if old is None else (1 - STRATUM_ALPHA) * old + STRATUM_ALPHA * accuracy

    def get(self, prompt: int) -> float | None:
        """The prompt's own pass-rate estimate (None before its first group)."""
        return self.rate.get(prompt)

    def estimate(self, prompt: int) -> float | None:
        """The prompt's estimate, else its stratum's, else None (what adaptive group sizes use)."""
        r = self.rate.get(prompt)
        if r is None and self.strata is not None:
            r = self.stratum_rate.get(self.strata[prompt])
        return r

    def state(self) -> dict:
        return {"rate": {str(k): v for k, v in self.rate.items()},
                "visits": {str(k): v for k, v in self.visits.items()},
                "stratum_rate": dict(self.stratum_rate)}

    def load(self, st: dict) -> None:
        self.rate = {int(k): float(v) for k, v in st.get("rate", {}).items()}
        self.visits = {int(k): int(v) for k, v in st.get("visits", {}).items()}
        self.stratum_rate = {str(k): float(v) for k, v in st.get("stratum_rate", {}).items()}


def group_size(pass_rate: float | None, default: int, min_group: int, max_group: int) -> int:
    """G for one prompt (see module docstring)."""
    if pass_rate is None:
        return default
    u = 4.0 * pass_rate * (1.0 - pass_rate)
    return int(min_group + round((max_group - min_group) * u))
