"""The r1zero model: a transformers-compatible decoder-only MoE (``model_type="r1zero_moe"``).

Importing this package registers :class:`R1ZeroConfig` / :class:`R1ZeroForCausalLM` with
``AutoConfig`` and ``AutoModelForCausalLM``. :func:`load_causal_lm` loads any HF causal LM dir.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from r1zero.model.config import R1ZeroConfig
from r1zero.model.loading import build_model, load_causal_lm
from r1zero.model.modeling import R1ZeroCausalLMOutput, R1ZeroForCausalLM, R1ZeroModel
from r1zero.model.moe import MoELayer, flat_moe_metrics

AutoConfig.register(R1ZeroConfig.model_type, R1ZeroConfig, exist_ok=True)
AutoModelForCausalLM.register(R1ZeroConfig, R1ZeroForCausalLM, exist_ok=True)

__all__ = [
    "MoELayer",
    "R1ZeroCausalLMOutput",
    "R1ZeroConfig",
    "R1ZeroForCausalLM",
    "R1ZeroModel",
    "build_model",
    "flat_moe_metrics",
    "load_causal_lm",
]
