"""Precision checks: fp8 refuses without Hopper (and runs the torchao path when one is present)."""

from __future__ import annotations

import pytest
import torch

from r1zero.errors import UserError
from r1zero.train.precision import apply_fp8, check_precision, param_dtype


def test_fp32_and_bf16_run_on_cpu():
    check_precision("fp32", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    assert param_dtype("bf16") == torch.bfloat16 and param_dtype("fp8") == torch.bfloat16


def test_fp16_on_cpu_is_refused_with_one_line():
    with pytest.raises(UserError, match="fp16 is not supported on CPU"):
        check_precision("fp16", torch.device("cpu"))


def test_fp8_on_cpu_names_the_requirement():
    with pytest.raises(UserError) as e:
        check_precision("fp8", torch.device("cpu"))
    assert "Hopper" in str(e.value) and "compute capability >= 9.0" in str(e.value)


def test_fp8_matches_the_hardware():
    """On a Hopper GPU: torchao float8 linears train a step; on anything else: a clear refusal.

    This machine has no GPU, so here it checks the refusal; on a lent H100/H200 the same test
    exercises the real FP8 path (needs ``pip install torchao==0.18.0``, the ``gpu`` extra).
    """
    cuda = torch.cuda.is_available()
    hopper = cuda and torch.cuda.get_device_capability(0) >= (9, 0)
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False), torch.nn.GELU(),
                                torch.nn.Linear(128, 64, bias=False))
    if not hopper:
        with pytest.raises(UserError, match="fp8"):
            apply_fp8(model, dev)
        return
    from r1zero.train.precision import count_fp8_linears

    model = apply_fp8(model.to(dev, torch.bfloat16), dev)
    assert count_fp8_linears(model) == 2
    x = torch.randn(32, 64, device=dev, dtype=torch.bfloat16)
    loss = model(x).float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_cli_refuses_fp8_on_cpu_with_exit_2(data_dir, tmp_path, capsys):
    from r1zero.cli import main

    rc = main(["pretrain", "--set", "pretrain.precision=fp8", "--set", "telemetry.enabled=false",
               "--data", str(data_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("r1zero: error: pretrain.precision=fp8 needs an NVIDIA Hopper GPU")
    assert "Traceback" not in err
