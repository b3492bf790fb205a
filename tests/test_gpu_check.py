"""`make gpu-check` (r1zero/gpu_check.py): the refusal without CUDA, the wheel folder for a GPU
machine without network, and the whole script's CPU dry path (every phase, one JSON object last)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from r1zero import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda_with_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "r1zero.gpu_check", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "needs a CUDA device" in lines[0] and "bf16" in lines[0] and "fp8" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "o").exists()  # nothing written


def test_bad_data_dir_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "r1zero.gpu_check", "--cpu-dry-run", "--out", str(tmp_path / "o"),
                        "--data", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no such data artifact" in r.stderr and "Traceback" not in r.stderr


def test_peak_flops_table_and_loss_trend():
    assert gpu_check.bf16_peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.bf16_peak_flops("Tesla T4") is None
    assert gpu_check._loss_falling([5.0, 4.8, 4.0, 3.5, 3.0])
    assert not gpu_check._loss_falling([3.0, 3.5, 4.0, 4.8, 5.0])
    assert not gpu_check._loss_falling([1.0, 0.9])  # too short to tell


def test_planner_estimate_for_the_check_model_on_an_h200():
    from r1zero.config import load_config

    cfg = load_config(str(ROOT / "configs/tiny.yaml"), [*gpu_check.GPU_OVERRIDES, "pretrain.precision=bf16"])
    est = gpu_check.planner_estimate_bytes(cfg, "NVIDIA H200")
    assert est is not None and 2e9 < est < 141e9  # bf16 params + fp32 states of ~275M params + activations
    assert gpu_check.planner_estimate_bytes(cfg, "cpu") is None
    assert gpu_check.flops_per_token(cfg) > 6 * 50e6  # at least 6 x the active parameters


def test_check_model_is_100_to_300m_parameters():
    from r1zero.config import load_config
    from r1zero.sizing_cli import spec_from_config

    cfg = load_config(str(ROOT / "configs/tiny.yaml"), gpu_check.GPU_OVERRIDES)
    n = spec_from_config(cfg).total_params()
    assert 100e6 <= n <= 300e6, n


@pytest.mark.slow
def test_cpu_dry_run_runs_every_phase_and_prints_json_last(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "r1zero.gpu_check", "--cpu-dry-run", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["cpu_dry_run"] is True
    phases = report["phases"]
    assert set(phases) == set(gpu_check.PHASES)
    pre = phases["pretrain_bf16"]
    assert pre["ok"] and pre["loss_finite"] and pre["loss_falling"] and pre["tokens_per_s"] > 0
    assert phases["pretrain_fp8"]["ok"] is None and "Hopper" in phases["pretrain_fp8"]["skipped"]
    assert phases["grpo"]["steps"] >= 1
    assert phases["eval"]["pass_at_1"] is not None
    tel = phases["telemetry"]
    assert tel["scrapes"] >= 2  # the live exporter answered while the phases ran
    assert tel["comm_time_ratio"] is not None and 0 < tel["comm_time_ratio"] <= 1
    assert (tmp_path / "o" / "eval" / "metrics.json").is_file()


@pytest.mark.slow
def test_gpu_wheels_fit_the_transfer_limit_and_cover_what_the_gpu_machine_lacks(tmp_path):
    folder = tmp_path / "wheels"
    r = subprocess.run(["make", "-s", "gpu-wheels", f"GPU_WHEELS={folder}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = sorted(folder.glob("*.whl"))
    names = {w.name.split("-")[0].lower() for w in wheels}
    # what the GPU machine's image lacks (device notes): pydantic, math-verify, torchao
    assert {"pydantic", "pydantic_core", "math_verify", "torchao"} <= names
    assert sum(w.stat().st_size for w in wheels) < 40 * 2**20
    for w in wheels:  # each one installs on the GPU machine's CPython 3.12
        tag = w.name[:-4].split("-")[-3:]
        assert tag[0] in ("py3", "cp312", "cp310") or tag[0].startswith("py3"), w.name
        assert zipfile.is_zipfile(w)
