"""GRPO vs PPO vs RLOO (and GRPO's optional spectral grouping) on the tiny preset, side by side.

    .venv/bin/python benchmarks/bench_rl_algorithms.py --data runs/tiny/data --policy runs/tiny/pretrain \
        --steps 300 --parallel 2 --json

Measures the article's claims (GRPO vs PPO: "2.3x faster convergence, +14% accuracy, 40% fewer
resources") instead of repeating them. Every variant starts from the same base policy and data,
runs the same number of RL steps (``--steps``; the preset's time budget is lifted so that the
comparison is per step) with the same prompts per step, G, lengths, lr and seed, each as its own
``r1zero grpo`` process with ``--threads`` intra-op threads. ``--parallel 2`` runs two at once on
a 2-core machine (each gets one core, so CPU-seconds stay comparable; wall time does not).

Per variant it reports:
- held-out greedy pass@1 of the final policy on the *whole* eval split (95% bootstrap CI), and
  the gain over the base measured in the same way;
- convergence: the first step at which the periodic held-out curve (``grpo.eval_problems``
  subset) reaches the base's pass@1 + ``--target-gain``, and the step of its best point;
- resources: process CPU-seconds per RL step, peak RSS, trainable parameters (PPO adds a value
  head) and completion tokens generated.

Variants (``--variants``, comma separated): ``grpo`` (the preset), ``grpo_grouping`` (spectral
dynamic grouping on: curriculum sampling by cluster pass rate), ``grpo_adaptive`` (adaptive
group sizes), ``rloo`` (leave-one-out group baseline), ``ppo`` (value head + GAE, the article's
comparison). Prints a markdown table and,
with ``--json``, one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "grpo": [],
    "grpo_grouping": ["grpo.grouping.enabled=true"],
    # adaptive group sizes (2..16 by the prompt's or its stratum's pass rate)
    "grpo_adaptive": ["grpo.adaptive.enabled=true"],
    "rloo": ["grpo.algorithm=rloo"],
    # PPO has no group baseline, so dropping all-equal groups (dynamic sampling) would discard
    # batches its value head could still learn from: off for PPO.
    "ppo": ["grpo.algorithm=ppo", "grpo.dynamic_sampling=false"],
}


def run_variant(name: str, args, out_root: Path) -> dict:
    out = out_root / name
    sets = [f"grpo.steps={args.steps}", "grpo.time_budget_s=100000", f"grpo.eval_every={args.eval_every}",
            "telemetry.enabled=false", *VARIANTS[name], *args.set]
    cmd = [sys.executable, "-m", "r1zero.cli", "grpo", "--config", args.config, "--policy", args.policy,
           "--data", args.data, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = out_root / f"{name}.log"
    t0 = time.perf_counter()
    # /usr/bin/time-like accounting without the binary: a wrapper reports the child's rusage
    wrapper = ("import resource,subprocess,sys,json;r=subprocess.run(sys.argv[1:]).returncode;"
               "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
               "print(json.dumps({'rc':r,'cpu_s':u.ru_utime+u.ru_stime,'max_rss_mb':u.ru_maxrss/1024}),"
               "file=sys.stderr)")
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, cwd=ROOT, stdout=f,
                             stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    usage = json.loads(res.stderr.strip().splitlines()[-1])
    if usage["rc"] != 0:
        raise SystemExit(f"{name}: r1zero grpo failed (rc {usage['rc']}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    curve = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["name"] == "eval/accuracy":
            curve[r["step"]] = r["value"]
    return {"name": name, "out": str(out), "wall_s": wall, "cpu_s": usage["cpu_s"], "max_rss_mb": usage["max_rss_mb"],
            "steps": summary["steps"], "completion_tokens": summary["completion_tokens"], "curve": curve}


def heldout(policy: str, data: str, config: str, threads: int) -> list[float]:
    """Greedy correctness per eval-split problem: the acceptance test's own measurement."""
    import torch
    from accept_grpo_learning import heldout as accept_heldout  # benchmarks/ is on sys.path as a script

    from r1zero.config import load_config

    torch.set_num_threads(threads)
    return accept_heldout(policy, data, load_config(config, ["telemetry.enabled=false"]))["correct"]


@functools.cache  # one policy load per algorithm, not per variant
def n_trainable(policy: str, algorithm: str) -> int:
    from r1zero.grpo.inputs import load_policy

    model, _ = load_policy(policy)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if algorithm == "ppo":
        from r1zero.grpo.ppo import ValueHead

        n += sum(p.numel() for p in ValueHead(model).parameters())
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--data", required=True, help="data artifact (r1zero data mix)")
    ap.add_argument("--policy", required=True, help="base policy (r1zero pretrain output)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--variants", default="grpo,grpo_grouping,rloo,ppo")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-gain", type=float, default=0.05, help="convergence target over the base curve")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every variant")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from r1zero.eval.metrics import bootstrap_ci, paired_bootstrap_diff

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown} (known: {sorted(VARIANTS)})", file=sys.stderr)
        raise SystemExit(2)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="r1zero-bench-rl-"))
    out_root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(lambda n: run_variant(n, args, out_root), names))
    base = heldout(args.policy, args.data, args.config, args.threads)
    base_ci = bootstrap_ci(base, seed=0)
    rows = []
    for r in runs:
        corr = heldout(r["out"], args.data, args.config, args.threads)
        ci = bootstrap_ci(corr, seed=0)
        diff = paired_bootstrap_diff(corr, base, seed=0)
        curve = r["curve"]
        start = curve.get(0, base_ci.mean)
        reach = next((s for s in sorted(curve) if s > 0 and curve[s] >= start + args.target_gain), None)
        best = max(sorted(curve), key=lambda s: (curve[s], -s))
        algo = "ppo" if r["name"] == "ppo" else "rloo" if r["name"] == "rloo" else "grpo"
        rows.append({"variant": r["name"], "pass@1": ci.mean, "ci": [ci.lo, ci.hi], "gain": diff.mean,
                     "gain_ci": [diff.lo, diff.hi], "steps_to_target": reach, "best_step": best,
                     "best_curve": curve[best], "cpu_s_per_step": r["cpu_s"] / max(r["steps"], 1),
                     "max_rss_mb": r["max_rss_mb"], "wall_s": r["wall_s"], "steps": r["steps"],
                     "completion_tokens": r["completion_tokens"], "trainable_params": n_trainable(args.policy, algo),
                     "curve": curve})
    print(f"base greedy pass@1 {base_ci.mean:.3f} [{base_ci.lo:.3f}, {base_ci.hi:.3f}] on {len(base)} problems; "
          f"{args.steps} RL steps per variant; runs in {out_root}")
    print(f"| variant | pass@1 [95% CI] | gain vs base [95% CI] | steps to base+{args.target_gain:.2f} (curve) |"
          " CPU s/step | peak RSS MB | trainable params |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['variant']} | {x['pass@1']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}] | {x['gain']:+.3f} "
              f"[{x['gain_ci'][0]:+.3f}, {x['gain_ci'][1]:+.3f}] | {x['steps_to_target'] or 'not reached'} | "
              f"{x['cpu_s_per_step']:.2f} | {x['max_rss_mb']:.0f} | {x['trainable_params']:,} |")
    result = {"base": {"pass@1": base_ci.mean, "ci": [base_ci.lo, base_ci.hi], "n": len(base)}, "variants": rows,
              "steps": args.steps, "self_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
