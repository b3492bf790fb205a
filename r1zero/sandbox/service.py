"""The sandbox as a service: ``r1zero sandbox serve --port P`` runs submitted programs with the
limits of :func:`r1zero.sandbox.runner.run_code` and answers one verdict per program.

    r1zero sandbox serve --port 8080 --workers 2 --queue 8
    curl -s localhost:8080/healthz                       # {"status": "ok", "workers": 2, ...}
    curl -s -XPOST localhost:8080/run -d '{"programs": [{"source": "print(1)", "timeout_s": 2}]}'
    # {"verdicts": [{"status": "ok", "returncode": 0, "stdout": "1\\n", "stderr": "", "seconds": 0.05}]}

Why a service: in the project's pods the trainer runs as a non-root uid with every capability
dropped, so the in-process sandbox loses its OS layers (uid drop, network namespace, NPROC), and
the trainer's environment holds the S3 keys. The service runs in its own pod that holds no
credentials and has no route out (docs/sandbox.md, r1zero/cluster/sandbox_manifests.py).

How: the stdlib's ThreadingHTTPServer (one thread per connection, keep-alive) in front of a fixed
pool of ``workers`` threads, each running one ``run_code`` at a time. Admission is counted in
programs: a request is admitted only if its programs fit in ``workers + queue`` slots, otherwise it
is answered ``503 {"error": "overloaded"}`` at once (never parked), so the wait of an admitted
program is bounded by ``ceil((workers + queue) / workers)`` program deadlines. Requests are
validated before anything runs: a malformed or oversized request gets a 4xx with a reason and runs
nothing. Endpoints: ``POST /run``, ``GET /healthz``, ``GET /metrics`` (Prometheus).

Request: ``{"programs": [{"source": str, "stdin": str (optional), "timeout_s": float (optional),
"memory_mb": int (optional)}, ...]}``. Response: ``{"verdicts": [...]}`` in the same order, each
exactly the JSON ``r1zero sandbox run`` prints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from r1zero.errors import UserError
from r1zero.sandbox.runner import STATUSES, run_code

log = logging.getLogger(__name__)

MAX_TIMEOUT_S = 30.0  # per program; a code reward that needs longer is a bad item, not a slow one
MAX_MEMORY_MB = 1024
DEFAULT_TIMEOUT_S, DEFAULT_MEMORY_MB = 2.0, 256  # run_code's defaults
MAX_PROGRAM_BYTES = 64 * 1024  # source + stdin of one program (a harness program is ~1 KiB)
MAX_BATCH = 64  # programs per request
MAX_BODY_BYTES = MAX_BATCH * MAX_PROGRAM_BYTES * 2  # 8 MiB; JSON escaping can double the size
# concurrent client connections (threads); beyond: 503 at accept. Bodies are read whole, so
# MAX_CONNECTIONS * MAX_BODY_BYTES (512 MiB) bounds what requests can hold in the pod's memory.
MAX_CONNECTIONS = 64
SOCKET_TIMEOUT_S = 30.0  # a client that stops sending mid-request loses its connection
VERDICT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

disable_created_metrics()  # as r1zero.telemetry.exporter: no `_created` companion series


class BadRequest(Exception):
    def __init__(self, code: HTTPStatus, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Program:
    source: str
    stdin: bytes
    timeout_s: float
    memory_mb: int


def _number(v, name: str, lo: float, hi: float, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be {'an integer' if integer else 'a number'}")
    if not (lo < v <= hi if not integer else lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be in {'[' if integer else '('}{lo}, {hi}] (got {v})")
    return v


def _utf8(text, name: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be a string")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \\udXXX escapes
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} is not valid UTF-8 text") from None


def parse_request(body: bytes, max_batch: int = MAX_BATCH, max_program_bytes: int = MAX_PROGRAM_BYTES) -> list[Program]:
    """The programs of one ``POST /run`` body, or :class:`BadRequest` naming the first problem."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "request body is not UTF-8") from None
    except json.JSONDecodeError as err:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {err.msg} at {err.pos}") from None
    except RecursionError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "request body is nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("programs"), list):
        raise BadRequest(HTTPStatus.BAD_REQUEST, 'request must be {"programs": [...]}')
    extra = set(doc) - {"programs"}
    if extra:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"unknown request keys: {sorted(extra)}")
    progs = doc["programs"]
    if not progs:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "programs is empty")
    if len(progs) > max_batch:
        raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{len(progs)} programs in one request (max {max_batch})")
    out = []
    for i, p in enumerate(progs):
        name = f"programs[{i}]"
        if not isinstance(p, dict):
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name} must be an object")
        extra = set(p) - {"source", "stdin", "timeout_s", "memory_mb"}
        if extra:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name}: unknown keys {sorted(extra)}")
        if "source" not in p:
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"{name}.source is missing")
        source = _utf8(p["source"], f"{name}.source")
        stdin = _utf8(p.get("stdin", ""), f"{name}.stdin")
        if len(source) + len(stdin) > max_program_bytes:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"{name}: {len(source) + len(stdin)} bytes of source+stdin (max {max_program_bytes})")
        timeout_s = float(_number(p.get("timeout_s", DEFAULT_TIMEOUT_S), f"{name}.timeout_s", 0, MAX_TIMEOUT_S))
        memory_mb = _number(p.get("memory_mb", DEFAULT_MEMORY_MB), f"{name}.memory_mb", 64, MAX_MEMORY_MB, integer=True)
        out.append(Program(p["source"], stdin, timeout_s, memory_mb))
    return out


