"""MoE layer forward+backward throughput: r1zero vs transformers Mixtral vs DeepSpeed-MoE.

    .venv/bin/python benchmarks/bench_moe.py                # full sizes (8192 tokens, d_model 512)
    .venv/bin/python benchmarks/bench_moe.py --tokens 256 --d-model 64 --repeats 1 --warmup 0 --json

``r1zero`` is ``MoELayer`` with its default ``expert_compute="loop"`` (per-expert GEMMs);
``r1zero_padded`` uses the padded-``bmm`` kernel. Two regimes, every peer configured to the same sizes and measured side by side in one process,
interleaved per repeat so machine noise hits all of them alike:

* ``mixtral``: E=8 experts, top-2, expert FFN width 1024 (Mixtral-8x7B shape, scaled down);
* ``fine_grained``: E=64, top-6, width 256 (DeepSeekMoE fine-grained segmentation).

Peers: ``transformers`` ``MixtralSparseMoeBlock`` (as a standalone block it runs the eager expert
loop; ``hf_grouped_mm`` is the same block with the ``torch._grouped_mm`` implementation that
``MixtralForCausalLM`` selects by default) and ``deepspeed.moe.layer.MoE`` (top-k gating,
capacity factor 1.25, token dropping). The ceiling is
this CPU's own fp32 matmul rate (2048^3 ``torch.mm``), measured in the same run; ``fraction of
peak`` = tokens/s * FLOPs/token / peak. FLOPs count the expert matmuls and the router, forward
and backward (3x forward). With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
from torch import nn

REGIMES = {
    "mixtral": {"n_experts": 8, "top_k": 2, "d_ff": 1024},
    "fine_grained": {"n_experts": 64, "top_k": 6, "d_ff": 256},
}


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops_per_token(d_model: int, n_experts: int, top_k: int, d_ff: int) -> float:
    # Per routed expert: gate+up (2*D*2F) and down (2*F*D) = 6*D*F forward; router 2*D*E.
    # Backward costs twice the forward (grad wrt inputs and wrt weights): x3 overall.
    return 3.0 * (top_k * 6 * d_model * d_ff + 2 * d_model * n_experts)


# ---- the three layers ----------------------------------------------------------------------


def build_r1zero(d_model, n_experts, top_k, d_ff, expert_compute="loop"):
    from r1zero.model.config import R1ZeroConfig
    from r1zero.model.moe import MoELayer

    cfg = R1ZeroConfig(hidden_size=d_model, num_attention_heads=1, n_experts=n_experts,
                       num_experts_per_tok=top_k, d_expert=d_ff, n_shared=0, router="softmax",
                       expert_compute=expert_compute)
    layer = MoELayer(cfg, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer, lambda x: layer(x)


def build_hf(d_model, n_experts, top_k, d_ff, experts_implementation="eager"):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d_model, intermediate_size=d_ff, num_local_experts=n_experts,
                        num_experts_per_tok=top_k)
    # A standalone block runs the eager expert loop; inside MixtralForCausalLM transformers 5.x
    # picks "grouped_mm" (torch._grouped_mm) by default, so both are measured.
    cfg._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block, lambda x: block(x)


class _SwiGLUExpert(nn.Module):
    """The same fused gate+up SwiGLU expert, for DeepSpeed to deep-copy per expert."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(g) * u)


