"""Build a fresh r1zero model from the typed config, or load any HF causal LM directory.

    from r1zero.model import build_model, load_causal_lm
    model = build_model(cfg.model, seed=cfg.seed)             # deterministic init
    model, tok = load_causal_lm("runs/tiny/pretrain")         # or s3://bucket/run/pretrain

``load_causal_lm`` accepts a local directory or an artifact-store URI (materialised through
:mod:`r1zero.store`) holding ``config.json`` + weights of *any* transformers causal LM (an r1zero
MoE, a Llama, ...), plus tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r1zero.errors import UserError


def build_model(model_cfg, seed: int = 0, **overrides):
    """A freshly initialised :class:`R1ZeroForCausalLM`; same ``seed`` -> same weights."""
    from r1zero.model.config import R1ZeroConfig
    from r1zero.model.modeling import R1ZeroForCausalLM

    hf_cfg = R1ZeroConfig.from_model_config(model_cfg, **overrides)
    state = torch.get_rng_state()  # seed locally, leave the caller's RNG stream untouched
    try:
        torch.manual_seed(seed)
        return R1ZeroForCausalLM(hf_cfg)
    finally:
        torch.set_rng_state(state)


def _load_tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        return None
    try:
        from r1zero.data.tokenizer import load_tokenizer
    except ImportError:  # data package not present: fall back to the generic loader
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    return load_tokenizer(path)


def load_causal_lm(path_or_uri, dtype: torch.dtype = torch.float32, require_tokenizer: bool = True):
    """Load ``(model, tokenizer)`` from an HF model directory or store URI.

    Raises :class:`UserError` (one line, exit 2) when the directory is missing, lacks
    ``config.json``, names an unknown architecture, or (with ``require_tokenizer``) has no
    tokenizer files. The model comes back in eval mode.
    """
    from transformers import AutoModelForCausalLM

    import r1zero.model  # noqa: F401 - registers r1zero_moe with the Auto classes
    from r1zero import store

    path = Path(store.materialize(str(path_or_uri)))
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"not a model directory: {path_or_uri} (no config.json)")
    try:
        model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path_or_uri}: config.json is not valid JSON ({err})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path_or_uri}: cannot load causal LM (model_type {model_type!r}): {first}") from None
    except OSError as err:
        raise UserError(f"{path_or_uri}: cannot load model weights: {str(err).splitlines()[0]}") from None
    model.eval()
    tokenizer = _load_tokenizer(path)
    if tokenizer is None and require_tokenizer:
        raise UserError(f"{path_or_uri}: no tokenizer files (tokenizer.json) beside the model")
    return model, tokenizer
