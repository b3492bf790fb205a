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
from r1zero.grpo.advantages import advantages, gae
from r1zero.grpo.inputs import (
    check_run,
    eval_subset,
    load_policy,
    load_rows,
    max_positions,
    prepare_entries,
)
from r1zero.grpo.metrics import (
    MetricsWriter,
    keyword_pattern,
    mean,
    rollout_consistency,
    rollout_summary,
    step_metrics,
    unpack_rows,
)
from r1zero.grpo.rewards import RewardScorer
from r1zero.grpo.rollout import Rollout, concat, generate_groups, greedy_eval
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


def run_eval(model, tok, subset, scorer, max_new_tokens, engine=None) -> dict[str, float]:
    """Greedy pass@1 on this rank's share of the subset, gathered; returns eval/* metrics
    (``engine``: greedy on the rollout engine instead of ``model``)."""
    rank, ws = world()
    recs = [r for part in _gather(greedy_eval(model, tok, subset[rank::ws], scorer, max_new_tokens, engine=engine))
            for r in part]
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


class GRPOTrainer:
    """The RL loop as named parts (torchtitan's ``Trainer`` shape); rank 0 writes into ``work``.

        trainer = GRPOTrainer(cfg, policy_uri, data_uri, work, ckpt_uri, device)
        try:
            summary = trainer.fit()        # resume, eval at 0, train_step until steps/budget, finish
        finally:
            trainer.close()

    Parts: :meth:`rollout` (sample + score this rank's groups, dynamic-sampling refills),
    :meth:`score` (old-policy, reference and value estimates on the batch), :meth:`advantages`
    (GRPO/RLOO/PPO, TIS weights), :meth:`update` (the policy step, replicated or sharded),
    :meth:`step_metrics` (gathered over ranks), :meth:`evaluate`, :meth:`save`. Collective: every
    rank builds one and calls the same methods. ``device``: where the policy (and reference /
    value head) run; rollouts, rewards and batches are built on CPU and moved at the update.
    """

    def __init__(self, cfg, policy_uri: str, data_uri: str, work: Path, ckpt_uri: str,
                 device: torch.device = torch.device("cpu")):
        from r1zero.train.checkpoint import Checkpointer

        g = self.g = cfg.grpo
        self.cfg, self.work, self.device = cfg, work, device
        self.rank, ws = world()
        check_run(cfg, ws)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.policy_uri = policy_uri
        # fsdp2 + vLLM: the shards are the only copy of the policy (the engine takes them one tensor
        # at a time); rank 0's loaded model fills every rank's shards (ShardedGRPO broadcasts it),
        # the other ranks load it on meta (config only; dynamic grouping embeds with the weights),
        # and it is dropped at the end of __init__
        self.shards_only = g.update_engine == "fsdp2" and g.rollout.engine == "vllm"
        weights = not self.shards_only or self.rank == 0 or g.grouping.enabled
        self.model, self.tok = load_policy(policy_uri, weights=weights)
        self.positions = max_positions(self.model)
        if not self.shards_only:
            self.model.to(device)
        self.sharded = None
        if g.update_engine == "fsdp2":  # the policy update on the pretraining engine (r1zero.grpo.sharded)
            from r1zero.grpo.sharded import ShardedGRPO

            self.sharded = ShardedGRPO(cfg, self.model, ws, device, keep_rollout_model=not self.shards_only)
        self.ref = load_policy(policy_uri)[0].eval().requires_grad_(False).to(device) \
            if g.beta > 0 and self.sharded is None else None
        self._load_prompts(data_uri)
        self.scorer = RewardScorer(g.reward, g.max_new_tokens, sandbox=cfg.sandbox)
        self.pattern = keyword_pattern(g.reflection_keywords)
        self.value_head = None
        if g.algorithm == "ppo":
            from r1zero.grpo.ppo import ValueHead

            self.value_head = ValueHead(self.model).to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad] if self.sharded is None else []
        if self.value_head is not None:
            self.params += list(self.value_head.parameters())
        self.optimizer = make_optimizer(self.params, g.lr) if self.sharded is None else self.sharded.optimizer
        self.st = self._new_state()
        self.metrics = MetricsWriter(work / "metrics.jsonl")
        self.samples_path = work / "samples.jsonl"
        self.ckpt = Checkpointer(ckpt_uri, keep_last=2)
        self.engine = None  # the rollout engine (vLLM) when grpo.rollout.engine says so; started by fit()
        self.engine_dir: str | None = None  # a streamed export the engine started from (removed at close)
        self.tel = self.detector = None
        if self.shards_only:
            self.model = None  # no full-size policy module from here on (tests assert it)

    # -- setup --------------------------------------------------------------------------------

    def _load_prompts(self, data_uri: str) -> None:
        from r1zero.data.shards import bench_split
        from r1zero.template import prompt_renderer

        g, tok = self.g, self.tok
        data_dir = store.materialize(data_uri)
        budget = self.positions - g.max_new_tokens
        if budget < 8:
            raise UserError(f"grpo.max_new_tokens ({g.max_new_tokens}) leaves no room for prompts in the "
                            f"policy's context ({self.positions})")
        render = prompt_renderer(tok, self.cfg.data.chat_template)  # the base's chat template when asked
        self.entries, self.dropped = prepare_entries(load_rows(data_dir, "train"), tok, budget, render)
        # the periodic held-out curve follows a named benchmark when grpo.eval_benchmark is set
        eval_split = bench_split(g.eval_benchmark) if g.eval_benchmark else "eval"
        eval_entries, self.eval_dropped = prepare_entries(load_rows(data_dir, eval_split), tok, budget, render)
        if not self.entries:
            raise UserError(f"data artifact {data_uri}: no usable RL prompts in the train split "
                            f"(dropped: {self.dropped})")
        self.subset = eval_subset(eval_entries, g.eval_problems, self.cfg.seed) if g.eval_problems else []

    def _new_state(self) -> RunState:
        g, cfg = self.g, self.cfg
        strata = [adaptive.stratum_of(e.item) for e in self.entries] \
            if g.adaptive.enabled and g.adaptive.stratum_prior else None
        st = RunState(stream=PromptStream(len(self.entries), cfg.seed), guard=NanGuard(g.nan_abort_after),
                      tracker=adaptive.PassRateTracker(strata))
        if g.grouping.enabled:
            from r1zero.grpo.grouping import DynamicGroups

            st.grouping = DynamicGroups.build(self.model, self.entries, g.grouping, cfg.seed)
        if g.reward.three_level:
            from r1zero.grpo.three_level import ThreeLevelState

            st.three_level_state = ThreeLevelState()
        return st

    def resume(self) -> None:
        """Load the newest valid checkpoint (weights, optimizer, run state, RNG, metrics so far),
        or clear the outputs of an earlier run in ``work``."""
        work, loaded = self.work, self.ckpt.load_latest()
        if loaded is None:
            if self.rank == 0:
                for name in ("metrics.jsonl", "samples.jsonl", "insight_stream.jsonl"):
                    (work / name).unlink(missing_ok=True)
            return
        sd = torch.load(loaded.path / "grpo_state.pt", weights_only=False, map_location="cpu")
        if self.model is not None:
            self.model.load_state_dict(sd["model"])
        if self.sharded is None:
            self.optimizer.load_state_dict(sd["optimizer"])
        else:  # the shards of the policy and its optimizer state (torch.distributed.checkpoint)
            self.sharded.load(loaded.path / "engine")
        if self.value_head is not None:
            self.value_head.load_state_dict(sd["value_head"])
        self.st.load(loaded.state["run"])
        self.ckpt.restore_rng(loaded)
        if self.rank == 0:
            for name in ("metrics.jsonl", "samples.jsonl"):
                src = loaded.path / name
                if src.exists():
                    shutil.copyfile(src, work / name)
                else:
                    (work / name).unlink(missing_ok=True)
        print0(f"grpo: resumed from step {self.st.step}")

    # -- one step -----------------------------------------------------------------------------

    def rollout(self) -> tuple[Rollout, dict]:
        """This rank's scored groups for the step (see :func:`collect_rollouts`). Collective."""
        return collect_rollouts(self.cfg, self.st, self.model, self.tok, self.entries, self.scorer, self.engine)

    def score(self, roll: Rollout, batch: Batch) -> tuple:
        """(old_logp_BT, ref_logp_BT, old_values_BT) on the batch; None where not needed."""
        g, sharded = self.g, self.sharded
        old_logp = ref_logp = old_v = None
        if g.mu > 1 or g.algorithm == "ppo" or roll.logprobs is not None:
            old_logp = sequence_logprobs(self.model, batch, g.temperature) if sharded is None \
                else sharded.logprobs(batch)
            if self.value_head is not None:
                with torch.no_grad():
                    old_v = self.value_head.values()[:, -(batch.mask_BT.shape[1] + 1):-1].detach().cpu()
        if self.ref is not None:
            ref_logp = sequence_logprobs(self.ref, batch, g.temperature)
        elif sharded is not None:
            ref_logp = sharded.ref_logprobs(batch)
        return old_logp, ref_logp, old_v

    def advantages(self, roll: Rollout, batch: Batch, info: dict, old_logp, old_v) -> tuple:
        """(adv, returns, old_logp): GRPO/RLOO per row or PPO's GAE per token, times the TIS weights
        when the rollout engine's log-probs are corrected; records the engine/trainer gap in ``info``."""
        g = self.g
        ret = None
        if g.algorithm == "ppo":
            adv, ret = ppo_advantages(self.cfg, roll, batch, old_v)
        else:
            adv = compute_advantages(self.cfg, roll, batch)
        if roll.logprobs is not None:  # train/inference consistency, optional TIS correction
            rollout_BT = unpack_rows(roll.logprobs, batch.mask_BT)
            info["logp_diff"], w_BT = rollout_consistency(old_logp, rollout_BT, batch.mask_BT, g.rollout.tis_cap)
            if g.rollout.tis_cap > 0:
                adv = (adv[:, None] if adv.dim() == 1 else adv) * w_BT
            if g.mu == 1 and g.algorithm != "ppo":
                old_logp = None  # pi_old = the detached current policy, as without an engine
        return adv, ret, old_logp

    def update(self, roll: Rollout, batch: Batch, adv, old_logp, ref_logp, old_v, ret) -> dict:
        """The policy step (``mu`` clipped iterations), then the rollout engine's weights follow."""
        n_global = all_sum([float(len(roll.completion_ids))])[0]
        local_fraction = len(roll.completion_ids) / max(n_global, 1.0)
        if self.engine is not None:
            self.engine.before_update()
        if self.sharded is not None:  # micro-batched on the FSDP2 (+EP) shards; the rollout model synced after
            upd = self.sharded.update(batch, adv, guard=self.st.guard, old_logp_BT=old_logp, ref_logp_BT=ref_logp,
                                      local_fraction=local_fraction)
        else:
            upd = policy_update(self.model, self.optimizer, batch, adv, self.g, params=self.params,
                                guard=self.st.guard, old_logp_BT=old_logp, ref_logp_BT=ref_logp,
                                value_head=self.value_head, old_values_BT=old_v, returns_BT=ret,
                                local_fraction=local_fraction)
        if self.engine is not None:
            self.push_weights()
        return upd

    def push_weights(self) -> None:
        """The rollout engine takes the policy's new weights: from the shards one tensor at a time
        (collective) when the trainer holds no full model, else from the model."""
        if self.model is None:
            self.engine.load_tensors(self.sharded.hf_tensors(self.sharded.engine_dtype()))
        else:
            self.engine.update_weights(self.model)

    def step_metrics(self, roll: Rollout, info: dict, upd: dict, seconds: float) -> dict[str, float]:
        """Gathers every rank's rollout summary, feeds the pass-rate tracker (identical on every
        rank), and returns the step's ``grpo/*`` series."""
        st = self.st
        summaries = _gather(rollout_summary(roll, info, self.pattern, info["first_round"]))
        for s in summaries:
            for p, acc in s["group_acc"]:
                st.tracker.update(p, acc)
        m = step_metrics(self.cfg, summaries, upd, seconds, self.pattern)
        st.tokens += int(sum(sum(s["sampled"]["lengths"]) for s in summaries))
        return m

    def train_step(self) -> tuple[dict[str, float], Rollout, dict]:
        """rollout -> score -> advantages -> update -> metrics; returns (metrics, rollout, update)."""
        t0 = time.perf_counter()
        roll, info = self.rollout()
        batch = build_batch(roll.prompt_ids, roll.completion_ids, self.tok.pad_token_id)
        old_logp, ref_logp, old_v = self.score(roll, batch)
        adv, ret, old_logp = self.advantages(roll, batch, info, old_logp, old_v)
        upd = self.update(roll, batch, adv, old_logp, ref_logp, old_v, ret)
        self.st.step += 1
        return self.step_metrics(roll, info, upd, time.perf_counter() - t0), roll, upd

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1 on the fixed held-out subset (``eval/*``); on the vLLM engine when the
        trainer holds no full model."""
        engine = self.engine if self.model is None else None
        return run_eval(self.model, self.tok, self.subset, self.scorer, self.g.max_new_tokens, engine=engine)

    def save(self) -> None:
        with self.tel.checkpoint_timer() if self.tel is not None else contextlib.nullcontext():
            _save(self.ckpt, self.st, self.model, self.optimizer, self.value_head, self.work, self.sharded)

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict | None:
        """Resume, train until ``steps`` or the time budget, finish; rank 0 returns the summary."""
        g, st, rank, subset = self.g, self.st, self.rank, self.subset
        self.resume()
        if g.rollout.engine == "vllm":
            self.start_engine()
        tel = self.tel = _telemetry(self.cfg, rank)
        self.scorer.attach_metrics(tel)
        detector = _streaming_detector(self.cfg, self.work / "insight_stream.jsonl", tel)
        if st.step == 0 and subset:
            st.first_eval = st.last_eval = self.evaluate()
            if rank == 0:
                self.metrics.write(0, st.first_eval)
        t_start = time.perf_counter() - st.elapsed_s
        bar = progress(total=g.steps, initial=st.step, desc="grpo", unit="step")
        stop_reason = "steps"
        while st.step < g.steps:
            if g.time_budget_s is not None and _flag(time.perf_counter() - t_start >= g.time_budget_s):
                stop_reason = "time_budget"
                break
            m, roll, upd = self.train_step()
            seconds = m["grpo/step_seconds"]
            if st.grouping is not None:
                m.update(st.grouping.report(st.tracker))
                if st.step % g.grouping.recluster_every == 0:
                    st.grouping.regroup(st.tracker)
                    st.stream.reset_groups()
            if subset and (st.step % g.eval_every == 0 or st.step == g.steps):
                st.last_eval = self.evaluate()
                m.update(st.last_eval)
            if rank == 0:
                self.metrics.write(st.step, m)
                for name, value in m.items():  # "aha" events as soon as they are detectable
                    detector.update(st.step, name, value)
                if st.step % g.sample_every == 0 or st.step == 1:
                    _write_samples(self.samples_path, st.step, roll, self.entries)
            if tel is not None:
                tel.observe_step(seconds, tokens=int(sum(len(c) for c in roll.completion_ids)), loss=upd["loss"],
                                 lr=g.lr, reward=m["grpo/reward/mean"], accuracy=m["grpo/accuracy"])
                tel.set_gauges(**m)
            st.elapsed_s = time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix(reward=f"{m['grpo/reward/mean']:.3f}", acc=f"{m['grpo/accuracy']:.3f}")
            if st.step % g.checkpoint_every == 0:
                self.save()
        bar.close()
        if subset and stop_reason == "time_budget" and st.step % g.eval_every != 0 and st.step > 0:
            st.last_eval = self.evaluate()  # the curve ends where training did
            if rank == 0:
                self.metrics.write(st.step, st.last_eval)
        if tel is not None:
            tel.close()
            self.tel = None
        if self.model is None:  # streamed from the shards, rank 0 writes (collective)
            self.sharded.export(self.work)
        if rank != 0:
            return None
        return _finish(self.cfg, self.model, self.tok, self.work, st, {
            "dropped_prompts": self.dropped, "dropped_eval_prompts": self.eval_dropped,
            "rollout_engine": g.rollout.engine, "rl_prompts": len(self.entries), "eval_subset": len(subset),
            "stop_reason": stop_reason, "verify_calls": self.scorer.verify_calls})

    def start_engine(self) -> None:
        """Start the vLLM rollout engine. From the full model when the trainer holds one; else from
        the policy checkpoint when it is a standard HF dir (then, after a resume, the shards' weights
        pushed), or from a streamed export of the shards (an r1zero-format policy dir)."""
        from r1zero.grpo.vllm_rollout import start_engine

        g, seed = self.g, self.cfg.seed + self.rank
        if self.model is not None:
            self.engine = start_engine(g.rollout, self.model, self.tok, max_len=self.positions, seed=seed)
            return
        dtype = self.sharded.engine_dtype()
        model_dir = Path(store.materialize(self.policy_uri))
        if _standard_dir(model_dir):
            push = self.st.step > 0 or bool(g.rollout.server_address)
        else:
            from r1zero.grpo.sharded import stream_full
            from r1zero.model.hf_export import export_hf

            self.engine_dir = model_dir = Path(tempfile.mkdtemp(prefix="r1zero-vllm-policy-"))
            export_hf(stream_full(self.sharded.pm.model, dtype), self.sharded.hf_config, model_dir, dtype=dtype)
            self.tok.save_pretrained(str(model_dir))
            push = bool(g.rollout.server_address)
        self.engine = start_engine(g.rollout, None, self.tok, max_len=self.positions, seed=seed,
                                   model_dir=str(model_dir), dtype=str(dtype).removeprefix("torch."))
        if push:
            self.push_weights()

    def close(self) -> None:
        """Stop the rollout engine (its process or server connection); idempotent."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.engine_dir is not None:
            shutil.rmtree(self.engine_dir, ignore_errors=True)
            self.engine_dir = None


def _standard_dir(model_dir: Path) -> bool:
    """A checkpoint vLLM serves as it is: a stock architecture's config.json (not r1zero_moe)."""
    from r1zero.model.hf_export import ARCHITECTURES

    try:
        conf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return conf.get("model_type") in ARCHITECTURES


def train(cfg, policy_uri: str, data_uri: str, work: Path, ckpt_uri: str,
          device: torch.device = torch.device("cpu")) -> dict | None:
    """The RL loop (:class:`GRPOTrainer`); rank 0 writes the outputs into ``work``. Collective."""
    trainer = GRPOTrainer(cfg, policy_uri, data_uri, work, ckpt_uri, device)
    try:
        return trainer.fit()
    finally:
        trainer.close()


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
        sd = {"model": model.state_dict()} if model is not None else {}  # None: the shards (engine/) only
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
    if model is not None:  # None: exported from the shards already (ShardedGRPO.export)
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
