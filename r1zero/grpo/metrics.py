"""Per-step GRPO metrics: reflection keywords, length stats, the JSONL writer, the step series.

Reflection rate = fraction of completions whose text contains at least one keyword of the
configured vocabulary (``grpo.reflection_keywords``; default mixes DeepSeek-R1's expert list,
Nature Extended Data Fig. 1, with the oat-zero / understand-r1-zero lists). Matching is
case-insensitive on word boundaries, so "waiting" does not count as "wait" but "re-evaluate" and
"try again" match as phrases.

:class:`MetricsWriter` appends ``{"step", "name", "value"}`` lines (the project-wide metrics
format) and can truncate a file back to a step on resume, so a resumed run's JSONL equals an
uninterrupted run's.

Train/inference consistency (:func:`rollout_consistency`): with a separate rollout engine (vLLM)
the tokens are sampled from the engine's numerics, not the trainer's. Per step the trainer logs
``|logp_train - logp_rollout|`` on the sampled tokens (mean and max) and, when
``grpo.rollout.tis_cap > 0``, weights each token's policy-gradient term by the truncated
importance ratio ``min(exp(logp_train - logp_rollout), cap)`` (TIS: Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"; verl ``tis_imp_ratio_cap``,
TRL ``vllm_importance_sampling_cap``). vLLM reports the log-prob under its *sampling*
distribution (temperature and top-p applied), so with ``top_p < 1`` the ratio also corrects for
the nucleus truncation that the update's full-softmax log-probs do not see.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from r1zero.grpo.advantages import zero_std_groups


def keyword_pattern(keywords: Iterable[str]) -> re.Pattern:
    """One regex matching any keyword as a whole word/phrase (case-insensitive)."""
    alts = sorted({k.strip().lower() for k in keywords if k.strip()}, key=len, reverse=True)
    if not alts:
        return re.compile(r"(?!x)x")  # matches nothing
    body = "|".join(r"\s+".join(re.escape(w) for w in k.split()) for k in alts)
    return re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)


def reflection_flags(texts: Sequence[str], pattern: re.Pattern) -> list[bool]:
    return [pattern.search(t) is not None for t in texts]


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def std(xs: Sequence[float]) -> float:
    """Population std (what TRL/verl log for reward std)."""
    if not xs:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def unpack_rows(rows: Sequence[Sequence[float]], mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) float tensor from per-row lists (right-padded with 0 where ``mask_BT`` is 0)."""
    out_BT = torch.zeros(mask_BT.shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out_BT[i, :len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out_BT


def rollout_consistency(train_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, mask_BT: torch.Tensor,
                        tis_cap: float) -> tuple[dict, torch.Tensor]:
    """Sums of ``|train - rollout|`` log-prob gaps on real tokens (for a cross-rank mean/max) and
    the TIS weights ``min(exp(train - rollout), cap)`` (1 everywhere when ``tis_cap`` is 0)."""
    m_BT = mask_BT.bool()
    gap_BT = (train_logp_BT.float().cpu() - rollout_logp_BT.float()).masked_fill(~m_BT, 0.0)
    absgap = gap_BT.abs()[m_BT]
    ratio_BT = gap_BT.clamp(-20.0, 20.0).exp()
    if tis_cap > 0:
        w_BT = ratio_BT.clamp(max=tis_cap).masked_fill(~m_BT, 0.0)
        clipped = float((ratio_BT[m_BT] > tis_cap).sum())
    else:
        w_BT = m_BT.float()
        clipped = 0.0
    stats = {"sum": float(absgap.sum()), "max": float(absgap.max()) if absgap.numel() else 0.0,
             "n": float(absgap.numel()), "w_sum": float(w_BT[m_BT].sum()), "w_clipped": clipped}
    return stats, w_BT


class MetricsWriter:
    """Append-only metrics JSONL with resume truncation."""

    def __init__(self, path: str | Path, run: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = run

    def truncate_after(self, step: int) -> None:
        """Drop lines with ``step > step`` (resume from a checkpoint taken at ``step``)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip() and json.loads(line)["step"] <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for name, value in values.items():
                rec = {"step": int(step), "name": name, "value": float(value)}
                if self.run:
                    rec["run"] = self.run
                f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------------------
# per-step series (over every rank's rollout summary)


def step_metrics(cfg, rolls: list[dict], upd: dict, seconds: float, pattern) -> dict[str, float]:
    """Per-step metrics from every rank's rollout summary (already gathered).

    Accuracy, reward, format, length, truncation and reflection are over ALL groups sampled this
    step (every dynamic-sampling round); ``grpo/kept/*`` repeats them over the groups the update
    trained on (with dynamic sampling those are biased toward 50% accuracy)."""
    out = population_metrics("grpo/", [r["sampled"] for r in rolls])
    out.update(population_metrics("grpo/kept/", [r["kept"] for r in rolls], short=True))
    lengths = [x for r in rolls for x in r["sampled"]["lengths"]]
    zero = [x for r in rolls for x in r["zero_std"]]
    gen_s = max(r["gen_seconds"] for r in rolls)
    out.update({
        "grpo/frac_zero_std": mean([float(z) for z in zero]),
        "grpo/kl": upd["kl_sum"] / max(upd["tokens"], 1.0),
        "grpo/clip_frac/low": upd["clip_low"] / max(upd["tokens"], 1.0),
        "grpo/clip_frac/high": upd["clip_high"] / max(upd["tokens"], 1.0),
        "grpo/entropy": upd["entropy_sum"] / max(upd["tokens"], 1.0),  # tokens: per inner iteration
        "grpo/loss": upd["loss"],
        "grpo/grad_norm": upd["grad_norm"],
        "grpo/tokens_per_s": sum(lengths) / max(seconds, 1e-9),
        "grpo/generate_tokens_per_s": sum(lengths) / max(gen_s, 1e-9),
        "grpo/step_seconds": seconds,
        "grpo/n_completions": float(sum(len(r["kept"]["total"]) for r in rolls)),
        "grpo/n_sampled": float(len(lengths)),
        "grpo/dropped_groups": float(sum(r["dropped_groups"] for r in rolls)),
        "grpo/refills": float(max(r["refills"] for r in rolls)),
        "grpo/nan_skipped": float(upd["skipped"]),
    })
    if cfg.grpo.algorithm == "ppo":
        out["grpo/value_loss"] = upd["value_loss"]
    if "logp_diff" in rolls[0]:  # rollout engine vs trainer log-probs on the sampled tokens
        n = sum(r["logp_diff"]["n"] for r in rolls)
        out["grpo/rollout_logp_diff/mean"] = sum(r["logp_diff"]["sum"] for r in rolls) / max(n, 1)
        out["grpo/rollout_logp_diff/max"] = max(r["logp_diff"]["max"] for r in rolls)
        out["grpo/tis/weight_mean"] = sum(r["logp_diff"]["w_sum"] for r in rolls) / max(n, 1)
        out["grpo/tis/clipped_frac"] = sum(r["logp_diff"]["w_clipped"] for r in rolls) / max(n, 1)
    return out


def population_metrics(prefix: str, parts: list[dict], short: bool = False) -> dict[str, float]:
    """Reward/accuracy/format/length/reflection metrics over the completions of ``parts``
    (one :func:`_population` dict per rank); ``short`` keeps the headline series only."""
    tot = [x for r in parts for x in r["total"]]
    correct = [x for r in parts for x in r["correct"]]
    formatted = [x for r in parts for x in r["formatted"]]
    lengths = [x for r in parts for x in r["lengths"]]
    out = {f"{prefix}reward/mean": mean(tot),
           f"{prefix}accuracy": mean([float(c) for c in correct]),
           f"{prefix}format_rate": mean([float(f) for f in formatted]),
           f"{prefix}completion_length/mean": mean(lengths),
           f"{prefix}reflection_rate": mean([float(x) for x in (y for r in parts for y in r["reflect"])])}
    if short:
        return out
    out[f"{prefix}reward/std"] = std(tot)
    for name in parts[0]["terms"]:
        out[f"{prefix}reward/{name}/mean"] = mean([x for r in parts for x in r["terms"][name]])
    out[f"{prefix}accuracy_formatted"] = sum(c and f for c, f in zip(correct, formatted)) / max(1, sum(formatted))
    out[f"{prefix}completion_length/max"] = float(max(lengths) if lengths else 0)
    out[f"{prefix}truncated_frac"] = mean([float(t) for r in parts for t in r["truncated"]])
    return out


def rollout_population(roll, pattern) -> dict:
    """A rollout's completions as plain per-row lists (what :func:`population_metrics` reads)."""
    return {"total": roll.reward.total, "terms": roll.reward.terms, "correct": roll.reward.correct,
            "formatted": roll.reward.formatted, "lengths": [len(c) for c in roll.completion_ids],
            "truncated": roll.truncated, "reflect": reflection_flags(roll.texts, pattern)}


def rollout_summary(roll, info: dict, pattern, first) -> dict:
    """One rank's step digest (all-gathered by the trainer): the sampled and kept populations,
    zero-variance groups of the first round, sampling time, refills and per-group accuracy."""
    z = zero_std_groups(torch.tensor(first.reward.total), first.group_B).tolist() if first.n_groups else []
    out = {"sampled": rollout_population(info["sampled"], pattern), "kept": rollout_population(roll, pattern),
           "zero_std": z,
           "gen_seconds": info["gen_seconds"], "dropped_groups": info["dropped_groups"], "refills": info["refills"],
           "group_acc": list(zip(first.prompt_index, first.group_accuracy()))}
    if "logp_diff" in info:
        out["logp_diff"] = info["logp_diff"]
    return out
