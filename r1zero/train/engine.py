"""The pretraining engine for every layout: FSDP2 + DTensor TP/SP + EP + ``torch.distributed.pipelining``.

    eng = TrainEngine(cfg, ctx, pm)           # pm = parallelize(...) then materialize(...)
    res = eng.train_step([x_BS, ...])         # this rank's grad_accum micro-batches -> StepResult
    eng.after_step()                          # aux-loss-free expert-bias step (counts summed over dp)
    eng.save(dir) / eng.load(dir)             # torch.distributed.checkpoint, any layout -> any layout
    for name, t in eng.full_tensors(): ...    # one full tensor at a time (HF export)

One optimizer step is the same math in every layout (so a layout change does not change the
losses): ``torch.optim.AdamW`` (GPT-3 betas, eps 1e-8; decay on matrices only), the warmup+cosine
``LambdaLR`` of :func:`r1zero.train.deepspeed_config.lr_lambda`, each micro-batch loss scaled by
1/grad_accum, gradients averaged over dp by FSDP2's reduce-scatter in fp32 (expert gradients: the
all-to-all backward sums them over ep, FSDP2 divides by dp), and clipping by
``max_norm / (norm + 1e-6)`` with the global norm over every distinct parameter (DTensor norms
reduced over their meshes, experts summed over ep, stages over pp, a tied embedding counted
once). Pipeline layouts run ``Schedule1F1B`` (``parallel.pp_schedule``: ``gpipe`` as an option)
over the grad_accum micro-batches; ``interleaved_1f1b`` runs ``ScheduleInterleaved1F1B`` over
``parallel.pp_virtual_stages`` stages per rank.

fp16 scales the loss with ``torch.amp.GradScaler`` (skips steps with inf/nan gradients).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from r1zero.train import dist as rdist
from r1zero.train.deepspeed_config import ADAM_BETAS, ADAM_EPS, lr_lambda
from r1zero.train.parallelize import ParallelModel, build_stage, canonical_fqn, decoder_layers


@dataclass
class StepResult:
    loss: float  # mean training loss of the global batch (LM + MoE aux/z)
    lm_loss: float  # next-token cross-entropy of the global batch
    grad_norm: float
    lr: float  # learning rate used for this step
    tokens: int  # tokens processed by all ranks in this step
    skipped: bool = False  # fp16 overflow: the optimizer step was skipped


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (dim >= 2), not norms/biases/router biases (GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def by_mesh(groups: list[dict]) -> list[dict]:
    """Each AdamW group split by the parameters' DeviceMesh (plain tensors apart), order kept.

    One foreach kernel cannot mix DTensors of several meshes, or DTensors and tensors, and FSDP2
    puts the experts on their own mesh (``edp``) beside the rest (``dp``). Homogeneous groups let
    AdamW run foreach in every layout: with one mixed group it fell back to a per-parameter loop,
    one DTensor dispatch per op and parameter (about 5x DeepSpeed's AdamW time on the tiny preset
    at dp=2 on CPU, BENCHMARKS.md "Where the step time goes at dp=2"). The math is unchanged."""
    from torch.distributed.tensor import DTensor

    out = []
    for g in groups:
        parts: dict = {}
        for p in g["params"]:
            parts.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        out += [{**g, "params": ps} for ps in parts.values()]
    return out


def build_optimizer(model: torch.nn.Module, pre) -> torch.optim.Optimizer:
    """The engine's AdamW (also what the dry run sizes), foreach over groups of one mesh each."""
    return torch.optim.AdamW(by_mesh(param_groups(model, pre.weight_decay)), lr=pre.lr, betas=ADAM_BETAS,
                             eps=ADAM_EPS, weight_decay=pre.weight_decay, foreach=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class TrainEngine:
    kind = "fsdp2"

    def __init__(self, cfg, ctx: rdist.DistContext, pm: ParallelModel):
        self.cfg, self.ctx, self.pm = cfg, ctx, pm
        pre = cfg.pretrain
        self.ga = pre.grad_accum
        self.model = pm.model
        self.device = ctx.device
        mesh, dims = pm.mesh, pm.dims
        # the groups of this rank (a group of one makes every helper a no-op; None would mean the world)
        self.dp_group = mesh["dp"].get_group()
        self.pp_group = mesh["pp"].get_group()
        self.ep_group = mesh["ep"].get_group()
        self.optimizer = build_optimizer(self.model, pre)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(pre))
        self.scaler = torch.amp.GradScaler(self.device.type) if pre.precision == "fp16" else None
        # every rank creates every {first, last} stage group (new_group is collective)
        self.tied_group = rdist.tied_embedding_group(mesh) if dims.pp > 1 and pm.config.tie_word_embeddings \
            else None
        self.compute_dtype: torch.dtype | None = None  # of the last forward's activations (summary.json)
        self.pipeline = None
        if dims.pp > 1:
            from r1zero.train.pipeline_parallel import Pipeline

            self.pipeline = Pipeline(build_stage(pm, self.device), pm.pp_rank, dims.pp, self.ga,
                                     schedule=cfg.parallel.pp_schedule, scale=self._scale_loss)

    # -- one optimizer step ---------------------------------------------------------------------
    def _scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        self.model.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is not None:
            both = self.pipeline.step(torch.cat(micro_batches).to(self.device))
            self.compute_dtype = self.model.compute_dtype
            # only the last stage knows the loss: a sum over the pipeline group hands it to all
            rdist.all_reduce(both, self.pp_group)
        else:
            sums = torch.zeros(2, device=self.device)
            for i, x_BS in enumerate(micro_batches):
                if self.pm.fsdp:  # reduce-scatter once, after the last micro-batch
                    self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
                x_BS = x_BS.to(self.device)
                out = self.model(input_ids=x_BS, labels=x_BS)
                self.compute_dtype = out.logits.dtype
                self._scale_loss(out.loss / self.ga).backward()
                sums += torch.stack([out.loss.detach().float(), out.lm_loss.detach().float()])
            both = sums / len(micro_batches)
        self._reduce_partial_grads()
        self._sum_tied_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = self._clip(self.cfg.pretrain.grad_clip)
        skipped = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        self.scheduler.step()
        rdist.all_reduce(both, self.dp_group)
        both = (both / self.pm.dims.dp).tolist()
        tokens = sum(int(x.numel()) for x in micro_batches) * self.pm.dims.dp
        return StepResult(loss=both[0], lm_loss=both[1], grad_norm=norm, lr=lr, tokens=tokens, skipped=skipped)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.grad is not None]

    def _reduce_partial_grads(self) -> None:
        """Gradients in their parameter's layout: a replicated weight fed by sequence shards (the
        sequence-parallel norms) gets a ``Partial`` gradient, each tp rank's share; DTensor
        reduces it (``redistribute``) before clipping and the step."""
        from torch.distributed.tensor import DTensor

        for p in self._params():
            g = p.grad
            if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(placements=p.placements)

    def _sum_tied_grads(self) -> None:
        """pp with tied embeddings: the first stage's embedding and the last stage's LM head are
        one weight; their gradients are summed (Megatron's embedding group)."""
        if self.tied_group is None:
            return
        tied = self.pm.tied
        if tied is None:
            return
        if tied.grad is None:
            tied.grad = torch.zeros_like(tied)
        rdist.all_reduce(_local(tied.grad), self.tied_group)

    def _counts(self, p) -> bool:
        """Whether this rank's copy of ``p``'s gradient enters the global norm: a replicated copy
        (over a tp / replicate mesh dim, or over tp when ``p`` is not tensor parallel) counts on
        the coordinate-0 rank only; shards, other experts and other stages all count."""
        from torch.distributed.tensor import DTensor, Replicate

        if p is self.pm.tied and not self.pm.first:
            return False  # the tied weight lives on the first and the last stage: count it once
        g = p.grad
        names: tuple = ()
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            names = mesh.mesh_dim_names or ()
            for dim, placement in enumerate(g.placements):
                if isinstance(placement, Replicate) and mesh.get_local_rank(dim) != 0:
                    return False
        return "tp" in names or self.pm.tp_rank == 0

    def _clip(self, max_norm: float) -> float:
        """Global L2 norm over every distinct parameter (one all-reduce of the squared local
        shards over the world), then ``coef = max_norm / (norm + 1e-6)``."""
        params = self._params()
        sq = [_local(p.grad).float().pow(2).sum() for p in params if self._counts(p)]
        total_sq = torch.stack(sq).sum() if sq else torch.zeros((), device=self.device)
        rdist.all_reduce(total_sq, None)
        total = float(total_sq.sqrt())
        if max_norm > 0:
            coef = max_norm / (total + 1e-6)
            if coef < 1.0:  # on the local shards, one foreach op (not a DTensor dispatch per parameter)
                torch._foreach_mul_([_local(p.grad) for p in params], coef)
        return total

    def after_step(self) -> None:
        """Aux-loss-free bias step, once per optimizer step, counts summed over the dp ranks."""
        for layer in decoder_layers(self.model):
            if hasattr(layer.mlp, "update_expert_bias"):
                layer.mlp.update_expert_bias(group=self.dp_group)

    def moe_metrics(self) -> dict[str, float]:
        from r1zero.model.moe import flat_moe_metrics

        stats = [s for s in (getattr(layer.mlp, "stats", dict)() for layer in decoder_layers(self.model)) if s]
        if self.pp_group is not None:
            stats = [s for part in rdist.all_gather_object(stats, self.pp_group) for s in part]
        return flat_moe_metrics(stats)

    # -- checkpoints (torch.distributed.checkpoint) ------------------------------------------------
    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # flattened optimizer state: keyed by parameter FQN, so any layout can load it
        return StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": model_sd, "optim": optim_sd}

    def save(self, directory: Path, async_save: bool = False):
        """Every rank writes only its own shards (``__<rank>_0.distcp``; rank 0 the metadata)."""
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()
        state["sched"] = self._sched_position()
        if async_save:
            return dcp.async_save(state, checkpoint_id=str(directory))
        dcp.save(state, checkpoint_id=str(directory))
        return None

    def load(self, directory: Path) -> None:
        """Load a checkpoint written by any layout (DCP reshards by FQN)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.state_dict()
        state["sched"] = self._sched_position()
        # a tied LM head on the last pipeline stage: its optimizer state is the embedding's (the
        # name every layout writes; the optimizer of a one-stage model knows the weight by that name)
        alias = {}
        if self.pm.tied is not None and not self.pm.first:
            alias = {k: k.replace("lm_head.weight", "model.embed_tokens.weight") for k in state["optim"]
                     if "lm_head.weight" in k}
            state["optim"] = {alias.get(k, k): v for k, v in state["optim"].items()}
        dcp.load(state, checkpoint_id=str(directory))
        back = {v: k for k, v in alias.items()}
        state["optim"] = {back.get(k, k): v for k, v in state["optim"].items()}
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._options())
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **state["sched"]})

    def _sched_position(self) -> dict:
        """The LR schedule's position only: its per-group lists (base LRs, last LRs) follow the
        optimizer's groups, whose number depends on the layout (``by_mesh``), and every group
        has the same base LR and lambda; the groups' current LRs travel in the optimizer state."""
        sd = self.scheduler.state_dict()
        return {"last_epoch": sd["last_epoch"], "_step_count": sd["_step_count"]}

    # -- export -----------------------------------------------------------------------------------
    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: ``(FQN, full fp32 CPU tensor)`` one at a time, on rank 0 (other ranks get
        nothing but take part). Pipeline stages hand their tensors to rank 0 stage by stage."""
        from torch.distributed.tensor import DTensor

        tie = bool(self.pm.config.tie_word_embeddings)
        names = self._global_names()
        mine = {canonical_fqn(k, False): v for k, v in self.model.state_dict().items()}
        for name in names:
            if tie and name == "lm_head.weight":
                continue  # the export ties it back to the embedding
            t = mine.get(name)
            full = None
            if t is not None:
                full = t.full_tensor() if isinstance(t, DTensor) else t
                full = full.detach()
            full = rdist.gather_to_rank0(full, self._owner(name), self.ctx.device)
            if self.ctx.is_rank0:
                yield name, full.float().cpu()

    def _owner(self, name: str) -> int:
        """Global rank of the first rank (in rank order) holding ``name`` (agreed by all ranks)."""
        return self._owners[name]

    def _global_names(self) -> list[str]:
        """Every FQN of the world-1 model, with the lowest rank holding it (one object all-gather)."""
        local = [canonical_fqn(k, False) for k in self.model.state_dict()]
        parts = rdist.all_gather_object(local, None)
        owners: dict[str, int] = {}
        for rank, names in enumerate(parts):
            for n in names:
                owners.setdefault(n, rank)
        self._owners = owners
        return sorted(owners, key=_fqn_order)


def _fqn_order(name: str) -> tuple:
    parts = name.split(".")
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)
