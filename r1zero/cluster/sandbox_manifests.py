"""The code-reward sandbox service in the cluster: ServiceAccount, Deployment, Service, NetworkPolicy.

    from r1zero.cluster.sandbox_manifests import sandbox_objects, sandbox_url
    sandbox_objects(cfg)        # the objects of manifests/base/sandbox.yaml (r1zero/cluster/tree.py)
    sandbox_url(cfg)            # http://r1zero-sandbox.r1zero.svc:8080 -> set it as sandbox.url

A separate Deployment + Service rather than a sidecar in the training pods, because a sidecar
shares its pod's network namespace, service account, volumes and NetworkPolicy: model-written
code would run next to the trainer's S3 credentials (the env of a neighbouring container is in
/proc when the pod shares its process namespace) with the trainer's egress to the object store.
In its own pod it gets its own policy (no egress at all, ingress only from GRPO and eval pods), no
credentials, no service-account token, its own memory limit (a memory bomb kills the sandbox pod,
not a training rank) and its own replica count, and one sandbox serves every rank.

The pod (``sandbox.*`` in the config): the runtime image as the non-root uid of every pod
(:data:`r1zero.cluster.render.RUN_AS`), all capabilities dropped, no privilege escalation,
seccomp ``RuntimeDefault``, read-only root filesystem with a memory-backed ``/tmp`` of
``sandbox.tmp_size`` (the programs' fresh directories), CPU = ``sandbox.workers``, memory
``sandbox.memory``, no service links, probes on ``/healthz``. Process count: Kubernetes has no
per-pod pids field; the kubelet's ``podPidsLimit`` caps every pod of the node, and inside the pod
the sandbox's own ``RLIMIT_NPROC`` (per uid) bounds a fork bomb (docs/sandbox.md).
"""

from __future__ import annotations

from r1zero.cluster.render import PART_OF, RUN_AS

NAME = "r1zero-sandbox"
COMPONENT = "sandbox"
CLIENT_COMPONENTS = ["grpo", "eval"]  # the pods that score code (r1zero.grpo.rewards, r1zero.eval)
WAVE = "argocd.argoproj.io/sync-wave"
CHECKOV_SKIPS = {
    "checkov.io/skip1": "CKV_K8S_43=images pinned by release tag in r1zero/images.py; digest known only after push",
}


def sandbox_url(cfg) -> str:
    return f"http://{NAME}.{cfg.cluster.namespace}.svc:{cfg.sandbox.port}"


def _meta(cfg, **extra) -> dict:
    return {"name": NAME, "namespace": cfg.cluster.namespace,
            "labels": {**PART_OF, "app.kubernetes.io/component": COMPONENT}, **extra}


def deployment(cfg) -> dict:
    s = cfg.sandbox
    labels = {**PART_OF, "app.kubernetes.io/component": COMPONENT}
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2}
    res = {"cpu": str(s.workers), "memory": s.memory, "ephemeral-storage": "64Mi"}
    container = {
        "name": "sandbox", "image": cfg.cluster.runtime_image, "imagePullPolicy": "Always",
        "command": ["r1zero"],
        "args": ["sandbox", "serve", "--port", str(s.port), "--workers", str(s.workers), "--queue", str(s.queue)],
        # nothing else: no secret, no config, no service links (enableServiceLinks below)
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"},
                {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "ports": [{"name": "http", "containerPort": s.port, "protocol": "TCP"}],
        "readinessProbe": {**probe, "initialDelaySeconds": 2},
        "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 3},
        "resources": {"requests": dict(res), "limits": dict(res)},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
                            "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod = {
        "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/inject": "false", **CHECKOV_SKIPS}},
        "spec": {
            "serviceAccountName": NAME, "automountServiceAccountToken": False, "enableServiceLinks": False,
            "hostNetwork": False, "hostPID": False, "hostIPC": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 40,  # > the service's 30 s program cap: in-flight programs finish
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": s.tmp_size}}],
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(cfg, annotations={WAVE: "1", **CHECKOV_SKIPS}),
            "spec": {"replicas": s.replicas, "selector": {"matchLabels": labels},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": pod}}


def service(cfg) -> dict:
    labels = {**PART_OF, "app.kubernetes.io/component": COMPONENT}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(cfg, annotations={WAVE: "1"}),
            "spec": {"type": "ClusterIP", "selector": labels,
                     "ports": [{"name": "http", "port": cfg.sandbox.port, "targetPort": "http", "protocol": "TCP"}]}}


def network_policy(cfg) -> dict:
    """No egress at all (not even DNS: the service resolves nothing); ingress only from the GRPO
    and eval pods of this namespace, on the service port."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(cfg, annotations={WAVE: "0"}),
            "spec": {
                "podSelector": {"matchLabels": {**PART_OF, "app.kubernetes.io/component": COMPONENT}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": dict(PART_OF), "matchExpressions": [
                    {"key": "app.kubernetes.io/component", "operator": "In", "values": CLIENT_COMPONENTS}]}}],
                    "ports": [{"protocol": "TCP", "port": cfg.sandbox.port}]}],
                "egress": [],
            }}


def service_account(cfg) -> dict:
    """Its own identity with no Role bound and no token mounted: the sandbox cannot call the API."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(cfg, annotations={WAVE: "0"}),
            "automountServiceAccountToken": False}


def sandbox_objects(cfg) -> list[dict]:
    return [service_account(cfg), network_policy(cfg), deployment(cfg), service(cfg)]
