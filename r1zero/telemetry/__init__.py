"""Live training telemetry for Prometheus: one exporter per training rank.

    from r1zero import telemetry
    tel = telemetry.start(cfg.telemetry, job="tiny", rank=rank, stage="pretrain")  # before DeepSpeed init
    for step in range(steps):
        t0 = time.perf_counter(); loss = train_step(); seconds = time.perf_counter() - t0
        tel.observe_step(seconds, tokens=batch_tokens, loss=loss, lr=lr, step=step + 1)
        tel.set_gauges(reward=0.4, accuracy=0.3)          # GRPO figures, any time
    tel.close()

``start`` serves ``/metrics`` on ``telemetry.bind:telemetry.port + LOCAL_RANK`` (port 0 = an
ephemeral port, see ``tel.port``), patches the torch.distributed / DeepSpeed collectives so that
their time is exported as ``r1zero_comm_seconds_total{op}`` and per step as
``r1zero_comm_time_ratio``, adds this rank's GPU through NVML (or an info metric saying why not),
and pushes to ``telemetry.pushgateway`` when set (short KFP tasks). With ``telemetry.enabled``
false it returns a :class:`NullTelemetry` whose methods do nothing. Metric names are listed in
``docs/observability.md``; alert rules and the dashboard come from
:func:`r1zero.telemetry.manifests.monitoring_objects`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings

from r1zero.telemetry.comm import CommTimer
from r1zero.telemetry.exporter import GAUGE_KEYS, JSONL_COUNTERS, JSONL_KEYS, Metrics, Server, push, serve

__all__ = ["start", "mfu_inputs", "Telemetry", "NullTelemetry", "CommTimer"]

_COUNTERS = {"aha_events": "aha_events", "nan_skips": "nan_skips", "tokens": "tokens"}
_MOE_NAME = re.compile(r"^moe/L(\d+)/(\w+)$")


class Telemetry:
    """The exporter of one rank. Build it with :func:`start`."""

    enabled = True

    def __init__(self, tcfg, job: str, rank: int, stage: str, local_rank: int = 0,
                 flops_per_token: float | None = None, peak_flops: float | None = None, comm: bool = True):
        from r1zero.telemetry.gpu import GpuCollector

        self.labels = {"job": str(job), "rank": str(rank), "stage": str(stage)}
        self.metrics = Metrics(self.labels)
        self.gpu = GpuCollector(self.labels, local_rank=local_rank)
        self.metrics.add_collector(self.gpu)
        self._comm = CommTimer()
        self.metrics.add_comm(self._comm)
        self._flops_per_token, self._peak_flops = flops_per_token, peak_flops
        self._gateway = tcfg.pushgateway
        self._push_interval = tcfg.push_interval_s
        self._last_push = time.monotonic()
        self._step = 0
        self._last_observe = time.perf_counter()
        self._warned: set[str] = set()
        self.metrics.set("last_step_time", time.time())  # the stall alert counts from process start
        self.server: Server | None = None
        if tcfg.serve:
            port = tcfg.port + local_rank if tcfg.port else 0
            self.server = serve(self.metrics.registry, port, tcfg.bind)
        if comm:  # last: a failed start leaves no patched collectives behind
            self._comm.install()

    # -- properties ------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    @property
    def url(self) -> str | None:
        return self.server.url if self.server else None

    # -- recording -------------------------------------------------------------------------
    def observe_step(self, seconds: float, tokens: int, loss: float | None = None, lr: float | None = None,
                     **gauges: float) -> None:
        """One optimizer step done: its wall seconds and tokens; loss, lr and any set_gauges keys."""
        m = self.metrics
        seconds = float(seconds)
        self._step = int(gauges.pop("step", self._step + 1))
        m.steps.inc()
        m.set("step", self._step)
        m.set("last_step_time", time.time())
        m.step_seconds.observe(seconds)
        m.tokens.inc(tokens)
        if seconds > 0:
            m.set("tokens_per_second", tokens / seconds)
            if self._flops_per_token and self._peak_flops and "mfu" not in gauges:
                m.set("mfu", tokens * self._flops_per_token / (seconds * self._peak_flops))
        # Comm ratio over the wall time since the previous observe_step (numerator and denominator
        # cover the same window wherever the caller measured ``seconds`` and whatever it did
        # between steps: GRPO evaluates between its step end and this call).
        now = time.perf_counter()
        window = now - self._last_observe
        if window > 0:
            m.set("comm_ratio", min(1.0, self._comm.seconds_between(self._last_observe, now) / window))
        self._last_observe = now
        if loss is not None:
            m.set("loss", loss)  # NaN is exported as NaN: the R1ZeroLossNaN alert keys on it
        if lr is not None:
            m.set("lr", lr)
        if gauges:
            self.set_gauges(**gauges)
        self._maybe_push()

    def set_gauges(self, **kw: float) -> None:
        """Set gauges by key: loss, lr, tokens_per_second, mfu, grad_norm, reward, accuracy,
        format_rate, kl, completion_length, reflection_rate, step, comm_time_ratio. Metrics-JSONL
        names (``**{"grpo/kl": 0.1, "moe/L0/max_load_ratio": 1.3}``) go to :meth:`observe_metrics`."""
        named = {k: kw.pop(k) for k in [k for k in kw if "/" in k]}
        if named:
            self.observe_metrics(named)
        for key, value in kw.items():
            attr = GAUGE_KEYS.get(key)
            if attr is None:
                self._warn_once(key, f"r1zero.telemetry: unknown gauge {key!r} ignored (known: {sorted(GAUGE_KEYS)})")
                continue
            if value is not None:
                self.metrics.set(attr, value)

    def observe_moe(self, stats: list[dict]) -> None:
        """Per-layer MoE figures (``model.moe_stats()``): max_load_ratio, dropped_fraction, router_entropy."""
        for i, layer in enumerate(stats):
            self.metrics.set_moe(layer.get("layer", i), **{k: v for k, v in layer.items() if k != "layer"})

    def observe_metrics(self, records: dict[str, float]) -> None:
        """Export one metrics-JSONL row: gauges for names such as ``train/loss``, ``grpo/kl``,
        ``moe/L0/max_load_ratio``; per-step counts (``grpo/nan_skipped``) increment their counter.
        Other names are ignored. Call it once per step (counts would add up twice otherwise)."""
        for name, value in records.items():
            if value is None or not isinstance(value, int | float):
                continue
            key = JSONL_KEYS.get(name)
            if key is not None:
                self.set_gauges(**{key: value})
                continue
            counter = JSONL_COUNTERS.get(name)
            if counter is not None:
                if value > 0:
                    getattr(self.metrics, counter).inc(value)
                continue
            moe = _MOE_NAME.match(name)
            if moe:
                self.metrics.set_moe(moe.group(1), **{moe.group(2): value})

    def inc(self, name: str, n: float = 1) -> None:
        """Increment a counter: aha_events, nan_skips, tokens."""
        attr = _COUNTERS.get(name)
        if attr is None:
            self._warn_once(name, f"r1zero.telemetry: unknown counter {name!r} ignored (known: {sorted(_COUNTERS)})")
            return
        getattr(self.metrics, attr).inc(n)

    def observe_checkpoint(self, seconds: float) -> None:
        self.metrics.checkpoint_seconds.observe(float(seconds))

    @contextlib.contextmanager
    def checkpoint_timer(self):
        """``with tel.checkpoint_timer(): save()`` records the save's wall time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe_checkpoint(time.perf_counter() - t0)

    def comm_timer(self) -> CommTimer:
        """The collective timer (installed by :func:`start` unless ``comm=False``; a context manager)."""
        return self._comm

    # -- output ----------------------------------------------------------------------------
    def push(self) -> bool:
        """Push to the Pushgateway now (no-op without one). A failure warns and returns False."""
        if not self._gateway:
            return False
        self._last_push = time.monotonic()
        try:
            push(self.metrics.registry, self._gateway, self.labels)
            return True
        except OSError as err:  # training must not die because the gateway is unreachable
            self._warn_once("push", f"r1zero.telemetry: push to {self._gateway} failed: {err}")
            return False

    def _maybe_push(self) -> None:
        if self._gateway and time.monotonic() - self._last_push >= self._push_interval:
            self.push()

    def close(self) -> None:
        """Final push, restore the collectives, stop the endpoint. Safe to call twice."""
        if self._gateway:
            self.push()
            self._gateway = None
        self._comm.uninstall()
        if self.server is not None:
            self.server.close()
            self.server = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class _NullComm(contextlib.nullcontext):
    """``comm_timer()`` of the disabled telemetry: nothing is patched or counted."""

    installed = False

    def install(self):
        return self

    def uninstall(self) -> None:
        pass

    def attach_ddp(self, ddp_model) -> None:
        pass

    def snapshot(self) -> dict:
        return {}

    def purposes(self) -> dict:
        return {}

    def name_group(self, group, kind: str) -> None:
        pass

    def name_mesh(self, mesh, kinds: dict) -> None:
        pass

    def total_seconds(self) -> float:
        return 0.0


