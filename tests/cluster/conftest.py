"""A loopback fake of the few Kubernetes API endpoints kubeflow-training's TrainingClient uses.

It serves real HTTP on 127.0.0.1 so the whole client stack (kubernetes ApiClient, urllib3,
TrainingClient's thread pool and deserialisation) runs unmodified. A scenario scripts how the
job's conditions and the master pod's log evolve with each GET of the job.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

JOBS = re.compile(r"^/apis/(?:kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs"
                  r"|trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs)(?:/([^/?]+))?")
CMS = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/?]+)/log)?")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events")


class FakeK8s:
    def __init__(self, conditions: list[list[str]], logs: list[str], fail_message: str = "replica exited 1"):
        self.conditions = conditions  # per GET of the job: the condition types, in order
        self.logs = logs  # per GET of the job: the master log so far
        self.fail_message = fail_message
        self.jobs: dict[str, dict] = {}
        self.configmaps: list[dict] = []
        self.deleted: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.gets = 0
        self.crds: list[dict] = []  # served at /apis/apiextensions.k8s.io/v1/customresourcedefinitions
        self.stamps: list[float] = []  # when each master log line first appeared (the kubelet's timestamp)
        self.log_queries: list[dict] = []  # query of every pods/log GET
        self.log_bytes: list[int] = []  # body size of every pods/log answer

    def log_answer(self, query: dict) -> str:
        """pods/log as the API server answers: ``sinceSeconds`` cuts by the kubelet timestamp,
        ``timestamps=true`` prefixes each line with its RFC3339Nano time (trailing zeros trimmed)."""
        lines = self.log_now().splitlines()
        now = time.time()
        self.stamps += [now] * (len(lines) - len(self.stamps))
        since = float(query["sinceSeconds"][0]) if "sinceSeconds" in query else None
        out = []
        for line, ts in zip(lines, self.stamps, strict=False):
            if since is not None and ts < now - since:
                continue
            if query.get("timestamps", ["false"])[0] in ("1", "t", "T", "true", "True", "TRUE"):  # Go ParseBool
                d = datetime.fromtimestamp(ts, UTC)
                frac = f"{int(ts * 1e9) % 10**9:09d}".rstrip("0")
                line = d.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z " + line
            out.append(line + "\n")
        body = "".join(out)
        self.log_queries.append(query)
        self.log_bytes.append(len(body))
        return body

    def job_view(self, name: str) -> dict:
        i = min(self.gets, len(self.conditions) - 1)
        self.gets += 1
        job = dict(self.jobs[name])
        trainjob = job.get("kind") == "TrainJob"  # Trainer v2 condition types: Complete / Failed
        conds = [{"type": "Complete" if trainjob and t == "Succeeded" else t, "status": "True",
                  "reason": f"{job.get('kind', 'PyTorchJob')}{t}",
                  "message": self.fail_message if t == "Failed" else f"job is {t.lower()}",
                  "lastTransitionTime": "2026-01-01T00:00:00Z", "lastUpdateTime": "2026-01-01T00:00:00Z"}
                 for t in self.conditions[i]]
        job["status"] = {"conditions": conds, "replicaStatuses": {}}
        return job

    def log_now(self) -> str:
        return self.logs[min(max(self.gets - 1, 0), len(self.logs) - 1)]


def _handler(state: FakeK8s):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body, ctype="application/json"):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_POST(self):  # noqa: N802
            state.requests.append(("POST", self.path))
            if JOBS.match(self.path):
                job = self._body()
                state.jobs[job["metadata"]["name"]] = job
                return self._send(201, job)
            if CMS.match(self.path):
                cm = self._body()
                if any(c["metadata"]["name"] == cm["metadata"]["name"] for c in state.configmaps):
                    return self._send(409, {"kind": "Status", "reason": "AlreadyExists", "code": 409})
                state.configmaps.append(cm)
                return self._send(201, cm)
            self._send(404, {"kind": "Status", "code": 404})

        def do_GET(self):  # noqa: N802
            state.requests.append(("GET", self.path))
            if (m := JOBS.match(self.path)) and m.group(3):
                if m.group(3) not in state.jobs:
                    return self._send(404, {"kind": "Status", "code": 404})
                return self._send(200, state.job_view(m.group(3)))
            if (m := PODS.match(self.path)) and m.group(2):
                return self._send(200, state.log_answer(parse_qs(urlparse(self.path).query)), "text/plain")
            if m := PODS.match(self.path):
                name = next(iter(state.jobs), "job")
                trainjob = state.jobs.get(name, {}).get("kind") == "TrainJob"
                pod = {"metadata": {"name": f"{name}-node-0-0" if trainjob else f"{name}-master-0",
                                    "namespace": m.group(1),
                                    "labels": {"jobset.sigs.k8s.io/jobset-name" if trainjob
                                               else "training.kubeflow.org/job-name": name}},
                       "status": {"phase": "Running"}}
                return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod]})
            if self.path.startswith("/apis/apiextensions.k8s.io/v1/customresourcedefinitions"):
                return self._send(200, {"kind": "CustomResourceDefinitionList", "apiVersion": "apiextensions.k8s.io/v1",
                                        "metadata": {}, "items": state.crds})
            if EVENTS.match(self.path):
                return self._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []})
            self._send(404, {"kind": "Status", "code": 404})

        def do_DELETE(self):  # noqa: N802
            state.requests.append(("DELETE", self.path))
            if (m := JOBS.match(self.path)) and m.group(3):
                state.deleted.append(m.group(3))
                state.jobs.pop(m.group(3), None)
                return self._send(200, {"kind": "Status", "status": "Success"})
            self._send(404, {"kind": "Status", "code": 404})

    return H


@pytest.fixture
def fake_k8s():
    """Factory: fake_k8s(conditions, logs) -> (FakeK8s, kubernetes Configuration for it)."""
    servers = []

    def start(conditions, logs, **kw):
        from kubernetes import client

        state = FakeK8s(conditions, logs, **kw)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{srv.server_address[1]}"
        return state, conf

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()
