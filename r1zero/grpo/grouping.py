"""The article's dynamic grouping: spectral clusters of prompt embeddings, re-split and merged.

``grpo.grouping`` (off by default):

1. Embed every RL prompt as the mean of the policy's final hidden states over its tokens (the
   input of ``lm_head``, captured by a hook, so any causal LM works) and L2-normalise.
2. scikit-learn ``SpectralClustering`` (k-nearest-neighbour affinity, ``random_state=seed``) splits
   them into ``k`` groups (default 4).
3. Every ``recluster_every`` steps, with per-prompt pass rates p_i from the rollouts
   (:class:`r1zero.grpo.adaptive.PassRateTracker`), a group whose *spread* - the population std of
   p_i over its visited prompts - exceeds ``spread_threshold`` is re-split in two (spectral again
   on its members; at least 4 members, at least 4 visited). Then, while there are more than 2k
   groups, the two groups with the closest mean pass rate are merged. Group ids are then
   renumbered 0..n-1 in order of their smallest member.
4. Curriculum: a step draws its prompts group by group with probability proportional to
   ``w_g = mean_i 4 p_i (1 - p_i) + 0.05`` (unvisited prompts count as p = 0.5), i.e. most samples
   go where outcomes are uncertain and GRPO groups carry signal; the 0.05 floor keeps every group
   in play.
5. Reporting: ``grpo/groups/n``, ``grpo/group/<g>/pass_rate``, ``grpo/group/<g>/size`` and the
   spread across groups ``grpo/groups/spread``.

Legend: N = prompts, D = hidden size.
"""

from __future__ import annotations

import numpy as np
import torch

from r1zero.generate import left_pad

WEIGHT_FLOOR = 0.05
MIN_SPLIT = 4


@torch.no_grad()
def prompt_embeddings(model, prompt_ids: list[list[int]], pad_id: int, batch: int = 64) -> np.ndarray:
    """Mean final hidden state per prompt, L2-normalised -> emb_ND."""
    captured = {}
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0]))
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for s in range(0, len(prompt_ids), batch):
            ids_BL, mask_BL = (t.to(dev) for t in left_pad(prompt_ids[s:s + batch], pad_id))
            pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, use_cache=False)
            h_BLD = captured["h"].float()
            m = mask_BL[..., None].float()
            out.append(((h_BLD * m).sum(1) / m.sum(1).clamp(min=1)).cpu().numpy())
    finally:
        handle.remove()
        model.train(was)
    emb_ND = np.concatenate(out, 0)
    return emb_ND / np.maximum(np.linalg.norm(emb_ND, axis=1, keepdims=True), 1e-12)


def spectral(emb_ND: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spectral cluster labels (k-NN affinity); fewer points than clusters -> one cluster each."""
    from sklearn.cluster import SpectralClustering

    n = emb_ND.shape[0]
    if n <= k:
        return np.arange(n)
    sc = SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=min(10, n - 1),
                            random_state=seed, assign_labels="kmeans")
    return sc.fit_predict(emb_ND)


class DynamicGroups:
    """Prompt -> group labels with split/merge by pass-rate spread."""

    def __init__(self, emb_ND: np.ndarray, labels_N: np.ndarray, cfg, seed: int):
        self.emb, self.cfg, self.seed = emb_ND, cfg, seed
        self.labels = np.asarray(labels_N, dtype=np.int64)
        self._renumber()
        self.splits = 0
        self.merges = 0

    @classmethod
    def build(cls, model, entries, cfg, seed: int) -> DynamicGroups:
        emb = prompt_embeddings(model, [e.ids for e in entries], _pad_of(model))
        return cls(emb, spectral(emb, cfg.k, seed), cfg, seed)

    # -- queries -------------------------------------------------------------------------
    def n_groups(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def members(self) -> list[list[int]]:
        return [np.flatnonzero(self.labels == g).tolist() for g in range(self.n_groups())]

    def label_of(self, prompt: int) -> int:
        return int(self.labels[prompt])

    def _rates(self, members: list[int], tracker) -> list[float]:
        return [r for r in (tracker.get(p) for p in members) if r is not None]

    def weights(self, tracker) -> list[float]:
        out = []
        for m in self.members():
            ps = [tracker.get(p) for p in m]
            u = [4 * (0.5 if p is None else p) * (1 - (0.5 if p is None else p)) for p in ps]
            out.append(float(np.mean(u)) + WEIGHT_FLOOR if u else 0.0)
        return out

    def report(self, tracker) -> dict[str, float]:
        out = {"grpo/groups/n": float(self.n_groups())}
        means = []
        for g, m in enumerate(self.members()):
            rates = self._rates(m, tracker)
            pr = float(np.mean(rates)) if rates else 0.0
            if rates:
                means.append(pr)
            out[f"grpo/group/{g}/pass_rate"] = pr
            out[f"grpo/group/{g}/size"] = float(len(m))
        out["grpo/groups/spread"] = float(max(means) - min(means)) if len(means) > 1 else 0.0
        return out

    # -- updates -------------------------------------------------------------------------
    def regroup(self, tracker) -> None:
        """Split groups whose pass-rate spread exceeds the threshold, then merge down to 2k."""
        labels = self.labels.copy()
        nxt = int(labels.max()) + 1
        for g, m in enumerate(self.members()):
            rates = self._rates(m, tracker)
            if len(m) >= MIN_SPLIT and len(rates) >= MIN_SPLIT and float(np.std(rates)) > self.cfg.spread_threshold:
                sub = spectral(self.emb[m], 2, self.seed + g)
                if len(set(sub.tolist())) == 2:
                    idx = np.asarray(m)
                    labels[idx[sub == 1]] = nxt
                    nxt += 1
                    self.splits += 1
        self.labels = labels
        self._renumber()
        while self.n_groups() > 2 * self.cfg.k:
            means = []
            for m in self.members():
                rates = self._rates(m, tracker)
                means.append(float(np.mean(rates)) if rates else 0.5)
            best = None
            for a in range(len(means)):
                for b in range(a + 1, len(means)):
                    d = abs(means[a] - means[b])
                    if best is None or d < best[0]:
                        best = (d, a, b)
            _, a, b = best
            self.labels[self.labels == b] = a
            self.merges += 1
            self._renumber()

    def _renumber(self) -> None:
        order = {}
        for lab in self.labels.tolist():
            order.setdefault(lab, len(order))
        self.labels = np.asarray([order[x] for x in self.labels.tolist()], dtype=np.int64)

    def state(self) -> dict:
        return {"labels": self.labels.tolist(), "splits": self.splits, "merges": self.merges}

    def load(self, st: dict) -> None:
        self.labels = np.asarray(st["labels"], dtype=np.int64)
        self.splits, self.merges = int(st["splits"]), int(st["merges"])


def _pad_of(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0
