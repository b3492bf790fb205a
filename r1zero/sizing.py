"""Cluster sizing: pick a 3D(+EP) parallel layout for a model and estimate its memory and speed.

Pure formulas (no I/O, no kubernetes): :func:`estimate` scores one :class:`Layout`, :func:`plan`
searches every layout and returns the fastest one that fits memory with headroom. The CLI is
``r1zero plan`` (:mod:`r1zero.sizing_cli`):

    r1zero plan --config configs/a100-13b.yaml --gpus 1024
    r1zero plan --layers 96 --hidden 16384 --heads 128 --vocab 51200 --seq 2048 \
        --global-batch 2160 --gpus 1920 --gpu a100-80gb --json

Symbols: Ψ parameters, l layers, h hidden, a heads, s sequence, b micro-batch, t tensor-parallel,
p pipeline-parallel, d data-parallel, e expert-parallel, m micro-batches per step, V vocabulary.

Sources of the formulas (each is cited again where it is used):
- [ZeRO] Rajbhandari et al. 2020, arXiv:1910.02054, sec. 3.1 and 5: mixed-precision Adam keeps
  2Ψ (fp16 weights) + 2Ψ (fp16 grads) + 12Ψ (fp32 master, momentum, variance) = 16Ψ bytes;
  ZeRO-1 4Ψ + 12Ψ/N_d, ZeRO-2 2Ψ + 14Ψ/N_d, ZeRO-3 16Ψ/N_d.
- [Korthikanti] Korthikanti et al. 2022, arXiv:2205.05198, eq. 1-5 and Table 2: activation
  bytes per layer sbh(34 + 5as/h) and the tensor/sequence-parallel and recompute variants.
- [Narayanan] Narayanan et al. 2021, arXiv:2104.04473, sec. 2.2 and appendix: 1F1B bubble
  (p-1)/m; FLOPs per iteration 96Bslh²(1 + s/6h + V/16lh) with full recompute.
- [Ring] Patarasuk & Yuan 2009 / nccl-tests PERFORMANCE.md: a ring all-reduce moves 2(n-1)/n of
  the buffer per rank; reduce-scatter and all-gather each (n-1)/n.
- [MoE a2a] Lepikhin et al. 2020 (GShard, arXiv:2006.16668) / DeepSpeed-MoE (arXiv:2201.05596):
  each MoE layer does two all-to-alls forward (dispatch, combine) and two backward, each moving
  the routed token activations (k copies of s·b·h) with a fraction (e-1)/e leaving the rank.

Calibration constants (``_GEMM_EFF`` etc.) are physical efficiencies with their sources next to
them, one value each for every model size and GPU. Honest note on calibration: while developing,
the estimates were printed next to Megatron-LM 2021 Table 1 and BLOOM-176B, and ``_GEMM_EFF``
was lowered from 0.72 to 0.66 (inside the cited sustained-GEMM range) and three terms were added
(unfused attention-score traffic, the last stage's logit GEMM, overlap interference). The tests
against those runs are therefore consistency checks within 15%, not held-out validation; only the
ZeRO memory figures are exact formulas. Held out: the OPT-175B row (FSDP + TP 8 on 992 A100s,
arXiv:2205.01068) was added after the constants were fixed and changed none of them.

Engines: ``Layout.engine="fsdp2"`` (default) is r1zero's engine as :mod:`r1zero.train.parallelize`
builds it (FSDP2-sharded fp32 states, bf16 all-gathered units, experts split over ep and
replicated over tp, 1F1B or interleaved pipeline; :func:`stage_memory`); ``"megatron"`` is the
replica-plus-ZeRO engine of the published runs, used only to compare with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from r1zero.errors import UserError

GB = 1e9

# ---------------------------------------------------------------------------------------------
# hardware


@dataclass(frozen=True)
class GPU:
    name: str
    # dense peak TFLOP/s by training precision; None = not supported by the hardware.
    peak_tflops: dict[str, float | None]
    hbm_gb: float
    hbm_gbps: float  # HBM bandwidth, GB/s
    nvlink_gbps: float  # NVLink bandwidth per GPU per direction, GB/s


# NVIDIA A100 datasheet (2021): 312 TFLOP/s dense BF16/FP16, 19.5 FP32, no FP8 row; 40 GB HBM2
# 1,555 GB/s, 80 GB HBM2e 2,039 GB/s; NVLink3 600 GB/s total = 300 GB/s per direction.
# NVIDIA H100 SXM datasheet (2023): 989 TFLOP/s dense BF16, 1,979 FP8; 3,350 GB/s; NVLink4 900 GB/s.
GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "fp8": None}, 40.0, 1555.0, 300.0),
    "a100-80gb": GPU("a100-80gb", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "fp8": None}, 80.0, 2039.0, 300.0),
    "h100-80gb": GPU("h100-80gb", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "fp8": 1979.0}, 80.0, 3350.0, 450.0),
}

# Efficiencies (fractions of peak actually reached; fixed constants, sources given).
# Sustained cuBLAS BF16 GEMM throughput on transformer shapes: ~200-230 of 312 TFLOP/s on A100
# (NVIDIA Deep Learning Performance guide, "Matrix multiplication background"), 0.66 = 206/312.
# One value for every size and GPU (see the module docstring for how it was chosen).
_GEMM_EFF = 0.66
# Bus bandwidth reached by NCCL all-reduce relative to link peak: ~230 of 300 GB/s on NVLink3 and
# ~23 of 25 GB/s per HDR NIC (nccl-tests PERFORMANCE.md figures on DGX A100) -> 0.77 / 0.9.
_NVLINK_EFF = 0.77
_IB_EFF = 0.9
# Memory-bound (non-GEMM) traffic per token per layer, in units of h elements of 2 bytes, read +
# written by layer norms, softmax, GeLU, dropout, residual adds, forward + backward. Korthikanti
# counts 34 h-sized bytes of *stored* activations per token; each is written once, read in the
# backward and touched again by the gradient kernels, ~4x -> 136 bytes·h.
_ELEMWISE_BYTES_PER_H = 136.0
# Unfused attention (no FlashAttention) also streams the a·s score matrix per token: Korthikanti
# stores 5as bytes of it (softmax out 2, dropout mask 1, dropout out 2); scale-mask-softmax and
# dropout touch each ~4x over forward + backward -> 20 bytes·a·s. FlashAttention (Dao et al. 2022)
# keeps scores in SRAM, so the term vanishes (and the 5as/h activation term with it).
_SCORE_BYTES_PER_AS = 20.0
# Reserve for the CUDA context, NCCL buffers and allocator fragmentation (PyTorch CUDA context
# ~0.5-1 GB; fragmentation commonly 5-10%): usable = hbm * (1 - headroom) - 1 GB.
# Slowdown of compute while a collective runs beside it: NCCL kernels occupy SMs and memory
# bandwidth; measured interference is 10-30% (Rashidi et al. 2021, "Enabling compute-communication
# overlap in distributed deep learning training platforms", ISCA; Jangda et al. 2022, CoCoNet);
# 0.2 of the overlapped time is charged.
_OVERLAP_INTERFERENCE = 0.2
DEFAULT_HEADROOM = 0.10
_CONTEXT_GB = 1.0


def gpu_of_device(device_name: str) -> GPU | None:
    """The :data:`GPUS` entry of a CUDA device name (``torch.cuda.get_device_name``), or None.
    H200 has the H100 SXM's compute (NVIDIA H200 datasheet: 989 TFLOP/s dense BF16)."""
    name = device_name.upper()
    if "H100" in name or "H200" in name:
        return GPUS["h100-80gb"]
    if "A100" in name:
        return GPUS["a100-40gb" if "40GB" in name else "a100-80gb"]
    return None


