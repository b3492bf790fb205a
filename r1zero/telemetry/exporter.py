"""Prometheus metrics of one training process: definitions, HTTP endpoint, Pushgateway.

Every series carries the bounded labels ``job`` (the training job name), ``rank`` (global rank)
and ``stage`` (pretrain, grpo, ...); per-op, per-layer and per-GPU series add ``op``, ``layer``
and ``gpu``. Names follow the Prometheus conventions (prometheus.io/docs/practices/naming): one
``r1zero_`` prefix, base units (seconds, bytes), ``_total`` counters, ratios in 0-1.

    from r1zero.telemetry.exporter import Metrics, serve
    m = Metrics({"job": "tiny", "rank": "0", "stage": "pretrain"})
    server = serve(m.registry, port=0, addr="127.0.0.1")   # server.port is the bound port
    m.step_seconds.observe(0.2)
    server.close()

The facade that trainers use is :func:`r1zero.telemetry.start`; this module only knows metrics.
"""

from __future__ import annotations

import errno
import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import push_to_gateway

from r1zero.errors import UserError
from r1zero.telemetry.comm import CommTimer

LABELS = ("job", "rank", "stage")

# No `_created` companion series: they double the series count and no rule or panel reads them.
disable_created_metrics()

# Step-duration buckets, seconds: CPU toy steps are 10 ms - 1 s, a 13B MoE step on A100s takes
# seconds to a minute (the article's 1024-GPU layout); the top bucket catches stalls.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 300.0, 600.0)
# Checkpoint save: seconds (tiny, local) to many minutes (sharded 13B to S3).
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 180.0, 600.0, 1800.0)

# set_gauges(key=value) -> metric attribute name on Metrics
GAUGE_KEYS: dict[str, str] = {
    "step": "step",
    "loss": "loss",
    "lr": "lr",
    "tokens_per_second": "tokens_per_second",
    "mfu": "mfu",
    "grad_norm": "grad_norm",
    "comm_time_ratio": "comm_ratio",
    "reward": "reward",
    "accuracy": "accuracy",
    "format_rate": "format_rate",
    "kl": "kl",
    "completion_length": "completion_length",
    "reflection_rate": "reflection_rate",
}

# metrics-JSONL names (the project's shared schema) -> set_gauges key
JSONL_KEYS: dict[str, str] = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
    "train/mfu": "mfu",
    "train/tokens_per_s": "tokens_per_second",
    "grpo/loss": "loss",
    "grpo/lr": "lr",
    "grpo/grad_norm": "grad_norm",
    "grpo/reward/mean": "reward",
    "grpo/accuracy": "accuracy",
    "grpo/format_rate": "format_rate",
    "grpo/kl": "kl",
    "grpo/completion_length/mean": "completion_length",
    "grpo/reflection_rate": "reflection_rate",
}
# per-step counts in metrics-JSONL rows -> counter attribute (incremented by the value)
JSONL_COUNTERS: dict[str, str] = {
    "grpo/nan_skipped": "nan_skips",
    "train/nan_skipped": "nan_skips",
    "insight/aha_events": "aha_events",
}
# moe/L<i>/<name> -> MoE gauge attribute
MOE_KEYS: dict[str, str] = {
    "max_load_ratio": "moe_max_load",
    "dropped_frac": "moe_dropped",  # r1zero.model.moe stats() key
    "dropped_fraction": "moe_dropped",
    "router_entropy": "moe_entropy",
}


class _CommCollector:
    """Exposes a :class:`CommTimer`'s accumulators at scrape time (no per-call metric cost)."""

    def __init__(self, timer: CommTimer, labels: dict[str, str]):
        self.timer = timer
        self.labels = labels

    def describe(self):
        return list(self.collect(empty=True))

    def collect(self, empty: bool = False):
        names = [*LABELS, "op"]
        sec = CounterMetricFamily("r1zero_comm_seconds", "Wall seconds spent in collectives, by op.", labels=names)
        calls = CounterMetricFamily("r1zero_comm_calls", "Collective calls, by op.", labels=names)
        if not empty:
            base = [self.labels[k] for k in LABELS]
            for op, (seconds, n) in self.timer.snapshot().items():
                if n:
                    sec.add_metric([*base, op], seconds)
                    calls.add_metric([*base, op], n)
        yield sec
        yield calls
        names = [*LABELS, "purpose"]
        psec = CounterMetricFamily("r1zero_comm_purpose_seconds",
                                   "Seconds in collectives by what they are for (fsdp_all_gather, fsdp_reduce_scatter, "
                                   "tp, pipeline_send_recv, expert_all_to_all, grpo_weight_sync, other).", labels=names)
        pbytes = CounterMetricFamily("r1zero_comm_purpose_bytes", "Bytes handed to collectives, by purpose.",
                                     labels=names)
        pcalls = CounterMetricFamily("r1zero_comm_purpose_calls", "Collective calls, by purpose.", labels=names)
        if not empty:
            for purpose, (seconds, n, nbytes) in self.timer.purposes().items():
                if n:
                    psec.add_metric([*base, purpose], seconds)
                    pbytes.add_metric([*base, purpose], nbytes)
                    pcalls.add_metric([*base, purpose], n)
        yield psec
        yield pbytes
        yield pcalls


