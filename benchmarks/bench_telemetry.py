"""Telemetry overhead: the same 2-rank gloo training step with telemetry off and on, side by side.

    .venv/bin/python benchmarks/bench_telemetry.py [--steps 50] [--rounds 6] [--pairs 600] [--scrape 1.0]

Re-launches itself under ``torchrun --standalone --nproc_per_node 2``. Each round runs ``--steps``
steps with telemetry off (``telemetry.enabled=false``: the NullTelemetry) and ``--steps`` with it on
(exporter serving on loopback, collectives patched and timed, ``observe_step`` + ``set_gauges``
every step, a thread scraping ``/metrics`` every ``--scrape`` seconds: 15x more often than the
PodMonitor's 15 s), alternating which goes first. A step is a 4-layer MLP forward/backward plus
one all-reduce per parameter tensor (8 collectives per step, like DeepSpeed's gradient buckets).
Reported: median step time per mode and the overhead ratio on/off - 1 per round (the machine is
shared: read the spread, not one figure); a paired A/B where telemetry is toggled step by step
(``paired_ab``: slow load drift cancels in the pairs; median paired difference with a bootstrap
95% interval) next to an A/A control run the same way (both arms identical: the method's noise
floor); and the exporter's own cost per step from per-call timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

if "RANK" not in os.environ:  # parent: re-launch under torchrun with 2 ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", R1ZERO_PROGRESS="0")))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from r1zero import telemetry  # noqa: E402
from r1zero.config import TelemetryConfig  # noqa: E402

OFF = TelemetryConfig(enabled=False)
ON = TelemetryConfig(port=0, bind="127.0.0.1")


def make_step(rank: int, width: int = 256):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(4)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.GELU())])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(128, width, generator=g)

    def step() -> float:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # 8 tensors -> 8 all-reduces
            dist.all_reduce(p.grad)
        opt.step()
        return loss.item()

    return step


def run_block(cfg, step, steps: int, rank: int, scrape_s: float) -> tuple[list[float], float, float]:
    """Per-step wall seconds, this process's CPU seconds per step (all threads), median seconds
    spent in observe_step + set_gauges."""
    tel = telemetry.start(cfg, job="bench", rank=rank, stage="pretrain")
    stop = threading.Event()
    scraper = None
    if tel.url:
        def scrape():
            while not stop.wait(scrape_s):
                urllib.request.urlopen(tel.url, timeout=5).read()
        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
    times, obs = [], []
    dist.barrier()
    cpu0 = time.process_time()
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        tel.observe_step(seconds, tokens=128, loss=loss, lr=1e-3, step=i + 1)
        tel.set_gauges(grad_norm=1.0)
        t2 = time.perf_counter()
        times.append(t2 - t0)  # includes observe_step's own cost
        obs.append(t2 - t1)
    cpu = (time.process_time() - cpu0) / steps
    stop.set()
    if scraper:
        scraper.join()
    tel.close()
    return times, cpu, statistics.median(obs)


def per_call_costs(n: int = 3000, repeats: int = 7) -> dict:
    """Microseconds per all_reduce (timed vs not) and per observe_step, tight loops.

    The all-reduces run on a one-rank group of each process (``new_group``), so the figure is
    the wrapper's own cost, not the cross-process latency of a loaded 2-core machine. Plain and
    timed loops alternate; the minimum over repeats is the least-disturbed estimate of each."""
    t = torch.ones(16)
    solo = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    for _ in range(200):  # warm the group up
        dist.all_reduce(t, group=solo)
    best = {"plain": float("inf"), "timed": float("inf")}
    for _ in range(repeats):
        for mode in ("plain", "timed"):
            timer = telemetry.CommTimer()
            if mode == "timed":
                timer.install()
            t0 = time.perf_counter()
            for _ in range(n):
                dist.all_reduce(t, group=solo)
            best[mode] = min(best[mode], (time.perf_counter() - t0) / n * 1e6)
            timer.uninstall()
    out = {f"all_reduce_{mode}_us": v for mode, v in best.items()}
    tel = telemetry.start(ON, job="bench", rank=dist.get_rank(), stage="pretrain", comm=False)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            tel.observe_step(0.01, 128, loss=1.0, lr=1e-3, step=i)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    out["observe_step_us"] = best
    t0 = time.perf_counter()
    for _ in range(50):
        urllib.request.urlopen(tel.url, timeout=5).read()
    out["scrape_ms"] = (time.perf_counter() - t0) / 50 * 1e3
    tel.close()
    return out


def paired_ab(step, pairs: int, rank: int, scrape_s: float, control: bool = False) -> dict:
    """Telemetry toggled step by step (on/off in a seeded random order within each pair, same on
    both ranks), so slow load drift cancels in the paired differences. The endpoint and the
    scraper run throughout (a scrape's cost is counted separately); "on" = collectives patched
    + observe_step + set_gauges. ``control=True`` is the A/A run: "on" does exactly what "off"
    does, so its figures are the noise floor of the method on this machine at this moment."""
    import random

    tel = telemetry.start(ON, job="bench", rank=rank, stage="pretrain", comm=False)
    timer = tel.comm_timer()
    stop = threading.Event()

    def scrape():
        while not stop.wait(scrape_s):
            urllib.request.urlopen(tel.url, timeout=5).read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    order_rng = random.Random(1234)  # same sequence on every rank
    times = {"on": [], "off": []}
    for i in range(pairs):
        modes = ["on", "off"] if order_rng.random() < 0.5 else ["off", "on"]
        for mode in modes:
            active = mode == "on" and not control
            if active:
                timer.install()
            else:
                timer.uninstall()
            dist.barrier()
            t0 = time.perf_counter()
            loss = step()
            if active:
                tel.observe_step(time.perf_counter() - t0, tokens=128, loss=loss, lr=1e-3, step=i + 1)
                tel.set_gauges(grad_norm=1.0)
            times[mode].append(time.perf_counter() - t0)
    stop.set()
    scraper.join()
    tel.close()
    rel = [a / b - 1 for a, b in zip(times["on"], times["off"], strict=True)]
    boot_rng = random.Random(0)
    boots = sorted(statistics.median(boot_rng.choices(rel, k=len(rel))) for _ in range(400))
    return {"pairs": pairs, "on_ms_median": statistics.median(times["on"]) * 1e3,
            "off_ms_median": statistics.median(times["off"]) * 1e3,
            "ratio_of_medians": statistics.median(times["on"]) / statistics.median(times["off"]) - 1,
            "median_paired_rel_diff": statistics.median(rel),
            "median_paired_rel_diff_ci95": [boots[10], boots[389]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--scrape", type=float, default=1.0)
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--width", type=int, default=256, help="MLP width (step time grows ~ width^2)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    step = make_step(rank, args.width)
    for _ in range(20):  # warm-up
        step()
    rounds, pooled, observe_us = [], {"off": [], "on": []}, []
    for r in range(args.rounds):
        order = [("off", OFF), ("on", ON)] if r % 2 == 0 else [("on", ON), ("off", OFF)]
        res = {name: run_block(cfg, step, args.steps, rank, args.scrape) for name, cfg in order}
        med = {name: statistics.median(times) for name, (times, _, _) in res.items()}
        for name, (times, _, _) in res.items():
            pooled[name] += times
        cpu = {name: c for name, (_, c, _) in res.items()}
        observe_us.append(res["on"][2] * 1e6)
        rounds.append({"off_ms": med["off"] * 1e3, "on_ms": med["on"] * 1e3, "overhead": med["on"] / med["off"] - 1,
                       "cpu_off_ms": cpu["off"] * 1e3, "cpu_on_ms": cpu["on"] * 1e3,
                       "cpu_overhead": cpu["on"] / cpu["off"] - 1})
    paired, control = {}, {}
    for rep in range(2):  # A/B and A/A alternate, so both see the same load on average
        for name, ctl in (("ab", False), ("aa", True)) if rep == 0 else (("aa", True), ("ab", False)):
            res = paired_ab(step, args.pairs // 2, rank, args.scrape, control=ctl)
            (paired if name == "ab" else control).setdefault("halves", []).append(res)
    for d in (paired, control):
        d["ratio_of_medians"] = statistics.mean(h["ratio_of_medians"] for h in d["halves"])
        d["median_paired_rel_diff"] = statistics.mean(h["median_paired_rel_diff"] for h in d["halves"])
    costs = per_call_costs()
    if rank == 0:
        ov = [x["overhead"] for x in rounds] or [float("nan")]
        cov = [x["cpu_overhead"] for x in rounds] or [float("nan")]
        step_ms = (statistics.median(x["off_ms"] for x in rounds) if rounds
                   else statistics.median(h["off_ms_median"] for h in control["halves"]))
        # the exporter's own work per step: 8 timed collectives + observe_step/set_gauges + a scrape
        # amortised over the steps between scrapes
        wrapper_us = max(0.0, costs["all_reduce_timed_us"] - costs["all_reduce_plain_us"])
        own_us = 8 * wrapper_us + statistics.median(observe_us) + costs["scrape_ms"] * 1e3 * (step_ms / 1e3) / args.scrape
        pooled_ov = statistics.median(pooled["on"]) / statistics.median(pooled["off"]) - 1 if rounds else float("nan")
        print(json.dumps({"rounds": rounds, "paired": paired, "paired_control_aa": control, "per_call": costs,
                          "wall_overhead_pooled_median": pooled_ov,
                          "wall_overhead_median": statistics.median(ov), "wall_overhead_min": min(ov),
                          "wall_overhead_max": max(ov), "cpu_overhead_median": statistics.median(cov),
                          "cpu_overhead_min": min(cov), "cpu_overhead_max": max(cov),
                          "step_ms_off_median": step_ms, "comm_calls_per_step": 8, "width": args.width,
                          "observe_in_loop_us_median": statistics.median(observe_us),
                          "own_cost_per_step_us": own_us, "own_cost_fraction": own_us / (step_ms * 1e3)}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
