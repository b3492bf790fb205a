"""Pretraining throughput: r1zero MoE on its FSDP2 engine vs HF Mixtral (same shape) side by side.

    .venv/bin/python benchmarks/bench_pretrain.py --repeats 3 --steps 8
    .venv/bin/python benchmarks/bench_pretrain.py --preset configs/tiny.yaml --n-shared 0

Rows (one run, interleaved, best-of-repeats and median reported):
- ``r1zero+engine``: ``R1ZeroForCausalLM`` built on meta, parallelized and materialised, then stepped
  by :class:`r1zero.train.engine.TrainEngine` (``train_step`` + ``after_step``; world 1, fp32) --
  what ``r1zero pretrain`` runs;
- ``r1zero+torch``: the same model with a plain ``torch.optim.AdamW`` loop (engine overhead);
- ``mixtral+torch`` (the peer): ``transformers.MixtralForCausalLM`` with identical d_model, layers,
  heads, experts, top-k and expert width (``--n-shared 0`` so the r1zero model has no shared
  expert either), same optimizer loop.

Achieved FLOP/s uses the PaLM accounting (Chowdhery et al. 2022, appendix B):
``6 * N_active + 12 * L * d_model * S`` per token (N_active = parameters a token touches: attention,
router, top-k experts, shared experts, LM head), divided by the measured fp32 matmul peak
(best of 2048x2048 ``torch.mm``), i.e. model-FLOPs utilisation against what this CPU really does.

The engines at dp=2 (FSDP2 vs the retired DeepSpeed ZeRO engine) are ``benchmarks/bench_engines.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from r1zero.config import load_config


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(cfg) -> float:
    m, S = cfg.model, cfg.pretrain.seq_len
    D, L, E, K, F = m.d_model, m.n_layers, m.moe.n_experts, m.moe.top_k, m.moe.d_expert
    q = m.n_heads * m.head_width  # d_model unless model.head_dim widens the heads
    kv = (m.n_kv_heads or m.n_heads) * m.head_width
    attn = D * q * 2 + 2 * D * kv  # q, o, k, v
    moe = D * E + K * 3 * D * F + m.moe.n_shared * 3 * D * F
    n_active = L * (attn + moe) + D * m.vocab_size  # + LM head
    return 6 * n_active + 12 * L * q * S


def _batches(cfg, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.model.vocab_size, (cfg.pretrain.micro_batch, cfg.pretrain.seq_len), generator=g)
            for _ in range(n)]


def _r1zero(cfg):
    from r1zero.model import build_model

    return build_model(cfg.model, seed=0)


def _mixtral(cfg):
    from transformers import MixtralConfig, MixtralForCausalLM

    m = cfg.model
    hf = MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.moe.d_expert,
                       num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, head_dim=m.head_width,
                       num_key_value_heads=m.n_kv_heads or m.n_heads, num_local_experts=m.moe.n_experts,
                       num_experts_per_tok=m.moe.top_k, max_position_embeddings=m.max_seq_len,
                       tie_word_embeddings=m.tie_embeddings, output_router_logits=True,
                       router_aux_loss_coef=m.moe.aux_loss_coef)
    torch.manual_seed(0)
    return MixtralForCausalLM(hf)


def time_torch_loop(model, batches, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    model.train()
    t = time.perf_counter()
    for x in batches:
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def time_engine(cfg, batches) -> float:
    """:class:`TrainEngine` built as ``r1zero.train.pretrain.build_engine`` builds it (world 1)."""
    from r1zero.train import dist as rdist
    from r1zero.train.engine import TrainEngine
    from r1zero.train.parallel_dims import ParallelDims
    from r1zero.train.parallelize import build_meta_model, materialize, parallelize

    ctx = rdist.init(ParallelDims(1, 1, 1, 1, 1))
    try:
        pm = parallelize(build_meta_model(cfg), ctx.mesh, cfg)
        materialize(pm, ctx.device, seed=0)
        eng = TrainEngine(cfg, ctx, pm)
        eng.train_step([batches[0]])  # warm-up outside the timing
        eng.after_step()
        t = time.perf_counter()
        for x in batches[1:]:
            eng.train_step([x])
            eng.after_step()
        return time.perf_counter() - t
    finally:
        rdist.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-shared", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config(args.preset, [f"model.moe.n_shared={args.n_shared}", "telemetry.enabled=false"])
    tokens = cfg.pretrain.micro_batch * cfg.pretrain.seq_len
    fpt = flops_per_token(cfg)
    peak = matmul_peak()
    rows: dict[str, list[float]] = {"r1zero+engine": [], "r1zero+torch": [], "mixtral+torch": []}
    for rep in range(args.repeats):
        batches = _batches(cfg, args.steps + 1, seed=rep)
        order = list(rows) if rep % 2 == 0 else list(reversed(rows))  # alternate: load drifts
        for name in order:
            if name == "r1zero+engine":
                secs = time_engine(cfg, batches)
            else:
                model = _r1zero(cfg) if name == "r1zero+torch" else _mixtral(cfg)
                time_torch_loop(model, batches[:1], cfg.pretrain.lr)  # warm-up
                secs = time_torch_loop(model, batches[1:], cfg.pretrain.lr)
            rows[name].append(tokens * args.steps / secs)
    print(f"preset {args.preset} (n_shared={args.n_shared}), {tokens} tokens/step, {args.steps} steps x "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"matmul peak (fp32, 2048^3): {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {fpt / 1e6:.2f} MFLOP")
    peer = statistics.median(rows["mixtral+torch"])
    print(f"{'engine':<18} {'tok/s best':>10} {'tok/s median':>12} {'GFLOP/s':>8} {'of peak':>8} {'vs peer':>8}")
    for name, vals in rows.items():
        med = statistics.median(vals)
        print(f"{name:<18} {max(vals):>10.0f} {med:>12.0f} {med * fpt / 1e9:>8.1f} {med * fpt / peak:>8.1%} "
              f"{med / peer:>8.2f}")


if __name__ == "__main__":
    main()
