"""Planner estimates side by side with published large-scale runs (a markdown table on stdout),
and the full-scale dry run of the a100-13b preset and two other layouts next to the planner.

    .venv/bin/python benchmarks/bench_sizing.py            # published runs
    .venv/bin/python benchmarks/bench_sizing.py --dry-run  # dry run vs planner (about 2 minutes)
    .venv/bin/python benchmarks/bench_sizing.py --activations  # one real layer's saved bytes vs formula

Peers: Megatron-LM 2021 Table 1 (Narayanan et al., arXiv:2104.04473; A100-80GB, seq 2048,
vocab 51200, full recompute), BLOOM-176B (arXiv:2211.05100), and the ZeRO paper's memory figures
(arXiv:1910.02054). For each Megatron row: the estimate at the published layout, and the layout
the planner itself picks under the same constraints (no ZeRO, full recompute, micro-batch 1,
no sequence parallelism). Pure arithmetic: the figures do not depend on this machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from r1zero.sizing import GPUS, Hardware, Layout, ModelSpec, estimate, model_state_bytes_per_param, plan

_spec = importlib.util.spec_from_file_location("t", Path(__file__).resolve().parents[1] / "tests" / "test_sizing.py")
_t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_t)
MEGATRON_2021 = _t.MEGATRON_2021
OPT_175B = _t.OPT_175B


def main() -> None:
    a100 = GPUS["a100-80gb"]
    print("| model | GPUs | published tp x pp | TFLOP/s published | predicted at their layout | error "
          "| planner's tp x pp | planner TFLOP/s | memory GB (theirs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    errs = []
    for params, heads, hidden, layers, tp, pp, gpus, batch, tflops in MEGATRON_2021:
        spec = ModelSpec(layers=layers, hidden=hidden, heads=heads, vocab=51200, seq=2048)
        hw = Hardware(a100, gpus)
        theirs = estimate(spec, hw, Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), recompute="full",
                                           sequence_parallel=False, engine="megatron"), batch)
        best = plan(spec, hw, batch, zero_stages=(0,), recompute_options=("full",), micro_batches=(1,),
                    sequence_parallel=(False,), engine="megatron")
        err = theirs.tflops_per_gpu / tflops - 1
        errs.append(abs(err))
        print(f"| {params}B | {gpus} | {tp} x {pp} | {tflops} | {theirs.tflops_per_gpu:.0f} | {err:+.1%} "
              f"| {best.layout.tp} x {best.layout.pp} | {best.tflops_per_gpu:.0f} | {theirs.memory_per_gpu_gb:.0f} |")
    bloom = ModelSpec(layers=70, hidden=14336, heads=112, vocab=250880, seq=2048, learned_positions=False)
    b = estimate(bloom, Hardware(a100, 384), Layout(tp=4, pp=12, dp=8, zero_stage=1, micro_batch=2, recompute="full",
                                                     sequence_parallel=False, engine="megatron"), 2048)
    print(f"| BLOOM-176B | 384 | 4 x 12 (ZeRO-1) | ~150 | {b.tflops_per_gpu:.0f} | {b.tflops_per_gpu / 150 - 1:+.1%} "
          f"| - | - | {b.memory_per_gpu_gb:.0f} |")
    o = OPT_175B
    opt = estimate(ModelSpec(layers=96, hidden=12288, heads=96, vocab=50272, seq=2048), Hardware(a100, o["gpus"]),
                   Layout(tp=o["tp"], dp=o["gpus"] // o["tp"], zero_stage=3, micro_batch=o["micro_batch"],
                          recompute="full", sequence_parallel=False, engine="fsdp2"), o["batch"])
    print(f"| OPT-175B (held out; FSDP + TP, r1zero's engine kind) | {o['gpus']} | {o['tp']} x 1 (FSDP) "
          f"| ~{o['tflops']} | {opt.tflops_per_gpu:.0f} | {opt.tflops_per_gpu / o['tflops'] - 1:+.1%} | - | - "
          f"| {opt.memory_per_gpu_gb:.0f} |")
    print(f"\nMegatron rows: mean |error| {sum(errs) / len(errs):.1%}, max {max(errs):.1%}")
    zero = {s: 7.5e9 * sum(model_state_bytes_per_param(s, 64).values()) / 1e9 for s in range(4)}
    print("ZeRO (7.5B, N_d=64) model states GB: " + ", ".join(f"stage {s} {v:.1f}" for s, v in zero.items())
          + " (paper: 120, 31.4, 16.6, 1.9)")


# The preset and other runnable layouts of the same model on A100-80GB (``--set`` overrides).
# The former preset (tp 4, pp 2, dp 128, 8 micro-batches; its ep group of ep 8 x tp 4 spans 4 nodes).
FORMER = ["parallel.tp=4", "parallel.pp=2", "parallel.dp=128", "pretrain.grad_accum=8", "parallel.ep_across_nodes=true"]
DRY_RUN_LAYOUTS = {
    "a100-13b preset: tp1 pp1 ep8 dp1024, ZeRO-1, full recompute, 1024 GPUs": [],
    "the planner's pick: the preset without recompute": ["pretrain.activation_checkpointing=false"],
    "former preset: tp4 pp2 ep8 dp128, ZeRO-1 (ep group on 4 nodes)": FORMER,
    "tp8 pp4 ep8 dp32, ZeRO-3, 1024 GPUs (ep group on 8 nodes)": [
        "parallel.tp=8", "parallel.pp=4", "parallel.dp=32", "parallel.zero_stage=3", "pretrain.grad_accum=32",
        "parallel.ep_across_nodes=true"],
    "tp1 pp1 ep8 dp64, ZeRO-1, 64 GPUs": ["cluster.nodes=8", "parallel.dp=64", "pretrain.grad_accum=16"],
    "former preset with interleaved 1F1B (2 stages per rank)": [*FORMER, "parallel.pp_schedule=interleaved_1f1b"],
    "preset with HSDP (128 replicas x 8 shards, a replica per node)": ["parallel.dp_replicate=128"],
}


def dry_run_table() -> None:
    from r1zero.config import load_config
    from r1zero.train.dryrun import dry_run

    config = Path(__file__).resolve().parents[1] / "configs" / "a100-13b.yaml"
    print("| layout | ranks measured | dry run GB (largest rank) | planner GB | planner / dry run "
          "| states GB dry run | states GB planner | ratio | fits 80 GB with 10% headroom |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, overrides in DRY_RUN_LAYOUTS.items():
        out = dry_run(load_config(config, overrides))
        worst = max(out["ranks"], key=lambda r: r["total_bytes"])
        states = max(r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] for r in out["ranks"])
        print(f"| {name} | {','.join(str(r['rank']) for r in out['ranks'])} | {worst['total_bytes'] / 1e9:.2f} "
              f"| {out['planner_total_bytes'] / 1e9:.2f} | {out['planner_total_bytes'] / worst['total_bytes']:.3f} "
              f"| {states / 1e9:.3f} | {out['planner_states_bytes'] / 1e9:.3f} "
              f"| {out['planner_states_bytes'] / states:.3f} | {'yes' if out['fits'] else 'no'} |")


def activation_check() -> None:
    """Saved-for-backward bytes of one real r1zero decoder layer (bf16, world 1, no recompute),
    measured with saved-tensor hooks (parameters excluded), against the planner's per-layer
    formula that the dry run uses. Shapes: d_model 256, 4 heads, 8 experts top-2 of width 256."""
    import torch

    from r1zero.config import build_config
    from r1zero.model import build_model
    from r1zero.sizing import activation_bytes_per_layer
    from r1zero.sizing_cli import spec_from_config

    print("| seq x micro-batch | measured bytes | formula bytes | measured / formula |")
    print("|---|---|---|---|")
    for seq, b in ((256, 2), (512, 2), (512, 4)):
        cfg = build_config({"model": {"vocab_size": 512, "d_model": 256, "n_layers": 1, "n_heads": 4,
                                      "max_seq_len": seq, "moe": {"n_experts": 8, "top_k": 2, "d_expert": 256}},
                            "pretrain": {"seq_len": seq, "micro_batch": b, "precision": "bf16"}})
        model = build_model(cfg.model).to(torch.bfloat16)
        layer = model.model.layers[0]
        x_BSD = torch.randn(b, seq, 256, dtype=torch.bfloat16, requires_grad=True)
        cos_sin = model.model.rotary(torch.arange(seq)[None].expand(b, seq), torch.bfloat16)
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x_BSD, cos_sin, None)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured = sum(v for k, v in seen.items() if k not in params)
        formula = activation_bytes_per_layer(spec_from_config(cfg), b, 1, "none", False)
        print(f"| {seq} x {b} | {measured} | {formula:.0f} | {measured / formula:.2f} |")


if __name__ == "__main__":
    import sys

    if "--dry-run" in sys.argv[1:]:
        dry_run_table()
    elif "--activations" in sys.argv[1:]:
        activation_check()
    else:
        main()