class Overloaded(Exception):
    pass


class SandboxService:
    """Admission control + a fixed pool of sandbox workers; no HTTP here (see :func:`make_server`)."""

    def __init__(self, workers: int = 2, queue: int = 8, run=run_code):
        if workers < 1 or queue < 0:
            raise UserError(f"sandbox serve: --workers must be >= 1 and --queue >= 0 (got {workers}, {queue})")
        self.workers, self.capacity, self._run = workers, workers + queue, run
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self._lock = threading.Lock()
        self._admitted = 0
        self._responding = 0  # POST /run requests between admission and their answer being written
        self._idle = threading.Condition(self._lock)
        self.started = time.time()
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("r1zero_sandbox_service_requests", "Requests by outcome.", ["outcome"], registry=r)
        self.m_verdicts = Counter("r1zero_sandbox_service_verdicts", "Verdicts by status.", ["status"], registry=r)
        self.m_seconds = Histogram("r1zero_sandbox_service_program_seconds", "Wall seconds per program, queue included.",
                                   buckets=VERDICT_BUCKETS, registry=r)
        self.m_inflight = Gauge("r1zero_sandbox_service_programs_admitted", "Programs admitted (running + queued).",
                                registry=r)
        self.m_inflight.set_function(lambda: self._admitted)

    def admit(self, n: int) -> None:
        if n > self.capacity:  # could never be admitted: a client error, not a busy service
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"{n} programs in one request, more than this service's capacity {self.capacity} "
                             "(see /healthz)")
        with self._lock:
            if self._admitted + n > self.capacity:
                raise Overloaded(f"{self._admitted} programs admitted, capacity {self.capacity}")
            self._admitted += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._admitted -= n

    def run_batch(self, programs: list[Program]) -> list[dict]:
        """Verdicts for admitted programs, in order; raises :class:`Overloaded` without running any."""
        self.admit(len(programs))
        try:
            t0 = time.monotonic()
            try:
                futs = [self._pool.submit(self._one, p) for p in programs]
                out = [f.result() for f in futs]
            except (CancelledError, RuntimeError) as err:  # shutting down: queued programs were dropped
                raise Overloaded(f"shutting down ({type(err).__name__})") from None
            for v in out:
                self.m_verdicts.labels(v["status"]).inc()
            self.m_seconds.observe(time.monotonic() - t0)
            return out
        finally:
            self._release(len(programs))

    def _one(self, p: Program) -> dict:
        try:
            return self._run(p.source, timeout_s=p.timeout_s, memory_mb=p.memory_mb, stdin=p.stdin).to_json()
        except Exception as err:  # noqa: BLE001 - one program never takes the service down
            log.exception("sandbox run failed")
            return {"status": "error", "returncode": None, "stdout": "",
                    "stderr": f"[sandbox service] {type(err).__name__}: {str(err)[:200]}", "seconds": 0.0}

    def health(self) -> dict:
        with self._lock:
            admitted = self._admitted
        return {"status": "ok", "workers": self.workers, "capacity": self.capacity, "admitted": admitted,
                "max_batch": MAX_BATCH, "max_program_bytes": MAX_PROGRAM_BYTES, "max_timeout_s": MAX_TIMEOUT_S,
                "statuses": list(STATUSES), "uptime_s": round(time.time() - self.started, 1)}

    @contextlib.contextmanager
    def responding(self):
        """Brackets one POST from its body to its written answer, so :meth:`drain` can wait for it."""
        with self._lock:
            self._responding += 1
        try:
            yield
        finally:
            with self._lock:
                self._responding -= 1
                self._idle.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every request being answered has written its answer (the handler threads are
        daemons: without this, the process could exit between a verdict and its response)."""
        with self._lock:
            return self._idle.wait_for(lambda: self._responding == 0, timeout_s)

    def close(self, wait: bool = True) -> None:
        """Drop queued programs (their requests are answered ``overloaded``); ``wait``: until running ones end."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses one connection across batches
    timeout = SOCKET_TIMEOUT_S
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature; access log off (one line per batch is noise)
        pass

    def _send(self, code: int, doc: dict | None = None, body: bytes | None = None,
              ctype: str = "application/json", close: bool = False) -> None:
        data = body if body is not None else (json.dumps(doc) + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if code == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, reason: str, close: bool = False) -> None:
        outcome = "overloaded" if code == HTTPStatus.SERVICE_UNAVAILABLE else str(code)
        self.server.service.m_requests.labels(outcome).inc()
        self._send(code, {"error": "overloaded" if outcome == "overloaded" else HTTPStatus(code).phrase.lower(),
                          "reason": reason}, close=close)

    def do_GET(self):  # noqa: N802 - stdlib name
        svc = self.server.service
        if self.path == "/healthz":
            self._send(HTTPStatus.OK, svc.health())
        elif self.path == "/metrics":
            self._send(HTTPStatus.OK, body=generate_latest(svc.registry), ctype=CONTENT_TYPE_LATEST)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path[:100]}")

    def do_POST(self):  # noqa: N802
        svc = self.server.service
        if self.path != "/run":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path[:100]}", close=True)
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required (no chunked bodies)", close=True)
            return
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length[:40]!r}", close=True)
            return
        if n > MAX_BODY_BYTES:
            # the body is not read: close the connection instead of draining an oversized upload
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {n} bytes (max {MAX_BODY_BYTES})", close=True)
            return
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            return
        with svc.responding():
            try:
                programs = parse_request(body)
                verdicts = svc.run_batch(programs)
            except BadRequest as err:
                self._error(err.code, err.reason)
                return
            except Overloaded as err:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(err))
                return
            svc.m_requests.labels("ok").inc()
            self._send(HTTPStatus.OK, {"verdicts": verdicts})


