"""Lean decoder: a causal LM's weights applied directly, for sampling and the GRPO update.

    dec = lean_decoder(model)                  # None for an unsupported model: use model(...)
    logits_BV = dec.prefill(ids_UL, mask_UL, pos_UL, src_B, max_new_tokens)
    logits_BV = dec.step(tok_B, pos_B)         # one token per row, static KV cache
    dec = lean_decoder(model, training=True)   # the update's forward (autograd)
    logits_NV = dec.shared_prompt_logits(ids_UP, att_UP, pos_UP, src_B, ids_BS, pos_BS, real_BT)

Supports transformers' Llama, Qwen2 and Mistral decoders and r1zero's own MoE model, built only
for a plain model (no hooks, no DTensor weights). The math is the model's own (same RMSNorm, RoPE
tables from the model's rotary module, grouped-query attention), so logits agree with
``model(...)`` up to float rounding (tests/test_generate.py). What it saves:

- decoding (:func:`r1zero.generate.sample`): a KV cache preallocated once per call, RoPE tables
  computed once, q|k|v and gate|up fused into one matmul each for small models, and a small MoE
  decoded densely (:func:`_moe_dense`), with none of transformers' per-step module, mask and
  cache bookkeeping;
- the GRPO update (:func:`r1zero.grpo.update.forward_completion`): each unique prompt runs once,
  position-wise work runs on the real completion tokens only, and attention runs in
  length-sorted buckets of a ragged batch (:meth:`_LeanDecoder.shared_prompt_logits`).

Legend: B = rows (completions), U = unique prompts, L/P = prompt length (left-padded),
S = completion inputs per row (right-padded), n/N = real completion inputs / tokens (packed),
V = vocab, H/G = query/key-value heads, Dh = head dim, T = tokens (MoE), E = routed experts,
Eb = E + shared-expert blocks, F = expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# transformers decoder layers whose forward is exactly: x += attn(input_layernorm(x)) (RoPE,
# GQA, optional q/k/v bias), x += mlp(post_attention_layernorm(x)), with a Llama RMSNorm.
_HF_LLAMA_LIKE = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"}
_HF_MLP_SWIGLU = {"LlamaMLP", "Qwen2MLP", "MistralMLP"}
_STATIC_ROPE = {"default", "linear", "llama3"}  # inv_freq does not depend on the sequence length


@dataclass
class _Layer:
    n1: tuple[torch.Tensor, float]  # (weight, eps) of the pre-attention RMSNorm
    q: tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    n2: tuple[torch.Tensor, float]
    mlp: object  # (gate, up, down) linears for a SiLU SwiGLU, else the module itself


def _lin(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if type(m) is not nn.Linear:
        raise _NotLean(f"{type(m).__name__} is not a plain Linear")
    return m.weight, m.bias


class _NotLean(Exception):
    pass


# Fuse q/k/v and gate/up weights for decoding only below this many bytes (see _LeanDecoder._fuse).
_FUSE_MAX_BYTES = 64 << 20


def _cat_linear(parts: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """One (weight, bias) from row-stacked linears, or None when only some have a bias."""
    biases = [b for _, b in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    return torch.cat([w for w, _ in parts]), (None if biases[0] is None else torch.cat(biases))


def _rms(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """Llama RMSNorm: ``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``."""
    w, eps = norm
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _swiglu(x: torch.Tensor, mlp) -> torch.Tensor:
    if isinstance(mlp, tuple):
        (wg, bg), (wu, bu), (wd, bd) = mlp
        return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)
    return mlp(x)


# Decode a MoE feed-forward densely (every expert on every token, weight 0 where not routed)
# when that costs at most this many times the routed FLOPs: at decode sizes the router's sort /
# gather / scatter bookkeeping costs more than the extra matmul work (BENCHMARKS.md, "GRPO on the
# tiny preset"). The tiny preset routes 2 of 4 experts (2x); the 13B preset 2 of 8 (4x) keeps
# the routed module.
_MOE_DENSE_MAX_FLOPS = 2.0


def _moe_dense_weights(moe) -> tuple | None:
    """(gate weight, selection bias, stacked gate|up (Eb*2F, D), stacked down (D, Eb*F), shared
    blocks) of an r1zero MoE layer for :func:`_moe_dense`, or None where it does not apply. Built
    once per :func:`r1zero.generate.sample` call: weights and bias do not change while sampling.

    Eb = routed experts + shared blocks: the shared SwiGLU of width n_shared*F is n_shared
    always-on experts of width F (block-diagonal), appended with weight 1.
    """
    from r1zero.model.moe import MoELayer

    if type(moe) is not MoELayer or moe.capacity_factor is not None or moe.ep_dispatch is not None:
        return None  # capacity dropping depends on the batch; expert parallelism dispatches remotely
    E, K = moe.n_experts, moe.top_k
    if E > _MOE_DENSE_MAX_FLOPS * K:
        return None
    ex = moe.experts
    Fd = ex.d_ff
    gu = list(ex.w_gate_up)
    dn = list(ex.w_down)
    n_sh = 0
    if moe.shared is not None:
        sh = moe.shared
        wg, wu, wd = sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight
        if wg.shape[0] % Fd or any(m.bias is not None for m in (sh.gate_proj, sh.up_proj, sh.down_proj)):
            return None
        n_sh = wg.shape[0] // Fd
        for j in range(n_sh):
            gu.append(torch.cat([wg[j * Fd:(j + 1) * Fd], wu[j * Fd:(j + 1) * Fd]]))
            dn.append(wd[:, j * Fd:(j + 1) * Fd])
    return moe.gate.weight.float(), moe.selection_bias(), torch.cat(gu), torch.cat(dn, 1), n_sh


def _moe_dense(moe, weights: tuple, x_TD: torch.Tensor) -> torch.Tensor:
    """``MoELayer.forward`` at inference (same routing, same expert math) as two dense matmuls
    over all experts, unrouted ones weighted 0; no aux-loss or statistics bookkeeping."""
    from r1zero.model import router as R

    w_gate, bias_E, gu_CD, dn_DC, n_sh = weights
    T, E = x_TD.shape[0], moe.n_experts
    weights_TK, ids_TK, _ = R.route(F.linear(x_TD.float(), w_gate), moe.top_k, moe.kind, bias_E, moe.route_scale)
    w_TB = x_TD.new_zeros((T, E + n_sh))
    if n_sh:
        w_TB[:, E:] = 1.0
    w_TB.scatter_(1, ids_TK, weights_TK.to(x_TD.dtype))
    h_TB2F = F.linear(x_TD, gu_CD).view(T, E + n_sh, -1)
    Fd = h_TB2F.shape[-1] // 2
    a_TBF = F.silu(h_TB2F[..., :Fd]) * h_TB2F[..., Fd:] * w_TB[..., None]
    return F.linear(a_TBF.reshape(T, -1), dn_DC)


@dataclass
class _Bucket:
    """Completion rows whose attention runs together, padded to the longest (``width``)."""
    src: torch.Tensor  # (Bk,) unique prompt of each row
    width: int  # Sk
    allow: torch.Tensor  # (Bk, 1, Sk, P + Sk) attention mask
    gather: torch.Tensor | None  # (Bk*Sk,) packed completion row of each padded slot (None: identity)
    real: torch.Tensor | None  # slots holding real rows, in bucket order (None: all)


# Split the completion attention of a ragged batch into up to this many buckets of rows sorted by
# length, when that cuts the padded attention work (queries x keys) to at most _BUCKET_GAIN of one
# padded block: each bucket costs a few gathers per layer, so small gains are not worth it.
_MAX_BUCKETS = 4
_BUCKET_GAIN = 0.75


def _packed_index(keep_BS: torch.Tensor) -> torch.Tensor:
    """(B, S) packed row (row-major rank among the kept slots) of each kept slot; at a dropped
    slot the value is that of the kept slot before it (-1 before the first): never read there."""
    return (keep_BS.reshape(-1).long().cumsum(0) - 1).view(keep_BS.shape)


def _attention_buckets(keep_BS: torch.Tensor, src_B: torch.Tensor, keys_UP: torch.Tensor,
                       packed_BS: torch.Tensor | None) -> tuple[list[_Bucket], torch.Tensor | None]:
    """Buckets for :meth:`_LeanDecoder.shared_prompt_logits` and the permutation from their
    concatenated real slots back to packed (row-major) order (None when already in order).
    ``packed_BS``: :func:`_packed_index` of ``keep_BS``, or None when nothing is dropped.

    Right padding makes every padded slot a key no real query reaches (causal) and a query whose
    output is dropped, so padded slots may hold any row's values (index 0): they get no gradient.
    """
    B, S = keep_BS.shape
    P = keys_UP.shape[1]
    dev = keep_BS.device
    len_B = keep_BS.sum(1)
    packed = packed_BS is not None
    buckets: list[tuple[torch.Tensor, int]] = [(torch.arange(B, device=dev), S)]
    if packed and B > 1:
        order = torch.sort(len_B, stable=True).indices
        chunks = [c for c in order.tensor_split(min(_MAX_BUCKETS, B)) if c.numel()]
        split = [(c, int(len_B[c].max())) for c in chunks]
        split = [(c, w) for c, w in split if w > 0]
        if sum(c.numel() * w * (P + w) for c, w in split) <= _BUCKET_GAIN * B * S * (P + S):
            buckets = split
    out, order_n = [], []
    for rows, w in buckets:
        ac = torch.arange(w, device=dev)
        src = src_B.index_select(0, rows)
        allow = torch.cat([keys_UP.index_select(0, src)[:, None, :].expand(rows.numel(), w, P),
                           (ac[None, :] <= ac[:, None]).expand(rows.numel(), w, w)], -1)[:, None]
        if not packed:
            out.append(_Bucket(src, w, allow, None, None))
            continue
        keep = keep_BS.index_select(0, rows)[:, :w].reshape(-1)
        slots = packed_BS.index_select(0, rows)[:, :w].reshape(-1)
        out.append(_Bucket(src, w, allow, slots * keep, keep.nonzero().squeeze(-1)))
        order_n.append(slots[keep])
    inv = None
    if len(out) > 1:
        order = torch.cat(order_n)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=dev)
    return out, inv


class _LeanDecoder:
    """Decode with a preallocated KV cache, calling the model's weights directly.

    Supports transformers' Llama, Qwen2 and Mistral (no sliding window) decoders and r1zero's own
    :class:`~r1zero.model.R1ZeroForCausalLM` (MoE feed-forwards are called as modules). Built only
    for a plain model: no hooks, no DTensor (tensor-parallel) weights. The math is the model's
    own (same RMSNorm, RoPE tables from the model's rotary module, GQA head grouping), so
    logits agree with ``model(...)`` up to float rounding (tests: within 1e-5).
    Cache layout: ``k[i]``/``v[i]`` are (B, G, T_max, Dh); slot ``s`` holds sequence position
    ``s`` of every row (left padding keeps the rows aligned), ``bias_BT`` masks the padding.
    """

    def __init__(self, model):
        base = getattr(model, "model", None)
        if base is None or type(getattr(model, "lm_head", None)) is not nn.Linear:
            raise _NotLean("no .model / plain lm_head")
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            raise _NotLean("global forward hooks")
        for m in model.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                raise _NotLean("module hooks")
            for p in m._parameters.values():  # DTensor / quantised weights are Parameter subclasses
                if p is not None and (type(p) is not nn.Parameter or not p.dtype.is_floating_point):
                    raise _NotLean("non-plain parameter")
        cfg = model.config
        self.embed = base.embed_tokens.weight
        self.padding_idx = base.embed_tokens.padding_idx  # no gradient into that row (training)
        self.head = _lin(model.lm_head)
        layers = list(base.layers)[:getattr(model.config, "num_hidden_layers", None)]
        if type(model).__module__.startswith("transformers."):
            if not layers or {type(x).__name__ for x in layers} - _HF_LLAMA_LIKE:
                raise _NotLean("decoder layer type")
            if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
                raise _NotLean("attention implementation")
            if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
                raise _NotLean("sliding window")
            rope = getattr(cfg, "rope_parameters", None) or {}
            if rope.get("rope_type", "default") not in _STATIC_ROPE:
                raise _NotLean("dynamic RoPE")
            if getattr(cfg, "pretraining_tp", 1) != 1:
                raise _NotLean("pretraining_tp")
            silu = getattr(cfg, "hidden_act", None) == "silu"
            rot = self.rotary = base.rotary_emb
            self._rope = lambda pos_BS: rot(self.embed[:1], pos_BS)
            self.final = (base.norm.weight, base.norm.variance_epsilon)
            self.layers = []
            for x in layers:
                a, mlp = x.self_attn, x.mlp
                mlp_t = (_lin(mlp.gate_proj), _lin(mlp.up_proj), _lin(mlp.down_proj)) \
                    if silu and type(mlp).__name__ in _HF_MLP_SWIGLU else mlp
                self.layers.append(_Layer((x.input_layernorm.weight, x.input_layernorm.variance_epsilon),
                                          _lin(a.q_proj), _lin(a.k_proj), _lin(a.v_proj), _lin(a.o_proj),
                                          (x.post_attention_layernorm.weight,
                                           x.post_attention_layernorm.variance_epsilon), mlp_t))
            self.scale = layers[0].self_attn.scaling
            self.head_dim = layers[0].self_attn.head_dim
        elif type(model).__module__.startswith("r1zero.model"):
            from r1zero.model.layers import SwiGLU

            rot = self.rotary = base.rotary
            self._rope = lambda pos_BS: rot(pos_BS, self.embed.dtype)
            self.final = (base.norm.weight, base.norm.eps)
            self.layers = []
            for x in layers:
                a, mlp = x.self_attn, x.mlp
                mlp_t = (_lin(mlp.gate_proj), _lin(mlp.up_proj), _lin(mlp.down_proj)) \
                    if type(mlp) is SwiGLU else mlp
                self.layers.append(_Layer((x.attn_norm.weight, x.attn_norm.eps), _lin(a.q_proj), _lin(a.k_proj),
                                          _lin(a.v_proj), _lin(a.o_proj), (x.ffn_norm.weight, x.ffn_norm.eps),
                                          mlp_t))
            self.head_dim = layers[0].self_attn.head_dim
            self.scale = self.head_dim ** -0.5
        else:
            raise _NotLean("unknown architecture")
        self.n_heads = self.layers[0].q[0].shape[0] // self.head_dim
        self.n_kv = self.layers[0].k[0].shape[0] // self.head_dim
        if self.n_heads % self.n_kv:
            raise _NotLean("heads")

    # -- pieces shared by prefill and the training forward -----------------------------------
    def _rope_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions ``pos`` (..., S) -> (..., S, Dh), sin carrying rotate_half's
        sign so that RoPE is ``x * cos + x.roll(Dh/2) * sin``."""
        cos, sin = self._rope(pos)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], -1)

    def _qkv(self, ly: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (n, H, s, Dh) and k, v (n, G, s, Dh) of ``h`` (n, s, D), RoPE applied to q and k."""
        n, s = h.shape[:2]
        H, G, Dh = self.n_heads, self.n_kv, self.head_dim
        q = F.linear(h, *ly.q).view(n, s, H, Dh).transpose(1, 2)
        k = F.linear(h, *ly.k).view(n, s, G, Dh).transpose(1, 2)
        v = F.linear(h, *ly.v).view(n, s, G, Dh).transpose(1, 2)
        half = Dh // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin, v

    def _sdpa(self, q, k, v, allow) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allow, scale=self.scale,
                                              enable_gqa=self.n_kv != self.n_heads)

    @staticmethod
    def _prompt_allow(keys_UL: torch.Tensor) -> torch.Tensor:
        """(U, 1, L, L) attention mask of left-padded prompts: causal over real keys (a padding
        query attends to itself only, so no row is all -inf)."""
        ar = torch.arange(keys_UL.shape[1], device=keys_UL.device)
        return (((ar[None, :] <= ar[:, None]) & keys_UL[:, None, :]) | (ar[None, :] == ar[:, None]))[:, None]

    # -- prefill: U unique prompts, expanded to B rows --------------------------------------
    def prefill(self, ids_UL: torch.Tensor, mask_UL: torch.Tensor, pos_UL: torch.Tensor, src_B: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        U, L = ids_UL.shape
        H, G, Dh = self.n_heads, self.n_kv, self.head_dim
        B, T = src_B.shape[0], L + max_new_tokens
        dev = ids_UL.device
        # RoPE tables over every position this call can reach: (P, Dh)
        cos_PD, sin_PD = self._rope_tables(torch.arange(int(pos_UL.max()) + max_new_tokens + 1, device=dev)[None])
        self.cos_PD, self.sin_PD = cos_PD[0], sin_PD[0]
        keys_UL = mask_UL.bool()
        allow_U1LL = self._prompt_allow(keys_UL)
        cos, sin = self.cos_PD[pos_UL][:, None], self.sin_PD[pos_UL][:, None]  # (U, 1, L, Dh)
        x = F.embedding(ids_UL, self.embed)
        self._fuse()
        self.k, self.v = [], []
        for i, ly in enumerate(self.layers):
            q, k, v = self._qkv(ly, _rms(x, ly.n1), cos, sin)
            kb = k.new_empty((B, G, T, Dh))
            vb = v.new_empty((B, G, T, Dh))
            kb[:, :, :L] = k.index_select(0, src_B)
            vb[:, :, :L] = v.index_select(0, src_B)
            self.k.append(kb)
            self.v.append(vb)
            o = self._sdpa(q, k, v, allow_U1LL)
            x = x + F.linear(o.transpose(1, 2).reshape(U, L, H * Dh), *ly.o)
            x = x + self._ffn(i, _rms(x, ly.n2), decode=False)
        x = _rms(x[:, -1], self.final)
        self.slot = L
        bias_BT = torch.zeros((B, T), dtype=x.dtype, device=dev)
        bias_BT[:, :L].masked_fill_(~keys_UL.index_select(0, src_B), float("-inf"))
        self.bias_B11T = bias_BT[:, None, None, :]
        return F.linear(x, *self.head).index_select(0, src_B)

    # -- training forward: completion logits with each unique prompt computed once -----------
    def shared_prompt_logits(self, ids_UP: torch.Tensor, att_UP: torch.Tensor, pos_UP: torch.Tensor,
                             src_B: torch.Tensor, ids_BS: torch.Tensor, pos_BS: torch.Tensor,
                             real_BT: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of the N real completion positions of ``real_BT`` (row-major order).

        ``ids_UP``: the U unique prompts, left-padded (``att_UP`` = 1 on real tokens, last column
        real); row b continues prompt ``src_B[b]`` with the right-padded completion inputs
        ``ids_BS`` (S = T - 1: input t predicts completion token t + 1; token 0 is predicted from
        the prompt's last position). ``real_BT`` marks the real completion tokens. Autograd-enabled.

        Work saved against ``model(...)`` over the padded batch, with the same logits up to float
        rounding (tests):
        - each unique prompt runs once and its keys/values are gathered per row (U instead of B
          prompt rows, forward and backward);
        - position-wise work (norms, projections, feed-forward, LM head) runs on one flat tensor
          of the prompt tokens plus the *real* completion tokens only: right padding never reaches
          a real query (causal), so its rows are skipped, and only attention sees the padded
          (B, S) layout (padding rows zero there, their outputs discarded).
        """
        U, P = ids_UP.shape
        B, S = ids_BS.shape
        H, G, Dh = self.n_heads, self.n_kv, self.head_dim
        half, UP = Dh // 2, U * P
        dev = ids_UP.device
        keys_UP = att_UP.bool()
        allow_p = self._prompt_allow(keys_UP)
        keep_BS = real_BT[:, 1:]  # completion input t is needed iff token t + 1 is real
        n = int(keep_BS.sum())
        packed_BS = _packed_index(keep_BS) if n < B * S else None  # None: no padding to skip
        ids_n, pos_n = (ids_BS[keep_BS], pos_BS[keep_BS]) if packed_BS is not None else \
            (ids_BS.reshape(-1), pos_BS.reshape(-1))
        buckets, inv_n = _attention_buckets(keep_BS, src_B, keys_UP, packed_BS) if n else ([], None)
        cos, sin = self._rope_tables(torch.cat([pos_UP.reshape(-1), pos_n])[None])
        cos, sin = cos[0][:, None], sin[0][:, None]  # (UP + n, 1, Dh)
        x = F.embedding(torch.cat([ids_UP.reshape(-1), ids_n]), self.embed, self.padding_idx)  # (UP + n, D)
        D = x.shape[-1]

        for ly in self.layers:
            h = _rms(x, ly.n1)
            q = F.linear(h, *ly.q).view(-1, H, Dh)
            k = F.linear(h, *ly.k).view(-1, G, Dh)
            v = F.linear(h, *ly.v).view(-1, G, Dh)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            qp, kp, vp = (t[:UP].view(U, P, -1, Dh).transpose(1, 2) for t in (q, k, v))
            o = self._sdpa(qp, kp, vp, allow_p).transpose(1, 2).reshape(UP, H * Dh)
            parts = [o]
            for bk in buckets:  # completion queries, a bucket of rows at a time (padded to its longest)
                Bk, Sk = bk.src.shape[0], bk.width

                def lay(t_n: torch.Tensor, bk=bk, Bk=Bk, Sk=Sk) -> torch.Tensor:  # (n, h, Dh) -> (Bk, h, Sk, Dh)
                    return (t_n if bk.gather is None else t_n.index_select(0, bk.gather)).view(Bk, Sk, -1, Dh).transpose(1, 2)

                kc = torch.cat([kp.index_select(0, bk.src), lay(k[UP:])], 2)
                vc = torch.cat([vp.index_select(0, bk.src), lay(v[UP:])], 2)
                oc = self._sdpa(lay(q[UP:]), kc, vc, bk.allow).transpose(1, 2).reshape(Bk * Sk, H * Dh)
                parts.append(oc if bk.real is None else oc.index_select(0, bk.real))
            if inv_n is not None:  # bucket order -> packed order
                parts = [o, torch.cat(parts[1:]).index_select(0, inv_n)]
            o = torch.cat(parts) if len(parts) > 1 else o
            x = x + F.linear(o, *ly.o)
            h = _rms(x, ly.n2)
            # a module feed-forward (r1zero MoE) sees each unique prompt token and each real
            # completion token once, so its routing statistics and aux loss skip padding
            x = x + (_swiglu(h, ly.mlp) if isinstance(ly.mlp, tuple) else ly.mlp(h[None])[0])
        # hidden state predicting each real token: (b, 0) <- prompt's last position, (b, t) <- packed row
        map_BT = torch.empty(real_BT.shape, dtype=torch.long, device=dev)
        map_BT[:, 0] = UP + n + torch.arange(B, device=dev)
        if S:
            map_BT[:, 1:] = UP + (packed_BS if packed_BS is not None else torch.arange(n, device=dev).view(B, S))
        last_B = x[:UP].view(U, P, D)[:, -1].index_select(0, src_B)
        h_N = torch.cat([x, last_B]).index_select(0, map_BT[real_BT])
        return F.linear(_rms(h_N, self.final), *self.head)

    def select(self, idx_B: torch.Tensor) -> None:
        self.k = [t.index_select(0, idx_B) for t in self.k]
        self.v = [t.index_select(0, idx_B) for t in self.v]
        self.bias_B11T = self.bias_B11T.index_select(0, idx_B)

    # -- one token per row -------------------------------------------------------------------
    def _fuse(self) -> None:
        """Concatenated q|k|v and gate|up weights for decoding (one matmul instead of 3 / 2), and
        for a small r1zero MoE feed-forward its experts stacked for :func:`_moe_dense`.

        A copy of those weights, made once per :func:`sample` call, so only for small models
        (``_FUSE_MAX_BYTES``), where per-op overhead dominates; large models keep separate matmuls.
        """
        self.fused = []
        nbytes = 0
        for ly in self.layers:
            ws = [w for w, _ in (ly.q, ly.k, ly.v)]
            ws += [w for w, _ in ly.mlp[:2]] if isinstance(ly.mlp, tuple) else list(ly.mlp.parameters())
            nbytes += sum(w.numel() * w.element_size() for w in ws)
        if nbytes > _FUSE_MAX_BYTES:
            return
        for ly in self.layers:
            qkv = _cat_linear([ly.q, ly.k, ly.v])
            gu = _cat_linear(list(ly.mlp[:2])) if isinstance(ly.mlp, tuple) else None
            self.fused.append((qkv, gu, None if isinstance(ly.mlp, tuple) else _moe_dense_weights(ly.mlp)))

    def _ffn(self, i: int, h: torch.Tensor, decode: bool = True) -> torch.Tensor:
        """Feed-forward of layer ``i`` at inference (fused / dense-MoE forms where built; the
        dense MoE only for ``decode``: over a prefill's many tokens the extra FLOPs cost more
        than the routing bookkeeping saved)."""
        ly = self.layers[i]
        fused = self.fused[i] if self.fused else (None, None, None)
        if fused[1] is not None:
            gate, up = F.linear(h, *fused[1]).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, *ly.mlp[2])
        if fused[2] is not None and decode:
            return _moe_dense(ly.mlp, fused[2], h.reshape(-1, h.shape[-1])).view(h.shape)
        return _swiglu(h, ly.mlp)

    def step(self, tok_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        B = tok_B.shape[0]
        H, G, Dh = self.n_heads, self.n_kv, self.head_dim
        r, half, s = H // G, Dh // 2, self.slot
        cos, sin = self.cos_PD[pos_B][:, None], self.sin_PD[pos_B][:, None]  # (B, 1, Dh)
        bias = self.bias_B11T[..., :s + 1]
        x = F.embedding(tok_B, self.embed)
        for i, (ly, kc, vc) in enumerate(zip(self.layers, self.k, self.v)):
            h = _rms(x, ly.n1)
            fused = self.fused[i] if self.fused else (None, None, None)
            if fused[0] is not None:  # one matmul, RoPE on q|k at once
                qkv = F.linear(h, *fused[0])
                qk = qkv[:, :(H + G) * Dh].view(B, H + G, Dh)
                qk = qk * cos + qk.roll(half, -1) * sin
                q, kc[:, :, s] = qk[:, :H], qk[:, H:]
                vc[:, :, s] = qkv[:, (H + G) * Dh:].view(B, G, Dh)
            else:
                q = F.linear(h, *ly.q).view(B, H, Dh)
                k = F.linear(h, *ly.k).view(B, G, Dh)
                q = q * cos + q.roll(half, -1) * sin
                kc[:, :, s] = k * cos + k.roll(half, -1) * sin
                vc[:, :, s] = F.linear(h, *ly.v).view(B, G, Dh)
            a = torch.matmul(q.reshape(B, G, r, Dh), kc[:, :, :s + 1].transpose(-1, -2)) * self.scale + bias
            p = a.softmax(-1) if a.dtype == torch.float32 else a.softmax(-1, dtype=torch.float32).to(a.dtype)
            o = torch.matmul(p, vc[:, :, :s + 1])  # (B, G, r, Dh)
            x = x + F.linear(o.view(B, H * Dh), *ly.o)
            x = x + self._ffn(i, _rms(x, ly.n2))
        self.slot = s + 1
        return F.linear(_rms(x, self.final), *self.head)

    def called_modules(self) -> list[nn.Module]:
        """Submodules this decoder calls as modules (the rest is applied weight by weight)."""
        return [self.rotary] + [ly.mlp for ly in self.layers if not isinstance(ly.mlp, tuple)]


def lean_decoder(model, training: bool = False):
    """The lean decoder for ``model``, or None when its architecture is not supported.

    ``training=True`` (the shared-prompt training forward) additionally needs a model without
    dropout or gradient checkpointing; for r1zero's MoE models, dropless experts (no capacity
    factor: otherwise the batch's composition decides which tokens are dropped) without expert
    parallelism. Their routing statistics and aux loss then count each unique prompt token once
    instead of G times (the logits and the policy-gradient part are the same).
    """
    try:
        dec = _LeanDecoder(model)
    except _NotLean:
        return None
    if training:
        cfg = model.config
        ckpt = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        if getattr(model, ckpt, False) or not _lean_trainable(model):
            return None
        if model.training and any(float(getattr(cfg, a, 0.0) or 0.0) > 0 for a in ("attention_dropout", "hidden_dropout",
                                                                                   "dropout", "mlp_dropout")):
            return None
    return dec


def _lean_trainable(model) -> bool:
    if type(model).__module__.startswith("transformers."):
        return True
    if not type(model).__module__.startswith("r1zero.model"):
        return False
    return all(m.capacity_factor is None and m.ep_dispatch is None for m in model.moe_layers())


def lean_aux_loss(model) -> torch.Tensor | None:
    """The aux loss of the last lean training forward, as ``model.forward`` would add it."""
    moes = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not moes or any(m.aux_loss is None for m in moes):
        return None
    cfg = model.config
    return cfg.aux_loss_coef * torch.stack([m.aux_loss for m in moes]).sum() + \
        cfg.z_loss_coef * torch.stack([m.z_loss for m in moes]).sum()
