"""GRPO stage orchestration: policy dir + data artifact -> RL-trained model dir.

    r1zero grpo --config configs/tiny.yaml --policy runs/tiny/pretrain --data runs/tiny/data --out runs/tiny/grpo
    torchrun --nproc-per-node 2 -m r1zero.cli grpo --config configs/tiny.yaml --policy ... --out ...

Python: ``run_grpo(cfg, policy_uri, data_uri, out_uri) -> summary`` (collective under a launcher:
every rank calls it, rank 0 returns the summary).

One step (``cfg.grpo``): take ``prompts_per_step`` RL prompts (the data's train split without
``general`` rows, R1-Zero template), sample G completions each (:mod:`r1zero.generate`), score them
(:mod:`r1zero.grpo.rewards`, optionally :mod:`r1zero.grpo.three_level`), optionally drop
zero-variance groups and refill (dynamic sampling), compute advantages (``algorithm``: grpo |
rloo | ppo), and make ``mu`` clipped policy-gradient updates (:mod:`r1zero.grpo.update`).
Ranks split each step's groups; the update equals the single-process one on the same batch.

Output (an HF model dir, like the pretraining stage): ``save_pretrained`` weights + tokenizer,
``metrics.jsonl`` (``grpo/*`` per step, ``eval/accuracy[/domain]`` every ``eval_every`` steps on a
fixed held-out subset, greedy), ``samples.jsonl`` (completions every ``sample_every`` steps),
``summary.json`` and ``checkpoints/step-*``. A rerun with the same ``--out`` resumes from the
newest valid checkpoint and reproduces the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from r1zero import store
from r1zero.errors import UserError
from r1zero.grpo import adaptive
from r1zero.grpo.advantages import advantages, gae, zero_std_groups
from r1zero.grpo.metrics import (
    MetricsWriter,
    keyword_pattern,
    mean,
    reflection_flags,
    rollout_consistency,
    std,
    unpack_rows,
)
from r1zero.grpo.rewards import RewardScorer
from r1zero.grpo.rollout import PromptEntry, Rollout, concat, generate_groups, greedy_eval
from r1zero.grpo.sampling import PromptStream, keep_informative
from r1zero.grpo.update import (
    Batch,
    NanGuard,
    all_sum,
    build_batch,
    collective_device,
    make_optimizer,
    policy_update,
    sequence_logprobs,
    world,
)
from r1zero.progress import print0, progress

RL_DOMAINS = ("math", "code", "cross")


# ---------------------------------------------------------------------------------------------
# inputs


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


def load_policy(policy_uri: str):
    """(model, tokenizer) from any transformers causal LM dir (r1zero.model.load_causal_lm)."""
    from r1zero.model import load_causal_lm

    model, tok = load_causal_lm(policy_uri)
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise UserError(f"{policy_uri}: tokenizer needs eos and pad tokens")
    return model, tok


def max_positions(model) -> int:
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


def _check(cfg, world_size: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# state


@dataclass
class RunState:
    step: int = 0
    elapsed_s: float = 0.0
    tokens: int = 0
    stream: PromptStream | None = None
    tracker: adaptive.PassRateTracker = field(default_factory=adaptive.PassRateTracker)
    guard: NanGuard | None = None
    grouping: object | None = None  # r1zero.grpo.grouping.DynamicGroups when enabled
    last_eval: dict = field(default_factory=dict)
    first_eval: dict = field(default_factory=dict)
    three_level_state: object | None = None  # r1zero.grpo.three_level.ThreeLevelState when enabled

    def to_json(self) -> dict:
        return {"step": self.step, "elapsed_s": self.elapsed_s, "tokens": self.tokens,
                "stream": self.stream.state(), "tracker": self.tracker.state(), "guard": self.guard.state(),
                "grouping": self.grouping.state() if self.grouping is not None else None,
                "last_eval": self.last_eval, "first_eval": self.first_eval,
                "three_level": self.three_level_state.state() if self.three_level_state is not None else None}

    def load(self, st: dict) -> None:
        self.step, self.elapsed_s, self.tokens = int(st["step"]), float(st["elapsed_s"]), int(st["tokens"])
        self.stream.load(st["stream"])
        self.tracker.load(st["tracker"])
        self.guard.load(st["guard"])
        if self.grouping is not None and st.get("grouping"):
            self.grouping.load(st["grouping"])
        self.last_eval, self.first_eval = st.get("last_eval", {}), st.get("first_eval", {})
        if self.three_level_state is not None and st.get("three_level"):
            self.three_level_state.load(st["three_level"])


def _gather(obj):
    rank, ws = world()
    if ws == 1:
        return [obj]
    from r1zero.train import dist as rdist

    return rdist.all_gather_object(obj)


def _generator(seed: int, step: int, rank: int, salt: int = 0) -> torch.Generator:
    # why: a per-step generator makes rollouts a function of (seed, step, rank) only, so resume is exact
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank, salt]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# one step


def _group_sizes(cfg, st: RunState, prompt_index: list[int]) -> list[int]:
    g = cfg.grpo
    if not g.adaptive.enabled:
        return [g.group_size] * len(prompt_index)
    return [adaptive.group_size(st.tracker.estimate(p), g.group_size, g.adaptive.min_group, g.adaptive.max_group)
            for p in prompt_index]


def _take_prompts(cfg, st: RunState, k: int) -> list[int]:
    if st.grouping is not None:
        return st.stream.take_weighted(k, st.grouping.members(), st.grouping.weights(st.tracker), st.step)
    return st.stream.take(k)


def collect_rollouts(cfg, st: RunState, model, tok, entries, scorer, engine=None) -> tuple[Rollout, dict]:
    """This rank's scored groups for the step (dynamic sampling refills included). Collective.

    ``info["sampled"]`` is every group generated this step (all rounds), the population of the
    step's accuracy/reward/length/reflection metrics; the returned rollout holds the kept groups."""
    g = cfg.grpo
    rank, ws = world()
    per_rank = g.prompts_per_step // ws
    kept: list[Rollout] = []
    have, info = 0, {"generated_groups": 0, "dropped_groups": 0, "refills": 0, "gen_seconds": 0.0}
    first: Rollout | None = None
    sampled: list[Rollout] = []
    for rnd in range(1 + (g.max_refills if g.dynamic_sampling else 0)):
        global_idx = _take_prompts(cfg, st, g.prompts_per_step)
        mine = global_idx[rank * per_rank:(rank + 1) * per_rank]
        if have < per_rank:
            roll = generate_groups(model, tok, entries, mine, _group_sizes(cfg, st, mine), g, scorer,
                                   _generator(cfg.seed, st.step, rank, rnd), engine=engine)
            _three_level(cfg, st, roll, entries)
            sampled.append(roll)
            info["generated_groups"] += roll.n_groups
            info["refills"] = rnd
            info["gen_seconds"] += roll.gen_seconds
            if first is None:
                first = roll
            if g.dynamic_sampling:
                keep = keep_informative(roll.group_rewards())
                room = per_rank - have
                flags, n = [], 0
                for k in keep:
                    flags.append(k and n < room)
                    n += int(k and n < room)
                info["dropped_groups"] += sum(1 for k in keep if not k)
                roll = roll.select_groups(flags)
            kept.append(roll)
            have += roll.n_groups
        if not g.dynamic_sampling:
            break
        short = all_sum([float(max(0, per_rank - have))])[0]
        if short == 0:
            break
    if have == 0:  # nothing informative anywhere: train on the first round (zero advantage, no-op update)
        kept = [first]
    info["first_round"] = first
    info["sampled"] = concat(sampled)
    return concat(kept), info