class Metrics:
    """All r1zero metrics of one process, on a private registry, children bound to the labels."""

    def __init__(self, labels: dict[str, str], registry: CollectorRegistry | None = None):
        self.labels = {k: str(labels[k]) for k in LABELS}
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._children: dict[tuple, object] = {}
        r, L = self.registry, list(LABELS)

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, [*L, *extra], registry=r)

        def counter(name, doc):
            return Counter(name, doc, L, registry=r).labels(**self.labels)

        self.step_seconds = Histogram("r1zero_step_duration_seconds", "Wall seconds per optimizer step.", L,
                                      buckets=STEP_BUCKETS, registry=r).labels(**self.labels)
        self.checkpoint_seconds = Histogram("r1zero_checkpoint_duration_seconds", "Wall seconds per checkpoint save.",
                                            L, buckets=CHECKPOINT_BUCKETS, registry=r).labels(**self.labels)
        self.steps = counter("r1zero_steps", "Optimizer steps completed.")
        self.tokens = counter("r1zero_tokens", "Tokens processed (trained on) by this rank.")
        self.nan_skips = counter("r1zero_nan_skips", "Steps skipped because the loss or gradients were not finite.")
        self.aha_events = counter("r1zero_aha_events", "Aha-moment events detected (reflection jump with accuracy gain).")
        # Gauges are bound on first set, so a gauge a stage never sets is absent rather than 0.
        self.step = gauge("r1zero_step", "Last completed optimizer step.")
        self.last_step_time = gauge("r1zero_last_step_timestamp_seconds",
                                    "Unix time of the last completed step (process start before the first).")
        self.loss = gauge("r1zero_loss", "Training loss of the last step.")
        self.lr = gauge("r1zero_learning_rate", "Learning rate of the last step.")
        self.tokens_per_second = gauge("r1zero_tokens_per_second", "Tokens per second of the last step.")
        self.mfu = gauge("r1zero_mfu_ratio", "Model FLOPs utilisation of the last step (0-1).")
        self.grad_norm = gauge("r1zero_grad_norm", "Global gradient norm of the last step.")
        self.comm_ratio = gauge("r1zero_comm_time_ratio",
                                "Fraction of wall time in collectives since the previous step (0-1).")
        self.reward = gauge("r1zero_grpo_reward", "Mean GRPO reward of the last step.")
        self.accuracy = gauge("r1zero_grpo_accuracy_ratio", "Fraction of verified-correct completions (0-1).")
        self.format_rate = gauge("r1zero_grpo_format_ratio", "Fraction of well-formatted completions (0-1).")
        self.kl = gauge("r1zero_grpo_kl", "KL(policy || reference) estimate of the last step.")
        self.completion_length = gauge("r1zero_grpo_completion_length_tokens", "Mean completion length.")
        self.reflection_rate = gauge("r1zero_grpo_reflection_ratio",
                                     "Fraction of completions with reflection keywords (0-1).")
        self.moe_max_load = gauge("r1zero_moe_max_load_ratio", "Max expert load / mean expert load, per layer.",
                                  ("layer",))
        self.moe_dropped = gauge("r1zero_moe_dropped_ratio", "Fraction of routed tokens dropped, per layer (0-1).",
                                 ("layer",))
        self.moe_entropy = gauge("r1zero_moe_router_entropy_nats", "Mean router entropy, per layer.", ("layer",))

    def set(self, attr: str, value: float, **extra: str) -> None:
        """Set gauge ``attr`` (an attribute name above) for this process's labels."""
        key = (attr, *extra.values())
        child = self._children.get(key)
        if child is None:  # labels() takes a lock and builds a tuple: once per series, not per step
            child = self._children[key] = getattr(self, attr).labels(**self.labels, **extra)
        child.set(float(value))

    def add_collector(self, collector) -> None:
        self.registry.register(collector)

    def add_comm(self, timer: CommTimer) -> None:
        self.add_collector(_CommCollector(timer, self.labels))

    def set_moe(self, layer: int | str, **values: float) -> None:
        for key, value in values.items():
            attr = MOE_KEYS.get(key)
            if attr is not None:
                self.set(attr, value, layer=str(layer))


class Server:
    """A running /metrics endpoint (prometheus-client's WSGI server in a daemon thread)."""

    def __init__(self, httpd, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.port: int = httpd.server_port
        self.addr: str = httpd.server_address[0]

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Server:
    """Serve ``registry`` on ``addr:port`` (0 = an ephemeral port, see ``Server.port``)."""
    try:
        httpd, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"telemetry port {port} on {addr} is already in use (set telemetry.port to a free "
                            "base port, or 0 for an ephemeral one)") from None
        raise UserError(f"telemetry cannot listen on {addr}:{port}: {err.strerror or err}") from None
    return Server(httpd, thread)


def push(registry: CollectorRegistry, gateway: str, labels: dict[str, str]) -> None:
    """Push every series to a Pushgateway, grouped by job/rank/stage so ranks don't overwrite."""
    push_to_gateway(gateway, job=labels["job"], registry=registry,
                    grouping_key={"rank": labels["rank"], "stage": labels["stage"]}, timeout=10)
