"""Transformer building blocks: RMSNorm, rotary embeddings, GQA attention with KV cache, SwiGLU.

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
        x32 = x_BSD.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x_BSD.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, arXiv 2104.09864): cos/sin tables for given absolute positions."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        # theta^(-2i/Dh), i = 0 .. Dh/2-1 (RoFormer eq. 15)
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.theta**exponent)

    @torch.no_grad()
    def forward(self, position_ids_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSh = position_ids_BS[..., None].float() * self.inv_freq
        emb_BSDh = torch.cat((freqs_BSh, freqs_BSh), dim=-1)
        return emb_BSDh.cos().to(dtype), emb_BSDh.sin().to(dtype)


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

    Returns None when plain causal SDPA suffices (no padding and no past: ``is_causal=True``;
    or a single new token without padding: it may see every key).
    """
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
        # view(..., -1, Dh): under tensor parallelism the projections hold H/tp local heads.
        q_BHSDh = self.q_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BGSDh = self.k_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BGSDh = self.v_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q_BHSDh, k_BGSDh = apply_rope(q_BHSDh, cos, sin), apply_rope(k_BGSDh, cos, sin)
        if cache is not None:
            k_BGSDh, v_BGSDh = cache.update(k_BGSDh, v_BGSDh, self.layer_idx)
        groups = q_BHSDh.shape[1] // k_BGSDh.shape[1]
        if groups > 1:
            k_BGSDh = k_BGSDh.repeat_interleave(groups, dim=1)
            v_BGSDh = v_BGSDh.repeat_interleave(groups, dim=1)
        causal = mask_B1SL is None and S > 1 and k_BGSDh.shape[2] == S
        out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, attn_mask=mask_B1SL, is_causal=causal)
        return self.o_proj(out_BHSDh.transpose(1, 2).reshape(B, S, -1))


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
