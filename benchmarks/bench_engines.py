"""Pretraining engines side by side at dp=2: the FSDP2 engine vs the retired DeepSpeed ZeRO engine.

    git worktree add /tmp/r1zero-old f59f072      # last commit with the DeepSpeed engine (outside the repo)
    .venv/bin/r1zero data mix --config configs/tiny.yaml --set data.n_train=3000 --set data.n_eval=60 \\
        --out /tmp/bench-eng/data
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_engines.py --old-tree /tmp/r1zero-old \\
        --data /tmp/bench-eng/data --work /tmp/bench-eng/runs --repeats 3
    git worktree remove /tmp/r1zero-old

Every row is a real ``torchrun --nproc-per-node 2 -m r1zero.cli pretrain`` (gloo, 2 processes) on the
same data artifact with the same config overrides and steps; ``PYTHONPATH`` picks the tree (the
script checks which ``r1zero`` each tree imports). Rows:

- ``old ds zero0/1/2``: the old tree's ``DeepSpeedTrainEngine`` (``parallel.zero_stage=0|1|2``);
- ``new fsdp2 zs0``: this tree's :class:`r1zero.train.engine.TrainEngine` (FSDP2; zero_stage 0-2
  are one setting there: parameters stay gathered between forward and backward);
- ``new fsdp2 zs3``: the same with ``reshard_after_forward`` (ZeRO-3).

Models: the tiny preset, and a ~20M-parameter MoE (d_model 256, 6 layers, 8 heads, 8 experts top-2,
d_expert 512, no shared expert). Telemetry off, held-out evaluation off, no intermediate
checkpoint, ``OMP_NUM_THREADS=1``. Throughput: the pretrain loop's own per-step timing
(``train/tokens_per_s`` in ``metrics.jsonl``, i.e. ``train_step`` + ``after_step``), steps 2..N
(the first is a warm-up): tokens / sum of step seconds. Repeats interleave the variants (the order
alternates), and the median with min-max is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["parallel.dp=2", "telemetry.enabled=false", "pretrain.heldout_per_domain=0", "pretrain.checkpoint_every=100000"]
MODELS = {
    # name: (overrides, steps)
    "tiny": ([], 20),
    "moe20m": (["model.d_model=256", "model.n_layers=6", "model.n_heads=8", "model.moe.n_experts=8",
                "model.moe.top_k=2", "model.moe.d_expert=512", "model.moe.n_shared=0",
                "pretrain.micro_batch=4"], 6),
}
VARIANTS = {
    # name: (tree, overrides)
    "old ds zero0": ("old", ["parallel.zero_stage=0"]),
    "old ds zero1": ("old", ["parallel.zero_stage=1"]),
    "old ds zero2": ("old", ["parallel.zero_stage=2"]),
    "new fsdp2 zs0": ("new", ["parallel.zero_stage=0"]),
    "new fsdp2 zs3": ("new", ["parallel.zero_stage=3"]),
}


def _env(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false")
    return env


def check_tree(tree: Path) -> str:
    out = subprocess.run([sys.executable, "-c", "import r1zero; print(r1zero.__file__)"], env=_env(tree),
                         cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: imports r1zero from {out}")
    return out


def steady_tokens_per_s(metrics: Path) -> float:
    """tokens / seconds over steps 2..N from the per-step ``train/tokens_per_s`` (constant tokens/step)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["value"] for r in sorted(rows, key=lambda r: r["step"]) if r["name"] == "train/tokens_per_s"][1:]
    return len(rates) / sum(1.0 / r for r in rates)


def run_one(tree: Path, config: str, overrides: list[str], data: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "r1zero.cli", "pretrain", "--config", config, "--data", data, "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(tree), cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {overrides}: rc {proc.returncode}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    row = dict(tokens_per_s=steady_tokens_per_s(out / "metrics.jsonl"), summary_tokens_per_s=summary["tokens_per_s"],
               engine=summary.get("engine"), n_params=summary.get("n_params"), wall_s=wall,
               final_loss=summary["losses"][-1])
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-tree", type=Path, required=True, help="git worktree of f59f072")
    ap.add_argument("--data", required=True, help="data artifact (r1zero data mix)")
    ap.add_argument("--work", type=Path, required=True, help="scratch dir for the runs' outputs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, help="steps per run (default: the model's, above)")
    ap.add_argument("--jsonl", type=Path, help="append every run as one JSON line")
    args = ap.parse_args()
    trees = {"old": args.old_tree.resolve(), "new": REPO}
    for name, tree in trees.items():
        print(f"{name} tree imports {check_tree(tree)}", flush=True)
    variants = args.variants.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for model in args.models.split(","):
        overrides, steps = MODELS[model]
        steps = args.steps or steps
        for rep in range(args.repeats):
            order = variants if rep % 2 == 0 else list(reversed(variants))  # load drifts
            for var in order:
                tree, extra = VARIANTS[var]
                sets = COMMON + overrides + [f"pretrain.steps={steps}"] + extra
                row = run_one(trees[tree], "configs/tiny.yaml", sets, args.data, args.work / "run")
                row.update(model=model, variant=var, repeat=rep, steps=steps)
                results.setdefault((model, var), []).append(row)
                print(json.dumps(row), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\n{'model':<8} {'variant':<15} {'engine':<10} {'params':>10} {'tok/s median [min-max]':>26} "
          f"{'vs old zero0':>12}")
    for model in args.models.split(","):
        base = results.get((model, "old ds zero0"))
        ref = statistics.median(r["tokens_per_s"] for r in base) if base else None
        for var in variants:
            rows = results[(model, var)]
            v = [r["tokens_per_s"] for r in rows]
            med = statistics.median(v)
            rel = f"{med / ref:.2f}x" if ref else "-"
            print(f"{model:<8} {var:<15} {rows[0]['engine']:<10} {rows[0]['n_params'] or 0:>10,} "
                  f"{med:>10.0f} [{min(v):.0f}-{max(v):.0f}] {rel:>12}")


if __name__ == "__main__":
    main()
