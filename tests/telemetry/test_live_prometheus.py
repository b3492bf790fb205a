"""A real Prometheus scrapes a live 2-rank gloo training run; PromQL returns step, loss, comm ratio."""

from __future__ import annotations

import time

import pytest


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
