"""Write r1zero's model as a checkpoint of a stock transformers architecture (no r1zero import to load).

    from r1zero.model.hf_export import export_hf
    export_hf(model.state_dict().items(), model.config, "runs/tiny/pretrain")   # fp32 by default
    export_hf(full_tensors(), cfg.model, out_dir, dtype=torch.bfloat16,         # streamed, sharded
              eos_token_id=2, pad_token_id=0)

The layout picks the family whose forward equals r1zero's exactly (``r1zero.config.standard_hf_family``,
docs/model.md "Standard checkpoints"): ``llama`` (all layers dense), ``glm4_moe`` (sigmoid routing
with the selection bias as ``e_score_correction_bias``, shared experts, dense first layers: DeepSeek-V3's
MoE with plain GQA), ``mixtral`` (softmax top-k, no shared experts) or ``qwen2_moe`` (softmax with
shared experts / dense first layers). Output: ``model-0000i-of-0000N.safetensors`` shards of at most
``max_shard_bytes`` (``model.safetensors`` when one suffices), ``model.safetensors.index.json``,
``config.json`` (written by the family's own transformers config class) and
``generation_config.json``. Tensors are consumed one at a time, so a
caller can stream full tensors gathered from shards; at most one shard is held in memory. Files land
in a temporary folder first and move into ``out_dir`` only when everything is written.

Name map (r1zero -> target), per decoder layer ``model.layers.{i}.``:
``attn_norm`` -> ``input_layernorm``, ``ffn_norm`` -> ``post_attention_layernorm``, attention
projections unchanged; routed experts ``mlp.experts.w_gate_up.{e}`` ``(2F, D)`` split into
``gate_proj``/``up_proj`` (Mixtral: ``w1``/``w3`` under ``block_sparse_moe``), ``w_down.{e}`` ->
``down_proj`` (``w2``); shared experts ``mlp.shared.*`` -> ``mlp.shared_experts.*`` (Glm4Moe) or
``mlp.shared_expert.*`` (Qwen2-MoE, whose ``sigmoid(shared_expert_gate(x))`` is pinned to 0.5 by a
zero gate weight, so the down projection is written doubled: exact in any float format). A tied
LM head is written as ``lm_head.weight`` too (``tie_word_embeddings`` stays true).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from r1zero.errors import UserError

# Safetensors shard bound; 5 GB is transformers' save_pretrained default (max_shard_size="5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
# Settings that matter for training only (the standard configs have no field for them): kept in
# config.json under this key so loading.py restores them; transformers and vLLM ignore it.
TRAINING_KEY = "r1zero"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def r1zero_config(model_cfg, **overrides):
    """An :class:`R1ZeroConfig` from an R1ZeroConfig (copied with ``overrides``) or a typed ModelConfig."""
    from r1zero.model.config import R1ZeroConfig

    if isinstance(model_cfg, R1ZeroConfig):
        if not overrides:
            return model_cfg
        return R1ZeroConfig(**{**model_cfg.to_dict(), **overrides})
    return R1ZeroConfig.from_model_config(model_cfg, **overrides)


def hf_family(cfg) -> str:
    """The standard family of an R1ZeroConfig; UserError (one line) when its layout has none."""
    from r1zero.config import standard_hf_family

    try:
        return standard_hf_family(cfg.router, cfg.n_experts, cfg.num_experts_per_tok, cfg.n_shared,
                                  cfg.n_dense_layers, cfg.num_hidden_layers, cfg.capacity_factor,
                                  cfg.bias_update_rate,
                                  wide_heads=cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size)
    except ValueError as err:
        raise UserError(f"cannot export as a standard architecture: {err}") from None


def hf_config(cfg, dtype: torch.dtype = torch.float32):
    """The stock transformers config (Llama/Mixtral/Qwen2Moe/Glm4Moe) equal to R1ZeroConfig ``cfg``."""
    import transformers

    family = hf_family(cfg)
    k = cfg.n_experts if cfg.router == "soft" else cfg.num_experts_per_tok
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        # explicit head_dim: vLLM's Glm4Moe fails without it
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings, use_cache=True,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )
    if family == "llama":
        hf = transformers.LlamaConfig(**common, intermediate_size=cfg.d_dense, attention_bias=False, mlp_bias=False)
    elif family == "glm4_moe":
        common["rope_parameters"]["partial_rotary_factor"] = 1.0
        hf = transformers.Glm4MoeConfig(
            **common, partial_rotary_factor=1.0, intermediate_size=cfg.d_dense, moe_intermediate_size=cfg.d_expert,
            n_routed_experts=cfg.n_experts, num_experts_per_tok=k, n_shared_experts=cfg.n_shared,
            first_k_dense_replace=cfg.n_dense_layers, routed_scaling_factor=float(cfg.route_scale),
            # one group = plain top-k; r1zero's sigmoid weights are always normalised by their sum
            n_group=1, topk_group=1, norm_topk_prob=True, use_qk_norm=False, attention_bias=False,
            num_mtp_layers=0)
    elif family == "mixtral":
        hf = transformers.MixtralConfig(
            **common, intermediate_size=cfg.d_expert, num_local_experts=cfg.n_experts, num_experts_per_tok=k,
            sliding_window=None, router_jitter_noise=0.0, router_aux_loss_coef=cfg.aux_loss_coef)
    else:  # qwen2_moe
        hf = transformers.Qwen2MoeConfig(
            **common, intermediate_size=cfg.d_dense, moe_intermediate_size=cfg.d_expert,
            shared_expert_intermediate_size=cfg.n_shared * cfg.d_expert, num_experts=cfg.n_experts,
            num_experts_per_tok=k,
            # r1zero's softmax renormalises the k weights only for k > 1 (Switch keeps the raw
            # top-1 probability); soft routing keeps every expert's softmax weight as is
            norm_topk_prob=cfg.router == "softmax" and k > 1,
            decoder_sparse_step=1, mlp_only_layers=list(range(cfg.n_dense_layers)),
            # zero q/k/v biases are written: vLLM's Qwen2-MoE attention always has them
            qkv_bias=True, use_sliding_window=False, router_aux_loss_coef=cfg.aux_loss_coef)
    hf.architectures = [ARCHITECTURES[family]]
    hf.dtype = dtype
    return hf


def training_settings(cfg) -> dict:
    """The r1zero-only fields stored under ``config.json[TRAINING_KEY]``."""
    return {"router": cfg.router, "aux_loss_coef": cfg.aux_loss_coef, "z_loss_coef": cfg.z_loss_coef,
            "bias_update_rate": cfg.bias_update_rate, "expert_compute": cfg.expert_compute}


def convert_tensor(name: str, tensor: torch.Tensor, cfg, family: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The target-architecture tensors for one r1zero tensor (none for a tied LM head)."""
    if name == "lm_head.weight":
        if not cfg.tie_word_embeddings:
            yield name, tensor
        return
    m = _LAYER.match(name)
    if m is None:
        if name not in ("model.embed_tokens.weight", "model.norm.weight"):
            raise ValueError(f"unexpected r1zero tensor {name!r}")
        yield name, tensor
        if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
            # a tied head is written too (from the embedding, whether or not the caller's stream
            # repeats it): vLLM's Glm4Moe/Mixtral never tie and would keep an uninitialised head;
            # transformers ties it back on load (tie_word_embeddings stays true)
            yield "lm_head.weight", tensor.clone()  # safetensors refuses shared storage
        return
    i, rest = int(m.group(1)), m.group(2)
    pre = f"model.layers.{i}."
    moe_pre = pre + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    if rest == "attn_norm.weight":
        yield pre + "input_layernorm.weight", tensor
    elif rest == "ffn_norm.weight":
        yield pre + "post_attention_layernorm.weight", tensor
    elif rest.startswith("self_attn."):
        yield pre + rest, tensor
        if family == "qwen2_moe" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                              "self_attn.v_proj.weight"):
            yield pre + rest.replace(".weight", ".bias"), tensor.new_zeros(tensor.shape[0])
    elif i < cfg.n_dense_layers:  # dense SwiGLU: same names in every family
        yield pre + rest, tensor
    elif rest == "mlp.gate.weight":
        yield moe_pre + "gate.weight", tensor
        if family == "qwen2_moe":
            yield pre + "mlp.shared_expert_gate.weight", tensor.new_zeros(1, tensor.shape[1])
    elif rest == "mlp.expert_bias_E":
        if family == "glm4_moe":  # DeepSeek-V3 keeps the correction bias in fp32
            yield moe_pre + "gate.e_score_correction_bias", tensor.float()
        elif bool(tensor.any()):
            raise ValueError(f"{name}: a non-zero selection bias has no place in {family}")
    elif (em := re.fullmatch(r"mlp\.experts\.w_gate_up\.(\d+)", rest)) is not None:
        gate, up = tensor.chunk(2, dim=0)
        e = em.group(1)
        if family == "mixtral":
            yield from ((f"{moe_pre}experts.{e}.w1.weight", gate), (f"{moe_pre}experts.{e}.w3.weight", up))
        else:
            yield from ((f"{moe_pre}experts.{e}.gate_proj.weight", gate), (f"{moe_pre}experts.{e}.up_proj.weight", up))
    elif (em := re.fullmatch(r"mlp\.experts\.w_down\.(\d+)", rest)) is not None:
        yield f"{moe_pre}experts.{em.group(1)}." + ("w2.weight" if family == "mixtral" else "down_proj.weight"), tensor
    elif rest.startswith("mlp.shared."):
        proj = rest[len("mlp.shared."):]
        if family == "glm4_moe":
            yield pre + "mlp.shared_experts." + proj, tensor
        elif family == "qwen2_moe":
            # sigmoid(0) = 0.5 exactly, and x2 is exact in every float format
            yield pre + "mlp.shared_expert." + proj, tensor * 2 if proj == "down_proj.weight" else tensor
        else:
            raise ValueError(f"{name}: {family} has no shared experts")
    else:
        raise ValueError(f"unexpected r1zero tensor {name!r}")


