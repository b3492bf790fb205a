"""Model-parallel training step (tp / pp / ep, combined with dp) on torch-native engines.

    eng = NativeTrainEngine(model, cfg, ctx)   # applies DTensor TP, pipelining stages, EP dispatch
    res = eng.train_step([x_BS, ...])          # same contract as DeepSpeedTrainEngine.train_step

Same optimizer (``torch.optim.AdamW``, GPT-3 betas), schedule (client ``LambdaLR``), loss scaling
(1/grad_accum per micro-batch) and clipping formula (``max_norm / (norm + 1e-6)``) as the
DeepSpeed engine, so a layout change does not change the math:

- gradients of replicated (dense) parameters are averaged over the data-parallel group;
- expert gradients (ep > 1) already hold the contributions of their ep group (the all-to-all
  backward brings them home); they are summed over the expert-data-parallel group and divided
  by dp (DeepSpeed-MoE's expert/data groups);
- the global gradient norm adds each distinct parameter once: tp shards summed over tp,
  replicated tensors counted on tp rank 0, experts summed over ep, stages summed over pp;
- with pipeline parallelism and tied embeddings, the embedding gradient of the first stage and
  the LM-head gradient of the last stage are summed over the pipeline group.

Checkpoints are one ``rank-XXXXX.pt`` per rank (local shards of model and optimizer state);
resuming needs the same layout. :meth:`full_state_dict` gathers experts, tp shards and stages
into full fp32 weights on rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from r1zero.train import tensor_parallel as tpar
from r1zero.train.deepspeed_config import ADAM_BETAS, ADAM_EPS, lr_lambda
from r1zero.train.ds_engine import StepResult, param_groups
from r1zero.train.expert_parallel import apply_expert_parallel, expert_param_ids, gather_experts


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (``torch.utils.checkpoint``, non-reentrant).

    NOTE: the MoE layer's training-time token counts are accumulated again during recompute;
    the aux-loss-free bias step uses only ``sign(mean - counts)``, which a uniform doubling keeps.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        fwd = layer.forward

        def wrapped(*args, _fwd=fwd, _layer=layer, **kw):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(_fwd, *args, use_reentrant=False, **kw)
            return _fwd(*args, **kw)

        layer.forward = wrapped


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _all_reduce(t: torch.Tensor, group) -> None:
    if _size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


class NativeTrainEngine:
    kind = "native"

    def __init__(self, model, cfg, ctx):
        self.cfg, self.ctx, self.model = cfg, ctx, model
        dims, pre = ctx.dims, cfg.pretrain
        self.ga = pre.grad_accum
        g = ctx.groups
        self.dp_group = g["dp"] if dims.dp > 1 else None
        self.tp_group = g["tp"] if dims.tp > 1 else None
        self.pp_group = g["pp"] if dims.pp > 1 else None
        self.ep_group = g["ep"] if dims.ep > 1 else None
        self.edp_group = g["edp"] if dims.ep > 1 and dims.dp // dims.ep > 1 else None
        self.tp_rank, self.pp_rank = ctx.coords["tp"], ctx.coords["pp"]
        model.to(ctx.device)

        if dims.tp > 1:
            from torch.distributed.device_mesh import DeviceMesh

            self.tp_mesh = DeviceMesh.from_group(g["tp"], ctx.device.type,
                                                 mesh=dims.group_of("tp", ctx.rank), mesh_dim_names=("tp",))
            tpar.apply_tensor_parallel(model, self.tp_mesh)
        all_experts = expert_param_ids(model)
        self.owned = all_experts
        if dims.ep > 1:
            self.owned = apply_expert_parallel(model, g["ep"], dims.ep, ctx.coords["ep"])
        self.expert_ids = all_experts if dims.ep > 1 else set()

        self.pipeline = None
        module = model
        if dims.pp > 1:
            from r1zero.train.pipeline_parallel import Pipeline, StageModule

            module = StageModule(model, self.pp_rank, dims.pp)
            self.pipeline = Pipeline(module, self.pp_rank, dims.pp, ctx.device, g["pp"], n_microbatches=self.ga)
        self.module = module
        self.tied = model.model.embed_tokens.weight if model.config.tie_word_embeddings and dims.pp > 1 else None
        params = [p for p in module.parameters() if id(p) not in all_experts or id(p) in self.owned]
        if self.tied is not None and all(p is not self.tied for p in params):
            params.append(self.tied)  # middle stages: keeps the tied grad collective symmetric
        self.params = params
        shim = torch.nn.Module()
        shim.p = torch.nn.ParameterList(params)
        self.optimizer = torch.optim.AdamW(param_groups(shim, pre.weight_decay), lr=pre.lr, betas=ADAM_BETAS,
                                           eps=ADAM_EPS, weight_decay=pre.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(pre))

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        self.model.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is not None:
            loss, lm = self.pipeline.step(torch.cat(micro_batches).to(self.ctx.device))
            # only the last stage knows the loss: a sum over the pipeline group hands it to all
            both = torch.stack([loss.float(), lm.float()])
            _all_reduce(both, self.pp_group)
        else:
            losses, lms = [], []
            for x_BS in micro_batches:
                x_BS = x_BS.to(self.ctx.device)
                out = self.model(input_ids=x_BS, labels=x_BS)
                (out.loss / self.ga).backward()
                losses.append(out.loss.detach().float())
                lms.append(out.lm_loss.detach().float())
            both = torch.stack([torch.stack(losses).mean(), torch.stack(lms).mean()])
        self._sync_grads()
        norm = self._clip(self.cfg.pretrain.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        _all_reduce(both, self.dp_group)
        both = both / self.ctx.dims.dp
        tokens = sum(int(x.numel()) for x in micro_batches) * self.ctx.dims.dp
        return StepResult(loss=float(both[0]), lm_loss=float(both[1]), grad_norm=norm, lr=lr, tokens=tokens)

    def _sync_grads(self) -> None:
        dp = self.ctx.dims.dp
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.tied is not None:
            _all_reduce(tpar.local(self.tied.grad), self.pp_group)
        for p in self.params:
            g = tpar.local(p.grad)
            if id(p) in self.expert_ids:
                _all_reduce(g, self.edp_group)
            else:
                _all_reduce(g, self.dp_group)
            if dp > 1:
                g.div_(dp)

    def _clip(self, max_norm: float) -> float:
        dense = torch.zeros((), dtype=torch.float64)
        expert = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            g = tpar.local(p.grad).detach().double()
            sq = g.pow(2).sum()
            if self.tied is not None and p is self.tied and self.pp_rank != 0:
                continue  # the tied weight lives on several stages: count the first stage's copy
            if id(p) in self.expert_ids:
                expert += sq if self.tp_rank == 0 else 0.0
            elif tpar.is_dtensor(p.grad):
                dense += sq  # a tp shard
            elif self.tp_rank == 0:
                dense += sq  # replicated over tp: count once
        both = torch.stack([dense, expert])
        _all_reduce(both, self.tp_group)
        _all_reduce(both, self.pp_group)
        _all_reduce(both[1:], self.ep_group)
        total = float(both.sum().sqrt())
        if max_norm > 0:
            coef = max_norm / (total + 1e-6)
            if coef < 1.0:
                for p in self.params:
                    tpar.local(p.grad).mul_(coef)
        return total

    def after_step(self) -> None:
        if hasattr(self.model, "update_expert_bias"):
            self.model.update_expert_bias(group=self.dp_group)

    def moe_metrics(self) -> dict[str, float]:
        from r1zero.model.moe import flat_moe_metrics

        layers = self.module.layers if self.pipeline is not None else self.model.model.layers
        stats = [s for s in (getattr(layer.mlp, "stats", dict)() for layer in layers) if s]
        if self.pp_group is not None:
            parts: list = [None] * _size(self.pp_group)
            dist.all_gather_object(parts, stats, group=self.pp_group)
            stats = [s for part in parts for s in part]
        return flat_moe_metrics(stats)

    # -- checkpoints ----------------------------------------------------------------------------
    def _file(self, directory: Path) -> Path:
        return Path(directory) / f"rank-{self.ctx.rank:05d}.pt"

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        model_sd = {k: tpar.local(v).detach().clone() for k, v in self.model.state_dict().items()}
        opt_sd = self.optimizer.state_dict()
        opt_sd["state"] = {i: {k: tpar.local(v).clone() if torch.is_tensor(v) else v for k, v in st.items()}
                           for i, st in opt_sd["state"].items()}
        torch.save({"model": model_sd, "optim": opt_sd, "sched": self.scheduler.state_dict()}, self._file(directory))

    def load(self, directory: Path) -> None:
        blob = torch.load(self._file(directory), weights_only=False)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                tpar.local(v).copy_(blob["model"][k])
        # optimizer state comes back as local shards: re-wrap like the parameter it belongs to
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        for i, st in blob["optim"]["state"].items():
            p = flat[int(i)]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and tpar.is_dtensor(p) and v.dim() > 0:
                    from torch.distributed.tensor import DTensor

                    st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False)
        self.optimizer.load_state_dict(blob["optim"])
        self.scheduler.load_state_dict(blob["sched"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: experts from their owners, tp shards all-gathered, stages broadcast; rank 0 keeps it."""
        dims = self.ctx.dims
        if dims.ep > 1:
            gather_experts(self.model, self.ep_group, dims.group_of("ep", self.ctx.rank), dims.ep)
        sd = {k: tpar.full(v).detach() for k, v in self.model.state_dict().items()}
        if dims.pp > 1:
            ranks = dims.group_of("pp", self.ctx.rank)
            per = self.model.config.num_hidden_layers // dims.pp
            for k, v in sd.items():
                owner = self._owner_stage(k, per, dims.pp)
                v = v.contiguous()
                dist.broadcast(v, src=ranks[owner], group=self.pp_group)
                sd[k] = v
        if not self.ctx.is_rank0:
            return None
        return {k: v.float().cpu().clone() for k, v in sd.items()}

    @staticmethod
    def _owner_stage(name: str, per: int, pp: int) -> int:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) // per
        if name.startswith(("model.norm", "lm_head")):
            return pp - 1
        return 0
