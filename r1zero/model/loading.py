"""Build a fresh r1zero model from the typed config, or load any HF causal LM directory.

    from r1zero.model import build_model, load_causal_lm
    model = build_model(cfg.model, seed=cfg.seed)             # deterministic init
    model, tok = load_causal_lm("runs/tiny/pretrain")         # or s3://bucket/run/pretrain

``load_causal_lm`` accepts a local directory or an artifact-store URI (materialised through
:mod:`r1zero.store`) holding ``config.json`` + weights of *any* transformers causal LM, plus
tokenizer files. A checkpoint of a standard family that r1zero's model represents exactly (what
:mod:`r1zero.model.hf_export` writes: Llama, Mixtral, Qwen2-MoE, Glm4Moe, also when saved by stock
transformers) is mapped into :class:`R1ZeroForCausalLM` (the inverse of the export's name map), so
GRPO keeps r1zero's fused MoE kernels, balancing and telemetry; anything else (qkv biases, qk-norm,
partial RoPE, sliding windows, gated shared experts, grouped routing, other families) runs as the
stock transformers model. Legacy ``model_type: r1zero_moe`` dirs still load.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from r1zero.errors import UserError

log = logging.getLogger(__name__)
MAPPED_FAMILIES = ("llama", "mixtral", "qwen2_moe", "glm4_moe")


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


def load_causal_lm(path_or_uri, dtype: torch.dtype = torch.float32, require_tokenizer: bool = True,
                   weights: bool = True):
    """Load ``(model, tokenizer)`` from an HF model directory or store URI.

    Raises :class:`UserError` (one line, exit 2) when the directory is missing, lacks
    ``config.json``, names an unknown architecture, or (with ``require_tokenizer``) has no
    tokenizer files. The model comes back in eval mode. ``weights=False``: the same model class
    and config on the meta device, no tensor read (the sharded GRPO ranks that get their shards
    broadcast from rank 0, :func:`r1zero.grpo.sharded.fill_from_rank0`).
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
    model = None
    if model_type in MAPPED_FAMILIES:
        try:
            model = load_into_r1zero(path, dtype, weights=weights)
        except NotRepresentable as why:
            log.info("%s: %s checkpoint runs as the stock transformers model (%s)", path_or_uri, model_type, why)
    try:
        if model is None and not weights:
            from transformers import AutoConfig

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=dtype)
        elif model is None:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path_or_uri}: cannot load causal LM, unsupported architecture "
                        f"(model_type {model_type!r}): {first}") from None
    except OSError as err:
        raise UserError(f"{path_or_uri}: cannot load model weights: {str(err).splitlines()[0]}") from None
    model.eval()
    tokenizer = _load_tokenizer(path)
    if tokenizer is None and require_tokenizer:
        raise UserError(f"{path_or_uri}: no tokenizer files (tokenizer.json) beside the model")
    return model, tokenizer


# ---- standard checkpoint -> R1ZeroForCausalLM (the inverse of hf_export.convert_tensor) ----------


class NotRepresentable(Exception):
    """A standard checkpoint whose forward r1zero's model cannot reproduce exactly (the reason)."""


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise NotRepresentable(why)


