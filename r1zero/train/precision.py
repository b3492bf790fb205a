"""Precision checks and the FP8 path.

    check_precision("fp8", torch.device("cpu"))   # -> UserError: fp8 needs Hopper ...
    model = apply_fp8(model)                       # Hopper only: torchao float8 linears

- fp32: everywhere.
- bf16: CPU, or CUDA with compute capability >= 8.0 (Ampere).
- fp16: CUDA only; FSDP2 fp16 parameters with fp32 gradient reduction and
  ``torch.amp.GradScaler`` dynamic loss scaling (:mod:`r1zero.train.engine`).
- fp8: CUDA with compute capability >= 9.0 (Hopper: H100/H200; the A100 has no FP8 tensor cores,
  NVIDIA A100 datasheet). Implemented with torchao's maintained float8 training path
  (``torchao.float8.convert_to_float8_training``, tensorwise scaling); the rest of the model runs
  in bf16.
"""

from __future__ import annotations

import torch

from r1zero.errors import UserError

HOPPER_CC = (9, 0)  # FP8 tensor cores start with sm_90 (Hopper)
AMPERE_CC = (8, 0)  # bf16 tensor cores start with sm_80 (Ampere)


def _gpu_name(device: torch.device) -> tuple[str, tuple[int, int]]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(idx), tuple(torch.cuda.get_device_capability(idx))


def check_precision(precision: str, device: torch.device) -> None:
    """Raise a one-line :class:`UserError` when ``precision`` cannot run on ``device``."""
    if precision == "fp32":
        return
    if device.type != "cuda":
        if precision == "bf16":
            return
        if precision == "fp8":
            raise UserError("pretrain.precision=fp8 needs an NVIDIA Hopper GPU (compute capability >= 9.0, "
                            "e.g. H100); this run is on CPU. Use bf16 or fp32.")
        raise UserError(f"pretrain.precision={precision} is not supported on CPU (fp16 loss scaling "
                        "runs on CUDA only); use bf16 or fp32.")
    name, cc = _gpu_name(device)
    if precision == "fp8" and cc < HOPPER_CC:
        raise UserError(f"pretrain.precision=fp8 needs compute capability >= 9.0 (Hopper) but {name} has "
                        f"{cc[0]}.{cc[1]} and no FP8 tensor cores; use bf16.")
    if precision == "bf16" and cc < AMPERE_CC:
        raise UserError(f"pretrain.precision=bf16 needs compute capability >= 8.0 but {name} has {cc[0]}.{cc[1]}; "
                        "use fp16.")


def param_dtype(precision: str) -> torch.dtype:
    """dtype the engine keeps the working weights in."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}[precision]


def _fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    # torchao float8 matmuls need both dims divisible by 16; the LM head stays in bf16 (its
    # softmax is precision sensitive; torchtitan's float8 recipe skips "output" the same way).
    if not isinstance(module, torch.nn.Linear):
        return False
    if "lm_head" in fqn or "router" in fqn or "gate" in fqn.split(".")[-1]:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Swap eligible ``nn.Linear`` layers for torchao float8 training linears (Hopper only)."""
    check_precision("fp8", device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=_fp8_filter)
    return model


def count_fp8_linears(model: torch.nn.Module) -> int:
    from torchao.float8.float8_linear import Float8Linear

    return sum(isinstance(m, Float8Linear) for m in model.modules())
