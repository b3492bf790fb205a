"""The per-rank exporter: names, labels, port rules, off switch, JSONL mapping, Pushgateway."""

from __future__ import annotations

import http.server
import math
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from r1zero import telemetry
from r1zero.config import TelemetryConfig
from r1zero.errors import UserError

LOOP = TelemetryConfig(port=0, bind="127.0.0.1")


def scrape(tel) -> dict[str, list]:
    """{sample name: [(labels, value)]} from a real HTTP scrape of the endpoint."""
    text = urllib.request.urlopen(tel.url, timeout=5).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels) -> float:
    hits = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


def test_step_metrics_over_http():
    with telemetry.start(LOOP, job="tiny", rank=3, stage="pretrain", local_rank=0,
                         flops_per_token=6e6, peak_flops=1e12) as tel:
        assert tel.enabled and tel.port and tel.url.startswith("http://127.0.0.1:")
        tel.observe_step(0.5, 1000, loss=2.5, lr=1e-3)
        tel.observe_step(0.25, 1000, loss=2.0, lr=2e-3, grad_norm=0.7)
        s = scrape(tel)
    lab = {"job": "tiny", "rank": "3", "stage": "pretrain"}
    assert value(s, "r1zero_steps_total", **lab) == 2
    assert value(s, "r1zero_step", **lab) == 2
    assert value(s, "r1zero_tokens_total", **lab) == 2000
    assert value(s, "r1zero_loss", **lab) == 2.0
    assert value(s, "r1zero_learning_rate", **lab) == 2e-3
    assert value(s, "r1zero_grad_norm", **lab) == 0.7
    assert value(s, "r1zero_tokens_per_second", **lab) == 4000
    assert value(s, "r1zero_mfu_ratio", **lab) == pytest.approx(1000 * 6e6 / (0.25 * 1e12))
    assert value(s, "r1zero_step_duration_seconds_count", **lab) == 2
    assert value(s, "r1zero_step_duration_seconds_sum", **lab) == 0.75
    assert value(s, "r1zero_step_duration_seconds_bucket", le="0.25", **lab) == 1
    assert value(s, "r1zero_comm_time_ratio", **lab) == 0.0  # no collectives in this process
    # a stage's unset gauges are absent, not 0; every series carries exactly the bounded labels
    assert "r1zero_grpo_reward" not in s and "r1zero_moe_max_load_ratio" not in s
    assert not any(n.endswith("_created") for n in s)
    for name, rows in s.items():
        for labels, _ in rows:
            assert {"job", "rank", "stage"} <= set(labels) <= {"job", "rank", "stage", "le", "op", "gpu", "layer",
                                                               "available", "reason"}, (name, labels)


def test_grpo_moe_counters_and_jsonl_names():
    with telemetry.start(LOOP, job="j", rank=0, stage="grpo") as tel:
        tel.set_gauges(reward=0.25, accuracy=0.5, format_rate=0.5, kl=0.01, completion_length=31.5,
                       reflection_rate=0.125)
        tel.observe_metrics({"grpo/kl": 0.02, "moe/L1/max_load_ratio": 1.5, "moe/L1/dropped_fraction": 0.1,
                             "moe/L0/router_entropy": 1.2, "eval/accuracy/math": 0.9})
        tel.observe_moe([{"layer": 0, "load": [3, 1], "max_load_ratio": 1.25, "router_entropy": 1.1}])
        # what the trainers pass: metrics-JSONL names through set_gauges(**dict)
        tel.set_gauges(**{"moe/L2/dropped_frac": 0.05, "moe/L2/load/E0": 0.5, "grpo/format_rate": 0.75,
                          "grpo/nan_skipped": 1.0, "grpo/grad_norm": 0.3})
        tel.inc("aha_events")
        tel.inc("nan_skips", 2)
        with tel.checkpoint_timer():
            pass
        tel.observe_step(1.0, 10, loss=float("nan"))
        s = scrape(tel)
    assert value(s, "r1zero_grpo_reward") == 0.25
    assert value(s, "r1zero_grpo_accuracy_ratio") == 0.5
    assert value(s, "r1zero_grpo_format_ratio") == 0.75
    assert value(s, "r1zero_grpo_kl") == 0.02  # the JSONL name overrode the earlier set_gauges
    assert value(s, "r1zero_grpo_completion_length_tokens") == 31.5
    assert value(s, "r1zero_grpo_reflection_ratio") == 0.125
    assert value(s, "r1zero_moe_max_load_ratio", layer="1") == 1.5
    assert value(s, "r1zero_moe_max_load_ratio", layer="0") == 1.25
    assert value(s, "r1zero_moe_dropped_ratio", layer="1") == 0.1
    assert value(s, "r1zero_moe_router_entropy_nats", layer="0") == 1.1
    assert value(s, "r1zero_moe_dropped_ratio", layer="2") == 0.05
    assert value(s, "r1zero_aha_events_total") == 1
    assert value(s, "r1zero_nan_skips_total") == 3  # inc(2) + the row's per-step count
    assert value(s, "r1zero_grad_norm") == 0.3
    assert value(s, "r1zero_checkpoint_duration_seconds_count") == 1
    assert math.isnan(value(s, "r1zero_loss"))  # exported as NaN for the R1ZeroLossNaN alert


