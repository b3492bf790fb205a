"""Parallel layout (dp x tp x pp, with ep inside dp): validated up front, then turned into groups.

    dims = ParallelDims.from_config(cfg.parallel, cfg.model, world_size=4)
    dims.coords(rank)   # -> {"dp": .., "tp": .., "pp": .., "ep": ..}

Rank order (innermost first) is tp, then dp, then pp, as in Megatron/torchtitan: tensor-parallel
peers are adjacent ranks (they talk every layer), pipeline stages are the outermost blocks
(they talk once per micro-batch). Expert parallelism does not add ranks: experts are sharded over
``ep`` consecutive data-parallel ranks (DeepSpeed ``_create_expert_and_data_parallel``), so
``ep`` must divide ``dp``; expert weights are then replicated over ``dp // ep`` ranks
(the "expert-data-parallel" groups).

Validation collects every problem and reports them in one line that lists each factor, so a
misconfigured PyTorchJob fails before any process group is created.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1zero.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    ep: int
    world_size: int
    v: int = 1  # pipeline stages per rank (interleaved 1F1B); the model splits into pp * v chunks
    schedule: str = "1f1b"  # parallel.pp_schedule
    dp_replicate: int = 1  # HSDP replicas (parallel.dp_replicate): FSDP shards over dp / dp_replicate

    @classmethod
    def from_config(cls, parallel, model=None, world_size: int = 1, grad_accum: int | None = None) -> ParallelDims:
        """Build and validate from ``cfg.parallel`` (+ ``cfg.model`` for divisibility checks)."""
        dims = cls(dp=parallel.dp, tp=parallel.tp, pp=parallel.pp, ep=parallel.ep, world_size=world_size,
                   v=parallel.virtual_stages(), schedule=parallel.pp_schedule, dp_replicate=parallel.dp_replicate)
        dims.validate(model, grad_accum=grad_accum)
        return dims

    # ------------------------------------------------------------------------------------------
    def describe(self) -> str:
        out = f"dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.dp * self.tp * self.pp} (ep={self.ep} within dp)"
        if self.dp_replicate > 1:
            out += f", HSDP {self.dp_replicate} replicas x {self.dp // self.dp_replicate} shards"
        return out + (f", {self.v} pipeline stages per rank (interleaved 1F1B)" if self.v > 1 else "")

    def problems(self, model=None, grad_accum: int | None = None) -> list[str]:
        """Every violated constraint, each naming the factors involved."""
        out: list[str] = []
        product = self.dp * self.tp * self.pp
        if product != self.world_size:
            out.append(f"dp({self.dp}) * tp({self.tp}) * pp({self.pp}) = {product} but world size is {self.world_size}")
        if self.dp % self.ep:
            out.append(f"ep({self.ep}) must divide dp({self.dp}) (experts shard over data-parallel ranks)")
        if self.dp_replicate > 1 and (self.dp % self.dp_replicate or (self.dp // self.dp_replicate) % self.ep):
            out.append(f"dp_replicate({self.dp_replicate}) * ep({self.ep}) must divide dp({self.dp})"
                       " (HSDP: expert groups sit inside one replica)")
        if model is not None:
            kv = model.n_kv_heads or model.n_heads
            if model.n_heads % self.tp:
                out.append(f"model.n_heads({model.n_heads}) not divisible by tp({self.tp})")
            if kv % self.tp:
                out.append(f"model.n_kv_heads({kv}) not divisible by tp({self.tp})")
            if model.moe.d_expert % self.tp:
                out.append(f"model.moe.d_expert({model.moe.d_expert}) not divisible by tp({self.tp})")
            if model.n_layers % (self.pp * self.v):
                stages = f"pp({self.pp}) * pp_virtual_stages({self.v})" if self.v > 1 else f"pp({self.pp})"
                out.append(f"model.n_layers({model.n_layers}) not divisible by {stages}")
            if model.moe.n_experts % self.ep:
                out.append(f"model.moe.n_experts({model.moe.n_experts}) not divisible by ep({self.ep})")
        if grad_accum is not None and self.pp > 1 and grad_accum < self.pp:
            # GPipe keeps every stage busy only with >= pp micro-batches; fewer is legal but wasteful,
            # and with grad_accum micro-batches per step the schedule needs at least one per stage.
            out.append(f"pretrain.grad_accum({grad_accum}) must be >= pp({self.pp}) (micro-batches per pipeline step)")
        if self.v > 1 and self.schedule != "interleaved_1f1b":
            out.append(f"parallel.pp_virtual_stages({self.v}) > 1 needs parallel.pp_schedule: interleaved_1f1b"
                       f" (not {self.schedule})")
        if self.schedule == "interleaved_1f1b":
            if self.pp < 2:
                out.append(f"parallel.pp_schedule interleaved_1f1b needs pp >= 2 (pp is {self.pp})")
            elif grad_accum is not None and grad_accum >= self.pp and grad_accum % (grad_accum // self.pp):
                # torch's ScheduleInterleaved1F1B runs the micro-batches in rounds of ~pp
                rounds = grad_accum // self.pp
                out.append(f"pretrain.grad_accum({grad_accum}) must be a multiple of its {rounds} rounds of"
                           f" pp({self.pp}) micro-batches (interleaved 1F1B)")
        return out

    def validate(self, model=None, grad_accum: int | None = None) -> None:
        errs = self.problems(model, grad_accum=grad_accum)
        if errs:
            raise UserError(f"invalid parallel layout [{self.describe()}, world size {self.world_size}]: "
                            + "; ".join(errs))

    # ------------------------------------------------------------------------------------------
    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank``: tp fastest, then dp, then pp; ep index inside the dp block."""
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return {"tp": tp, "dp": dp, "pp": pp, "ep": dp % self.ep}

    def rank_of(self, dp: int, tp: int, pp: int) -> int:
        return pp * self.dp * self.tp + dp * self.tp + tp

    def group_ranks(self, kind: str) -> list[list[int]]:
        """All rank lists for one group kind: ``dp``, ``tp``, ``pp``, ``ep`` or ``edp``.

        ``ep`` groups are blocks of ``ep`` consecutive dp indices (all-to-all of tokens);
        ``edp`` (expert-data-parallel) groups join ranks holding the same expert shard
        (DeepSpeed ``groups._create_expert_and_data_parallel``).
        """
        groups: list[list[int]] = []
        if kind == "dp":
            for pp in range(self.pp):
                for tp in range(self.tp):
                    groups.append([self.rank_of(d, tp, pp) for d in range(self.dp)])
        elif kind == "tp":
            for pp in range(self.pp):
                for d in range(self.dp):
                    groups.append([self.rank_of(d, t, pp) for t in range(self.tp)])
        elif kind == "pp":
            for d in range(self.dp):
                for tp in range(self.tp):
                    groups.append([self.rank_of(d, tp, p) for p in range(self.pp)])
        elif kind == "ep":
            for pp in range(self.pp):
                for tp in range(self.tp):
                    for block in range(self.dp // self.ep):
                        groups.append([self.rank_of(block * self.ep + e, tp, pp) for e in range(self.ep)])
        elif kind == "edp":
            for pp in range(self.pp):
                for tp in range(self.tp):
                    for e in range(self.ep):
                        groups.append([self.rank_of(b * self.ep + e, tp, pp) for b in range(self.dp // self.ep)])
        else:
            raise ValueError(f"unknown group kind {kind!r}")
        return groups

    def group_nodes(self, kind: str, ranks_per_node: int) -> int:
        """Most nodes any group of ``kind`` spans when node ``n`` holds ranks
        ``[n * ranks_per_node, (n + 1) * ranks_per_node)`` (torchrun's node-major rank order)."""
        return max(len({r // ranks_per_node for r in g}) for g in self.group_ranks(kind))

    def group_of(self, kind: str, rank: int) -> list[int]:
        for g in self.group_ranks(kind):
            if rank in g:
                return g
        raise ValueError(f"rank {rank} not in any {kind} group")
