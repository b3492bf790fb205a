"""The pure DeepSpeed config builder and the warmup+cosine schedule."""

from __future__ import annotations

import math

import pytest

from r1zero.config import build_config
from r1zero.train.deepspeed_config import build_ds_config, lr_at, lr_lambda


def test_batch_arithmetic_and_optimizer():
    cfg = build_config({"pretrain": {"micro_batch": 4, "grad_accum": 3, "grad_clip": 0.5}, "parallel": {"zero_stage": 2}})
    ds = build_ds_config(cfg.pretrain, cfg.parallel, dp=8)
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "bf16" not in ds and "fp16" not in ds


@pytest.mark.parametrize("precision,key", [("bf16", "bf16"), ("fp16", "fp16"), ("fp8", "bf16")])
def test_precision_sections(precision, key):
    cfg = build_config({"pretrain": {"precision": precision}})
    ds = build_ds_config(cfg.pretrain, cfg.parallel, dp=1)
    assert ds[key]["enabled"] is True
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # stays at the floor after the schedule
    vals = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lr_lambda_is_relative_to_base_lr():
    cfg = build_config({"pretrain": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 4, "steps": 20}})
    fn = lr_lambda(cfg.pretrain)
    assert fn(3) == pytest.approx(1.0)
    assert fn(20) == pytest.approx(0.1)
