"""Smoke run of benchmarks/bench_moe.py at tiny sizes: it runs every peer and reports JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_moe_smoke_json():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_moe.py"), "--tokens", "128", "--d-model", "32",
           "--repeats", "1", "--warmup", "0", "--peak-n", "256", "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["matmul_peak_gflops"] > 0
    assert set(result["configs"]) == {"mixtral", "fine_grained"}
    for name, res in result["configs"].items():
        for key in ("r1zero_tokens_per_s", "hf_mixtral_tokens_per_s", "deepspeed_tokens_per_s", "flops_per_token",
                    "r1zero_padded_tokens_per_s", "hf_grouped_mm_tokens_per_s", "r1zero_fraction_of_peak"):
            assert res[key] > 0, (name, key)
    fg = result["configs"]["fine_grained"]
    # 3 x (6 experts x 6*D*F + 2*D*E) at D=32, F=256, E=64
    assert fg["flops_per_token"] == 3 * (6 * 6 * 32 * 256 + 2 * 32 * 64)
