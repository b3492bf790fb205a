"""Tests for r1zero.cluster.events: the Event body, and a real POST through the kubernetes client.

The API server is a loopback HTTP fake (127.0.0.1) that records what the client sends, so the
client's serialisation and request path run unmodified.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from r1zero.cluster.events import build_event, emit_k8s_event, k8s_event_callback

EVENT = {"run": "seed1", "metric": "eval/accuracy/math", "kind": "aha", "step": 60.0, "before": 0.3, "after": 0.6,
         "width_steps": 2.5, "score": 14.2, "detected_at": 70.0, "lag_steps": 10.0}


class _Recorder(BaseHTTPRequestHandler):
    posts: list = []
    status = 201

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append((self.path, body))
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        reply = dict(body) if type(self).status < 300 else {"kind": "Status", "code": type(self).status}
        self.wfile.write(json.dumps(reply).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def api():
    from kubernetes import client

    _Recorder.posts = []
    _Recorder.status = 201
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    conf = client.Configuration(host=f"http://127.0.0.1:{srv.server_address[1]}")
    try:
        yield client.CoreV1Api(client.ApiClient(conf))
    finally:
        srv.shutdown()
        srv.server_close()


def test_build_event_body():
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ev = build_event(EVENT, "r1zero-grpo", "ml", uid="u-1", now=now)
    assert ev.involved_object.kind == "PyTorchJob" and ev.involved_object.name == "r1zero-grpo"
    assert ev.involved_object.api_version == "kubeflow.org/v1" and ev.involved_object.uid == "u-1"
    assert ev.reason == "AhaMoment" and ev.type == "Normal" and ev.count == 1
    assert "eval/accuracy/math" in ev.message and "step 60" in ev.message and "10 steps later" in ev.message
    assert ev.metadata.generate_name.startswith("r1zero-grpo.") and ev.metadata.namespace == "ml"
    assert ev.first_timestamp == now and ev.source.component == "r1zero-insight"


def test_emit_posts_through_the_client(api):
    emit_k8s_event(EVENT, "r1zero-grpo", "ml", api=api)
    (path, body), = _Recorder.posts
    assert path == "/api/v1/namespaces/ml/events"
    assert body["involvedObject"] == {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "r1zero-grpo",
                                      "namespace": "ml"}
    assert body["reason"] == "AhaMoment" and body["metadata"]["labels"]["r1zero.io/event-kind"] == "aha"
    assert body["firstTimestamp"].startswith("20")


def test_callback_never_raises_on_api_errors(api, caplog):
    _Recorder.status = 403
    cb = k8s_event_callback("r1zero-grpo", "ml", api=api)
    cb(EVENT)  # RBAC refusal: logged, training goes on
    assert len(_Recorder.posts) == 1 and "could not post" in caplog.text
