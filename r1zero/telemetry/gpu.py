"""GPU utilisation and memory of this rank's GPU through NVML (nvidia-ml-py), read at scrape time.

Series (labels job, rank, stage, gpu = NVML device index):
- ``r1zero_gpu_utilization_ratio``: NVML's utilization.gpu / 100, the fraction of the last sample
  period in which a kernel was running (the same counter as DCGM_FI_DEV_GPU_UTIL);
- ``r1zero_gpu_memory_used_bytes`` and ``r1zero_gpu_memory_total_bytes``.

Plus ``r1zero_gpu_monitoring_info{available, reason}`` = 1 always, so a dashboard can tell "no GPU
here" (``available="false"``, reason e.g. "NVML Shared Library Not Found") from "exporter down".
On a machine without a GPU the utilisation and memory series are absent, not zero.

Which GPU: a rank monitors the device it trains on, so several ranks on one node export each GPU
once: the ``local_rank``-th visible device (``CUDA_VISIBLE_DEVICES`` order, indices or UUIDs), or
the only visible device when a process sees exactly one.

    GpuCollector({"job": "j", "rank": "0", "stage": "pretrain"}, local_rank=0).reason
"""

from __future__ import annotations

import os

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from r1zero.telemetry.exporter import LABELS


def _visible_handles(nvml) -> list:
    """NVML handles in CUDA_VISIBLE_DEVICES order (all devices when unset)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for item in (v.strip() for v in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(item)))
        else:  # GPU-<uuid> (MIG-<uuid> devices are not NVML-queryable for utilisation)
            handles.append(nvml.nvmlDeviceGetHandleByUUID(item))
    return handles


class GpuCollector:
    """A prometheus-client collector for this rank's GPU; ``available``/``reason`` say what it found."""

    def __init__(self, labels: dict[str, str], local_rank: int = 0):
        self.labels = labels
        self.available = False
        self.reason = ""
        self._nvml = None
        self._handle = None
        self._index = ""
        try:
            import pynvml as nvml  # nvidia-ml-py
            nvml.nvmlInit()
            handles = _visible_handles(nvml)
            if not handles:
                self.reason = "no GPU visible to this process (CUDA_VISIBLE_DEVICES empty or no devices)"
                return
            handle = handles[0] if len(handles) == 1 else handles[local_rank % len(handles)]
            self._index = str(nvml.nvmlDeviceGetIndex(handle))
            self._nvml, self._handle = nvml, handle
            self.available, self.reason = True, "ok"
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
        except Exception as err:  # pynvml.NVMLError_*: no driver, no library, no permission
            self.reason = f"NVML unavailable: {err}"

    def describe(self):
        return list(self._families(sample=False))

    def collect(self):
        return list(self._families(sample=True))

    def _families(self, sample: bool):
        names = list(LABELS)
        base = [self.labels[k] for k in LABELS]
        info = InfoMetricFamily("r1zero_gpu_monitoring", "Whether GPU series are exported, and why not.",
                                labels=names)
        info.add_metric(base, {"available": str(self.available).lower(), "reason": self.reason})
        yield info
        if not self.available:
            return
        util = GaugeMetricFamily("r1zero_gpu_utilization_ratio", "Fraction of time a kernel ran (NVML, 0-1).",
                                 labels=[*names, "gpu"])
        used = GaugeMetricFamily("r1zero_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=[*names, "gpu"])
        total = GaugeMetricFamily("r1zero_gpu_memory_total_bytes", "GPU memory size (NVML).", labels=[*names, "gpu"])
        if sample:
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            except Exception:  # a transient NVML error must not break the whole scrape
                return
            util.add_metric([*base, self._index], rates.gpu / 100.0)
            used.add_metric([*base, self._index], float(mem.used))
            total.add_metric([*base, self._index], float(mem.total))
        yield util
        yield used
        yield total