_TOO_MANY_BODY = json.dumps({"error": "overloaded", "reason": "too many connections"}).encode()
_TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
             b"Connection: close\r\nContent-Length: " + str(len(_TOO_MANY_BODY)).encode() + b"\r\n\r\n" + _TOO_MANY_BODY)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, addr, service: SandboxService, max_connections: int = MAX_CONNECTIONS):
        self.service = service
        self._conns = threading.BoundedSemaphore(max_connections)
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address):
        if not self._conns.acquire(blocking=False):
            # too many open connections: answer overloaded from the accept thread and close
            try:
                request.sendall(_TOO_MANY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._conns.release()

    @property
    def port(self) -> int:
        return self.server_address[1]


def make_server(host: str = "127.0.0.1", port: int = 0, workers: int = 2, queue: int = 8,
                max_connections: int = MAX_CONNECTIONS, run=run_code) -> _Server:
    """A bound, not yet serving server (call ``serve_forever``; ``.port`` is the bound port)."""
    try:
        return _Server((host, port), SandboxService(workers, queue, run), max_connections)
    except OSError as err:
        raise UserError(f"sandbox serve: cannot listen on {host}:{port}: {err.strerror}") from None


def serve(host: str, port: int, workers: int, queue: int) -> None:
    """Run until SIGTERM/SIGINT: running programs finish (their deadlines bound the wait), queued
    ones are answered ``overloaded`` so their clients retry elsewhere."""
    srv = make_server(host, port, workers, queue)
    stop = threading.Event()

    def _stop(*_):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(json.dumps({"listening": f"http://{host}:{srv.port}", "workers": workers, "capacity": workers + queue,
                      "pid": os.getpid()}), flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        close_server(srv)


def close_server(srv: _Server) -> None:
    """After ``serve_forever`` returned: stop listening, answer queued programs ``overloaded``, and
    return only once every running program's answer has been written to its client."""
    srv.server_close()
    srv.service.close(wait=False)
    # running programs end by their own deadlines; their answers must reach the clients before exit
    srv.service.drain(MAX_TIMEOUT_S + SOCKET_TIMEOUT_S)


class ServiceProcess:
    """``r1zero sandbox serve`` in a child process, for benchmarks, tests and local runs.

        with ServiceProcess(port=0, workers=2) as svc:
            SandboxClient(svc.url).run("print(1)")
        svc.kill(); svc.start()      # a crash and a restart on the same port
    """

    def __init__(self, port: int = 0, workers: int = 2, queue: int = 8, host: str = "127.0.0.1",
                 env: dict | None = None, argv: list[str] | None = None):
        import sys

        self.port, self.host, self.env = port, host, env
        self.argv = argv or [sys.executable, "-m", "r1zero.cli", "sandbox", "serve"]
        self.args = ["--host", host, "--workers", str(workers), "--queue", str(queue)]
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        import subprocess

        self.proc = subprocess.Popen([*self.argv, *self.args, "--port", str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=self.env)
        line = self.proc.stdout.readline()  # {"listening": ...} once bound, or EOF if it failed
        if not line:
            err = self.proc.stderr.read()
            self.proc.wait(timeout_s)
            raise RuntimeError(f"sandbox service did not start: {err.strip()[-300:]}")
        self.port = int(json.loads(line)["listening"].rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL, as a crashed or evicted pod."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        if self.proc:
            self.proc.wait(30)

    def stop(self) -> int | None:
        """SIGTERM: in-flight programs finish, then it exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(45)
            except Exception:  # noqa: BLE001 - a stuck shutdown still ends the process
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode if self.proc else None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
