"""Client of the sandbox service (:mod:`r1zero.sandbox.service`): batched requests, per-item
timeouts, retries with backoff, a circuit breaker, Prometheus metrics.

    from r1zero.sandbox.client import SandboxClient
    c = SandboxClient("http://r1zero-sandbox:8080")
    c.run_many(["print(1)", "while True: pass"], timeout_s=1.0)   # [SandboxResult(ok), SandboxResult(timeout)]

    r1zero sandbox run prog.py --server http://127.0.0.1:8080   # one program through the service

The GRPO reward (:class:`r1zero.grpo.rewards.RewardScorer`) and the eval use it when
``sandbox.url`` is set (:func:`verify_many_for`); otherwise code runs in this process's sandbox.

Failure handling, so a dead or overloaded service never hangs a training step:

- batches are at most the service's capacity (``/healthz``), so none is refused for its size;
- each batch has a deadline computed from its programs' own timeouts and the service's worker
  count (``/healthz``), so a request never waits longer than its programs can run;
- connection errors, timeouts, 5xx and ``503 overloaded`` are retried ``retries`` times with
  exponential backoff plus jitter (``backoff_s * 2**attempt``); a 4xx is not retried (the request
  itself is wrong) and becomes ``unavailable`` results carrying the service's reason;
- after ``breaker_failures`` consecutive batches that failed every retry, the circuit opens: for
  ``breaker_reset_s`` every program gets an ``unavailable`` result at once (the verifier turns it
  into a ``sandbox_error`` verdict) and one log line says so; the next batch after that probes the
  service again (half-open) and closes the circuit when it answers.

``unavailable`` results are never cached by the verifier or the reward cache, so a restarted
service costs the rewards of the batches it missed, not wrong rewards later.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Sequence

import urllib3
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from r1zero.errors import UserError
from r1zero.sandbox.runner import STARTUP_GRACE_S, SandboxResult
from r1zero.sandbox.service import MAX_BATCH, MAX_PROGRAM_BYTES

log = logging.getLogger(__name__)

UNAVAILABLE = "unavailable"  # client-side status: no verdict could be obtained from the service
SLACK_S = 5.0  # per batch: HTTP, JSON, process start-up and kill on a loaded machine
CONNECT_TIMEOUT_S = 2.0
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# One registry for every client in the process; the trainer registers it with its telemetry
# registry (r1zero/grpo/trainer.py), so the series reach the rank's /metrics endpoint.
REGISTRY = CollectorRegistry(auto_describe=True)
M_LATENCY = Histogram("r1zero_sandbox_request_duration_seconds",
                      "Wall seconds per sandbox-service batch, retries included (code reward latency).",
                      buckets=LATENCY_BUCKETS, registry=REGISTRY)
M_ERRORS = Counter("r1zero_sandbox_client_errors", "Failed sandbox-service attempts by kind.", ["kind"],
                   registry=REGISTRY)
M_RESULTS = Counter("r1zero_sandbox_client_results", "Program results from the sandbox service by status.",
                    ["status"], registry=REGISTRY)
M_OPEN = Gauge("r1zero_sandbox_circuit_open", "1 while the client's circuit to the sandbox service is open.",
               registry=REGISTRY)


class _Failure(Exception):
    def __init__(self, kind: str, reason: str, retry: bool = True):
        super().__init__(reason)
        self.kind, self.reason, self.retry = kind, reason, retry


def _unavailable(reason: str) -> SandboxResult:
    return SandboxResult(UNAVAILABLE, None, "", f"[sandbox service] {reason}", 0.0)


class SandboxClient:
    """Thread-safe; one per process is enough (it pools connections)."""

    def __init__(self, url: str, *, batch_size: int = 32, retries: int = 4, backoff_s: float = 0.25,
                 breaker_failures: int = 3, breaker_reset_s: float = 15.0, max_connections: int = 8):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"sandbox url must start with http:// or https:// (got {url!r})")
        self.url = url.rstrip("/")
        self.batch_size = max(1, min(batch_size, MAX_BATCH))
        self.retries, self.backoff_s = retries, backoff_s
        self.breaker_failures, self.breaker_reset_s = breaker_failures, breaker_reset_s
        self._http = urllib3.PoolManager(maxsize=max_connections, block=False, retries=False)
        self._lock = threading.Lock()
        self._failures = 0  # consecutive batches that failed every retry
        self._open_until = 0.0
        self._workers: int | None = None  # the service's worker count, from /healthz
        self._capacity: int | None = None  # programs it admits at once: no batch may be larger
        self.attempts = 0  # requests sent (for tests and the load benchmark: retries show here)

    # -- circuit ------------------------------------------------------------------------------

    def circuit_open(self) -> bool:
        with self._lock:
            return time.monotonic() < self._open_until

    def _record(self, ok: bool, reason: str = "") -> None:
        with self._lock:
            if ok:
                if self._failures >= self.breaker_failures:
                    log.warning("sandbox service %s answers again: circuit closed", self.url)
                self._failures, self._open_until = 0, 0.0
                M_OPEN.set(0)
                return
            self._failures += 1
            if self._failures >= self.breaker_failures and time.monotonic() >= self._open_until:
                self._open_until = time.monotonic() + self.breaker_reset_s
                M_OPEN.set(1)
                log.error("sandbox service %s failed %d batches in a row (%s): circuit open, code rewards are "
                          "sandbox_error for %.0f s", self.url, self._failures, reason, self.breaker_reset_s)

    # -- HTTP ---------------------------------------------------------------------------------

    def health(self, timeout_s: float = 2.0) -> dict:
        try:
            r = self._http.request("GET", self.url + "/healthz",
                                   timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout_s))
            doc = json.loads(r.data)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:
            raise _Failure("connect", f"GET /healthz: {type(err).__name__}: {err}") from None
        if r.status != 200 or not isinstance(doc, dict):
            raise _Failure("http", f"GET /healthz: HTTP {r.status}")
        self._workers = int(doc.get("workers", 1)) or 1
        self._capacity = int(doc.get("capacity", MAX_BATCH)) or 1
        return doc

    def _deadline_s(self, payload: list[dict]) -> float:
        """Read timeout of one batch: its programs run ``workers`` at a time, each within its own
        timeout + start-up grace (the service admits a batch only when it has room for all of it)."""
        workers = self._workers or 1
        longest = max(p["timeout_s"] for p in payload) + STARTUP_GRACE_S + 1.0
        return math.ceil(len(payload) / workers) * longest + SLACK_S

    def _post(self, payload: list[dict]) -> list[dict]:
        body = json.dumps({"programs": payload}).encode()
        self.attempts += 1
        try:
            if self._workers is None:
                self.health()
            r = self._http.request("POST", self.url + "/run", body=body,
                                   headers={"Content-Type": "application/json"},
                                   timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=self._deadline_s(payload)))
        except _Failure:
            raise
        except (urllib3.exceptions.HTTPError, OSError) as err:
            self._workers = None  # a restarted service may have another size
            kind = "timeout" if isinstance(err, urllib3.exceptions.TimeoutError) else "connect"
            raise _Failure(kind, f"{type(err).__name__}: {err}") from None
        try:
            doc = json.loads(r.data)
        except ValueError:
            doc = {}
        if r.status == 503:
            raise _Failure("overloaded", f"overloaded: {doc.get('reason', '')}")
        if r.status >= 500:
            raise _Failure("http", f"HTTP {r.status}: {doc.get('reason', r.data[:200])}")
        if r.status != 200:
            self._workers = None  # e.g. a batch over a (restarted, smaller) service's capacity: re-read it
            raise _Failure("rejected", f"HTTP {r.status}: {doc.get('reason', r.data[:200])}", retry=False)
        verdicts = doc.get("verdicts") if isinstance(doc, dict) else None
        if not isinstance(verdicts, list) or len(verdicts) != len(payload):
            raise _Failure("protocol", f"expected {len(payload)} verdicts, got {type(verdicts).__name__}")
        return verdicts

    def _batch(self, payload: list[dict]) -> list[SandboxResult]:
        if self.circuit_open():
            M_ERRORS.labels("circuit_open").inc()
            return [_unavailable(f"circuit open: {self.url} failed recently")] * len(payload)
        t0 = time.monotonic()
        last = None
        for attempt in range(self.retries + 1):
            try:
                verdicts = self._post(payload)
            except _Failure as err:
                M_ERRORS.labels(err.kind).inc()
                last = err
                if not err.retry:
                    break
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** attempt * (0.5 + random.random()))
                continue
            M_LATENCY.observe(time.monotonic() - t0)
            self._record(True)
            out = []
            for v in verdicts:
                try:
                    res = SandboxResult(str(v["status"]), v["returncode"], str(v["stdout"]), str(v["stderr"]),
                                        float(v["seconds"]))
                except (KeyError, TypeError, ValueError):
                    res = _unavailable(f"malformed verdict from the service: {str(v)[:100]}")
                M_RESULTS.labels(res.status).inc()
                out.append(res)
            return out
        M_LATENCY.observe(time.monotonic() - t0)
        if last.retry:  # a rejected request says nothing about the service's health
            self._record(False, last.reason)
        M_RESULTS.labels(UNAVAILABLE).inc(len(payload))
        return [_unavailable(last.reason)] * len(payload)

    # -- public -------------------------------------------------------------------------------

    def run_many(self, sources: Sequence[str], timeout_s: float = 2.0, memory_mb: int = 256,
                 stdins: Sequence[str] | None = None) -> list[SandboxResult]:
        """One result per source, in order, never raising for what the service or network does."""
        out: list[SandboxResult | None] = [None] * len(sources)
        payload, where = [], []
        for i, src in enumerate(sources):
            item = {"source": src, "timeout_s": float(timeout_s), "memory_mb": int(memory_mb)}
            if stdins is not None and stdins[i]:
                item["stdin"] = stdins[i]
            size = len(src.encode("utf-8", "surrogatepass")) + len(item.get("stdin", "").encode("utf-8", "surrogatepass"))
            if size > MAX_PROGRAM_BYTES:  # the service would refuse the whole batch for it
                out[i] = SandboxResult("error", None, "", f"[sandbox service] program of {size} bytes is over the "
                                       f"service's limit of {MAX_PROGRAM_BYTES}", 0.0)
                continue
            payload.append(item)
            where.append(i)
        if payload and self._capacity is None and not self.circuit_open():
            with contextlib.suppress(_Failure):
                self.health()
        size = min(self.batch_size, self._capacity or self.batch_size)
        for s in range(0, len(payload), size):
            for i, res in zip(where[s:s + size], self._batch(payload[s:s + size])):
                out[i] = res
        return out  # type: ignore[return-value]

    def run(self, source: str, timeout_s: float = 2.0, memory_mb: int = 256, stdin: str | None = None) -> SandboxResult:
        return self.run_many([source], timeout_s, memory_mb, [stdin or ""])[0]


@functools.lru_cache(maxsize=8)
def client_for(url: str, batch_size: int, retries: int, backoff_s: float, breaker_failures: int,
               breaker_reset_s: float) -> SandboxClient:
    """One shared client per distinct setting (its circuit and connection pool are per process)."""
    return SandboxClient(url, batch_size=batch_size, retries=retries, backoff_s=backoff_s,
                         breaker_failures=breaker_failures, breaker_reset_s=breaker_reset_s)


def from_config(sandbox_cfg) -> SandboxClient | None:
    """The client for ``cfg.sandbox`` (:class:`r1zero.config.SandboxConfig`), or None when ``url`` is unset."""
    if sandbox_cfg is None or not sandbox_cfg.url:
        return None
    s = sandbox_cfg
    return client_for(s.url, s.batch_size, s.retries, s.backoff_s, s.breaker_failures, s.breaker_reset_s)


def verify_many_for(sandbox_cfg):
    """:func:`r1zero.verify.verify_many`, sending its programs to the service when ``sandbox.url`` is set."""
    from r1zero.verify import verify_many

    client = from_config(sandbox_cfg)
    if client is None:
        return verify_many
    return functools.partial(verify_many, run_many=client.run_many)