def r1zero_config_from_hf(path: Path):
    """(R1ZeroConfig, family) equal to the standard checkpoint's config; NotRepresentable otherwise."""
    from transformers import AutoConfig

    from r1zero.model.config import R1ZeroConfig
    from r1zero.model.hf_export import TRAINING_KEY

    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    hf = AutoConfig.from_pretrained(str(path))
    family = hf.model_type
    extra = raw.get(TRAINING_KEY) or {}
    D, H = hf.hidden_size, hf.num_attention_heads
    _need(getattr(hf, "hidden_act", "silu") == "silu", f"activation {getattr(hf, 'hidden_act', None)}")
    head_dim = getattr(hf, "head_dim", None) or D // H
    # Llama, Mixtral and Glm4Moe read head_dim in transformers and vLLM; Qwen2-MoE's vLLM model
    # derives it from hidden_size, so a wider head there would not serve
    _need(head_dim * H == D or family in ("llama", "mixtral", "glm4_moe"), f"{family} with head_dim * heads != hidden_size")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    _need(rope.get("rope_type", "default") == "default", f"rope_type {rope.get('rope_type')}")
    _need(float(rope.get("partial_rotary_factor", 1.0)) == 1.0, "partial rotary embedding")
    _need(not getattr(hf, "attention_bias", False) and not getattr(hf, "mlp_bias", False), "attention/MLP biases")
    _need(getattr(hf, "sliding_window", None) is None or not getattr(hf, "use_sliding_window", True),
          "sliding-window attention")
    kw = dict(vocab_size=hf.vocab_size, hidden_size=D, num_hidden_layers=hf.num_hidden_layers,
              num_attention_heads=H, num_key_value_heads=hf.num_key_value_heads, head_dim=head_dim,
              max_position_embeddings=hf.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
              rms_norm_eps=hf.rms_norm_eps, initializer_range=getattr(hf, "initializer_range", 0.02),
              tie_word_embeddings=bool(hf.tie_word_embeddings), bos_token_id=hf.bos_token_id,
              eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
              **{k: extra[k] for k in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "expert_compute")
                 if k in extra})
    L = hf.num_hidden_layers
    if family == "llama":
        kw.update(n_experts=1, num_experts_per_tok=1, d_expert=1, n_dense_layers=L, d_dense=hf.intermediate_size)
    elif family == "mixtral":
        E, k = hf.num_local_experts, hf.num_experts_per_tok
        soft = extra.get("router") == "soft" and k == E
        _need(k > 1, "Mixtral top-1 renormalises the weight to 1")
        kw.update(n_experts=E, num_experts_per_tok=k, d_expert=hf.intermediate_size,
                  router="soft" if soft else "softmax")
    elif family == "qwen2_moe":
        E, k, F = hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size
        dense = sorted(hf.mlp_only_layers or [])
        _need(hf.decoder_sparse_step == 1 and dense == list(range(len(dense))), "MoE layers not after a dense prefix")
        shared = hf.shared_expert_intermediate_size
        _need(shared > 0 and shared % F == 0, "shared-expert width not a multiple of the expert width")
        if k == E and not hf.norm_topk_prob:
            router = "soft"
        else:
            _need(bool(hf.norm_topk_prob) == (k > 1), "norm_topk_prob differs from r1zero's softmax (renormalise iff k > 1)")
            router = "softmax"
        kw.update(n_experts=E, num_experts_per_tok=k, d_expert=F,
                  n_shared=shared // F, n_dense_layers=len(dense), d_dense=hf.intermediate_size, router=router)
    elif family == "glm4_moe":
        E, k = hf.n_routed_experts, hf.num_experts_per_tok
        _need(not hf.use_qk_norm, "qk-norm")
        _need(hf.topk_group == hf.n_group, "group-limited routing (topk_group < n_group)")
        _need(bool(hf.norm_topk_prob), "un-normalised sigmoid weights")
        _need(hf.n_shared_experts >= 1, "no shared experts")
        kw.update(n_experts=E, num_experts_per_tok=k, d_expert=hf.moe_intermediate_size, n_shared=hf.n_shared_experts,
                  n_dense_layers=min(hf.first_k_dense_replace, L), d_dense=hf.intermediate_size, router="sigmoid",
                  route_scale=float(hf.routed_scaling_factor))
    else:
        raise NotRepresentable(f"family {family}")
    try:
        return R1ZeroConfig(**kw), family
    except ValueError as err:
        raise NotRepresentable(str(err)) from None


def _tensor_reader(path: Path):
    """``read(name) -> tensor`` over the dir's safetensors files, and the set of stored names."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():  # only the shards the index names (a dir may hold other safetensors files)
        files = sorted({path / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    _need(bool(files), "no safetensors weights")
    where = {}
    handles = [safe_open(str(f), framework="pt") for f in files]
    for h in handles:
        where.update({k: h for k in h.keys()})

    def read(name: str) -> torch.Tensor:
        if name not in where:
            raise NotRepresentable(f"tensor {name} missing")
        return where[name].get_tensor(name)

    return read, set(where)


def r1zero_tensor(name: str, cfg, family: str, read) -> torch.Tensor:
    """The r1zero tensor ``name`` read from a standard checkpoint (inverse of ``convert_tensor``)."""
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return read("model.embed_tokens.weight")
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m is None:
        return read(name)
    i, rest = int(m.group(1)), m.group(2)
    pre = f"model.layers.{i}."
    moe_pre = pre + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    if rest == "attn_norm.weight":
        return read(pre + "input_layernorm.weight")
    if rest == "ffn_norm.weight":
        return read(pre + "post_attention_layernorm.weight")
    if rest.startswith("self_attn.") or i < cfg.n_dense_layers:
        if family == "qwen2_moe" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                              "self_attn.v_proj.weight"):
            _need(not bool(read(pre + rest.replace(".weight", ".bias")).any()), "non-zero q/k/v biases")
        return read(pre + rest)
    if rest == "mlp.gate.weight":
        if family == "qwen2_moe":
            _need(not bool(read(pre + "mlp.shared_expert_gate.weight").any()), "a learned shared-expert gate")
        return read(moe_pre + "gate.weight")
    if rest == "mlp.expert_bias_E":
        if family == "glm4_moe":
            return read(moe_pre + "gate.e_score_correction_bias")
        return torch.zeros(cfg.n_experts)
    em = re.fullmatch(r"mlp\.experts\.(w_gate_up|w_down)\.(\d+)", rest)
    if em is not None:
        e = em.group(2)
        names = {"mixtral": ("w1", "w3", "w2")}.get(family, ("gate_proj", "up_proj", "down_proj"))
        if em.group(1) == "w_down":
            return read(f"{moe_pre}experts.{e}.{names[2]}.weight")
        return torch.cat([read(f"{moe_pre}experts.{e}.{names[0]}.weight"),
                          read(f"{moe_pre}experts.{e}.{names[1]}.weight")], dim=0)
    if rest.startswith("mlp.shared."):
        proj = rest[len("mlp.shared."):]
        if family == "glm4_moe":
            return read(pre + "mlp.shared_experts." + proj)
        t = read(pre + "mlp.shared_expert." + proj)
        return t / 2 if proj == "down_proj.weight" else t  # the export folded sigmoid(0) = 0.5 in
    raise NotRepresentable(f"no source for {name}")


def load_into_r1zero(path: Path, dtype: torch.dtype = torch.float32, weights: bool = True):
    """R1ZeroForCausalLM (eval mode) holding a standard checkpoint's weights; NotRepresentable if the
    checkpoint's forward differs from r1zero's (a reason the stock model must run instead).
    ``weights=False``: the model on meta, its config checked but no tensor read."""
    from r1zero.model.layers import RotaryEmbedding
    from r1zero.model.modeling import R1ZeroForCausalLM

    cfg, family = r1zero_config_from_hf(path)
    read, _ = _tensor_reader(path)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = R1ZeroForCausalLM(cfg)
    if not weights:
        return model.eval()
    state = {}
    for name, ref in model.state_dict().items():
        t = r1zero_tensor(name, cfg, family, read)
        _need(tuple(t.shape) == tuple(ref.shape), f"{name}: shape {tuple(t.shape)} != {tuple(ref.shape)}")
        # router state stays fp32, as the routing math
        state[name] = t.to(torch.float32 if name.endswith("expert_bias_E") else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for mod in model.modules():  # non-persistent buffers: not in the checkpoint, rebuilt here
        if isinstance(mod, RotaryEmbedding):
            mod.inv_freq = mod.compute_inv_freq()
        elif hasattr(mod, "tokens_per_expert_E"):
            mod.tokens_per_expert_E = torch.zeros(cfg.n_experts)
    return model.eval()
