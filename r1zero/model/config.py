"""``R1ZeroConfig``: the transformers config of the r1zero MoE decoder (``model_type="r1zero_moe"``).

Built from the project's typed config with :meth:`R1ZeroConfig.from_model_config`::

    from r1zero.config import load_config
    from r1zero.model import R1ZeroConfig
    hf_cfg = R1ZeroConfig.from_model_config(load_config("configs/tiny.yaml").model)

Field names follow the transformers conventions (``hidden_size``, ``num_hidden_layers``, ...) so
generic HF tooling (generation, device maps, ``num_parameters``) understands the model.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ROUTERS = ("softmax", "sigmoid", "soft")


class R1ZeroConfig(PretrainedConfig):
    model_type = "r1zero_moe"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        # None: hidden_size // num_attention_heads (transformers' default in Llama/Mixtral/Glm4Moe)
        head_dim: int | None = None,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        # NOTE: 0.02 is the GPT-2 / Llama init std used across transformers.
        initializer_range: float = 0.02,
        n_experts: int = 8,
        # HF's name (Mixtral/Qwen2-MoE): ``top_k`` would collide with the generation setting.
        num_experts_per_tok: int = 2,
        n_shared: int = 0,
        d_expert: int = 256,
        router: str = "softmax",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        capacity_factor: float | None = None,
        n_dense_layers: int = 0,
        d_dense: int | None = None,
        # DeepSeek-V3 multiplies normalised sigmoid weights by route_scale (2.5 for 671B,
        # inference/configs/config_671B.json); 1.0 keeps the routed output at unit scale.
        route_scale: float = 1.0,
        # Routed-expert kernels: "loop" (per-expert GEMMs) or "padded" (bmm over experts padded to
        # the largest; wins only on oversubscribed cores); see experts.py, BENCHMARKS.md.
        expert_compute: str = "loop",
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ):
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if num_experts_per_tok > n_experts:
            raise ValueError(f"num_experts_per_tok ({num_experts_per_tok}) must be <= n_experts ({n_experts})")
        kv = num_key_value_heads or num_attention_heads
        if (head_dim is None and hidden_size % num_attention_heads) or num_attention_heads % kv:
            raise ValueError("hidden_size must divide by num_attention_heads (or head_dim be set), and heads by kv heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = kv
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.n_experts = n_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared = n_shared
        self.d_expert = d_expert
        self.router = router
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.bias_update_rate = bias_update_rate
        self.capacity_factor = capacity_factor
        self.n_dense_layers = n_dense_layers
        # Dense layers get the FFN width of the activated experts (routed top-k + shared), so a
        # dense layer costs the same FLOPs per token as an MoE layer (DeepSeekMoE sec. 3).
        self.d_dense = d_dense or d_expert * (num_experts_per_tok + n_shared)
        self.route_scale = route_scale
        if expert_compute not in ("loop", "padded"):
            raise ValueError(f"expert_compute must be loop|padded, got {expert_compute!r}")
        self.expert_compute = expert_compute
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_model_config(cls, model_cfg, **overrides: Any) -> R1ZeroConfig:
        """Map :class:`r1zero.config.ModelConfig` onto the HF config (``overrides`` win)."""
        moe = model_cfg.moe
        kwargs: dict[str, Any] = dict(
            vocab_size=model_cfg.vocab_size,
            hidden_size=model_cfg.d_model,
            num_hidden_layers=model_cfg.n_layers,
            num_attention_heads=model_cfg.n_heads,
            num_key_value_heads=model_cfg.n_kv_heads,
            head_dim=model_cfg.head_dim,
            max_position_embeddings=model_cfg.max_seq_len,
            rope_theta=model_cfg.rope_theta,
            rms_norm_eps=model_cfg.norm_eps,
            tie_word_embeddings=model_cfg.tie_embeddings,
            n_experts=moe.n_experts,
            num_experts_per_tok=moe.top_k,
            n_shared=moe.n_shared,
            d_expert=moe.d_expert,
            router=moe.router,
            aux_loss_coef=moe.aux_loss_coef,
            z_loss_coef=moe.z_loss_coef,
            bias_update_rate=moe.bias_update_rate,
            capacity_factor=moe.capacity_factor,
            n_dense_layers=moe.n_dense_layers,
            expert_compute=getattr(moe, "expert_compute", "loop"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)
