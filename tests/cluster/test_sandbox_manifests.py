"""The sandbox service's manifests (r1zero/cluster/sandbox_manifests.py, manifests/base/sandbox.yaml):
non-root, no capabilities, seccomp, read-only root + small tmpfs, limits, no credentials, no
egress, ingress only from GRPO and eval pods; the container's command is a valid CLI call."""

from __future__ import annotations

from pathlib import Path

import yaml

from r1zero.cluster.render import RUN_AS
from r1zero.cluster.sandbox_manifests import sandbox_objects, sandbox_url
from r1zero.config import Config, load_config

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"


def _by_kind(objs):
    return {o["kind"]: o for o in objs}


def test_checked_in_base_has_the_sandbox():
    docs = [d for d in yaml.safe_load_all((MANIFESTS / "base" / "sandbox.yaml").read_text()) if d]
    assert docs == sandbox_objects(Config())
    assert "sandbox.yaml" in yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())["resources"]


def test_pod_is_locked_down():
    d = _by_kind(sandbox_objects(Config()))["Deployment"]
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == RUN_AS != 0 and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and not sc["privileged"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} == pod["securityContext"]["seccompProfile"]
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert not pod["hostNetwork"] and not pod["hostPID"] and not pod["hostIPC"]
    # the only writable place is a small memory tmpfs at /tmp
    assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}}]
    lim = c["resources"]["limits"]
    assert lim == c["resources"]["requests"] and lim["memory"] == "3Gi" and lim["cpu"] == "2"
    # no credentials of any kind
    text = yaml.safe_dump(sandbox_objects(Config()))
    for word in ("secretKeyRef", "secretRef", "AWS_", "envFrom", "secret:"):
        assert word not in text
    assert {e["name"] for e in c["env"]} == {"HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE"}
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_network_policy_denies_egress_and_admits_only_grpo_and_eval():
    objs = _by_kind(sandbox_objects(Config()))
    np = objs["NetworkPolicy"]["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"] and np["egress"] == []
    assert np["podSelector"]["matchLabels"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]
    (rule,) = np["ingress"]
    (peer,) = rule["from"]
    assert "namespaceSelector" not in peer and "ipBlock" not in peer
    assert peer["podSelector"]["matchExpressions"][0]["values"] == ["grpo", "eval"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert objs["Service"]["spec"]["selector"] == objs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_container_command_is_a_valid_serve_call_and_follows_the_config():
    import argparse

    from r1zero.sandbox.cli import register

    cfg = load_config(None, ["sandbox.workers=4", "sandbox.queue=16", "sandbox.port=9000", "sandbox.replicas=3"])
    d = _by_kind(sandbox_objects(cfg))["Deployment"]
    (c,) = d["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["r1zero"] and d["spec"]["replicas"] == 3
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(c["args"])
    assert (args.port, args.workers, args.queue) == (9000, 4, 16)
    assert c["resources"]["limits"]["cpu"] == "4"
    assert sandbox_url(cfg) == "http://r1zero-sandbox.r1zero.svc:9000"
    assert load_config(None, [f"sandbox.url={sandbox_url(cfg)}"]).sandbox.url == sandbox_url(cfg)
