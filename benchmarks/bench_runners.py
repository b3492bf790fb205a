"""`r1zero run` with kfp.local's subprocess runner vs its docker runner, side by side.

    .venv/bin/python benchmarks/bench_runners.py --repeats 3 --json

Runs the same shrunken tiny preset (the overrides of tests/pipelines/test_docker_run.py) with
``--runner subprocess`` and ``--runner docker`` alternately, ``--repeats`` times each, and reports
each runner's wall seconds (median, min-max), the sum of the stage seconds the pipeline records
and the difference (kfp.local and, for docker, one container start per task). Needs the runtime
image (``python -m r1zero.images build``) and a Docker engine. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.local_run import SMOKE_SETS as SHRUNK

REPO = Path(__file__).resolve().parents[1]


def one_run(runner: str, out: Path) -> dict:
    sets = [a for o in SHRUNK for a in ("--set", o)]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "r1zero.cli", "run", "--runner", runner, "--config",
                          "configs/tiny.yaml", "--out", str(out), *sets], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{runner} run failed: {res.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": round(wall, 1), "stages": round(summary["total_seconds"], 1)}


def stats(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 1), "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"subprocess": [], "docker": []}
    with tempfile.TemporaryDirectory(prefix="bench-runners-") as tmp:
        for i in range(args.repeats):
            for runner in runs:  # alternating: both see the same load
                r = one_run(runner, Path(tmp) / f"{runner}-{i}")
                runs[runner].append(r)
                if not args.json:
                    print(f"{runner:10s} run {i + 1}: wall {r['wall']:6.1f} s, stages {r['stages']:6.1f} s", flush=True)
    result = {k: {"wall_s": stats([r["wall"] for r in v]), "stages_s": stats([r["stages"] for r in v]),
                  "overhead_s": stats([round(r["wall"] - r["stages"], 1) for r in v])} for k, v in runs.items()}
    result["repeats"] = args.repeats
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
