"""Runs benchmarks/bench_data.py at a small size and checks its JSON result line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_small_json():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--rows", "2000",
                           "--peer-rows", "400", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, R1ZERO_PROGRESS="0"))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rows"] == 2000 and res["seconds"] > 0 and 50 < res["peak_rss_mb"] < 2048
    assert res["rows_in"] >= res["rows"] and res["ratio_error_pp"] < 1
    d = res["dedup"]
    assert d["peer_rows"] == 400 and d["decision_agreement"] > 0.99 and d["speedup_median"] > 0