def _three_level(cfg, st: RunState, roll: Rollout, entries) -> None:
    if not cfg.grpo.reward.three_level:
        return
    from r1zero.grpo.three_level import apply_three_level

    if st.grouping is not None:
        clusters = [f"group{st.grouping.label_of(p)}" for p in roll.prompt_index]
    else:
        clusters = [str(entries[p].item.get("domain", "")) for p in roll.prompt_index]
    apply_three_level(roll, cfg.grpo.reward, st.three_level_state, clusters)


def compute_advantages(cfg, roll: Rollout, batch: Batch, value_ctx=None) -> torch.Tensor:
    """adv_B for grpo/rloo, adv_BT for ppo (value_ctx = (old_values_BT, returns placeholder))."""
    g = cfg.grpo
    rewards_B = torch.tensor(roll.reward.total, dtype=torch.float32)
    if g.algorithm == "rloo":
        return advantages(rewards_B, roll.group_B, "rloo")
    if g.algorithm == "grpo":
        batch_std = None
        if g.advantage == "batch":
            n, s, ss = all_sum([float(rewards_B.numel()), float(rewards_B.sum()), float((rewards_B.double() ** 2).sum())])
            var = (ss - s * s / max(n, 1)) / max(n - 1, 1)
            batch_std = float(max(var, 0.0)) ** 0.5 if n > 1 else 1.0
        return advantages(rewards_B, roll.group_B, g.advantage, batch_std=batch_std)
    raise ValueError(g.algorithm)


