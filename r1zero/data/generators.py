"""Domain generator registry and the saturation-aware (difficulty, family) sampler.

Each domain module (``gen_math``, ``gen_code``, ``gen_cross``, ``gen_general``) exposes
``FAMILIES = {name: (fn, lowest_difficulty, weight)}`` and ``generate(rng, difficulty, family)``.
A *cell* is one (difficulty, family) pair; difficulty is uniform over 1..max_difficulty and the
family is weighted among those eligible at that difficulty.

Small cells run out of distinct items (difficulty-1 addition has ~5k problems; a 1M-row mix asks
for far more). :class:`CellSampler` watches each cell's acceptance rate (rows surviving dedup and
decontamination) over windows of ``WINDOW`` tries and retires a cell whose rate falls below
``SATURATED``; the other cells' probabilities are renormalised. The achieved difficulty/family
histogram goes into the manifest, so the shift is visible, never silent. When every cell of a
domain is retired the domain is *exhausted* and its quota shortfall is reported.

    python -c "import random; from r1zero.data.generators import CellSampler; \\
               s = CellSampler('math', 2, random.Random(0)); print(s.draw())"
"""

from __future__ import annotations

import bisect
import random
from collections import Counter

from r1zero.data import gen_code, gen_cross, gen_general, gen_math

MODULES = {"math": gen_math, "code": gen_code, "cross": gen_cross, "general": gen_general}
WINDOW = 64  # tries per acceptance window
SATURATED = 0.25  # retire a cell once fewer than 1 in 4 of its fresh items survive dedup


def cells(domain: str, max_difficulty: int) -> dict[tuple[int, str], float]:
    """(difficulty, family) -> probability, before any retirement."""
    fams = MODULES[domain].FAMILIES
    out = {}
    for d in range(1, max_difficulty + 1):
        eligible = {n: w for n, (_, lo, w) in fams.items() if lo <= d}
        total = sum(eligible.values())
        for n, w in eligible.items():
            out[(d, n)] = w / total / max_difficulty
    return out


class CellSampler:
    """Draws (difficulty, family) for one (split, domain) stream; retires saturated cells."""

    def __init__(self, domain: str, max_difficulty: int, rng: random.Random):
        self.domain, self.rng = domain, rng
        self.probs = cells(domain, max_difficulty)
        self.active = sorted(self.probs)
        self.retired: list[tuple[int, str]] = []
        self._tries: Counter = Counter()
        self._accepts: Counter = Counter()
        self.kept: Counter = Counter()  # accepted rows per cell (manifest histogram)
        self._rebuild()

    def _rebuild(self) -> None:
        acc, cum = 0.0, []
        for c in self.active:
            acc += self.probs[c]
            cum.append(acc)
        self._cum = cum

    @property
    def exhausted(self) -> bool:
        return not self.active

    def draw(self) -> tuple[int, str]:
        u = self.rng.random() * self._cum[-1]
        return self.active[min(bisect.bisect_right(self._cum, u), len(self.active) - 1)]

    def generate(self) -> tuple[int, str, dict]:
        difficulty, family = self.draw()
        return difficulty, family, MODULES[self.domain].generate(self.rng, difficulty, family)

    def record(self, cell: tuple[int, str], accepted: bool) -> None:
        self._tries[cell] += 1
        self._accepts[cell] += accepted
        self.kept[cell] += accepted
        if self._tries[cell] >= WINDOW:
            if self._accepts[cell] < SATURATED * self._tries[cell] and cell in self.active:
                self.active.remove(cell)
                self.retired.append(cell)
                self._rebuild()
            self._tries[cell] = self._accepts[cell] = 0