def usable_bytes(gpu: GPU, headroom: float = DEFAULT_HEADROOM) -> float:
    """Device bytes a rank may fill: HBM less the headroom fraction and the CUDA context reserve."""
    return (gpu.hbm_gb * (1 - headroom) - _CONTEXT_GB) * GB


@dataclass(frozen=True)
class Hardware:
    gpu: GPU
    gpus: int
    gpus_per_node: int = 8
    inter_node_gbps: float = 200.0  # per node, GB/s (8 x 200 Gb/s HDR = 200 GB/s on DGX A100)

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    @property
    def ib_per_gpu_gbps(self) -> float:
        return self.inter_node_gbps / self.gpus_per_node


# ---------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class ModelSpec:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    ffn: int | None = None  # dense MLP width; default 4h (GPT)
    kv_heads: int | None = None
    experts: int = 1  # 1 = dense
    top_k: int = 1
    shared_experts: int = 0
    expert_ffn: int | None = None  # width of one expert; default ffn
    gated: bool = False  # SwiGLU MLP (3 matrices) instead of GPT's 2
    tied_embeddings: bool = True
    learned_positions: bool = True  # GPT-style s·h position table (Megatron counts it)
    flash_attention: bool = False  # fused attention: no a·s² scores in HBM
    # width of one head when it is not hidden / heads (Qwen3-style); counts only the q/k/v/o
    # parameters, the activation and FLOP terms keep Korthikanti's h = a * head_dim
    head_dim: int | None = None

    @property
    def moe(self) -> bool:
        return self.experts > 1

    @property
    def ffn_width(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def expert_width(self) -> int:
        return self.expert_ffn or self.ffn_width

    # parameter counts (weights only; biases and norms add 13h per layer as in Narayanan eq. (1))
    def attn_params(self) -> int:
        h = self.hidden
        kv = self.kv_heads or self.heads
        h_q = self.heads * self.head_dim if self.head_dim else h
        h_kv = h_q * kv // self.heads
        return h * h_q + 2 * h * h_kv + h_q * h + 13 * h

    def mlp_params(self, width: int) -> int:
        return (3 if self.gated else 2) * self.hidden * width

    def expert_params_per_layer(self) -> int:
        return self.experts * self.mlp_params(self.expert_width) if self.moe else 0

    def dense_params_per_layer(self) -> int:
        if self.moe:
            return self.attn_params() + self.shared_experts * self.mlp_params(self.expert_width) + self.hidden * self.experts
        return self.attn_params() + self.mlp_params(self.ffn_width)

    def active_params_per_layer(self) -> int:
        if self.moe:
            return self.attn_params() + (self.top_k + self.shared_experts) * self.mlp_params(self.expert_width)
        return self.dense_params_per_layer()

    def embedding_params(self) -> int:
        pos = self.seq * self.hidden if self.learned_positions else 0
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + pos

    def total_params(self) -> int:
        return self.layers * (self.dense_params_per_layer() + self.expert_params_per_layer()) + self.embedding_params()

    def active_params(self) -> int:
        return self.layers * self.active_params_per_layer() + self.embedding_params()


def gpt_params(layers: int, hidden: int, vocab: int, seq: int) -> float:
    """Narayanan et al. 2021 eq. (1): P = 12lh²(1 + 13/(12h) + (V + s)/(12lh))."""
    l, h = layers, hidden
    return 12 * l * h * h * (1 + 13 / (12 * h) + (vocab + seq) / (12 * l * h))


def spec_from_params(params: float, seq: int = 2048, vocab: int = 51200) -> ModelSpec:
    """A GPT shape for a parameter count: aspect ratio h ≈ 128·l (Kaplan et al. 2020 fig. 5 optimum
    band; Megatron's 1.7B-1T rows sit at h/l 96-200), heads of 128 dims."""
    if params <= 0:
        raise UserError(f"--params must be positive (got {params})")
    layers = max(2, round((params / (12 * 128 * 128)) ** (1 / 3)))
    hidden = max(128, round(128 * layers / 128) * 128)
    return ModelSpec(layers=layers, hidden=hidden, heads=max(1, hidden // 128), vocab=vocab, seq=seq)


def spec_from_hf_config(doc: dict, seq: int) -> ModelSpec:
    """The planner's shape of a transformers ``config.json`` (a ``model.base``), dense or MoE.

    Keys as transformers names them: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``; experts as ``num_local_experts`` (Mixtral),
    ``num_experts`` (Qwen2-MoE, OLMoE), ``n_routed_experts`` (DeepSeek-V2/V3, GLM-4-MoE) or
    ``n_experts`` (r1zero_moe), their width ``moe_intermediate_size`` (else ``intermediate_size``,
    as in Mixtral) or ``d_expert``, shared experts ``n_shared_experts`` (or one of
    ``shared_expert_intermediate_size``, Qwen2-MoE). Gated (SwiGLU) MLPs and RoPE, as all of those.
    """
    def get(*names, default=None):
        for n in names:
            v = doc.get(n)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return default

    hidden, layers, heads = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer"), \
        get("num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        raise UserError("config.json lacks hidden_size / num_hidden_layers / num_attention_heads")
    experts = get("num_local_experts", "num_experts", "n_routed_experts", "n_experts", default=1)
    ffn = get("intermediate_size", default=4 * hidden)
    expert_ffn = get("moe_intermediate_size", "d_expert", default=ffn)
    shared = get("n_shared_experts", "n_shared", default=0)
    if not shared and get("shared_expert_intermediate_size"):  # Qwen2-MoE: one wide shared expert
        shared = max(1, round(get("shared_expert_intermediate_size") / expert_ffn))
    top_k = get("num_experts_per_tok", "top_k", default=1) if experts > 1 else 1
    return ModelSpec(layers=layers, hidden=hidden, heads=heads, kv_heads=get("num_key_value_heads"),
                     head_dim=get("head_dim") if get("head_dim", default=0) * heads != hidden else None,
                     vocab=get("vocab_size", default=32000), seq=seq,
                     ffn=ffn if experts == 1 else expert_ffn * (top_k + shared),  # as spec_from_config
                     experts=experts, top_k=top_k,
                     shared_experts=shared if experts > 1 else 0, expert_ffn=expert_ffn if experts > 1 else None,
                     gated=True, tied_embeddings=bool(doc.get("tie_word_embeddings", False)),
                     learned_positions=False, flash_attention=True)


# ---------------------------------------------------------------------------------------------
# memory


def model_state_bytes_per_param(zero_stage: int, n_d: int, precision: str = "bf16") -> dict[str, float]:
    """Bytes per parameter for weights, gradients and Adam states on one rank ([ZeRO] sec. 3.1, 5).

    Mixed precision: 2 (16-bit weights) + 2 (16-bit grads) + 12 (fp32 master + m + v) = 16.
    fp32 training: 4 + 4 + 8 (m, v) = 16. ZeRO-1 shards optimizer states over ``n_d`` data ranks,
    ZeRO-2 also gradients, ZeRO-3 also weights.
    """
    if precision == "fp32":
        w, g, o = 4.0, 4.0, 8.0
    else:  # bf16 / fp16 / fp8 (fp8 GEMMs still keep 16-bit weights and fp32 states)
        w, g, o = 2.0, 2.0, 12.0
    if zero_stage >= 1:
        o /= n_d
    if zero_stage >= 2:
        g /= n_d
    if zero_stage >= 3:
        w /= n_d
    return {"weights": w, "gradients": g, "optimizer": o}


def activation_bytes_per_layer(spec: ModelSpec, micro_batch: int, tp: int, recompute: str,
                               sequence_parallel: bool, experts_split_tp: bool = True) -> float:
    """Stored activation bytes of one layer for one micro-batch ([Korthikanti] eq. 2-5, Table 2).

    Dense GPT block: attention 11sbh + 5as²b, MLP 19sbh, two layer norms 4sbh -> sbh(34 + 5as/h).
    The MLP's 16sbh of 4h-wide tensors is rescaled for other widths, gated MLPs and top-k experts.
    ``recompute``: none | selective (drop the 5as²b attention scores) | full (keep the 2sbh input).
    ``experts_split_tp=False`` (r1zero's engine): routed experts run on the tp-gathered sequence,
    so their wide tensors and their 2sbh gathered input are held whole on every tp rank.
    """
    if spec.moe and not experts_split_tp and tp > 1 and recompute != "full":
        moe_only = replace(spec, shared_experts=0)
        dense_part = activation_bytes_per_layer(replace(spec, experts=1, ffn=spec.shared_experts * spec.expert_width
                                                        or 1), micro_batch, tp, recompute, sequence_parallel)
        wide = 3 if spec.gated else 2
        return dense_part + spec.seq * micro_batch * spec.hidden * (2 + 2 * wide * moe_only.top_k
                                                                   * spec.expert_width / spec.hidden)
    s, b, h, a, t = spec.seq, micro_batch, spec.hidden, spec.heads, tp
    wide = 3 if spec.gated else 2  # 4h-wide tensors kept per MLP: GeLU in/out; SwiGLU gate/up/act
    width = (spec.top_k + spec.shared_experts) * spec.expert_width if spec.moe else spec.ffn_width
    mlp_wide = 2 * wide * width / h  # = 16 for GPT: two 4h-wide 16-bit tensors
    # Korthikanti eq. 3: attention splits 8 of its 11 (Q, K, V, projection input) and the MLP its
    # wide tensors; 10 stay replicated across tp ranks without SP (block inputs, LN, dropout masks).
    tp_part = 8 + mlp_wide
    rep_part = 10.0
    scores = 0.0 if spec.flash_attention else 5 * a * s / h
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    if sequence_parallel:
        per = (rep_part + tp_part) / t + (0 if recompute == "selective" else scores / t)
    else:
        per = rep_part + tp_part / t + (0 if recompute == "selective" else scores / t)
    return s * b * h * per


# ---------------------------------------------------------------------------------------------
# layout and estimate


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    zero_stage: int = 0
    micro_batch: int = 1
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = True  # Megatron SP when tp > 1 (Korthikanti 2022)
    # "fsdp2": r1zero's engine (r1zero.train.parallelize: FSDP2 + DTensor TP/SP + EP + pipelining);
    # "megatron": Megatron-LM/DeepSpeed ZeRO-style replicas, used only for the published comparisons.
    engine: str = "fsdp2"
    interleave: int = 1  # virtual pipeline stages per rank (interleaved 1F1B); 1 = plain 1F1B
    schedule: str = "1f1b"  # "1f1b" | "gpipe" (all micro-batches forward, then all backward)
    dp_replicate: int = 1  # HSDP replicas (fsdp2): states shard over dp / dp_replicate ranks only


def interleaved_in_flight(rank: int, pp: int, v: int, m: int) -> float:
    """Micro-batches' worth of a rank's layers whose activations interleaved 1F1B keeps at its peak.

    torch's ``ScheduleInterleaved1F1B`` runs ``m`` micro-batches in ``max(1, m // pp)`` rounds and
    warms up ``(v - 1) * m_round + 2 * (pp - 1 - rank)`` chunk forwards (capped at ``m * v``;
    ``torch.distributed.pipelining.schedules._get_warmup_ops``) before its first backward; with
    the steady state's one more, each chunk ``1 / v`` of the rank's layers. Rank 0 with ``m`` a
    multiple of ``pp``: ``pp + (pp - 1) / v`` = [Korthikanti] sec. 4.2.3's ``pp (1 + (pp - 1) / (pp v))``.
    """
    rounds = max(1, m // pp)
    warmup = min((v - 1) * (m // rounds) + 2 * (pp - 1 - rank), m * v)
    return min(warmup + 1, m * v) / v


def fsdp2_state_bytes_per_param(n_shard: int) -> dict[str, float]:
    """Bytes per parameter of FSDP2 (``fully_shard``) on one rank, for any training precision.

    FSDP2 keeps the sharded parameter in its original dtype (fp32) and casts the all-gathered copy
    to ``MixedPrecisionPolicy.param_dtype`` for compute; the sharded gradient is reduced in
    ``reduce_dtype`` (fp32) and stored in the parameter's dtype; AdamW keeps m and v (fp32) per
    sharded element (torch.distributed.fsdp docs, "fully_shard"; torchtitan docs/fsdp.md). All three
    divide by the shard group size: 4/n + 4/n + 8/n = 16/n.
    """
    n = max(1, n_shard)
    return {"weights": 4.0 / n, "gradients": 4.0 / n, "optimizer": 8.0 / n}


def stage_memory(spec: ModelSpec, layout: Layout, micro_batches: int, precision: str = "bf16", first: bool = True,
                 last: bool = True) -> dict[str, float]:
    """Bytes one rank of a pipeline stage holds: model states, FSDP buffers, stored activations.

    ``engine="fsdp2"`` (r1zero.train.parallelize): dense weights split over tp, experts over ep
    (and tp), every parameter FSDP2-sharded over the data ranks that hold the same slice (dp for
    dense weights, dp/ep for experts); the unsharded compute-dtype copy of the current and the
    prefetched block (ZeRO-3: ``reshard_after_forward``), or of every block of the stage when the
    layout keeps them between forward and backward (zero_stage < 3). The first stage holds the
    embedding, the last the output projection and the logits. ``engine="megatron"``: replicas
    with [ZeRO] stage-z sharding, the whole embedding on the worst stage (the published runs).
    """
    L = layout
    t, p, d, e, b = L.tp, L.pp, L.dp, L.ep, L.micro_batch
    sp = L.sequence_parallel and t > 1
    layers = math.ceil(spec.layers / p)
    in_flight = min(p, micro_batches) if first else 1  # 1F1B: stage i holds p - i micro-batches
    if L.schedule == "gpipe" and p > 1:  # GPipe: every stage holds all m micro-batches
        in_flight = micro_batches
    if L.interleave > 1 and p > 1:  # interleaved 1F1B: p·(1 + (p-1)/(p·v)) on stage 0 ([Korthikanti] sec. 4.2.3)
        in_flight = interleaved_in_flight(0 if first else p - 1, p, L.interleave, micro_batches)
    split = L.engine != "fsdp2"
    act_layer = activation_bytes_per_layer(spec, b, t, L.recompute, sp, split)
    act = act_layer * layers * in_flight
    if L.recompute == "full":  # the layer being recomputed materialises its full activations once
        act += activation_bytes_per_layer(spec, b, t, "none", sp, split)
    if L.engine == "megatron":
        dense = layers * spec.dense_params_per_layer() / t + spec.embedding_params() / t
        experts = layers * spec.expert_params_per_layer() / (t * e)
        dense_bpp = model_state_bytes_per_param(L.zero_stage, d, precision)
        expert_bpp = model_state_bytes_per_param(L.zero_stage, max(1, d // e), precision)
        mem = {k: dense * dense_bpp[k] + experts * expert_bpp[k] for k in dense_bpp}
        logits = spec.seq * b * spec.vocab / t * 4 if p == 1 else 0.0  # fp32 logits for the loss
        mem["activations"] = act + logits
        return mem
    if L.engine != "fsdp2":
        raise ValueError(f"unknown engine {L.engine!r}")
    table = spec.vocab * spec.hidden
    pos = spec.seq * spec.hidden if spec.learned_positions else 0
    embed = (table + pos if first else 0) + (table if last and not (spec.tied_embeddings and first) else 0)
    # Routed experts are replicated over tp (they run on the all-gathered sequence) and split over
    # ep; the router gate and the norms are replicated over tp too (small: counted with the tp split).
    dense = layers * spec.dense_params_per_layer() / t + embed / t
    experts = layers * spec.expert_params_per_layer() / e
    fsdp = d > 1 or precision != "fp32"  # the engine skips FSDP2 only for an fp32 world without dp
    # HSDP: FSDP2 shards over the dp / dp_replicate ranks of one replica (the 2-D mesh's shard dim)
    r = max(1, L.dp_replicate)
    dense_bpp = fsdp2_state_bytes_per_param(d // r) if fsdp else model_state_bytes_per_param(0, 1, "fp32")
    expert_bpp = fsdp2_state_bytes_per_param(d // (e * r)) if fsdp else dense_bpp
    mem = {k: dense * dense_bpp[k] + experts * expert_bpp[k] for k in dense_bpp}
    compute_bytes = 4 if precision == "fp32" else 2
    block_params = spec.dense_params_per_layer() / t + spec.expert_params_per_layer() / e
    block, root = block_params * compute_bytes, embed / t * compute_bytes  # the root stays gathered
    # ZeRO-3 reshards after forward (2 blocks gathered: current + prefetched); stages < 3 keep
    # every block gathered from forward to backward, and so does a pipeline stage with ZeRO-3
    # (torch.distributed.pipelining sets reshard_after_backward=False between micro-batches):
    # an upper bound there.
    keep_all = L.zero_stage < 3 or p > 1
    mem["fsdp_buffers"] = 0.0 if not fsdp else (root + layers * block) if keep_all else (root + 2 * block)
    # Gradient accumulation without sync (the engine and the pipeline schedule both turn FSDP's
    # gradient sync off until the last micro-batch): FSDP2 keeps each unit's unsharded gradient,
    # upcast to reduce_dtype (fp32), until the reduce-scatter of the last micro-batch.
    mem["unsharded_grads"] = (layers * block_params + embed / t) * 4 if fsdp and micro_batches > 1 else 0.0
    # Logits: the compute-dtype output, its fp32 copy and the fp32 log-softmax cross_entropy saves.
    logits = spec.seq * b * spec.vocab / t * (compute_bytes + 8) if last else 0.0
    mem["activations"] = act + logits
    return mem


@dataclass
class Estimate:
    layout: Layout
    fits: bool
    grad_accum: int
    memory_gb: dict[str, float]
    memory_per_gpu_gb: float
    usable_gb: float
    step_seconds: float
    tflops_per_gpu: float  # hardware FLOPs incl. recompute, as Narayanan counts
    mfu: float  # model FLOPs (6·Ψ_active·tokens + attention, no recompute) / peak
    bubble_fraction: float
    comm_fraction: float
    scaling_efficiency: float
    breakdown_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def flops_per_step(spec: ModelSpec, global_batch: int, recompute: str) -> float:
    """FLOPs of one iteration ([Narayanan] appendix, generalised to MoE/GQA).

    Forward per token per layer: 2·Ψ_active_layer (GEMMs) + 4sh (QKᵀ and AV). Backward is 2x the
    forward; full recompute adds one forward of every layer; the logit GEMM (2hV per token) is
    never recomputed. Dense GPT: 4·(24Bslh² + 4Bs²lh) + 6BshV = 96Bslh²(1 + s/6h + V/16lh).
    """
    s, h = spec.seq, spec.hidden
    layer_fwd = 2 * (spec.active_params_per_layer() - 13 * h) + 4 * s * h
    passes = 3.0 + (1.0 if recompute == "full" else 0.0)
    per_token = passes * spec.layers * layer_fwd + 3 * 2 * h * spec.vocab
    if recompute == "selective":  # recompute only the attention-score part (Korthikanti sec. 5)
        per_token += spec.layers * 4 * s * h
    return per_token * s * global_batch


def passes_of(recompute: str) -> float:
    """Forward-equivalent passes per micro-batch: forward + backward (2x), + a forward under full recompute."""
    return 4.0 if recompute == "full" else 3.0


def ring_allreduce_bytes(n: int, size_bytes: float) -> float:
    """Bytes each rank sends in a ring all-reduce ([Ring]): 2(n-1)/n · size."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * size_bytes


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """1F1B bubble share of the step: (p-1)/(m+p-1) of the time, i.e. (p-1)/m of ideal ([Narayanan])."""
    return (pp - 1) / (micro_batches + pp - 1)


def estimate(spec: ModelSpec, hw: Hardware, layout: Layout, global_batch: int, precision: str = "bf16",
             headroom: float = DEFAULT_HEADROOM) -> Estimate:
    """Memory per GPU by part and step time of one layout (see the module docstring for sources)."""
    peak = hw.gpu.peak_tflops.get(precision)
    if peak is None:
        raise UserError(f"precision {precision} is not supported on {hw.gpu.name}"
                        + (" (the A100 has no FP8 tensor cores; FP8 starts with Hopper/H100)" if "a100" in hw.gpu.name else ""))
    L = layout
    t, p, d, e, b = L.tp, L.pp, L.dp, L.ep, L.micro_batch
    sp = L.sequence_parallel and t > 1
    notes: list[str] = []
    per_replica = global_batch // d
    m = per_replica // b
    layers_per_stage = math.ceil(spec.layers / p)

    # -- memory: the worst pipeline stage (the first holds the embedding and the most micro-batches
    # in flight, the last the output projection and the logits)
    mem = max((stage_memory(spec, L, m, precision, first=i == 0, last=i == p - 1) for i in {0, p - 1}),
              key=lambda x: sum(x.values()))
    mem = {k: v / GB for k, v in mem.items()}
    dense_params = layers_per_stage * spec.dense_params_per_layer() / t + spec.embedding_params() / t
    expert_params = layers_per_stage * spec.expert_params_per_layer() / (e if L.engine == "fsdp2" else t * e)
    total_mem = sum(mem.values())
    usable = usable_bytes(hw.gpu, headroom) / GB

    # -- time of one micro-batch on one stage
    tokens_mb = spec.seq * b
    # The slowest stage sets the pipeline's pace: the last one runs the logit GEMM (6hV per token,
    # never recomputed) on top of its layers; with p = 1 this is just the whole model.
    logit_flops = 3 * 2 * spec.hidden * spec.vocab * tokens_mb
    layer_flops = (flops_per_step(spec, 1, L.recompute) * b - logit_flops) / spec.layers
    f_mb_stage = layer_flops * layers_per_stage + logit_flops
    gemm_s = f_mb_stage / t / (peak * 1e12 * _GEMM_EFF)
    if L.engine == "fsdp2" and spec.moe and t > 1:
        # r1zero's engine runs the routed experts on the all-gathered sequence, replicated over
        # tp: their FLOPs are not divided by t.
        expert_flops = (passes_of(L.recompute) * 2 * spec.top_k * spec.mlp_params(spec.expert_width)
                        * tokens_mb * layers_per_stage)
        gemm_s += expert_flops * (1 - 1 / t) / (peak * 1e12 * _GEMM_EFF)
    passes = 4 if L.recompute == "full" else 3
    per_token_bytes = spec.hidden * _ELEMWISE_BYTES_PER_H
    if not spec.flash_attention:
        per_token_bytes += spec.heads * spec.seq * _SCORE_BYTES_PER_AS
    elem_s = layers_per_stage * tokens_mb * per_token_bytes * passes / 3 / t / (hw.gpu.hbm_gbps * GB)
    nvlink = hw.gpu.nvlink_gbps * GB * _NVLINK_EFF
    ib = hw.ib_per_gpu_gbps * GB * _IB_EFF
    # TP: 2 all-reduces forward + 2 backward per layer (+2 recomputed), each of s·b·h 16-bit values
    # (with SP: reduce-scatter + all-gather, same volume) ([Narayanan] sec. 3.3, Korthikanti sec. 4.2.2).
    n_ar = 4 + (2 if L.recompute == "full" else 0)
    tp_bw = nvlink if t <= hw.gpus_per_node else ib
    tp_s = layers_per_stage * n_ar * ring_allreduce_bytes(t, tokens_mb * spec.hidden * 2) / tp_bw
    # MoE all-to-all ([MoE a2a]): 4 per layer (+2 recomputed), k·s·b·h 16-bit values, (e-1)/e leave.
    a2a_s = 0.0
    if spec.moe and e > 1:
        span = e * t  # ep groups join ranks of equal tp index: ep x tp consecutive ranks
        a2a_bw = nvlink if span <= hw.gpus_per_node else ib
        # r1zero's engine dispatches the whole (tp-gathered) sequence from every tp rank
        vol = spec.top_k * tokens_mb / (1 if L.engine == "fsdp2" else t) * spec.hidden * 2 * (e - 1) / e
        a2a_s = layers_per_stage * n_ar * vol / a2a_bw
    # PP: send activations s·b·h/t (SP) forward and gradients back, once per micro-batch per stage.
    pp_s = 0.0 if p == 1 else 2 * tokens_mb * spec.hidden * 2 / (t if sp else 1) / (ib if t * p > hw.gpus_per_node else nvlink)
    mb_s = gemm_s + elem_s + tp_s + a2a_s + pp_s
    v = max(1, L.interleave)
    # Interleaved 1F1B: each rank runs v chunks of 1/v of its layers; the bubble is (p-1)/v
    # chunk-times ([Narayanan] sec. 2.2.2), i.e. (p-1)/v micro-batch times.
    pipe_s = (m + (p - 1) / v) * mb_s
    bubble = bubble_fraction(p, m * v)

    dp_bw = ib if t * p < hw.gpus and (t * p >= hw.gpus_per_node or d * t * p > hw.gpus_per_node) else nvlink
    if L.engine == "megatron":
        # DP gradient sync once per step (reduce-scatter + all-gather for ZeRO = same volume as
        # all-reduce; ZeRO-3 adds a parameter all-gather in forward and backward: 1.5x, [ZeRO] sec. 7).
        grad_bytes = 2 if precision != "fp32" else 4
        dense_sync = ring_allreduce_bytes(d, dense_params * grad_bytes)
        expert_sync = ring_allreduce_bytes(max(1, d // e), expert_params * grad_bytes)
        if L.zero_stage == 3:
            dense_sync *= 1.5
            expert_sync *= 1.5
        dp_s = (dense_sync + expert_sync) / dp_bw
        # The last micro-batch's backward overlaps the bucketed all-reduce (DeepSpeed overlap_comm,
        # Megatron's grad buckets): hide up to 2/3 of one micro-batch's time.
        hidable = (2 / 3) * mb_s
    else:
        # FSDP2: every micro-batch all-gathers each block's compute-dtype parameters before its
        # forward (and again before its backward under ZeRO-3 resharding); gradients are
        # reduce-scattered in fp32 (reduce_dtype) once per step. FSDP2 prefetches the next block's
        # all-gather and reduce-scatters the previous block's gradients while the current block
        # computes, so all but about one block's collective hides behind the stage's compute.
        cb = 4 if precision == "fp32" else 2
        gathers = m * (2 if L.zero_stage == 3 else 1)
        gather = gathers * ((d - 1) / d * dense_params + (d // e - 1) / max(1, d // e) * expert_params) * cb
        scatter = ((d - 1) / d * dense_params + (d // e - 1) / max(1, d // e) * expert_params) * 4
        dp_s = (gather + scatter) / dp_bw
        hidable = max(0.0, m * mb_s * (1 - 1 / max(1, layers_per_stage)))
    # Hidden communication is not free: NCCL kernels take SMs and HBM bandwidth from the
    # overlapped compute (_OVERLAP_INTERFERENCE of the hidden time).
    dp_exposed = (max(0.0, dp_s - hidable) + _OVERLAP_INTERFERENCE * min(dp_s, hidable)) if d > 1 else 0.0
    # Optimizer step: memory-bound pass over the local model states (read+write 16 B/param x 2).
    opt_s = 2 * (mem["weights"] + mem["gradients"] + mem["optimizer"]) * GB / (hw.gpu.hbm_gbps * GB)
    step = pipe_s + dp_exposed + opt_s

    n_gpus = t * p * d
    hw_flops = flops_per_step(spec, global_batch, L.recompute)
    model_flops = flops_per_step(spec, global_batch, "none")
    tflops = hw_flops / step / n_gpus / 1e12
    mfu = model_flops / step / n_gpus / (peak * 1e12)
    comm = (m * (tp_s + a2a_s + pp_s) + dp_exposed) / step
    # Weak scaling: throughput per GPU relative to one model replica doing the same per-replica work
    # with no data-parallel sync.
    scaling = (pipe_s + opt_s) / step
    fits = total_mem <= usable
    if not fits:
        notes.append(f"needs {total_mem:.1f} GB > {usable:.1f} GB usable")
    return Estimate(
        layout=L, fits=fits, grad_accum=m, memory_gb={k: round(v, 3) for k, v in mem.items()},
        memory_per_gpu_gb=round(total_mem, 3), usable_gb=round(usable, 3), step_seconds=step,
        tflops_per_gpu=tflops, mfu=mfu, bubble_fraction=bubble, comm_fraction=comm, scaling_efficiency=scaling,
        breakdown_s={"gemm": m * gemm_s, "elementwise": m * elem_s, "tp_comm": m * tp_s, "moe_all_to_all": m * a2a_s,
                     "pp_p2p": m * pp_s, "bubble": (p - 1) * mb_s, "dp_comm_exposed": dp_exposed, "optimizer": opt_s},
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# search


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_layouts(spec: ModelSpec, hw: Hardware, global_batch: int, zero_stages=None,
                      recompute_options=("none", "full"), micro_batches=(1, 2, 4, 8),
                      tp_options=None, pp_options=None, sequence_parallel=(True,), engine: str = "fsdp2",
                      interleave=(1,)):
    """Every layout the engine runs: tp within a node dividing heads, kv-heads and the expert width;
    pp dividing layers with at least pp micro-batches per step (1F1B); dp = gpus/(tp·pp) dividing
    the global batch; ep dividing both experts and dp.

    ``engine="fsdp2"`` (r1zero's): ZeRO stages 1-3 only (FSDP2 always shards parameters, gradients
    and optimizer states; the stage picks resharding after forward, see :func:`stage_memory`),
    activation recompute none or full (the engine has no selective recompute), sequence parallelism
    always on with tp. ``engine="megatron"``: the published runs' options (ZeRO 0-3, selective).
    """
    n = hw.gpus
    fsdp = engine == "fsdp2"
    if zero_stages is None:
        zero_stages = (1, 3) if fsdp else (0, 1, 2, 3)
    kv = spec.kv_heads or spec.heads
    tps = tp_options or [t for t in (1, 2, 4, 8) if t <= hw.gpus_per_node and spec.heads % t == 0
                         and (not fsdp or (kv % t == 0 and (not spec.moe or spec.expert_width % t == 0)))]
    for t in tps:
        for p in pp_options or _divisors(spec.layers):
            if n % (t * p):
                continue
            d = n // (t * p)
            if global_batch % d:
                continue
            eps = [e for e in _divisors(spec.experts) if d % e == 0] if spec.moe else [1]
            if fsdp:  # the engine's default: an ep group (ep x tp consecutive ranks) inside one node
                eps = [e for e in eps if e == 1 or e * t <= hw.gpus_per_node]
            for e in eps:
                for z in zero_stages:
                    if z and d == 1:
                        continue
                    for b in micro_batches:
                        if (global_batch // d) % b or (fsdp and p > 1 and global_batch // d // b < p):
                            continue
                        for r in recompute_options:
                            for sp in sequence_parallel:
                                for v in (interleave if p > 1 else (1,)):
                                    if v > 1 and (spec.layers % (p * v) or (global_batch // d // b) % p):
                                        continue  # torch's interleaved schedule: m a multiple of pp
                                    yield Layout(tp=t, pp=p, dp=d, ep=e, zero_stage=z, micro_batch=b,
                                                 recompute=r, sequence_parallel=sp, engine=engine,
                                                 interleave=v)


def plan(spec: ModelSpec, hw: Hardware, global_batch: int, precision: str = "bf16",
         headroom: float = DEFAULT_HEADROOM, **search) -> Estimate:
    """The fastest layout that fits memory with ``headroom`` (ties: simpler layout first)."""
    if hw.gpu.peak_tflops.get(precision) is None:
        estimate(spec, hw, Layout(), global_batch, precision)  # raises the precise UserError
    best: Estimate | None = None
    tried = 0
    for layout in candidate_layouts(spec, hw, global_batch, **search):
        tried += 1
        est = estimate(spec, hw, layout, global_batch, precision, headroom)
        if not est.fits:
            continue
        key = (round(est.step_seconds, 6), layout.zero_stage, layout.tp, layout.pp, layout.ep)
        if best is None or key < (round(best.step_seconds, 6), best.layout.zero_stage, best.layout.tp,
                                  best.layout.pp, best.layout.ep):
            best = est
    if best is None:
        raise UserError(f"no layout fits: {spec.total_params() / 1e9:.1f}B parameters on {hw.gpus} x {hw.gpu.name} "
                        f"(global batch {global_batch}; tried {tried} layouts) - add GPUs or shrink the model")
    return best


def to_json(est: Estimate, hw: Hardware) -> dict:
    """The ``r1zero plan --json`` keys."""
    L = est.layout
    return {
        "tp": L.tp, "pp": L.pp, "dp": L.dp, "ep": L.ep, "zero_stage": L.zero_stage,
        "micro_batch": L.micro_batch, "grad_accum": est.grad_accum, "recompute": L.recompute,
        "nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node,
        # nodes one expert-parallel group (ep x tp consecutive ranks in r1zero's mesh) and one
        # tensor-parallel group span
        "ep_group_nodes": -(-L.ep * L.tp // hw.gpus_per_node) if L.ep > 1 else 1,
        "tp_group_nodes": -(-L.tp // hw.gpus_per_node),
        "memory_per_gpu_gb": round(est.memory_per_gpu_gb, 2),
        "memory_gb": {k: round(v, 2) for k, v in est.memory_gb.items()},
        "tflops_per_gpu": round(est.tflops_per_gpu, 1), "mfu": round(est.mfu, 4),
        "bubble_fraction": round(est.bubble_fraction, 4), "comm_fraction": round(est.comm_fraction, 4),
        "scaling_efficiency": round(est.scaling_efficiency, 4), "step_seconds": round(est.step_seconds, 3),
    }

