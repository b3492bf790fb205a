"""GRPO inputs: the data artifact's RL prompts, the policy, and the checks a run needs first.

    entries, dropped = prepare_entries(load_rows(data_dir, "train"), tok, budget)
    model, tok = load_policy("runs/tiny/pretrain")     # any transformers causal LM dir or URI

Used by :mod:`r1zero.grpo.trainer` and the GRPO benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from r1zero.errors import UserError
from r1zero.grpo.rollout import PromptEntry

RL_DOMAINS = ("math", "code", "cross")


def load_rows(data_dir: Path, split: str) -> list[dict]:
    """Rows of a data artifact split (the data package's reader, or the parquet shards directly)."""
    try:
        from r1zero.data.shards import read_rows
    except ImportError:
        read_rows = None
    if read_rows is not None:
        return list(read_rows(data_dir, split))
    import pyarrow.parquet as pq

    parts = sorted((Path(data_dir) / split).glob("part-*.parquet"))
    if not parts:
        raise UserError(f"data artifact {data_dir} has no {split}/part-*.parquet shards")
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def load_policy(policy_uri: str, weights: bool = True):
    """(model, tokenizer) from any transformers causal LM dir (r1zero.model.load_causal_lm);
    ``weights=False``: the model on meta (config only)."""
    from r1zero.model import load_causal_lm

    model, tok = load_causal_lm(policy_uri, weights=weights)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise UserError(f"{policy_uri}: tokenizer needs eos and pad tokens")
    return model, tok


def max_positions(model) -> int:
    """The policy's context length from its config (unbounded when it names none)."""
    c = model.config
    for name in ("max_position_embeddings", "max_seq_len", "n_positions"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30


def prepare_entries(rows: list[dict], tokenizer, max_prompt_tokens: int,
                    render=None) -> tuple[list[PromptEntry], dict]:
    """Render + tokenize prompts; rows that cannot be used are counted by reason, never silently lost."""
    from r1zero.template import render_prompt

    entries, dropped = [], {}
    for r in rows:
        if r.get("domain") not in RL_DOMAINS:
            dropped["not_rl_domain"] = dropped.get("not_rl_domain", 0) + 1
            continue
        ids = tokenizer((render or render_prompt)(r["prompt"]), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            dropped["prompt_too_long"] = dropped.get("prompt_too_long", 0) + 1
            continue
        entries.append(PromptEntry(item=r, ids=list(ids)))
    return entries, dropped


def eval_subset(entries: list[PromptEntry], n: int, seed: int) -> list[PromptEntry]:
    """A fixed held-out subset (seeded shuffle) for the periodic greedy curve."""
    order = np.random.default_rng([seed, 4242]).permutation(len(entries))
    return [entries[i] for i in order[:n]]


def check_run(cfg, world_size: int) -> None:
    """Refuse a GRPO config that cannot run at this world size (one line, exit 2 via UserError)."""
    g = cfg.grpo
    for problem in cfg.grpo_world_problems(world_size):
        raise UserError(problem)
    if g.adaptive.enabled and g.adaptive.min_group > g.adaptive.max_group:
        raise UserError("grpo.adaptive.min_group must be <= grpo.adaptive.max_group")
    if g.rollout.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("grpo.rollout.engine=vllm needs vLLM: run r1zero from the vLLM environment "
                            "(make vllm-env; .venv-vllm/bin/r1zero grpo ...)")
    if g.algorithm == "grpo" and g.group_size < 2 and not g.adaptive.enabled:
        raise UserError("grpo.group_size must be >= 2 for GRPO (a group of one has zero advantage)")