def _init_single_process_dist() -> None:
    import deepspeed

    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def build_deepspeed(d_model, n_experts, top_k, d_ff):
    from deepspeed.moe.layer import MoE

    _init_single_process_dist()
    layer = MoE(hidden_size=d_model, expert=_SwiGLUExpert(d_model, d_ff), num_experts=n_experts, ep_size=1,
                k=top_k, capacity_factor=1.25, eval_capacity_factor=1.25, drop_tokens=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer, lambda x: layer(x)[0]


PEERS = {
    "r1zero": build_r1zero,
    "r1zero_padded": lambda *a: build_r1zero(*a, expert_compute="padded"),  # bmm over padded experts
    "hf_mixtral": build_hf,
    "hf_grouped_mm": lambda *a: build_hf(*a, experts_implementation="grouped_mm"),
    "deepspeed": build_deepspeed,
}


def fwd_bwd_seconds(module, fn, x, grad) -> float:
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    out = fn(xi)
    out.backward(grad)
    return time.perf_counter() - t0


def bench_regime(name: str, d_model: int, tokens: int, repeats: int, warmup: int, peak_probe) -> dict:
    r = REGIMES[name]
    torch.manual_seed(0)
    layers = {peer: build(d_model, r["n_experts"], r["top_k"], r["d_ff"]) for peer, build in PEERS.items()}
    x = torch.randn(1, tokens, d_model)
    grad = torch.randn(1, tokens, d_model)
    times: dict[str, list[float]] = {p: [] for p in layers}
    for i in range(warmup + repeats):
        for peer, (module, fn) in layers.items():  # interleaved: noise hits every peer alike
            module.train()
            t = fwd_bwd_seconds(module, fn, x, grad)
            if i >= warmup:
                times[peer].append(t)
        peak_probe()  # the ceiling is probed between rounds too: the best seen is the peak
    fpt = flops_per_token(d_model, r["n_experts"], r["top_k"], r["d_ff"])
    res: dict = {**r, "d_model": d_model, "tokens": tokens, "flops_per_token": fpt}
    for peer, ts in times.items():
        res[f"{peer}_tokens_per_s"] = tokens / min(ts)
        res[f"{peer}_median_tokens_per_s"] = tokens / statistics.median(ts)
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per peer (best is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--configs", default="mixtral,fine_grained")
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size of the matmul-peak probe")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)

    peaks = [matmul_peak_gflops(args.peak_n)]
    probe = lambda: peaks.append(matmul_peak_gflops(args.peak_n, repeats=2))  # noqa: E731
    result: dict = {"threads": torch.get_num_threads(), "configs": {}}
    runs = {name: bench_regime(name, args.d_model, args.tokens, args.repeats, args.warmup, probe)
            for name in args.configs.split(",")}
    peak = result["matmul_peak_gflops"] = max(peaks)
    for name, res in runs.items():
        achieved = res["r1zero_tokens_per_s"] * res["flops_per_token"] / 1e9
        res["r1zero_fraction_of_peak"] = achieved / peak
        res["hf_fraction_of_peak"] = res["hf_mixtral_tokens_per_s"] * res["flops_per_token"] / 1e9 / peak
        res["speedup_vs_hf"] = res["r1zero_tokens_per_s"] / res["hf_mixtral_tokens_per_s"]
        res["speedup_vs_deepspeed"] = res["r1zero_tokens_per_s"] / res["deepspeed_tokens_per_s"]
        res["speedup_vs_hf_grouped_mm"] = res["r1zero_tokens_per_s"] / res["hf_grouped_mm_tokens_per_s"]
        result["configs"][name] = res
        if not args.json:
            print(f"{name:13s} r1zero {res['r1zero_tokens_per_s']:8.0f} tok/s  "
                  f"hf {res['hf_mixtral_tokens_per_s']:8.0f}  ds {res['deepspeed_tokens_per_s']:8.0f}  "
                  f"x{res['speedup_vs_hf']:.2f} hf  x{res['speedup_vs_deepspeed']:.2f} ds  "
                  f"{100 * res['r1zero_fraction_of_peak']:.0f}% of {peak:.0f} GFLOP/s peak "
                  f"(hf {100 * res['hf_fraction_of_peak']:.0f}%)  "
                  f"hf grouped_mm {res['hf_grouped_mm_tokens_per_s']:.0f} (x{res['speedup_vs_hf_grouped_mm']:.2f})  "
                  f"r1zero padded {res['r1zero_padded_tokens_per_s']:.0f}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
