"""Which prompts a GRPO step trains on: deterministic epoch order, curriculum, dynamic sampling.

- :class:`PromptStream` walks the RL prompt pool in a per-epoch permutation seeded by
  ``(seed, epoch)``; its only state is an integer cursor, so a checkpoint restores it exactly and
  every data-parallel rank computes the same global batch.
- With spectral grouping on, :meth:`PromptStream.take_weighted` draws a group by weight (the
  curriculum from :mod:`r1zero.grpo.grouping`) and then the group's next prompt in its own
  permutation (one cursor per group).
- Dynamic sampling (DAPO, arXiv 2503.14476 sec. 3.2): groups whose rewards are all equal carry no
  GRPO signal (zero advantage); :func:`keep_informative` drops them and the trainer refills the
  batch with fresh prompts, at most ``grpo.max_refills`` extra rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _perm(n: int, seed: int, epoch: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, epoch, salt]).permutation(n)


class PromptStream:
    """Deterministic, resumable stream of prompt indices ``0..n-1``."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("no RL prompts")
        self.n, self.seed = n, seed
        self.cursor = 0
        self.group_cursors: dict[int, int] = {}
        self._cache: dict[tuple, np.ndarray] = {}

    def _order(self, epoch: int, salt: int = 0, size: int | None = None) -> np.ndarray:
        key = (epoch, salt, size)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = _perm(self.n if size is None else size, self.seed, epoch, salt)
        return self._cache[key]

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, pos = divmod(self.cursor, self.n)
            out.append(int(self._order(epoch)[pos]))
            self.cursor += 1
        return out

    def take_weighted(self, k: int, members: Sequence[Sequence[int]], weights: Sequence[float],
                      step: int) -> list[int]:
        """``k`` prompts: a group drawn with probability proportional to ``weights``, then its next member."""
        w = np.asarray(weights, dtype=np.float64)
        w = np.where([len(m) > 0 for m in members], w, 0.0)
        if w.sum() <= 0:
            return self.take(k)
        rng = np.random.default_rng([self.seed, step, 7919, self.cursor])
        picks = rng.choice(len(members), size=k, p=w / w.sum())
        out = []
        for g in picks.tolist():
            m = members[g]
            c = self.group_cursors.get(g, 0)
            epoch, pos = divmod(c, len(m))
            out.append(int(m[int(self._order(epoch, 1000 + g, len(m))[pos])]))
            self.group_cursors[g] = c + 1
        self.cursor += k  # keeps refill rounds' seeds distinct
        return out

    def state(self) -> dict:
        return {"cursor": self.cursor, "group_cursors": {str(k): v for k, v in self.group_cursors.items()}}

    def load(self, st: dict) -> None:
        self.cursor = int(st["cursor"])
        self.group_cursors = {int(k): int(v) for k, v in st.get("group_cursors", {}).items()}

    def reset_groups(self) -> None:
        """Forget per-group positions (after a regrouping the member lists change)."""
        self.group_cursors = {}


def keep_informative(rewards_per_group: Sequence[Sequence[float]], tol: float = 1e-9) -> list[bool]:
    """True for groups whose rewards are not all equal (a group of one is never informative)."""
    return [len(r) > 1 and (max(r) - min(r)) > tol for r in rewards_per_group]
