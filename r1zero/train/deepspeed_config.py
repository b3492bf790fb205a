"""Pure builder of the DeepSpeed config dict from the r1zero config tree.

    ds = build_ds_config(cfg.pretrain, cfg.parallel, dp=2)
    engine, opt, _, sched = deepspeed.initialize(model=m, model_parameters=groups, config=ds,
                                                 lr_scheduler=lr_lambda_scheduler)

Batch semantics (DeepSpeed's): ``train_batch_size = micro_batch * grad_accum * dp``; every
data-parallel rank runs ``grad_accum`` micro-batches of ``micro_batch`` sequences per optimizer
step. The optimizer is DeepSpeed's ``AdamW`` with ``torch_adam: true`` (i.e. ``torch.optim.AdamW``,
verified across gloo processes on CPU; the fused CPU Adam needs a C++ build). The LR schedule is
passed to ``deepspeed.initialize`` as a client scheduler (:func:`lr_lambda`), so the exact same
warmup + cosine curve drives the DeepSpeed engine and the native (tp/pp/ep) loop.
"""

from __future__ import annotations

import math

# AdamW betas/eps: (0.9, 0.95) and 1e-8 as in GPT-3 (Brown et al. 2020, sec. 2 / appendix B) and
# nanoGPT; 0.95 rather than 0.999 keeps small-batch pretraining stable.
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8

# fp16 dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2):
# start at 2^16, halve on overflow, double after 1000 clean steps (DeepSpeed defaults).
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 1000


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``total_steps`` (GPT-3 / Chinchilla).

    ``step`` counts optimizer steps from 0 (the LR used *for* step ``step``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def lr_lambda(pre, total_steps: int | None = None):
    """A ``LambdaLR`` multiplier function for ``cfg.pretrain`` (base LR = ``pre.lr``)."""
    total = pre.steps if total_steps is None else total_steps

    def fn(step: int) -> float:
        return lr_at(step, lr=pre.lr, min_lr=pre.min_lr, warmup_steps=pre.warmup_steps, total_steps=total) / pre.lr

    return fn


def build_ds_config(pre, parallel, dp: int, *, steps_per_print: int | None = None) -> dict:
    """DeepSpeed config for ``cfg.pretrain`` / ``cfg.parallel`` with ``dp`` data-parallel ranks."""
    cfg: dict = {
        "train_micro_batch_size_per_gpu": pre.micro_batch,
        "gradient_accumulation_steps": pre.grad_accum,
        "train_batch_size": pre.micro_batch * pre.grad_accum * dp,
        "gradient_clipping": pre.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": pre.lr,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": pre.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": parallel.zero_stage},
        "steps_per_print": steps_per_print or 10**9,
        "wall_clock_breakdown": False,
        "prescale_gradients": False,
    }
    if parallel.zero_stage >= 1:
        # Without contiguous/overlapped buckets ZeRO reduces in a fixed order, which keeps fp32 CPU
        # runs bit-reproducible across restarts.
        cfg["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": False})
    if parallel.zero_stage == 3:
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    if pre.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif pre.precision == "fp16":
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": FP16_INITIAL_SCALE_POWER,
            "loss_scale_window": FP16_LOSS_SCALE_WINDOW,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    # fp8 is not a DeepSpeed precision: the model's linears are converted by r1zero.train.precision
    # (torchao float8) and the engine runs in bf16.
    elif pre.precision == "fp8":
        cfg["bf16"] = {"enabled": True}
    if pre.activation_checkpointing:
        # The model itself checkpoints its blocks (HF gradient_checkpointing_enable); these settings
        # only matter for deepspeed.checkpointing users and are recorded for the run manifest.
        cfg["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return cfg
