"""The sandbox-service client: batching, retries with backoff, the circuit breaker, metrics, the
verifier and reward paths through it, ``r1zero sandbox run --server``.

    .venv/bin/python -m pytest tests/sandbox/test_client.py -q
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from r1zero.config import RewardConfig, SandboxConfig
from r1zero.grpo.rewards import RewardScorer
from r1zero.sandbox import client as client_mod
from r1zero.sandbox.client import REGISTRY, UNAVAILABLE, SandboxClient, verify_many_for
from r1zero.sandbox.service import MAX_PROGRAM_BYTES, make_server
from r1zero.train.dist import free_port
from r1zero.verify import verify_many

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _serve(port: int = 0, workers: int = 2, queue: int = 8):
    srv = make_server("127.0.0.1", port, workers=workers, queue=queue)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def _stop(srv) -> None:
    srv.shutdown()
    srv.server_close()
    srv.service.close()


@pytest.fixture()
def service():
    srv = _serve()
    yield srv
    _stop(srv)


def _sample(name: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_run_many_batches_and_keeps_order(service):
    c = SandboxClient(f"http://127.0.0.1:{service.port}", batch_size=3)
    sources = [f"print({i} * {i})" for i in range(8)] + ["import time; time.sleep(9)"]
    before = _sample("r1zero_sandbox_request_duration_seconds_count")
    res = c.run_many(sources, timeout_s=0.5)
    assert [r.stdout for r in res[:8]] == [f"{i * i}\n" for i in range(8)]
    assert res[8].status == "timeout"
    assert c.attempts == 3  # 9 programs in batches of 3, no retries
    assert _sample("r1zero_sandbox_request_duration_seconds_count") - before == 3


def test_oversized_program_is_a_local_error_and_the_rest_still_run(service):
    c = SandboxClient(f"http://127.0.0.1:{service.port}")
    res = c.run_many(["#" * (MAX_PROGRAM_BYTES + 1), "print('fine')"], timeout_s=1.0)
    assert res[0].status == "error" and "over the service's limit" in res[0].stderr
    assert res[1].stdout == "fine\n"


def test_dead_service_opens_the_circuit_with_one_log_line(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    c = SandboxClient(url, retries=2, backoff_s=0.01, breaker_failures=2, breaker_reset_s=60)
    open_before = _sample("r1zero_sandbox_client_errors_total", {"kind": "circuit_open"})
    with caplog.at_level(logging.WARNING, logger="r1zero.sandbox.client"):
        t0 = time.monotonic()
        for _ in range(6):
            res = c.run_many(["print(1)", "print(2)"], timeout_s=1.0)
            assert [r.status for r in res] == [UNAVAILABLE] * 2
        wall = time.monotonic() - t0
    assert wall < 3.0, wall  # no hang: 2 batches x 3 tries of refused connections, then immediate answers
    assert c.attempts == 6 and c.circuit_open()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "circuit open" in errors[0].getMessage() and url in errors[0].getMessage()
    assert _sample("r1zero_sandbox_client_errors_total", {"kind": "circuit_open"}) - open_before == 4
    assert _sample("r1zero_sandbox_circuit_open") == 1.0
    # the verifier turns it into sandbox_error verdicts, never raising
    item = {"id": "c", "domain": "code", "answer": "3",
            "meta": json.dumps({"kind": "find_input", "source": "def f(x):\n    return x\n", "output": 3})}
    v = verify_many([item], ["3"], timeout_s=1.0, run_many=c.run_many)
    assert v[0].status == "sandbox_error" and "circuit open" in v[0].detail


def test_circuit_half_opens_and_closes_when_the_service_returns(caplog):
    port = free_port()
    c = SandboxClient(f"http://127.0.0.1:{port}", retries=0, backoff_s=0.01, breaker_failures=1, breaker_reset_s=0.5)
    assert c.run("print(1)").status == UNAVAILABLE and c.circuit_open()
    srv = _serve(port)
    try:
        assert c.run("print(1)").status == UNAVAILABLE  # still open: not even tried
        time.sleep(0.6)
        with caplog.at_level(logging.WARNING, logger="r1zero.sandbox.client"):
            assert c.run("print(1)").stdout == "1\n"
        assert not c.circuit_open() and any("circuit closed" in r.getMessage() for r in caplog.records)
    finally:
        _stop(srv)


def test_overloaded_is_retried_with_backoff_until_admitted():
    srv = _serve(workers=1, queue=0)
    try:
        c = SandboxClient(f"http://127.0.0.1:{srv.port}", retries=6, backoff_s=0.1)
        t = threading.Thread(target=lambda: SandboxClient(f"http://127.0.0.1:{srv.port}").run(
            "import time; time.sleep(1)", timeout_s=3.0))
        t.start()
        while srv.service.health()["admitted"] == 0:
            time.sleep(0.01)
        before = _sample("r1zero_sandbox_client_errors_total", {"kind": "overloaded"})
        res = c.run("print('after')", timeout_s=1.0)
        t.join()
        assert res.stdout == "after\n" and c.attempts >= 2
        assert _sample("r1zero_sandbox_client_errors_total", {"kind": "overloaded"}) > before
    finally:
        _stop(srv)


def test_rejected_request_is_not_retried_and_does_not_open_the_circuit(service):
    c = SandboxClient(f"http://127.0.0.1:{service.port}", breaker_failures=1)
    res = c.run_many(["print(1)"], timeout_s=1e6)  # over the service's max timeout: 400
    assert res[0].status == UNAVAILABLE and "timeout_s must be in" in res[0].stderr
    assert c.attempts == 1 and not c.circuit_open()


def test_reward_scorer_through_the_service_and_cache_skips_sandbox_errors(service):
    def item(i, src, out):
        return {"id": f"c{i}", "domain": "code", "answer": str(out),
                "meta": json.dumps({"kind": "find_input", "source": src, "func": "f", "output": out})}

    items = [item(0, "def f(x):\n    return 2 * x + 1\n", 7), item(1, "def f(x):\n    return x * x\n", 16)]
    texts = [" ok </think> <answer> 3 </answer>", " ok </think> <answer> 5 </answer>"]
    cfg = SandboxConfig(url=f"http://127.0.0.1:{service.port}", retries=0, breaker_failures=1, breaker_reset_s=0.3)
    client_mod.client_for.cache_clear()
    sc = RewardScorer(RewardConfig(), 16, sandbox=cfg, timeout_s=1.0)
    res = sc.score(items, texts, [8, 8], [False, False])
    assert res.correct == [True, False]
    assert service.service.m_verdicts.labels("ok")._value.get() == 2  # they ran in the service
    # a dead service: sandbox_error verdicts (reward 0) that are not memoised ...
    dead = SandboxConfig(url=f"http://127.0.0.1:{free_port()}", retries=0, breaker_failures=1, breaker_reset_s=0.3)
    sc2 = RewardScorer(RewardConfig(), 16, sandbox=dead, timeout_s=1.0)
    fresh = [item(2, "def f(x):\n    return 2 * x + 1  # not in the verifier's run cache yet\n", 7)]
    assert sc2.score(fresh, texts[:1], [8], [False]).correct == [False]
    assert sc2.score(fresh, texts[:1], [8], [False]).correct == [False]
    assert sc2.verify_calls == 2 and len(sc2._cache) == 0
    # ... so once a service answers, the same answer is scored right
    sc2.verify_many_fn = verify_many_for(cfg)
    assert sc2.score(fresh, texts[:1], [8], [False]).correct == [True]


def test_verify_many_for_without_url_is_the_local_sandbox():
    assert verify_many_for(SandboxConfig()) is verify_many
    assert verify_many_for(None) is verify_many


def test_cli_run_through_the_server(service, tmp_path):
    prog = tmp_path / "p.py"
    prog.write_text("import sys\nprint(sys.stdin.read().upper())\n")
    stdin = tmp_path / "in.txt"
    stdin.write_text("hi")
    cli = [sys.executable, "-m", "r1zero.cli", "sandbox", "run", str(prog)]
    p = subprocess.run([*cli, "--server", f"http://127.0.0.1:{service.port}", "--stdin", str(stdin)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert list(out) == ["status", "returncode", "stdout", "stderr", "seconds"] and out["stdout"] == "HI\n"
    p = subprocess.run([*cli, "--server", f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("r1zero: error: sandbox run: no verdict from")
    assert len(p.stderr.strip().splitlines()) == 1


def test_reward_latency_and_errors_reach_the_ranks_metrics_endpoint(service):
    import urllib.request

    from r1zero import telemetry
    from r1zero.config import TelemetryConfig

    tel = telemetry.start(TelemetryConfig(port=0, bind="127.0.0.1"), job="sbx", rank=0, stage="grpo")
    try:
        cfg = SandboxConfig(url=f"http://127.0.0.1:{service.port}")
        sc = RewardScorer(RewardConfig(), 16, sandbox=cfg)
        sc.attach_metrics(tel)
        client_mod.from_config(cfg).run_many(["print(1)"], timeout_s=1.0)
        text = urllib.request.urlopen(f"{tel.url}", timeout=10).read().decode()
        assert "r1zero_sandbox_request_duration_seconds_count" in text
        assert "r1zero_sandbox_circuit_open" in text and 'r1zero_sandbox_client_results_total{status="ok"}' in text
        RewardScorer(RewardConfig(), 16).attach_metrics(tel)  # no service: nothing registered, no error
    finally:
        tel.close()


def test_batches_are_cut_to_the_services_capacity():
    srv = _serve(workers=1, queue=2)  # capacity 3
    try:
        c = SandboxClient(f"http://127.0.0.1:{srv.port}", batch_size=32)
        res = c.run_many([f"print({i})" for i in range(7)], timeout_s=1.0)
        assert [r.stdout for r in res] == [f"{i}\n" for i in range(7)]
        assert c.attempts == 3  # 3 + 3 + 1, none refused
    finally:
        _stop(srv)


def test_a_batch_may_run_longer_than_the_connect_timeout():
    # 3 programs of ~0.9 s on one worker: ~3 s of reading, past the 2 s connect timeout
    srv = _serve(workers=1, queue=4)
    try:
        c = SandboxClient(f"http://127.0.0.1:{srv.port}", retries=0)
        t0 = time.monotonic()
        res = c.run_many(["import time; time.sleep(0.9); print('done')"] * 3 + ["print('x')"], timeout_s=2.0)
        assert [r.status for r in res] == ["ok"] * 4, [r.stderr for r in res]
        assert time.monotonic() - t0 > 2.7 and c.attempts == 1
    finally:
        _stop(srv)


def test_eval_scoring_through_the_service(service):
    from r1zero.eval.evaluate import score_problems

    meta = {"kind": "find_input", "source": "def f(x):\n    return 3 * x\n", "func": "f", "output": 12}
    item = {"id": "e0", "domain": "code", "answer": "4", "meta": json.dumps(meta)}
    greedy = (" f(4) = 12 </think> <answer> 4 </answer>", 10, False)
    sampled = [[(" </think> <answer> 5 </answer>", 8, False), (" </think> <answer> 4 </answer>", 8, False)]]
    client_mod.client_for.cache_clear()
    vm = verify_many_for(SandboxConfig(url=f"http://127.0.0.1:{service.port}"))
    (rec,) = score_problems([item], [greedy], sampled, 2, True, ["wait"], verify_many=vm)
    assert rec["pass@1"] == 1.0 and rec["c"] == 1
    assert service.service.m_requests.labels("ok")._value.get() >= 1  # scored by the service
