"""The hostile catalogue THROUGH the sandbox service while the service runs as its manifest says:
the runtime image, uid 10001, every capability dropped, no new privileges, read-only root with a
256 MiB tmpfs at /tmp, pids and memory limits, on an internal Docker network with no route out
(r1zero/cluster/sandbox_manifests.py). The test process plays the trainer: it holds a canary
secret in its environment and talks to the service only over HTTP.

Checks: every program's status is one the catalogue allows; the batch ends within its bound;
nothing the programs started is left in the container; a canary file the service's uid could
write survives; nothing connects to a listener on the host's side of the network; the container
has no route out; the trainer's secret is in no output; the service is healthy afterwards.

    .venv/bin/python -m pytest tests/sandbox/test_service_container.py -q     # needs Docker (.ci/run starts it)
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
import uuid

import pytest

from r1zero.cluster.render import RUN_AS
from r1zero.config import Config
from r1zero.sandbox.client import SandboxClient
from r1zero.sandbox.hostile import HOSTILE, render
from r1zero.sandbox.runner import STARTUP_GRACE_S

TIMEOUT_S = 1.0
SECRET_NAME, SECRET_VALUE = "R1ZERO_TRAINER_SECRET", "trainer-s3cr3t-5d2e-never-in-a-verdict"
CANARY = "/tmp/outside/canary.txt"  # on the service's own writable tmpfs: only the sandbox protects it


def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def contained_service(runtime_image):
    """The service container as the manifest runs it; yields (client, container id, gateway ip)."""
    s = Config().sandbox
    net = f"r1zero-sbx-{uuid.uuid4().hex[:8]}"
    _docker("network", "create", "--internal", net)
    cid = None
    try:
        cid = _docker(
            "run", "-d", "--rm", "--network", net, "--user", f"{RUN_AS}:{RUN_AS}", "--read-only",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--pids-limit", "256",
            "--memory", "3g", "--cpus", str(s.workers), "--tmpfs", f"/tmp:rw,size={s.tmp_size.removesuffix('i')},mode=1777",
            "-e", "HOME=/tmp", "-e", "TMPDIR=/tmp", "-e", "PYTHONDONTWRITEBYTECODE=1",
            runtime_image, "sandbox", "serve", "--port", str(s.port), "--workers", str(s.workers),
            "--queue", str(s.queue)).stdout.strip()
        info = json.loads(_docker("inspect", cid).stdout)[0]["NetworkSettings"]["Networks"][net]
        client = SandboxClient(f"http://{info['IPAddress']}:{s.port}", retries=6, backoff_s=0.5)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, _docker("logs", cid, check=False).stderr[-500:]
                time.sleep(0.5)
        yield client, cid, info["Gateway"]
    finally:
        if cid:
            _docker("rm", "-f", cid, check=False)
        _docker("network", "rm", net, check=False)


def _processes(cid: str) -> list[str]:
    out = _docker("top", cid, "-eo", "pid,user,args").stdout.splitlines()[1:]
    return [ln for ln in out if ln.strip()]


def test_the_container_is_what_the_manifest_says(contained_service):
    client, cid, _ = contained_service
    cfg = json.loads(_docker("inspect", cid).stdout)[0]["HostConfig"]
    assert cfg["ReadonlyRootfs"] and cfg["CapDrop"] == ["ALL"] and cfg["PidsLimit"] == 256
    uid = _docker("exec", cid, "python3", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split()
    assert uid == [str(RUN_AS)] * 2
    # no route out: an outside address is unreachable from inside the service's container
    p = _docker("exec", cid, "python3", "-c",
                "import socket; socket.create_connection(('1.1.1.1', 443), timeout=3)", check=False)
    assert p.returncode != 0 and ("unreachable" in p.stderr or "timed out" in p.stderr), p.stderr[-300:]
    # the read-only root
    p = _docker("exec", cid, "sh", "-c", "echo x > /etc/r1zero-test", check=False)
    assert p.returncode != 0 and "Read-only file system" in p.stderr
    assert client.health()["status"] == "ok"


@pytest.mark.slow  # the whole catalogue in the container (~40 s with 2 workers)
@pytest.mark.timeout(2400)  # the fixture may build the images cold (tests/conftest.py)
def test_hostile_catalogue_through_the_contained_service(contained_service, monkeypatch):
    client, cid, gateway = contained_service
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)  # the trainer's secret
    _docker("exec", cid, "sh", "-c", f"mkdir -p -m 777 /tmp/outside && echo intact > {CANARY} && chmod 666 {CANARY}")
    listener = socket.socket()
    listener.bind((gateway, 0))  # the host's side of the service's network: what a program could reach
    listener.listen(16)
    listener.setblocking(False)
    before = _processes(cid)
    names = sorted(HOSTILE)
    sources = [render(HOSTILE[n], canary=CANARY, secret_name=SECRET_NAME, port=listener.getsockname()[1])
               for n in names]
    # the network programs aim at the host's listener, not the container's own loopback
    sources = [s.replace('"127.0.0.1"', repr(gateway)) for s in sources]
    t0 = time.monotonic()
    results = client.run_many(sources, timeout_s=TIMEOUT_S)
    wall = time.monotonic() - t0
    try:
        for name, res in zip(names, results):
            assert res.status in HOSTILE[name].allowed, (name, res.status, res.stderr[-300:])
            assert res.seconds <= TIMEOUT_S + STARTUP_GRACE_S + 1.0, (name, res.seconds)
            assert SECRET_VALUE not in res.stdout + res.stderr, name
        bound = math.ceil(len(names) / client.health()["workers"]) * (TIMEOUT_S + STARTUP_GRACE_S + 1.0) + 10.0
        assert wall <= bound, (wall, bound)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected
        assert _docker("exec", cid, "cat", CANARY).stdout == "intact\n"
        # nothing the programs started outlives its deadline: only the server is left
        time.sleep(0.5)
        after = _processes(cid)
        assert len(after) == len(before) == 1 and "sandbox serve" in after[0], (before, after)
        # the service is healthy and still answers correctly
        h = client.health()
        assert h["status"] == "ok" and h["admitted"] == 0
        assert client.run("print(sum(range(10)))").stdout == "45\n"
        assert os.getppid() > 1
    finally:
        listener.close()
