"""Kubernetes Events for insight detections: ``kubectl describe pytorchjob <job>`` shows the aha moment.

    from r1zero.cluster.events import k8s_event_callback
    det = StreamingDetector(cfg.insight, on_event=[k8s_event_callback("r1zero-grpo", "r1zero")])

:func:`build_event` turns an insight event (the dict of :mod:`r1zero.insight.streaming`) into a
core/v1 Event whose ``involvedObject`` is the training job; :func:`emit_k8s_event` posts it with
the kubernetes client. This lives in ``r1zero/cluster/`` because only this package may import
kubernetes; core code only sees the callback.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket

log = logging.getLogger(__name__)

REASONS = {"jump": "MetricJump", "knee": "LossKnee", "reflection": "ReflectionRise",
           "length_growth": "LengthGrowth", "aha": "AhaMoment"}
COMPONENT = "r1zero-insight"


def _message(e: dict) -> str:
    run = "" if e.get("run") in (None, "", "default") else f" (run {e['run']})"
    lag = f", detected {e['lag_steps']:.0f} steps later" if "lag_steps" in e else ""
    return (f"{e['kind']} in {e['metric']}{run} at step {e['step']:.0f}: {e['before']:.4g} -> {e['after']:.4g} "
            f"over {e['width_steps']:.1f} steps, score {e['score']:.1f}{lag}")[:1024]


def build_event(e: dict, job_name: str, namespace: str, kind: str = "PyTorchJob", api_version: str = "kubeflow.org/v1",
                uid: str | None = None, now: dt.datetime | None = None):
    """A ``CoreV1Event`` (kubernetes client model) describing insight event ``e`` on the job."""
    from kubernetes import client

    now = now or dt.datetime.now(dt.UTC)
    return client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{job_name}.insight-", namespace=namespace,
                                     labels={"app.kubernetes.io/component": COMPONENT,
                                             "r1zero.io/event-kind": e["kind"]}),
        involved_object=client.V1ObjectReference(kind=kind, api_version=api_version, name=job_name,
                                                 namespace=namespace, uid=uid),
        reason=REASONS.get(e["kind"], "Insight"),
        message=_message(e),
        type="Normal",
        count=1,
        first_timestamp=now,
        last_timestamp=now,
        event_time=now.replace(microsecond=now.microsecond),
        action="Detected",
        reporting_component=COMPONENT,
        reporting_instance=os.environ.get("HOSTNAME") or socket.gethostname(),
        source=client.V1EventSource(component=COMPONENT),
    )


def emit_k8s_event(e: dict, job_name: str, namespace: str, api=None, **kw):
    """Post the Event for ``e``; ``api`` is a ``CoreV1Api`` (default: in-cluster or kubeconfig)."""
    if api is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CoreV1Api()
    body = build_event(e, job_name, namespace, **kw)
    return api.create_namespaced_event(namespace, body)


def k8s_event_callback(job_name: str, namespace: str, api=None, **kw):
    """A streaming-detector callback posting each event; API errors are logged, never raised.

    Training must not die because the Events API refused a write (RBAC, API server hiccup).
    """
    from kubernetes.client.rest import ApiException

    def cb(e: dict) -> None:
        try:
            emit_k8s_event(e, job_name, namespace, api=api, **kw)
        except (ApiException, OSError) as err:
            log.warning("insight: could not post Kubernetes Event for %s: %s", e.get("kind"), err)

    return cb