def ppo_advantages(cfg, roll: Rollout, batch: Batch, old_values_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (whitened over the global batch) and returns for PPO."""
    from r1zero.grpo.ppo import terminal_rewards

    g = cfg.grpo
    rewards_BT = terminal_rewards(torch.tensor(roll.reward.total), batch.mask_BT)
    adv_BT, ret_BT = gae(rewards_BT, old_values_BT, batch.mask_BT, g.gamma, g.gae_lambda)
    m = batch.mask_BT
    n, s, ss = all_sum([float(m.sum()), float((adv_BT * m).sum()), float((adv_BT.double() ** 2 * m).sum())])
    mu = s / max(n, 1)
    var = max(ss / max(n, 1) - mu * mu, 0.0)
    return (adv_BT - mu) / (var + 1e-8) ** 0.5 * m, ret_BT


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


def _population(roll: Rollout, pattern) -> dict:
    return {"total": roll.reward.total, "terms": roll.reward.terms, "correct": roll.reward.correct,
            "formatted": roll.reward.formatted, "lengths": [len(c) for c in roll.completion_ids],
            "truncated": roll.truncated, "reflect": reflection_flags(roll.texts, pattern)}


def _rollout_summary(roll: Rollout, info: dict, pattern, first: Rollout) -> dict:
    z = zero_std_groups(torch.tensor(first.reward.total), first.group_B).tolist() if first.n_groups else []
    out = {"sampled": _population(info["sampled"], pattern), "kept": _population(roll, pattern), "zero_std": z,
           "gen_seconds": info["gen_seconds"], "dropped_groups": info["dropped_groups"], "refills": info["refills"],
           "group_acc": list(zip(first.prompt_index, first.group_accuracy()))}
    if "logp_diff" in info:
        out["logp_diff"] = info["logp_diff"]
    return out


def run_eval(model, tok, subset, scorer, max_new_tokens) -> dict[str, float]:
    """Greedy pass@1 on this rank's share of the subset, gathered; returns eval/* metrics."""
    rank, ws = world()
    recs = [r for part in _gather(greedy_eval(model, tok, subset[rank::ws], scorer, max_new_tokens)) for r in part]
    out = {"eval/accuracy": mean([float(r["correct"]) for r in recs]),
           "eval/format_rate": mean([float(r["formatted"]) for r in recs])}
    fmt = [r for r in recs if r["formatted"]]
    out["eval/accuracy_formatted"] = mean([float(r["correct"]) for r in fmt]) if fmt else 0.0
    for d in sorted({r["domain"] for r in recs}):
        out[f"eval/accuracy/{d}"] = mean([float(r["correct"]) for r in recs if r["domain"] == d])
    out["eval/n"] = float(len(recs))
    return out


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg, policy_uri: str, data_uri: str, work: Path, ckpt_uri: str,
          device: torch.device = torch.device("cpu")) -> dict | None:
    """The RL loop; rank 0 writes the outputs into ``work``. Collective.

    ``device``: where the policy (and reference / value head) run; rollouts, rewards and batches
    are built on CPU and moved at the update.
    """
    from r1zero.train.checkpoint import Checkpointer

    g = cfg.grpo
    rank, ws = world()
    _check(cfg, ws)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, tok = load_policy(policy_uri)
    model.to(device)
    sharded = None
    if g.update_engine == "fsdp2":  # the policy update on the pretraining engine (r1zero.grpo.sharded)
        from r1zero.grpo.sharded import ShardedGRPO

        sharded = ShardedGRPO(cfg, model, ws, device)
    ref = load_policy(policy_uri)[0].eval().requires_grad_(False).to(device) if g.beta > 0 and sharded is None \
        else None
    data_dir = store.materialize(data_uri)
    budget = max_positions(model) - g.max_new_tokens
    if budget < 8:
        raise UserError(f"grpo.max_new_tokens ({g.max_new_tokens}) leaves no room for prompts in the "
                        f"policy's context ({max_positions(model)})")
    from r1zero.data.shards import bench_split
    from r1zero.template import prompt_renderer

    render = prompt_renderer(tok, cfg.data.chat_template)  # the base's chat template when asked
    entries, dropped = prepare_entries(load_rows(data_dir, "train"), tok, budget, render)
    # the periodic held-out curve follows a named benchmark when grpo.eval_benchmark is set
    eval_split = bench_split(g.eval_benchmark) if g.eval_benchmark else "eval"
    eval_entries, eval_dropped = prepare_entries(load_rows(data_dir, eval_split), tok, budget, render)
    if not entries:
        raise UserError(f"data artifact {data_uri}: no usable RL prompts in the train split (dropped: {dropped})")
    subset = eval_subset(eval_entries, g.eval_problems, cfg.seed) if g.eval_problems else []
    scorer = RewardScorer(g.reward, g.max_new_tokens, sandbox=cfg.sandbox)
    pattern = keyword_pattern(g.reflection_keywords)

    value_head = None
    if g.algorithm == "ppo":
        from r1zero.grpo.ppo import ValueHead

        value_head = ValueHead(model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if value_head is not None:
        params += list(value_head.parameters())
    optimizer = make_optimizer(params, g.lr) if sharded is None else sharded.optimizer

    strata = [adaptive.stratum_of(e.item) for e in entries] if g.adaptive.enabled and g.adaptive.stratum_prior else None
    st = RunState(stream=PromptStream(len(entries), cfg.seed), guard=NanGuard(g.nan_abort_after),
                  tracker=adaptive.PassRateTracker(strata))
    if g.grouping.enabled:
        from r1zero.grpo.grouping import DynamicGroups

        st.grouping = DynamicGroups.build(model, entries, g.grouping, cfg.seed)
    if g.reward.three_level:
        from r1zero.grpo.three_level import ThreeLevelState

        st.three_level_state = ThreeLevelState()
    metrics = MetricsWriter(work / "metrics.jsonl")
    samples_path = work / "samples.jsonl"
    ckpt = Checkpointer(ckpt_uri, keep_last=2)
    loaded = ckpt.load_latest()
    if loaded is not None:
        sd = torch.load(loaded.path / "grpo_state.pt", weights_only=False, map_location="cpu")
        model.load_state_dict(sd["model"])
        if sharded is None:
            optimizer.load_state_dict(sd["optimizer"])
        else:  # the shards of the policy and its optimizer state (torch.distributed.checkpoint)
            sharded.load(loaded.path / "engine")
        if value_head is not None:
            value_head.load_state_dict(sd["value_head"])
        st.load(loaded.state["run"])
        ckpt.restore_rng(loaded)
        if rank == 0:
            for name in ("metrics.jsonl", "samples.jsonl"):
                src = loaded.path / name
                if src.exists():
                    shutil.copyfile(src, work / name)
                else:
                    (work / name).unlink(missing_ok=True)
        print0(f"grpo: resumed from step {st.step}")
    elif rank == 0:
        for name in ("metrics.jsonl", "samples.jsonl", "insight_stream.jsonl"):
            (work / name).unlink(missing_ok=True)

    engine = None
    if g.rollout.engine == "vllm":
        from r1zero.grpo.vllm_rollout import start_engine

        engine = start_engine(g.rollout, model, tok, max_len=max_positions(model), seed=cfg.seed + rank)
    try:
        return _loop(cfg, st, model, tok, ref, value_head, optimizer, params, entries, subset, scorer, pattern,
                     metrics, samples_path, ckpt, work, engine, {"dropped_prompts": dropped,
                                                                 "dropped_eval_prompts": eval_dropped},
                     sharded=sharded)
    finally:
        if engine is not None:
            engine.close()


def _loop(cfg, st, model, tok, ref, value_head, optimizer, params, entries, subset, scorer, pattern, metrics,
          samples_path, ckpt, work, engine, dropped_info, sharded=None) -> dict | None:
    g = cfg.grpo
    rank, _ = world()
    tel = _telemetry(cfg, rank)
    scorer.attach_metrics(tel)
    detector = _streaming_detector(cfg, work / "insight_stream.jsonl", tel)
    if st.step == 0 and subset:
        ev = run_eval(model, tok, subset, scorer, g.max_new_tokens)
        st.first_eval = st.last_eval = ev
        if rank == 0:
            metrics.write(0, ev)
    t_start = time.perf_counter() - st.elapsed_s
    bar = progress(total=g.steps, initial=st.step, desc="grpo", unit="step")
    stop_reason = "steps"
    while st.step < g.steps:
        if g.time_budget_s is not None and _flag(time.perf_counter() - t_start >= g.time_budget_s):
            stop_reason = "time_budget"
            break
        t0 = time.perf_counter()
        roll, info = collect_rollouts(cfg, st, model, tok, entries, scorer, engine)
        batch = build_batch(roll.prompt_ids, roll.completion_ids, tok.pad_token_id)
        old_logp = ref_logp = old_v = ret = None
        if g.mu > 1 or g.algorithm == "ppo" or roll.logprobs is not None:
            old_logp = sequence_logprobs(model, batch, g.temperature) if sharded is None else sharded.logprobs(batch)
            if value_head is not None:
                with torch.no_grad():
                    old_v = value_head.values()[:, -(batch.mask_BT.shape[1] + 1):-1].detach().cpu()
        if ref is not None:
            ref_logp = sequence_logprobs(ref, batch, g.temperature)
        elif sharded is not None:
            ref_logp = sharded.ref_logprobs(batch)
        if g.algorithm == "ppo":
            adv, ret = ppo_advantages(cfg, roll, batch, old_v)
        else:
            adv = compute_advantages(cfg, roll, batch)
        if roll.logprobs is not None:  # train/inference consistency, optional TIS correction
            rollout_BT = unpack_rows(roll.logprobs, batch.mask_BT)
            info["logp_diff"], w_BT = rollout_consistency(old_logp, rollout_BT, batch.mask_BT, g.rollout.tis_cap)
            if g.rollout.tis_cap > 0:
                adv = (adv[:, None] if adv.dim() == 1 else adv) * w_BT
            if g.mu == 1 and g.algorithm != "ppo":
                old_logp = None  # pi_old = the detached current policy, as without an engine
        n_global = all_sum([float(len(roll.completion_ids))])[0]
        if engine is not None:
            engine.before_update()
        if sharded is not None:  # micro-batched on the FSDP2 (+EP) shards; the rollout model synced after
            upd = sharded.update(batch, adv, guard=st.guard, old_logp_BT=old_logp, ref_logp_BT=ref_logp,
                                 local_fraction=len(roll.completion_ids) / max(n_global, 1.0))
        else:
            upd = policy_update(model, optimizer, batch, adv, g, params=params, guard=st.guard, old_logp_BT=old_logp,
                                ref_logp_BT=ref_logp, value_head=value_head, old_values_BT=old_v, returns_BT=ret,
                                local_fraction=len(roll.completion_ids) / max(n_global, 1.0))
        if engine is not None:
            engine.update_weights(model)
        summaries = _gather(_rollout_summary(roll, info, pattern, info["first_round"]))
        for s in summaries:  # identical tracker on every rank
            for p, acc in s["group_acc"]:
                st.tracker.update(p, acc)
        st.step += 1
        seconds = time.perf_counter() - t0
        m = step_metrics(cfg, summaries, upd, seconds, pattern)
        st.tokens += int(sum(sum(s["sampled"]["lengths"]) for s in summaries))
        if st.grouping is not None:
            m.update(st.grouping.report(st.tracker))
            if st.step % g.grouping.recluster_every == 0:
                st.grouping.regroup(st.tracker)
                st.stream.reset_groups()
        if subset and (st.step % g.eval_every == 0 or st.step == g.steps):
            ev = run_eval(model, tok, subset, scorer, g.max_new_tokens)
            st.last_eval = ev
            m.update(ev)
        if rank == 0:
            metrics.write(st.step, m)
            for name, value in m.items():  # "aha" events as soon as they are detectable
                detector.update(st.step, name, value)
            if st.step % g.sample_every == 0 or st.step == 1:
                _write_samples(samples_path, st.step, roll, entries)
        if tel is not None:
            tel.observe_step(seconds, tokens=int(sum(len(c) for c in roll.completion_ids)), loss=upd["loss"], lr=g.lr,
                             reward=m["grpo/reward/mean"], accuracy=m["grpo/accuracy"])
            tel.set_gauges(**m)
        st.elapsed_s = time.perf_counter() - t_start
        bar.update(1)
        bar.set_postfix(reward=f"{m['grpo/reward/mean']:.3f}", acc=f"{m['grpo/accuracy']:.3f}")
        if st.step % g.checkpoint_every == 0:
            with tel.checkpoint_timer() if tel is not None else contextlib.nullcontext():
                _save(ckpt, st, model, optimizer, value_head, work, sharded)
    bar.close()
    if subset and stop_reason == "time_budget" and st.step % g.eval_every != 0 and st.step > 0:
        st.last_eval = run_eval(model, tok, subset, scorer, g.max_new_tokens)  # the curve ends where training did
        if rank == 0:
            metrics.write(st.step, st.last_eval)
    if tel is not None:
        tel.close()
    if rank != 0:
        return None
    return _finish(cfg, model, tok, work, st, {**dropped_info,
                                               "rollout_engine": g.rollout.engine,
                                               "rl_prompts": len(entries), "eval_subset": len(subset),
                                               "stop_reason": stop_reason, "verify_calls": scorer.verify_calls})


def _flag(local: bool) -> bool:
    """Rank 0 decides (time budgets must end every rank on the same step)."""
    if world()[1] == 1:
        return local
    from r1zero.train import dist as rdist

    return rdist.broadcast_flag(local, collective_device())


def _telemetry(cfg, rank: int):
    try:
        from r1zero import telemetry

        return telemetry.start(cfg.telemetry, job=cfg.name, rank=rank, stage="grpo")
    except Exception as err:  # noqa: BLE001 - telemetry must never stop training
        import warnings

        warnings.warn(f"telemetry disabled: {type(err).__name__}: {err}", stacklevel=2)
        return None


def _write_samples(path: Path, step: int, roll: Rollout, entries) -> None:
    lines = []
    for i in range(min(8, len(roll.texts))):
        g = int(roll.group_B[i])
        item = entries[roll.prompt_index[g]].item
        lines.append(json.dumps({"step": step, "id": item.get("id"), "domain": item.get("domain"),
                                 "prompt": item.get("prompt"), "gold": item.get("answer"),
                                 "completion": roll.texts[i], "answer": roll.reward.answers[i],
                                 "reward": roll.reward.total[i], "correct": roll.reward.correct[i],
                                 "formatted": roll.reward.formatted[i], "truncated": roll.truncated[i]}))
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in lines))


