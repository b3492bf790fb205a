"""Adaptive GRPO: the group size of each prompt follows its measured pass rate.

A group is informative when its rewards differ; for a binary reward with pass rate p the chance
that G samples are *not* all equal is 1 - p^G - (1-p)^G, and the variance of the reward is
p(1-p). We spend samples where p(1-p) is high:

    u_i = 4 * p_i * (1 - p_i)                      (in [0, 1], 1 at p = 0.5)
    G_i = min_group + round((max_group - min_group) * u_i)

``p_i`` is an exponential moving average of the prompt's accuracy over its past groups
(``ALPHA`` = 0.5), initialised on first visit; a never-seen prompt gets the configured
``grpo.group_size``. The article names adaptive group sizes as GRPO's future direction; this is
one concrete rule for it.
"""

from __future__ import annotations

ALPHA = 0.5  # EMA weight of the newest group's pass rate


class PassRateTracker:
    """Per-prompt pass-rate estimates (EMA), serialisable for checkpoints."""

    def __init__(self):
        self.rate: dict[int, float] = {}
        self.visits: dict[int, int] = {}

    def update(self, prompt: int, accuracy: float) -> None:
        old = self.rate.get(prompt)
        self.rate[prompt] = accuracy if old is None else (1 - ALPHA) * old + ALPHA * accuracy
        self.visits[prompt] = self.visits.get(prompt, 0) + 1

    def get(self, prompt: int) -> float | None:
        return self.rate.get(prompt)

    def state(self) -> dict:
        return {"rate": {str(k): v for k, v in self.rate.items()},
                "visits": {str(k): v for k, v in self.visits.items()}}

    def load(self, st: dict) -> None:
        self.rate = {int(k): float(v) for k, v in st.get("rate", {}).items()}
        self.visits = {int(k): int(v) for k, v in st.get("visits", {}).items()}


def group_size(pass_rate: float | None, default: int, min_group: int, max_group: int) -> int:
    """G for one prompt (see module docstring)."""
    if pass_rate is None:
        return default
    u = 4.0 * pass_rate * (1.0 - pass_rate)
    return int(min_group + round((max_group - min_group) * u))
