"""A real Prometheus scrapes a live 2-rank gloo training run; PromQL returns step, loss, comm ratio."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_prometheus_scrapes_two_rank_training(tmp_path, torchrun, prometheus):
    proc = torchrun("train", tmp_path, wait=False)
    deadline = time.monotonic() + 60
    ports = {}
    while len(ports) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        for r in (0, 1):
            f = tmp_path / f"port-{r}"
            if f.exists() and f.read_text():
                ports[r] = int(f.read_text())
        time.sleep(0.2)
    assert len(ports) == 2, "workers did not start their exporters"
    assert ports[0] != ports[1]

    prom = prometheus([f"127.0.0.1:{p}" for p in ports.values()])
    want = {
        "r1zero_step": lambda v: v >= 1,
        "r1zero_loss": lambda v: 0 < v < 100,
        "r1zero_comm_time_ratio": lambda v: 0 < v <= 1,
        'r1zero_comm_seconds_total{op="all_reduce"}': lambda v: v > 0,
        "r1zero_step_duration_seconds_count": lambda v: v >= 1,
        "r1zero_tokens_total": lambda v: v >= 16,
        "changes(r1zero_step[1m])": lambda v: v >= 2,  # the step advanced between scrapes
    }
    import torch

    if not torch.cuda.is_available():  # no GPU here: an info metric says why
        want['r1zero_gpu_monitoring_info{available="false"}'] = lambda v: v == 1
    got: dict[str, list] = {}
    gpu: list = []
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        got = {q: prom.query(q) for q in want}
        gpu = prom.query("r1zero_gpu_utilization_ratio")
        if all(len(res) == 2 and all(ok(float(s["value"][1])) for s in res) for (q, ok), res in
               zip(want.items(), got.values(), strict=True)):
            break
        time.sleep(1)
    (tmp_path / "stop").write_text("")
    proc.wait(timeout=60)
    for q, ok in want.items():
        res = got[q]
        assert len(res) == 2, f"{q}: {res}"
        assert {s["metric"]["rank"] for s in res} == {"0", "1"}, res
        assert all(s["metric"]["job"] == "live" and s["metric"]["stage"] == "pretrain" for s in res), res
        assert all(ok(float(s["value"][1])) for s in res), f"{q}: {res}"
    assert proc.returncode == 0
    if not torch.cuda.is_available():  # ... and the GPU series are absent, not zero
        assert gpu == []
        assert all(s["metric"]["reason"] for s in got['r1zero_gpu_monitoring_info{available="false"}'])


def _two_free_ports() -> int:
    """A base port P with P and P + 1 free on loopback (ranks listen on base + LOCAL_RANK)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            if base >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                except OSError:
                    continue
        return base
    raise AssertionError("no two consecutive free ports")


@pytest.mark.slow
def test_prometheus_scrapes_r1zero_pretrain_under_torchrun(tmp_path, prometheus):
    """The real `r1zero pretrain` (DeepSpeed, dp=2, gloo) exports; Prometheus sees both ranks."""
    env = dict(os.environ, R1ZERO_PROGRESS="0", OMP_NUM_THREADS="1")
    r1zero = [sys.executable, "-m", "r1zero.cli"]
    subprocess.run([*r1zero, "data", "mix", "--config", str(TINY), "--set", "data.n_train=200",
                    "--set", "data.n_eval=20", "--out", str(tmp_path / "data")],
                   env=env, check=True, capture_output=True, timeout=120)
    base = _two_free_ports()
    prom = prometheus([f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"])
    sets = ["parallel.dp=2", "pretrain.steps=400", "pretrain.micro_batch=2", "pretrain.seq_len=32",
            "pretrain.log_every=5", "pretrain.heldout_per_domain=1", "pretrain.heldout_max_new_tokens=4",
            "pretrain.time_budget_s=12", f"telemetry.port={base}", "telemetry.bind=127.0.0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "r1zero.cli", "pretrain", "--config", str(TINY), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "pre")] + [a for s in sets for a in ("--set", s)]
    log = open(tmp_path / "pretrain.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    want = {
        "r1zero_step": lambda v: v >= 1,
        "r1zero_loss": lambda v: 0 < v < 50,
        "r1zero_comm_time_ratio": lambda v: 0 < v <= 1,
        'r1zero_comm_seconds_total{op="all_reduce"}': lambda v: v > 0,
        "changes(r1zero_step[1m])": lambda v: v >= 2,
    }
    got: dict[str, list] = {}
    moe: list = []
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            got = {q: prom.query(q) for q in want}
            moe = prom.query("r1zero_moe_max_load_ratio")
            if moe and all(len(r) == 2 and all(ok(float(s["value"][1])) for s in r)
                           for (q, ok), r in zip(want.items(), got.values(), strict=True)):
                break
            time.sleep(1)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "pretrain.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    for q, ok in want.items():
        res = got.get(q, [])
        assert len(res) == 2, f"{q}: {res}\n{text[-2000:]}"
        assert {(s["metric"]["rank"], s["metric"]["stage"], s["metric"]["job"]) for s in res} == {
            ("0", "pretrain", "tiny"), ("1", "pretrain", "tiny")}, res
        assert all(ok(float(s["value"][1])) for s in res), f"{q}: {res}"
    assert moe and all(float(s["value"][1]) >= 1.0 for s in moe), moe  # max/mean load is >= 1 by definition