def _streaming_detector(cfg, path: Path, tel):
    """Online insight detection on rank 0: each event is appended to ``insight_stream.jsonl``
    (with its detection lag) and counted by the telemetry exporter when it becomes detectable.
    Kept out of metrics.jsonl so a resumed run's metrics stay identical to an uninterrupted one
    (the detector restarts empty after a resume)."""
    from r1zero.insight.streaming import StreamingDetector, metrics_callback

    def write(row: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if tel is not None:
            tel.observe_metrics({row["name"]: row["value"]})

    return StreamingDetector(cfg.insight, on_event=[metrics_callback(write)])


def _save(ckpt, st: RunState, model, optimizer, value_head, work: Path, sharded=None) -> None:
    rank, _ = world()

    def write(d: Path) -> None:
        if sharded is not None:  # every rank writes its own shards of the policy and optimizer
            sharded.save(d / "engine")
        if rank != 0:
            return
        sd = {"model": model.state_dict()}
        if sharded is None:
            sd["optimizer"] = optimizer.state_dict()
        if value_head is not None:
            sd["value_head"] = value_head.state_dict()
        torch.save(sd, d / "grpo_state.pt")
        for name in ("metrics.jsonl", "samples.jsonl"):
            if (work / name).exists():
                shutil.copyfile(work / name, d / name)

    state = {"run": st.to_json()}
    ckpt.save(st.step, write, state)


def _finish(cfg, model, tok, work: Path, st: RunState, info: dict) -> dict:
    model.save_pretrained(str(work), safe_serialization=True)
    tok.save_pretrained(str(work))
    first, last = st.first_eval, st.last_eval
    summary = {
        "name": cfg.name, "config_hash": cfg.hash(), "seed": cfg.seed, "algorithm": cfg.grpo.algorithm,
        "steps": st.step, "elapsed_s": round(st.elapsed_s, 3), "completion_tokens": st.tokens,
        "nan_skipped": st.guard.total, "eval_start": first, "eval_end": last,
        "eval_accuracy_gain": (last.get("eval/accuracy", 0.0) - first.get("eval/accuracy", 0.0)) if first else None,
        **info,
    }
    store.atomic_write_text(work / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


def run_grpo(cfg, policy_uri: str, data_uri: str, out_uri: str) -> dict | None:
    """RL-train the policy at ``policy_uri`` on ``data_uri``; publish the model dir to ``out_uri``."""
    from r1zero.train import dist as rdist

    store.configure(cfg.store)
    env = rdist.read_env()
    device = rdist.device_for(env)  # cuda:LOCAL_RANK on a GPU node, else CPU
    # the fsdp2 update engine builds a DeviceMesh: a one-rank group at world 1
    group = env.world_size > 1 or cfg.grpo.update_engine == "fsdp2"
    if group and not dist.is_initialized():
        rdist.init_default_group(env, device)
    ckpt_uri = store.join(out_uri, "checkpoints")
    remote = store.is_s3(out_uri)
    work = Path(tempfile.mkdtemp(prefix="r1zero-grpo-")) if remote else store.local_path(out_uri)
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = train(cfg, policy_uri, data_uri, work, ckpt_uri, device)
        if remote and summary is not None:
            store.publish(work, out_uri)
        return summary
    finally:
        if group:
            rdist.shutdown()
        if remote:
            shutil.rmtree(work, ignore_errors=True)