def to_hf_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], model_cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """``(r1zero name, tensor)`` -> ``(checkpoint name, tensor)`` of the standard architecture, lazily:
    what vLLM's ``model.load_weights(...)`` takes for an in-place weight update (no disk round trip)."""
    cfg = r1zero_config(model_cfg)
    family = hf_family(cfg)
    for name, tensor in named_tensors:
        yield from convert_tensor(name, tensor, cfg, family)


class _ShardWriter:
    """Accumulate tensors into safetensors shards of at most ``max_bytes`` (one held at a time)."""

    def __init__(self, folder: Path, max_bytes: int, dtype: torch.dtype):
        self.folder, self.max_bytes, self.dtype = folder, max_bytes, dtype
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.current or any(name in f for f in self.files):
            raise ValueError(f"duplicate tensor {name!r}")
        keep_fp32 = name.endswith("e_score_correction_bias")
        t = tensor.detach().to("cpu", torch.float32 if keep_fp32 else self.dtype).contiguous()
        size = t.numel() * t.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = t
        self.current_bytes += size
        self.total += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        save_file(self.current, str(self.folder / f"shard-{len(self.files):05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> dict:
        """Rename shards to ``model-0000i-of-0000N.safetensors`` (one shard: ``model.safetensors``,
        the name transformers gives an unsharded checkpoint); return the index dict."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        return {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}


def export_hf(named_full_tensors: Iterable[tuple[str, torch.Tensor]], model_cfg, out_dir,
              dtype: torch.dtype = torch.float32, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              **config_overrides) -> str:
    """Write ``(r1zero name, full tensor)`` pairs as a standard HF checkpoint in ``out_dir``.

    ``model_cfg``: an R1ZeroConfig or the typed ``cfg.model`` (``config_overrides`` such as
    ``eos_token_id`` go to the R1ZeroConfig). Replaces any weights/config already in ``out_dir``
    (other files, e.g. tokenizer files, stay). Returns the family name. UserError for a layout
    with no standard architecture; ValueError for a tensor name r1zero's model does not have.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UserError(f"export dtype must be float32, bfloat16 or float16, got {dtype}")
    cfg = r1zero_config(model_cfg, **config_overrides)
    family = hf_family(cfg)
    hf = hf_config(cfg, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-export-", dir=out))
    try:
        writer = _ShardWriter(tmp, max_shard_bytes, dtype)
        for hf_name, t in to_hf_tensors(named_full_tensors, cfg):
            writer.add(hf_name, t)
        index = writer.finish()
        _check_complete(index["weight_map"], hf)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf.save_pretrained(str(tmp))
        conf = json.loads((tmp / "config.json").read_text())
        conf[TRAINING_KEY] = training_settings(cfg)
        # older readers (vLLM builds pinned to transformers 4.x) look for the top-level rope_theta
        # and partial_rotary_factor (Glm4MoeConfig's 4.x default is 0.5)
        conf.setdefault("rope_theta", float(cfg.rope_theta))
        if family == "glm4_moe":
            conf.setdefault("partial_rotary_factor", 1.0)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        _generation_config(cfg).save_pretrained(str(tmp))
        for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")) \
                + list(out.glob("pytorch_model*.bin*")):
            old.unlink()
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return family


def _generation_config(cfg):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                            pad_token_id=cfg.pad_token_id)


def _check_complete(weight_map: dict, hf) -> None:
    """Every layer got its attention, norms and FFN: a missing r1zero tensor would otherwise load
    as a random init in transformers (it only warns)."""
    n = hf.num_hidden_layers
    need = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n):
        need += [f"model.layers.{i}.{s}" for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                                   "self_attn.q_proj.weight", "self_attn.o_proj.weight")]
    missing = [k for k in need if k not in weight_map]
    if missing:
        raise ValueError(f"export is missing {len(missing)} tensors, e.g. {missing[:3]}")
