"""Fixtures for the telemetry tests: free loopback ports, torchrun workers, a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, R1ZERO_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def torchrun():
    """``torchrun(scenario, out_dir, wait=True)``: 2 gloo ranks of dist_worker.py."""
    procs: list[subprocess.Popen] = []

    def run(scenario: str, out: Path, wait: bool = True, timeout: float = 120):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), scenario, str(out)]
        p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        if not wait:
            return p
        text, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, text[-4000:]
        return p

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


class Prometheus:
    """A real ``prometheus`` server on loopback with a temp config and TSDB."""

    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
               "scrape_configs": [{"job_name": "r1zero", "honor_labels": True,
                                   "static_configs": [{"targets": targets}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [shutil.which("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus did not become ready in 30 s")

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    """``prometheus(targets)`` starts a server scraping ``targets`` every second; stopped after."""
    servers: list[Prometheus] = []

    def make(targets: list[str]) -> Prometheus:
        assert shutil.which("prometheus"), "prometheus not installed (apt-get install prometheus)"
        d = tmp_path / f"prom{len(servers)}"
        d.mkdir()
        servers.append(Prometheus(d, targets))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()
