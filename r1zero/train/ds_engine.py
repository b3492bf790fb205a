"""Data-parallel training step on a real DeepSpeed engine (ZeRO 0-3, bf16/fp16, accumulation, clipping).

    eng = DeepSpeedTrainEngine(model, cfg, ctx)
    res = eng.train_step([x_BS, ...])     # grad_accum micro-batches of this rank -> StepResult
    eng.save(dir) / eng.load(dir)         # DeepSpeed's own sharded checkpoint files
    sd = eng.full_state_dict()            # full fp32 weights on rank 0 (gathers ZeRO-3 shards)

Used when the layout is pure data parallel (tp = pp = ep = 1). DeepSpeed scales each micro-batch
loss by 1/grad_accum, averages gradients over the data-parallel ranks, clips the global norm and
steps ``torch.optim.AdamW`` with the client warmup+cosine ``LambdaLR``
(:func:`r1zero.train.deepspeed_config.lr_lambda`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from r1zero.train.deepspeed_config import build_ds_config, lr_lambda


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


def mean_over(values: list[torch.Tensor], group=None) -> float:
    """Mean of per-micro-batch scalars over this rank's micro-batches and the group's ranks."""
    t = torch.stack([v.detach().float().cpu() for v in values]).mean()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t = t / dist.get_world_size(group)
    return float(t)


class DeepSpeedTrainEngine:
    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg, ctx):
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        pre = cfg.pretrain
        self.cfg, self.ctx = cfg, ctx
        self.ds_config = build_ds_config(pre, cfg.parallel, dp=ctx.dims.dp)
        sched_fn = lr_lambda(pre)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, pre.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, sched_fn),
            dist_init_required=False,
        )
        self.model = self.engine.module
        self.dtype = next(self.model.parameters()).dtype
        self._plain = cfg.parallel.zero_stage == 0 and pre.precision == "fp32"

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, micro_batches: list[torch.Tensor]) -> StepResult:
        self.engine.train()
        lr = self._lr()
        losses, lm_losses = [], []
        norm = None
        for i, x_BS in enumerate(micro_batches):
            x_BS = x_BS.to(self.ctx.device)
            out = self.engine(input_ids=x_BS, labels=x_BS)
            self.engine.backward(out.loss)
            if i == len(micro_batches) - 1 and self._plain:
                # ZeRO-0 fp32 clips inside the engine without keeping the norm; the grads are
                # already averaged over dp at the boundary backward, so measure it here.
                norm = torch.sqrt(sum(p.grad.detach().double().pow(2).sum() for p in self.model.parameters()
                                      if p.grad is not None))
            self.engine.step()
            losses.append(out.loss)
            lm_losses.append(out.lm_loss if getattr(out, "lm_loss", None) is not None else out.loss)
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        skipped = bool(getattr(self.engine, "skipped_steps", 0)) and self._last_skipped()
        tokens = sum(int(x.numel()) for x in micro_batches) * self.ctx.dims.dp
        return StepResult(loss=mean_over(losses), lm_loss=mean_over(lm_losses),
                          grad_norm=float(norm) if norm is not None else float("nan"), lr=lr, tokens=tokens,
                          skipped=skipped)

    def _last_skipped(self) -> bool:
        prev = getattr(self, "_skips", 0)
        now = int(self.engine.skipped_steps)
        self._skips = now
        return now > prev

    def after_step(self) -> None:
        """Aux-loss-free bias update, once per optimizer step, counts summed over all dp ranks."""
        if hasattr(self.model, "update_expert_bias"):
            self.model.update_expert_bias(group=dist.group.WORLD if self.ctx.dims.dp > 1 else None)

    def moe_metrics(self) -> dict[str, float]:
        """Per-layer MoE telemetry of this rank's last micro-batch (``moe/L{i}/...``)."""
        return self.model.moe_metrics() if hasattr(self.model, "moe_metrics") else {}

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine checkpoint under {directory}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0 (None elsewhere); gathers ZeRO-3 partitions first."""
        params = list(self.model.parameters())
        if self.cfg.parallel.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                sd = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()} \
                    if self.ctx.is_rank0 else None
            return sd
        if not self.ctx.is_rank0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}


def ds_env_defaults() -> None:
    """DeepSpeed on CPU: force the CPU accelerator (no CUDA probing); set before importing deepspeed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