def test_unknown_names_warn_once():
    with telemetry.start(LOOP, job="j", rank=0, stage="grpo") as tel:
        with pytest.warns(RuntimeWarning, match="unknown gauge 'rewrad'"):
            tel.set_gauges(rewrad=1.0)
        with pytest.warns(RuntimeWarning, match="unknown counter"):
            tel.inc("ahas")


def test_port_is_base_plus_local_rank_and_busy_port_is_a_user_error():
    import torch.distributed as dist

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = TelemetryConfig(port=port - 1, bind="127.0.0.1")
        with pytest.raises(UserError, match=f"telemetry port {port} .* already in use"):
            telemetry.start(cfg, job="j", rank=9, stage="pretrain", local_rank=1)
        assert not hasattr(dist.all_reduce, "__r1zero_timed__")  # a failed start patches nothing
    tel = telemetry.start(cfg, job="j", rank=5, stage="pretrain", local_rank=1)  # now free
    try:
        assert tel.port == port  # base + local rank
        assert dist.all_reduce.__r1zero_timed__
    finally:
        tel.close()
    tel.close()  # idempotent
    assert not hasattr(dist.all_reduce, "__r1zero_timed__")


def test_off_switch_is_a_no_op():
    tel = telemetry.start(TelemetryConfig(enabled=False), job="j", rank=0, stage="pretrain")
    assert isinstance(tel, telemetry.NullTelemetry) and not tel.enabled and tel.port is None
    tel.observe_step(1.0, 10, loss=1.0, lr=0.1, reward=1.0)
    tel.set_gauges(anything=1)
    tel.inc("anything")
    with tel.comm_timer(), tel.checkpoint_timer():
        pass
    tel.comm_timer().attach_ddp(object())  # a no-op, like everything else here
    assert tel.comm_timer().snapshot() == {}
    tel.close()
    import torch.distributed as dist

    assert not hasattr(dist.all_reduce, "__r1zero_timed__")  # nothing patched


class _Gateway(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_PUT(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        _Gateway.received.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_pushgateway_push_on_close_grouped_by_rank_and_stage():
    _Gateway.received = []
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = TelemetryConfig(serve=False, pushgateway=f"http://127.0.0.1:{httpd.server_port}")
        tel = telemetry.start(cfg, job="kfp-task", rank=1, stage="eval")
        assert tel.port is None  # push only
        tel.observe_step(0.1, 5, loss=1.0)
        tel.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(_Gateway.received) == 1
    path, body = _Gateway.received[0]
    assert path == "/metrics/job/kfp-task/rank/1/stage/eval"
    names = {s.name for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert {"r1zero_steps_total", "r1zero_loss", "r1zero_step_duration_seconds_count"} <= names


def test_unreachable_pushgateway_warns_and_training_goes_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed when the block ends: nothing listens there
    tel = telemetry.start(TelemetryConfig(serve=False, pushgateway=f"http://127.0.0.1:{dead}"),
                          job="j", rank=0, stage="eval")
    with pytest.warns(RuntimeWarning, match="push to"):
        assert tel.push() is False
    tel.close()


def test_mfu_inputs_from_the_model_and_the_device_peak():
    import torch

    from r1zero.config import load_config
    from r1zero.sizing import GPUS, flops_per_step, gpu_of_device
    from r1zero.sizing_cli import spec_from_config
    from r1zero.telemetry import mfu_inputs

    cfg = load_config("configs/a100-13b.yaml")
    got = mfu_inputs(cfg, torch.device("cpu"), world_size=8)
    spec = spec_from_config(cfg)
    assert got["flops_per_token"] == pytest.approx(flops_per_step(spec, 1, "none") / spec.seq)
    # 6 x active parameters plus attention: 4.42B active -> a bit above 6 x 4.42e9 per token
    assert 6 * 4.4e9 < got["flops_per_token"] < 6 * 4.4e9 * 1.3
    assert got["peak_flops"] is None  # a CPU has no datasheet peak: the gauge stays unset
    assert gpu_of_device("NVIDIA A100-SXM4-80GB") is GPUS["a100-80gb"]
    assert gpu_of_device("NVIDIA A100-PCIE-40GB") is GPUS["a100-40gb"]
    assert gpu_of_device("NVIDIA H200") is GPUS["h100-80gb"] and gpu_of_device("Tesla T4") is None


def test_comm_time_and_bytes_by_purpose_over_http():
    with telemetry.start(LOOP, job="tiny", rank=0, stage="pretrain", local_rank=0, comm=False) as tel:
        timer = tel.comm_timer()
        timer.add_interval("all_gather", 1.0, 1.5, "fsdp_all_gather", 4096)
        timer.add_interval("all_to_all", 2.0, 2.25, "expert_all_to_all", 512)
        s = scrape(tel)
    lab = {"job": "tiny", "rank": "0", "stage": "pretrain"}
    assert value(s, "r1zero_comm_purpose_seconds_total", purpose="fsdp_all_gather", **lab) == 0.5
    assert value(s, "r1zero_comm_purpose_bytes_total", purpose="fsdp_all_gather", **lab) == 4096
    assert value(s, "r1zero_comm_purpose_calls_total", purpose="expert_all_to_all", **lab) == 1
    assert value(s, "r1zero_comm_purpose_seconds_total", purpose="expert_all_to_all", **lab) == 0.25
    assert "tp" not in {lab_["purpose"] for lab_, _ in s["r1zero_comm_purpose_calls_total"]}  # zero: absent
