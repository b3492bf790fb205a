"""NVML collector: GPU series when NVML sees a GPU, otherwise absent with an info metric saying why."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from r1zero.telemetry.gpu import GpuCollector

LABELS = {"job": "j", "rank": "0", "stage": "pretrain"}


def _samples(collector) -> dict[str, list]:
    reg = CollectorRegistry()
    reg.register(collector)
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_gpu_series_match_what_nvml_sees():
    col = GpuCollector(LABELS, local_rank=0)
    s = _samples(col)
    [(info, one)] = s["r1zero_gpu_monitoring_info"]
    assert one == 1 and info["available"] == str(col.available).lower() and info["reason"]
    if torch.cuda.is_available():  # a GPU machine: NVML must work, values in range
        assert col.available, col.reason
        [(lab, util)] = s["r1zero_gpu_utilization_ratio"]
        assert 0.0 <= util <= 1.0 and lab["gpu"].isdigit()
        [(_, used)] = s["r1zero_gpu_memory_used_bytes"]
        [(_, total)] = s["r1zero_gpu_memory_total_bytes"]
        assert 0 < used <= total
    else:  # no GPU: the series are absent (not zero) and the reason is given
        assert not col.available
        assert "r1zero_gpu_utilization_ratio" not in s and "r1zero_gpu_memory_used_bytes" not in s
        assert "NVML" in col.reason or "GPU" in col.reason or "pynvml" in col.reason
