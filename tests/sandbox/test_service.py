"""The sandbox service: verdicts in the ``r1zero sandbox run`` shape, batches, bad input (a 4xx with
a reason, never a crash), ``overloaded`` instead of a hang, health and metrics, the CLI.

    .venv/bin/python -m pytest tests/sandbox/test_service.py -q
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time

import pytest

from r1zero.sandbox.runner import STARTUP_GRACE_S
from r1zero.sandbox.service import MAX_BATCH, MAX_BODY_BYTES, MAX_PROGRAM_BYTES, make_server, parse_request

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
VERDICT_KEYS = ["status", "returncode", "stdout", "stderr", "seconds"]


@pytest.fixture()
def service():
    srv = make_server("127.0.0.1", 0, workers=2, queue=2)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.service.close()


def _request(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 30.0) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data.decode()


def _run(srv, programs: list[dict], **kw):
    return _request(srv, "POST", "/run", json.dumps({"programs": programs}).encode(), **kw)


def test_batch_verdicts_in_order_in_the_cli_shape(service):
    code, doc = _run(service, [{"source": "print(6 * 7)"}, {"source": "raise SystemExit(3)"},
                               {"source": "import sys; print(sys.stdin.read()[::-1])", "stdin": "abc"},
                               {"source": "while True: pass", "timeout_s": 0.5}])
    assert code == 200, doc
    v = doc["verdicts"]
    assert [list(x) for x in v] == [VERDICT_KEYS] * 4
    assert [x["status"] for x in v] == ["ok", "error", "ok", "timeout"]
    assert (v[0]["stdout"], v[1]["returncode"], v[2]["stdout"]) == ("42\n", 3, "cba\n")
    assert v[3]["seconds"] < 0.5 + STARTUP_GRACE_S + 1.0


def test_health_and_metrics(service):
    code, doc = _request(service, "GET", "/healthz")
    assert code == 200 and doc["status"] == "ok" and doc["workers"] == 2 and doc["capacity"] == 4
    _run(service, [{"source": "print(1)"}])
    code, text = _request(service, "GET", "/metrics")
    assert code == 200
    assert 'r1zero_sandbox_service_verdicts_total{status="ok"} 1.0' in text
    assert 'r1zero_sandbox_service_requests_total{outcome="ok"} 1.0' in text


BAD = [
    (b"not json", 400, "not JSON"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    (b"[1, 2]", 400, '{"programs"'),
    (b'{"programs": []}', 400, "empty"),
    (b'{"programs": [1]}', 400, "must be an object"),
    (b'{"programs": [{}]}', 400, "source is missing"),
    (b'{"programs": [{"source": 5}]}', 400, "must be a string"),
    (b'{"programs": [{"source": "\\ud800print(1)"}]}', 400, "not valid UTF-8"),  # lone surrogate
    (b'{"programs": [{"source": "x", "stdin": "\\udfff"}]}', 400, "stdin is not valid UTF-8"),
    (b'{"programs": [{"source": "x", "timeout_s": "2"}]}', 400, "timeout_s must be a number"),
    (b'{"programs": [{"source": "x", "timeout_s": 0}]}', 400, "timeout_s must be in"),
    (b'{"programs": [{"source": "x", "timeout_s": 1e9}]}', 400, "timeout_s must be in"),
    (b'{"programs": [{"source": "x", "timeout_s": true}]}', 400, "timeout_s must be a number"),
    (b'{"programs": [{"source": "x", "memory_mb": 1.5}]}', 400, "memory_mb must be an integer"),
    (b'{"programs": [{"source": "x", "memory_mb": 8}]}', 400, "memory_mb must be in"),
    (b'{"programs": [{"source": "x", "env": {"A": "1"}}]}', 400, "unknown keys"),
    (b'{"programs": [{"source": "x"}], "as_root": true}', 400, "unknown request keys"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (json.dumps({"programs": [{"source": "p"}] * (MAX_BATCH + 1)}).encode(), 413, "programs in one request"),
    (json.dumps({"programs": [{"source": "#" * (MAX_PROGRAM_BYTES + 1)}]}).encode(), 413, "bytes of source+stdin"),
]


@pytest.mark.parametrize("body,code,reason", BAD, ids=[r for _, _, r in BAD])
def test_bad_requests_get_a_4xx_with_a_reason_and_run_nothing(service, body, code, reason):
    got, doc = _request(service, "POST", "/run", body, {"Content-Type": "application/json"})
    assert got == code, doc
    assert reason in doc["reason"], doc
    assert service.service.m_verdicts._metrics == {}  # nothing ran
    assert _run(service, [{"source": "print('still up')"}])[1]["verdicts"][0]["stdout"] == "still up\n"


def test_bad_http_framing(service):
    # no Content-Length (chunked), a negative one, an oversized one (refused before reading the body)
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.putrequest("POST", "/run")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["reason"]
    conn.close()
    assert _request(service, "POST", "/run", b"", {"Content-Length": "-5"})[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.putrequest("POST", "/run")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()  # and never send the body
    r = conn.getresponse()
    assert r.status == 413 and r.getheader("Connection") == "close"
    conn.close()
    assert _request(service, "GET", "/nope")[0] == 404
    assert _request(service, "POST", "/nope", b"{}")[0] == 404
    assert _request(service, "GET", "/healthz")[1]["status"] == "ok"


def test_non_utf8_program_output_becomes_text(service):
    code, doc = _run(service, [{"source": "import sys; sys.stdout.buffer.write(b'\\xff\\xfeok')"}])
    assert code == 200 and doc["verdicts"][0]["stdout"] == "\ufffd\ufffdok"


def test_overloaded_is_answered_at_once_not_parked(service):
    # capacity 4 (2 workers + queue 2): a batch of 4 sleepers fills it; the next request is refused
    slow = [{"source": "import time; time.sleep(30)", "timeout_s": 2.0}] * 4
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(r=_run(service, slow)))
    t.start()
    deadline = time.monotonic() + 5
    while service.service.health()["admitted"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    code, doc = _run(service, [{"source": "print(1)"}])
    assert code == 503 and doc["error"] == "overloaded", doc
    assert time.monotonic() - t0 < 1.0
    assert _request(service, "GET", "/healthz")[1]["admitted"] == 4  # health answers while full
    t.join(30)
    assert [v["status"] for v in first["r"][1]["verdicts"]] == ["timeout"] * 4
    assert _run(service, [{"source": "print(1)"}])[0] == 200  # and admits again once drained


def test_a_batch_larger_than_the_capacity_is_refused_not_deadlocked(service):
    code, doc = _run(service, [{"source": "print(1)"}] * 5)  # capacity 4: never admissible, so not a 503
    assert code == 413 and "capacity 4" in doc["reason"]


def test_parse_request_is_pure():
    progs = parse_request(b'{"programs": [{"source": "print(1)", "stdin": "x", "timeout_s": 1, "memory_mb": 128}]}')
    assert (progs[0].source, progs[0].stdin, progs[0].timeout_s, progs[0].memory_mb) == ("print(1)", b"x", 1.0, 128)


def test_serve_cli_bad_input_is_one_line_exit_2():
    for args in (["--port", "99999"], ["--workers", "0"], ["--queue", "x"]):
        p = subprocess.run([sys.executable, "-m", "r1zero.cli", "sandbox", "serve", *args], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("r1zero: error:") and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


def test_connections_beyond_the_limit_get_overloaded_at_accept():
    import socket

    srv = make_server("127.0.0.1", 0, workers=1, queue=0, max_connections=2)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]  # hold both slots
    try:
        time.sleep(0.2)
        code, doc = _request(srv, "GET", "/healthz")
        assert code == 503 and doc["error"] == "overloaded" and "connections" in doc["reason"]
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert _request(srv, "GET", "/healthz")[0] == 200  # slots come back when clients leave
    finally:
        srv.shutdown()
        srv.server_close()
        srv.service.close()


def test_close_server_waits_for_running_answers_and_drops_queued_ones():
    """The shutdown path of ``sandbox serve``: the running program's answer is written before
    ``close_server`` returns (handler threads are daemons, so the process may exit right after);
    a program still queued is answered ``overloaded`` for its client to retry elsewhere."""
    from r1zero.sandbox.service import close_server

    srv = make_server("127.0.0.1", 0, workers=1, queue=1)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    out: dict = {}
    running = threading.Thread(target=lambda: out.update(
        running=_run(srv, [{"source": "import time; time.sleep(1.5); print('done')", "timeout_s": 5}])))
    running.start()
    deadline = time.monotonic() + 30
    while srv.service.health()["admitted"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = threading.Thread(target=lambda: out.update(queued=_run(srv, [{"source": "print(1)"}])))
    queued.start()
    while srv.service.health()["admitted"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.shutdown()
    close_server(srv)
    assert srv.service._responding == 0  # every answer written: none left for a dying process
    running.join(10)
    queued.join(10)
    code, doc = out["running"]
    assert code == 200 and doc["verdicts"][0]["stdout"] == "done\n", doc
    code, doc = out["queued"]
    assert code == 503 and doc["error"] == "overloaded", doc