class NullTelemetry:
    """What :func:`start` returns when telemetry is off: every method does nothing."""

    enabled = False
    port = None
    url = None
    labels: dict[str, str] = {}

    def observe_step(self, seconds, tokens, loss=None, lr=None, **gauges) -> None:
        pass

    def set_gauges(self, **kw) -> None:
        pass

    def observe_moe(self, stats) -> None:
        pass

    def observe_metrics(self, records) -> None:
        pass

    def inc(self, name, n=1) -> None:
        pass

    def observe_checkpoint(self, seconds) -> None:
        pass

    def checkpoint_timer(self):
        return contextlib.nullcontext()

    def comm_timer(self):
        return _NullComm()

    def push(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def __enter__(self) -> NullTelemetry:
        return self

    def __exit__(self, *exc) -> None:
        pass


def mfu_inputs(cfg, device, world_size: int = 1) -> dict[str, float | None]:
    """``flops_per_token`` and ``peak_flops`` for :func:`start`'s MFU gauge.

    FLOPs per token are the planner's model FLOPs (forward + backward, no recompute: 6·N_active
    plus attention, :func:`r1zero.sizing.flops_per_step`) of ``cfg.model`` at ``pretrain.seq_len``;
    the peak is the device's dense peak at ``pretrain.precision`` (datasheet table in
    :mod:`r1zero.sizing`) times ``world_size``, because the engines report the whole job's tokens
    per step. None on a CPU or an unknown GPU (no datasheet peak): the gauge then stays unset.
    """
    from r1zero.sizing import flops_per_step, gpu_of_device
    from r1zero.sizing_cli import spec_from_config

    spec = spec_from_config(cfg)
    fpt = flops_per_step(spec, 1, "none") / spec.seq
    peak = None
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        gpu = gpu_of_device(torch.cuda.get_device_name(device))
        tflops = gpu.peak_tflops.get(cfg.pretrain.precision) if gpu else None
        peak = tflops * 1e12 * world_size if tflops else None
    return {"flops_per_token": fpt, "peak_flops": peak}


def start(tcfg, job: str, rank: int, stage: str, *, local_rank: int | None = None,
          flops_per_token: float | None = None, peak_flops: float | None = None,
          comm: bool = True) -> Telemetry | NullTelemetry:
    """Start this rank's exporter (``tcfg`` is ``cfg.telemetry``); a no-op object when disabled.

    ``local_rank`` defaults to ``$LOCAL_RANK`` (torchrun) and offsets the port. ``flops_per_token``
    and ``peak_flops`` (whole-job FLOP/s / world size, i.e. per rank) turn on the MFU gauge.
    """
    if not tcfg.enabled:
        return NullTelemetry()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return Telemetry(tcfg, job, rank, stage, local_rank=local_rank, flops_per_token=flops_per_token,
                     peak_flops=peak_flops, comm=comm)
