"""Rollouts: G sampled completions per prompt, decoded and scored.

    roll = generate_groups(model, tok, entries, [3, 17], [8, 8], gcfg, scorer, generator)
    roll.group_B          # group index of each completion
    roll.reward.total     # one reward per completion

The prompts are token lists prepared once by the trainer (R1-Zero template, see
:func:`r1zero.template.render_prompt`). Completions are decoded *with* special tokens (the
``<think>``/``<answer>`` tags are special tokens of the data tokenizer, and dropping them would
make every answer unparseable) but without EOS/pad.

Legend: B = completions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from r1zero.generate import sample
from r1zero.grpo.rewards import RewardResult, RewardScorer


@dataclass
class PromptEntry:
    item: dict  # the data row
    ids: list[int]  # rendered prompt tokens


@dataclass
class Rollout:
    prompt_index: list[int]  # pool index per group
    group_B: torch.Tensor  # group (0..n_groups-1) per completion
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: list[bool]
    texts: list[str]
    reward: RewardResult
    gen_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    # log-prob of each sampled token under the rollout engine's sampling distribution (vLLM's
    # processed log-probs: after temperature and top-p); None for the native sampler
    logprobs: list[list[float]] | None = None

    @property
    def n_groups(self) -> int:
        return len(self.prompt_index)

    def group_rewards(self) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in range(self.n_groups)]
        for g, r in zip(self.group_B.tolist(), self.reward.total):
            out[g].append(r)
        return out

    def group_accuracy(self) -> list[float]:
        hits: list[list[bool]] = [[] for _ in range(self.n_groups)]
        for g, c in zip(self.group_B.tolist(), self.reward.correct):
            hits[g].append(c)
        return [sum(h) / len(h) if h else 0.0 for h in hits]

    def select_groups(self, keep: Sequence[bool]) -> Rollout:
        """A rollout with only the groups where ``keep`` is True (re-indexed)."""
        new_index = {}
        for g, k in enumerate(keep):
            if k:
                new_index[g] = len(new_index)
        rows = [i for i, g in enumerate(self.group_B.tolist()) if g in new_index]
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        r = self.reward
        reward = RewardResult(pick(r.total), {k: pick(v) for k, v in r.terms.items()}, pick(r.correct),
                              pick(r.formatted), pick(r.answers))
        return Rollout([p for g, p in enumerate(self.prompt_index) if g in new_index],
                       torch.tensor([new_index[g] for g in self.group_B.tolist() if g in new_index], dtype=torch.long),
                       pick(self.prompt_ids), pick(self.completion_ids), pick(self.truncated), pick(self.texts),
                       reward, self.gen_seconds, dict(self.extra),
                       None if self.logprobs is None else pick(self.logprobs))


def concat(parts: Sequence[Rollout]) -> Rollout:
    """Concatenate rollouts (e.g. a dynamic-sampling refill) with group indices shifted."""
    parts = [p for p in parts if p.n_groups]
    if not parts:
        raise ValueError("concat: nothing to concatenate")
    offset, groups = 0, []
    for p in parts:
        groups.append(p.group_B + offset)
        offset += p.n_groups
    cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
    rs = [p.reward for p in parts]
    terms = {k: [x for r in rs for x in r.terms[k]] for k in rs[0].terms}
    reward = RewardResult([x for r in rs for x in r.total], terms, [x for r in rs for x in r.correct],
                          [x for r in rs for x in r.formatted], [x for r in rs for x in r.answers])
    logprobs = cat("logprobs") if all(p.logprobs is not None for p in parts) else None
    return Rollout(cat("prompt_index"), torch.cat(groups), cat("prompt_ids"), cat("completion_ids"),
                   cat("truncated"), cat("texts"), reward, sum(p.gen_seconds for p in parts), logprobs=logprobs)


def decode(tokenizer, ids: Sequence[int], drop: set[int]) -> str:
    return tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)


def generate_groups(model, tokenizer, entries: Sequence[PromptEntry], prompt_index: Sequence[int],
                    group_sizes: Sequence[int], gcfg, scorer: RewardScorer,
                    generator: torch.Generator | None, engine=None) -> Rollout:
    """Sample ``group_sizes[j]`` completions for prompt ``prompt_index[j]`` and score them.

    ``engine``: a rollout engine (:mod:`r1zero.grpo.vllm_rollout`) instead of the native sampler;
    its seed is drawn from ``generator``, so rollouts stay a function of (seed, step, rank)."""
    prompts, groups = [], []
    for g, (pi, size) in enumerate(zip(prompt_index, group_sizes)):
        prompts += [entries[pi].ids] * size
        groups += [g] * size
    t0 = time.perf_counter()
    logprobs = None
    if engine is not None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
        out, logprobs = engine.sample(prompts, gcfg.max_new_tokens, gcfg.temperature, gcfg.top_p, seed=seed)
    else:
        out = sample(model, prompts, gcfg.max_new_tokens, gcfg.temperature, gcfg.top_p,
                     eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=generator)
    gen_s = time.perf_counter() - t0
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    texts = [decode(tokenizer, c, drop) for c in out.completion_ids]
    items = [entries[prompt_index[g]].item for g in groups]
    lengths = [len(c) for c in out.completion_ids]
    reward = scorer.score(items, texts, lengths, out.truncated)
    return Rollout(list(prompt_index), torch.tensor(groups, dtype=torch.long), prompts, out.completion_ids,
                   out.truncated, texts, reward, gen_s, logprobs=logprobs)


@torch.no_grad()
def greedy_eval(model, tokenizer, entries: Sequence[PromptEntry], scorer: RewardScorer, max_new_tokens: int,
                batch: int = 64, engine=None) -> list[dict]:
    """Greedy pass@1 records ``{domain, correct, formatted}`` for each entry (held-out curves);
    ``engine``: a rollout engine (:mod:`r1zero.grpo.vllm_rollout`) decodes instead of ``model``."""
    drop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    recs = []
    for i in range(0, len(entries), batch):
        chunk = entries[i:i + batch]
        if engine is not None:
            out = engine.sample([e.ids for e in chunk], max_new_tokens, 0.0, 1.0, seed=None)[0]
        else:
            out = sample(model, [e.ids for e in chunk], max_new_tokens, 0.0,
                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
        texts = [decode(tokenizer, c, drop) for c in out.completion_ids]
        res = scorer.score([e.item for e in chunk], texts, [len(c) for c in out.completion_ids], out.truncated)
        for e, c, f in zip(chunk, res.correct, res.formatted):
            recs.append({"domain": e.item.get("domain", ""), "correct": bool(c), "formatted": bool(f)})
    return recs
