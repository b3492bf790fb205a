"""Planner estimates side by side with published large-scale runs (a markdown table on stdout).

    .venv/bin/python benchmarks/bench_sizing.py

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
                                           sequence_parallel=False), batch)
        best = plan(spec, hw, batch, zero_stages=(0,), recompute_options=("full",), micro_batches=(1,),
                    sequence_parallel=(False,))
        err = theirs.tflops_per_gpu / tflops - 1
        errs.append(abs(err))
        print(f"| {params}B | {gpus} | {tp} x {pp} | {tflops} | {theirs.tflops_per_gpu:.0f} | {err:+.1%} "
              f"| {best.layout.tp} x {best.layout.pp} | {best.tflops_per_gpu:.0f} | {theirs.memory_per_gpu_gb:.0f} |")
    bloom = ModelSpec(layers=70, hidden=14336, heads=112, vocab=250880, seq=2048, learned_positions=False)
    b = estimate(bloom, Hardware(a100, 384), Layout(tp=4, pp=12, dp=8, zero_stage=1, micro_batch=2, recompute="full",
                                                     sequence_parallel=False), 2048)
    print(f"| BLOOM-176B | 384 | 4 x 12 (ZeRO-1) | ~150 | {b.tflops_per_gpu:.0f} | {b.tflops_per_gpu / 150 - 1:+.1%} "
          f"| - | - | {b.memory_per_gpu_gb:.0f} |")
    print(f"\nMegatron rows: mean |error| {sum(errs) / len(errs):.1%}, max {max(errs):.1%}")
    zero = {s: 7.5e9 * sum(model_state_bytes_per_param(s, 64).values()) / 1e9 for s in range(4)}
    print("ZeRO (7.5B, N_d=64) model states GB: " + ", ".join(f"stage {s} {v:.1f}" for s, v in zero.items())
          + " (paper: 120, 31.4, 16.6, 1.9)")


if __name__ == "__main__":
    main()
