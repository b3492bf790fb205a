"""Where a pretraining step's time goes, for either engine: ``r1zero pretrain`` under torch.profiler.

A torchrun target that runs ``r1zero.cli pretrain`` unchanged and profiles steps 2..N (the first is
a warm-up) on every rank; it works on this tree (FSDP2 ``TrainEngine``) and on the old tree
(``DeepSpeedTrainEngine``, commit f59f072), so ``bench_engines.py --profile`` can put the two side by
side on the same command. Per rank it writes ``profile-rank<r>.json`` into ``$R1ZERO_PROFILE_DIR``:
milliseconds per step by phase (whole step, forward+backward, backward, gradient clip, optimizer,
collectives, FSDP's own ranges, copies and casts) and the top operators by self time.

    PYTHONPATH=<tree> R1ZERO_PROFILE_DIR=out torchrun --standalone --nproc-per-node 2 \\
        benchmarks/profile_engine_step.py pretrain --config configs/tiny.yaml --set parallel.dp=2 ...
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# operators that are inter-process communication on gloo (c10d's dispatcher ops and the functional
# collectives FSDP2 / DTensor issue)
COLLECTIVE = ("c10d::", "_c10d_functional::", "gloo:", "all_gather", "reduce_scatter", "allreduce", "all_reduce",
              "broadcast", "record_param_comms")
COPY = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::cat", "aten::_foreach_copy_", "aten::chunk_cat",
        "aten::split_with_sizes_copy", "aten::clone", "aten::empty", "aten::zero_", "aten::fill_")


class StepProfiler:
    """From the second ``train_step`` on: ``timers`` mode adds up wall-clock seconds per phase
    (perf_counter, no profiler: undisturbed); ``profile`` mode runs torch.profiler until the end."""

    def __init__(self, mode: str = "profile"):
        self.mode = mode
        self.calls = 0
        self.prof = None
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def wrap_step(self, fn):
        return self.ranged("phase:train_step", fn, starts=True)

    def ranged(self, name, fn, starts: bool = False):
        @functools.wraps(fn)
        def inner(*a, **kw):
            if starts:
                self.calls += 1
                if self.calls == 2 and self.mode == "profile":
                    self.prof = profile(activities=[ProfilerActivity.CPU])
                    self.prof.start()
            if self.mode == "timers":
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    if self.calls >= 2:
                        self.seconds[name] += time.perf_counter() - t0
                        self.counts[name] += 1
            with record_function(name):
                return fn(*a, **kw)
        return inner

    def timers(self) -> dict:
        steps = max(self.calls - 1, 1)
        return {"steps": steps, "ms_per_step": {k: round(v * 1e3 / steps, 3) for k, v in sorted(self.seconds.items())},
                "calls_per_step": {k: round(v / steps, 1) for k, v in sorted(self.counts.items())}}


def patch(sp: StepProfiler) -> None:
    """Phase ranges on whichever engine this tree has (the code under test is not modified)."""
    torch.Tensor.backward = sp.ranged("phase:loss.backward", torch.Tensor.backward)
    torch.optim.AdamW.step = sp.ranged("phase:optimizer", torch.optim.AdamW.step)
    try:  # this tree
        from r1zero.train.engine import TrainEngine

        TrainEngine.train_step = sp.wrap_step(TrainEngine.train_step)
        TrainEngine._clip = sp.ranged("phase:clip", TrainEngine._clip)
        TrainEngine.after_step = sp.ranged("phase:after_step", TrainEngine.after_step)
    except ImportError:  # the old tree: DeepSpeed at dp
        import deepspeed.runtime.engine as dse
        from r1zero.train.ds_engine import DeepSpeedTrainEngine

        DeepSpeedTrainEngine.train_step = sp.wrap_step(DeepSpeedTrainEngine.train_step)
        DeepSpeedTrainEngine.after_step = sp.ranged("phase:after_step", DeepSpeedTrainEngine.after_step)
        dse.DeepSpeedEngine.backward = sp.ranged("phase:ds_backward", dse.DeepSpeedEngine.backward)
        dse.DeepSpeedEngine.allreduce_gradients = sp.ranged("phase:dp_allreduce",
                                                            dse.DeepSpeedEngine.allreduce_gradients)
        dse.DeepSpeedEngine.step = sp.ranged("phase:engine_step", dse.DeepSpeedEngine.step)
        dse.DeepSpeedEngine.clip_fp32_gradients = sp.ranged("phase:clip", dse.DeepSpeedEngine.clip_fp32_gradients)


def _window(e) -> str | None:
    """The step range (``phase:train_step`` / ``phase:after_step``) an event runs in, if any."""
    while e is not None:
        if e.name in ("phase:train_step", "phase:after_step"):
            return e.name
        e = e.cpu_parent
    return None


def _kind(name: str) -> str:
    return ("collective" if any(s in name for s in COLLECTIVE) else
            "copy/cast/alloc" if name.startswith(COPY) else
            "matmul" if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm") else
            "other aten" if name.startswith("aten::") else "other")


def summarise(prof, steps: int) -> dict:
    """Milliseconds per profiled step, counting only events inside the step window (the pretrain
    loop times ``train_step`` + ``after_step``): phases and FSDP's ranges (inclusive), self time by
    kind of operator, and the Python time no operator accounts for (dispatch, hooks, DTensor)."""
    inclusive, calls = defaultdict(float), defaultdict(int)
    kinds, kind_calls, by_op = defaultdict(float), defaultdict(int), defaultdict(float)
    window_us = 0.0
    for e in prof.events():
        if _window(e) is None:
            continue
        us = e.time_range.elapsed_us()
        if e.name in ("phase:train_step", "phase:after_step") and e.cpu_parent is None:
            window_us += us
        if e.name.startswith(("phase:", "FSDP::", "Optimizer.")):
            inclusive[e.name] += us
            calls[e.name] += 1
            continue
        kinds[_kind(e.name)] += e.self_cpu_time_total
        kind_calls[_kind(e.name)] += 1
        by_op[e.name] += e.self_cpu_time_total
    ops_us = sum(kinds.values())
    ms = 1e-3 / steps
    return {
        "steps": steps,
        "window_ms_per_step": round(window_us * ms, 3),
        "inclusive_ms_per_step": {k: round(v * ms, 3) for k, v in sorted(inclusive.items())},
        "calls_per_step": {k: round(v / steps, 1) for k, v in sorted(calls.items())},
        "self_ms_per_step_by_kind": {**{k: round(v * ms, 3) for k, v in sorted(kinds.items())},
                                     "python outside operators": round((window_us - ops_us) * ms, 3)},
        "ops_per_step_by_kind": {k: round(v / steps, 1) for k, v in sorted(kind_calls.items())},
        "top_self_ms_per_step": [[k, round(v * ms, 3)] for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]],
    }


def main() -> int:
    sp = StepProfiler(os.environ.get("R1ZERO_PROFILE_MODE", "profile"))
    patch(sp)
    from r1zero.cli import main as cli_main

    rc = cli_main(sys.argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ.get("R1ZERO_PROFILE_DIR", "."))
    out.mkdir(parents=True, exist_ok=True)
    if sp.prof is not None:
        sp.prof.stop()
        (out / f"profile-rank{rank}.json").write_text(json.dumps(summarise(sp.prof, sp.calls - 1), indent=1))
    if sp.mode == "timers":
        (out / f"timers-rank{rank}.json").write_text(json.dumps(sp.timers(), indent=1))
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
