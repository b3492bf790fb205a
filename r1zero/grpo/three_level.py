"""The article's three-level reward (optional, ``grpo.reward.three_level``; off by default).

    R_3L = l_b * base + l_g * group + l_G * global          (grpo.reward.level_weights)
    base   = 0.6 task + 0.3 consistency + 0.1 novelty        (grpo.reward.base_weights)
    group  = 0.7 rank + 0.3 transfer                         (grpo.reward.group_weights)
    global = 0.5 progress + 0.5 diversity                    (grpo.reward.global_weights)

Each term lies in [0, 1] (progress in [-1, 1]) and is defined per completion i of group g:

- task: 1 if the answer is verified correct, else 0 (the accuracy reward).
- consistency: 1 if the response is well formatted and its final answer string occurs in the
  reasoning (the text before ``</think>``), i.e. the answer follows from what was reasoned; else 0.
- novelty: 1 - max_j Jaccard(trigrams_i, trigrams_j) over the other completions j of the same group
  (token trigrams of the decoded text, whitespace-split); 1 for a group of one.
- rank: the average-tie rank of the completion's *base* reward inside its group, scaled to [0, 1]
  ((rank - 1) / (G - 1); 0.5 when G = 1).
- transfer: mean task accuracy, in this step's batch, of the *other* prompts of the same spectral
  group (:mod:`r1zero.grpo.grouping`; the data domain when grouping is off); 0 when there is none.
  It rewards skills that carry over between similar problems.
- progress: the batch accuracy of this completion's spectral group this step minus that group's
  exponential moving average (EMA weight 0.1) before this step, clipped to [-1, 1].
- diversity: fraction of the completion's distinct trigrams not present in a global buffer of the
  trigrams of the last ``BUFFER_STEPS`` steps' completions (1 for an empty completion's "nothing
  new" is avoided: empty text scores 0).

Terms that are constant inside a group (transfer, progress) shift every completion of the group
equally, so they cancel in group-normalised GRPO advantages; they only matter with
``grpo.advantage: batch`` or PPO. The default ``level_weights`` [1, 0, 0] therefore uses only the
base level. The value added to the reward is ``R_3L``; ``rewards.terms`` gets ``three_level``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from r1zero.template import THINK_CLOSE

BUFFER_STEPS = 4  # global novelty memory, steps
EMA = 0.1  # progress-rate EMA weight


def trigrams(text: str) -> set[tuple[str, str, str]]:
    w = text.split()
    return {tuple(w[i:i + 3]) for i in range(len(w) - 2)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def consistency(text: str, answer: str | None, formatted: bool) -> float:
    if not formatted or not answer:
        return 0.0
    reasoning = text.split(THINK_CLOSE, 1)[0]
    return 1.0 if answer in reasoning else 0.0


def novelty(grams: Sequence[set], groups: Sequence[int]) -> list[float]:
    out = []
    for i, (gi, ti) in enumerate(zip(groups, grams)):
        sims = [jaccard(ti, tj) for j, (gj, tj) in enumerate(zip(groups, grams)) if gj == gi and j != i]
        out.append(1.0 - max(sims) if sims else 1.0)
    return out


def in_group_rank(values: Sequence[float], groups: Sequence[int]) -> list[float]:
    """Average-tie rank inside each group scaled to [0, 1]."""
    out = []
    for g, v in zip(groups, values):
        peers = [values[j] for j, gj in enumerate(groups) if gj == g]
        if len(peers) == 1:
            out.append(0.5)
            continue
        below = sum(1 for p in peers if p < v)
        ties = sum(1 for p in peers if p == v)
        rank = below + (ties + 1) / 2  # 1-based average rank
        out.append((rank - 1) / (len(peers) - 1))
    return out


class ThreeLevelState:
    """Cross-step memory: per-cluster accuracy EMA and the global trigram buffer."""

    def __init__(self):
        self.ema: dict[str, float] = {}
        self.buffer: deque[set] = deque(maxlen=BUFFER_STEPS)

    def seen(self) -> set:
        out: set = set()
        for s in self.buffer:
            out |= s
        return out

    def state(self) -> dict:
        return {"ema": dict(self.ema), "buffer": [sorted(" ".join(g) for g in s) for s in self.buffer]}

    def load(self, st: dict) -> None:
        self.ema = {k: float(v) for k, v in st["ema"].items()}
        self.buffer = deque([{tuple(x.split(" ")) for x in s} for s in st["buffer"]], maxlen=BUFFER_STEPS)


def three_level_terms(texts: Sequence[str], answers: Sequence[str | None], correct: Sequence[bool],
                      formatted: Sequence[bool], groups: Sequence[int], clusters: Sequence[str],
                      state: ThreeLevelState, w) -> dict[str, list[float]]:
    """Every term and the combined ``three_level`` value per completion (``w`` = RewardConfig)."""
    grams = [trigrams(t) for t in texts]
    task = [float(c) for c in correct]
    cons = [consistency(t, a, f) for t, a, f in zip(texts, answers, formatted)]
    nov = novelty(grams, groups)
    bw = w.base_weights
    base = [bw[0] * a + bw[1] * b + bw[2] * c for a, b, c in zip(task, cons, nov)]
    rank = in_group_rank(base, groups)
    # per-group accuracy, then per-cluster transfer from the other groups
    acc_g: dict[int, list[float]] = {}
    for g, a in zip(groups, task):
        acc_g.setdefault(g, []).append(a)
    mean_g = {g: sum(v) / len(v) for g, v in acc_g.items()}
    cluster_of = {g: c for g, c in zip(groups, clusters)}
    transfer = []
    for g in groups:
        others = [mean_g[h] for h in mean_g if h != g and cluster_of[h] == cluster_of[g]]
        transfer.append(sum(others) / len(others) if others else 0.0)
    gw = w.group_weights
    group = [gw[0] * r + gw[1] * t for r, t in zip(rank, transfer)]
    # global level
    by_cluster: dict[str, list[float]] = {}
    for c, a in zip(clusters, task):
        by_cluster.setdefault(c, []).append(a)
    now = {c: sum(v) / len(v) for c, v in by_cluster.items()}
    progress = [max(-1.0, min(1.0, now[c] - state.ema.get(c, now[c]))) for c in clusters]
    seen = state.seen()
    diversity = [len(gr - seen) / len(gr) if gr else 0.0 for gr in grams]
    glw = w.global_weights
    glob = [glw[0] * p + glw[1] * d for p, d in zip(progress, diversity)]
    lw = w.level_weights
    total = [lw[0] * b + lw[1] * g + lw[2] * G for b, g, G in zip(base, group, glob)]
    # update memory after scoring (the step is judged against the past only)
    for c, v in now.items():
        state.ema[c] = v if c not in state.ema else (1 - EMA) * state.ema[c] + EMA * v
    step_grams: set = set()
    for gr in grams:
        step_grams |= gr
    state.buffer.append(step_grams)
    return {"task": task, "consistency": cons, "novelty": nov, "base": base, "rank": rank, "transfer": transfer,
            "group": group, "progress": progress, "diversity": diversity, "global": glob, "three_level": total}


def apply_three_level(roll, w, state: ThreeLevelState, cluster_of_group: Sequence[str]) -> None:
    """Add the three-level reward to a rollout's totals (in place) and record its terms.

    ``cluster_of_group[g]`` names group g's spectral group (or its data domain when grouping is off).
    """
    groups = roll.group_B.tolist()
    clusters = [str(cluster_of_group[g]) for g in groups]
    terms = three_level_terms(roll.texts, roll.reward.answers, roll.reward.correct, roll.reward.formatted,
                              groups, clusters, state, w)
    roll.reward.total = [t + x for t, x in zip(roll.reward.total, terms["three_level"])]
    for k in ("base", "group", "global", "three_level"):
        roll.reward.terms[k] = terms[k]
