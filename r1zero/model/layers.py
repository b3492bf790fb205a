"""Transformer building blocks: RMSNorm, rotary embeddings, GQA attention with KV cache, SwiGLU.

The one implementation of attention and RoPE in r1zero: training, evaluation and the GRPO
sampler all run it (the sampler with the preallocated :class:`KVCache`).

Used by :mod:`r1zero.model.modeling`; nothing here knows about experts. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` and keeps keys/values in any transformers
``Cache`` (``DynamicCache`` by default) so ``generate()`` works unchanged.

Shape legend:
    B: batch, S: query length, L: key length (past + S), D: d_model, H: query heads (local to a
    tensor-parallel rank), G: key/value heads, Dh: head dim, F: FFN width
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if x_BSD.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same formula as one fused op (fewer kernels per layer at a decode step)
            return F.rms_norm(x_BSD, (x_BSD.shape[-1],), self.weight, self.eps)
        x32 = x_BSD.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x_BSD.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, arXiv 2104.09864): cos/sin tables for given absolute positions.

    The (positions, Dh) tables are computed once per device/dtype (grown by doubling when a
    longer position is asked for) and indexed per call: a decode step then costs one gather
    instead of an outer product and two transcendental ops per layer call. Indexing the table
    gives bit-identical values to computing ``pos * inv_freq`` directly (same fp32 products).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        self._tables: dict = {}

    def compute_inv_freq(self) -> torch.Tensor:
        # theta^(-2i/Dh), i = 0 .. Dh/2-1 (RoFormer eq. 15)
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.theta**exponent)

    def _table(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        # keyed on the buffer's storage and version: from_pretrained and _init_weights rewrite it
        key = (inv.device, dtype, inv.data_ptr(), inv._version)
        got = self._tables.get(key)
        if got is None or got[0].shape[0] < n:
            size = max(256, 1 << (n - 1).bit_length())
            # why outside inference mode: the table is reused by training forwards, which save
            # cos/sin for backward (inference tensors cannot be saved)
            with torch.inference_mode(False), torch.no_grad():
                freqs = torch.arange(size, device=inv.device, dtype=torch.float32)[:, None] * inv.clone()
                emb = torch.cat((freqs, freqs), dim=-1)
                got = (emb.cos().to(dtype), emb.sin().to(dtype))
            self._tables = {key: got}
        return got

    @torch.no_grad()
    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(position_ids_BS.max()) + 1 if position_ids_BS.numel() else 1
        cos_PDh, sin_PDh = self._table(n, dtype)
        return cos_PDh[position_ids_BS], sin_PDh[position_ids_BS]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHSDh: torch.Tensor, cos_BSDh: torch.Tensor, sin_BSDh: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BSDh[:, None], sin_BSDh[:, None]
    return x_BHSDh * cos + _rotate_half(x_BHSDh) * sin


def attention_mask_4d(
    attention_mask_BL: torch.Tensor | None, q_len: int, past_len: int, batch: int, device
) -> torch.Tensor | None:
    """Boolean ``(B, 1, S, L)`` mask (True = attend) combining causality and key padding.

    A 4D mask is returned as it is (the caller built it, e.g. the sampler's key-padding mask for
    one new token). Returns None when plain causal SDPA suffices (no padding and no past: ``is_causal=True``;
    or a single new token without padding: it may see every key).
    """
    if attention_mask_BL is not None and attention_mask_BL.dim() == 4:
        return attention_mask_BL.bool()  # prebuilt (B, 1, S, L) boolean mask (r1zero.generate)
    L = past_len + q_len
    no_padding = attention_mask_BL is None or bool(attention_mask_BL.all())
    if no_padding and (past_len == 0 or q_len == 1):
        return None
    q_pos_S = torch.arange(past_len, L, device=device)
    k_pos_L = torch.arange(L, device=device)
    mask_BSL = (k_pos_L[None, :] <= q_pos_S[:, None]).expand(batch, q_len, L)
    if not no_padding:
        keys_BL = attention_mask_BL[:, -L:].bool()
        mask_BSL = mask_BSL & keys_BL[:, None, :]
        # Padding queries would see no key at all and SDPA would return NaN: let them see
        # themselves (their outputs are ignored by the loss and by generation).
        mask_BSL = mask_BSL | (k_pos_L[None, :] == q_pos_S[:, None])
    return mask_BSL[:, None]


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads (GQA, Ainslie et al. 2023)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)

    def forward(self, x_BSD, cos_sin, mask_B1SL, cache=None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        Dh = self.head_dim
        cos, sin = cos_sin
        qkv = self._fused_qkv(cache) if S == 1 and isinstance(cache, KVCache) else None
        if qkv is not None:  # decode: one matmul for q|k|v, RoPE on q|k at once
            nq = self.q_proj.weight.shape[0] // Dh
            qkv_B1X = F.linear(x_BSD, qkv)
            n_qk = qkv_B1X.shape[-1] // Dh - self.v_proj.weight.shape[0] // Dh
            # (B, heads, Dh) rows stay contiguous: no transposed views into the attention matmuls
            qk_BNDh = qkv_B1X[:, 0, :n_qk * Dh].view(B, n_qk, Dh)
            qk_BNDh = qk_BNDh * cos + _rotate_half(qk_BNDh) * sin  # cos, sin: (B, 1, Dh)
            q_BHSDh, k_BGSDh = qk_BNDh[:, :nq, None], qk_BNDh[:, nq:, None]
            v_BGSDh = qkv_B1X[:, 0, n_qk * Dh:].view(B, -1, 1, Dh)
        else:
            # view(..., -1, Dh): under tensor parallelism the projections hold H/tp local heads.
            q_BHSDh = self.q_proj(x_BSD).view(B, S, -1, Dh).transpose(1, 2)
            k_BGSDh = self.k_proj(x_BSD).view(B, S, -1, Dh).transpose(1, 2)
            v_BGSDh = self.v_proj(x_BSD).view(B, S, -1, Dh).transpose(1, 2)
            q_BHSDh, k_BGSDh = apply_rope(q_BHSDh, cos, sin), apply_rope(k_BGSDh, cos, sin)
        if cache is not None:
            k_BGSDh, v_BGSDh = cache.update(k_BGSDh, v_BGSDh, self.layer_idx)
        if S == 1 and not torch.is_grad_enabled():
            return self.o_proj(_decode_attention(q_BHSDh, k_BGSDh, v_BGSDh, mask_B1SL).reshape(B, 1, -1))
        causal = mask_B1SL is None and S > 1 and k_BGSDh.shape[2] == S
        # grouped-query heads inside SDPA (no repeat_interleave copy of the keys and values)
        out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, attn_mask=mask_B1SL, is_causal=causal,
                                                   enable_gqa=q_BHSDh.shape[1] != k_BGSDh.shape[1])
        return self.o_proj(out_BHSDh.transpose(1, 2).reshape(B, S, -1))

    def _fused_qkv(self, cache: KVCache) -> torch.Tensor | None:
        """q|k|v weights stacked for a decode step (one matmul instead of three), built once per
        decode and held by its :class:`KVCache` (the weights do not change while sampling; a
        version-keyed cache would miss fused AdamW's in-place steps, which bump no version);
        None for hooked projections, biases or sharded (DTensor) weights. The parameters stay
        separate (state-dict names, tensor parallelism)."""
        key = (id(self), "qkv")
        if key not in cache.derived:
            lins = (self.q_proj, self.k_proj, self.v_proj)
            plain = all(type(m) is nn.Linear and m.bias is None and type(m.weight) is nn.Parameter
                        and not (m._forward_hooks or m._forward_pre_hooks) for m in lins)
            cache.derived[key] = torch.cat([m.weight for m in lins]) if plain else None
        return cache.derived[key]


def _decode_attention(q_BH1Dh: torch.Tensor, k_BGLDh: torch.Tensor, v_BGLDh: torch.Tensor,
                      mask_B11L: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new query per row, as SDPA computes it (softmax(q k^T / sqrt(Dh)) v), with
    the query heads of a key/value group folded into one matmul: at a decode step CPU SDPA with a
    mask and grouped heads costs ~3x this (BENCHMARKS.md, "GRPO on the tiny preset"). -> (B, H, Dh)"""
    B, H, _, Dh = q_BH1Dh.shape
    G = k_BGLDh.shape[1]
    a_BGrL = torch.matmul(q_BH1Dh.reshape(B, G, H // G, Dh), k_BGLDh.transpose(-1, -2)) * Dh ** -0.5
    if mask_B11L is not None:
        a_BGrL = a_BGrL.masked_fill(~mask_B11L, float("-inf"))
    p_BGrL = a_BGrL.softmax(-1) if a_BGrL.dtype == torch.float32 else \
        a_BGrL.softmax(-1, dtype=torch.float32).to(a_BGrL.dtype)
    return torch.matmul(p_BGrL, v_BGLDh).reshape(B, H, Dh)


class KVCache:
    """Keys/values preallocated once for a whole decode (``r1zero.generate.sample``).

    transformers' ``DynamicCache`` concatenates every step (a copy of the whole cache per layer
    and token); this one writes each step into (B, G, ``max_len``, Dh) buffers allocated at the
    first update and hands attention views of the filled part, with the ``update`` /
    ``get_seq_length`` / ``batch_select_indices`` methods :class:`Attention` and the sampler use.
    Inference only: writes are in place, so autograd must not see it (training forwards use a
    ``DynamicCache``). ``derived`` holds weights rearranged for decoding (stacked q|k|v, the dense
    MoE's stacked experts), built at the first step that needs them and valid for this decode only.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.derived: dict = {}
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.len = [0] * n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.len[layer_idx]

    def update(self, k_BGSDh: torch.Tensor, v_BGSDh: torch.Tensor, layer_idx: int, *args, **kwargs):
        i, s0, S = layer_idx, self.len[layer_idx], k_BGSDh.shape[2]
        if self.k[i] is None:
            B, G, _, Dh = k_BGSDh.shape
            self.k[i] = k_BGSDh.new_empty((B, G, self.max_len, Dh))
            self.v[i] = v_BGSDh.new_empty((B, G, self.max_len, Dh))
        if s0 + S > self.max_len:
            raise ValueError(f"KVCache: {s0 + S} positions exceed max_len {self.max_len}")
        self.k[i][:, :, s0:s0 + S] = k_BGSDh
        self.v[i][:, :, s0:s0 + S] = v_BGSDh
        self.len[i] = s0 + S
        return self.k[i][:, :, :s0 + S], self.v[i][:, :, :s0 + S]

    def batch_select_indices(self, idx_B: torch.Tensor) -> None:
        """Keep / repeat the rows ``idx_B`` (prefill of unique prompts -> one row per completion;
        finished rows dropped)."""
        self.k = [t if t is None else t.index_select(0, idx_B) for t in self.k]
        self.v = [t if t is None else t.index_select(0, idx_B) for t in self.v]


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, arXiv 2002.05202): ``down(silu(gate(x)) * up(x))``.

    Gate and up stay separate ``Linear`` layers so tensor parallelism can shard both column-wise
    (a fused gate+up weight would hand one rank all gates and the other all ups).
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
