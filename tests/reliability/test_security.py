"""Security posture: no secrets in manifests, logs, metrics or artifacts; S3 credentials only by
secretKeyRef; the launcher's RBAC is namespaced and wildcard-free.

- Rendered manifests (``manifests/``) and the compiled pipeline (``pipelines/*.yaml``) hold no
  literal credential: no AWS key pattern, and every credential-named env var comes from a
  ``secretKeyRef`` to the configured secret; the config tree has no credential fields at all (so a
  ConfigMap rendered from it cannot carry one).
- Canary: real stages (``data mix`` -> S3, ``pretrain`` from/to S3 with telemetry on,
  ``insight detect`` on the S3 metrics, a failing command) run with ``AWS_SECRET_ACCESS_KEY`` and
  ``AWS_ACCESS_KEY_ID`` set to canaries; neither appears in any stdout/stderr, any object written
  to the bucket (artifacts, checkpoints, metrics), the local cache, or the Prometheus exposition of
  a telemetry exporter.
- checkov over the manifests runs in tests/cluster/test_tree.py; RBAC exact resources there too.

    .venv/bin/python -m pytest tests/reliability/test_security.py -q
"""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from relutil import REPO, TINY_DATA, TINY_TRAIN, cli_env, run_cli  # noqa: E402

CANARY_SECRET = "canary-secret-9f8e7d6c5b4a3921-DO-NOT-LEAK"
CANARY_ID = "AKIACANARY7Q2W3E4R5T"
CRED_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
CRED_FIELD = re.compile(r"(secret|password|passwd|access_key|api_key|private_key|credential|auth_token|session_token"
                        r"|^token$)", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
LITERAL_SECRET = re.compile(r"(aws_secret_access_key|secret_access_key|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}",
                            re.I)


def _yaml_files() -> list[Path]:
    return sorted([*(REPO / "manifests").rglob("*.yaml"), *(REPO / "pipelines").glob("*.yaml")])


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _env_entries(doc) -> list[dict]:
    return [e for n in _walk(doc) for e in (n.get("env") or []) if isinstance(n.get("env"), list) and isinstance(e, dict)
            and "name" in e]


def test_no_literal_credentials_in_rendered_manifests_or_pipeline():
    from r1zero.config import Config

    files = _yaml_files()
    assert len(files) >= 20
    secret_name = Config().cluster.s3_secret
    refs = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert not AWS_KEY_ID.search(text), f"{f}: AWS access key id literal"
        assert not LITERAL_SECRET.search(text), f"{f}: literal secret"
        for doc in yaml.safe_load_all(text):
            for e in _env_entries(doc):
                if CRED_NAME.search(e["name"]):
                    assert "value" not in e, f"{f}: env {e['name']} has a literal value"
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    assert ref and ref["name"] == secret_name, f"{f}: env {e['name']} not from secret {secret_name}"
                    refs += 1
            if isinstance(doc, dict) and doc.get("kind") in ("ConfigMap", "Secret"):
                assert doc["kind"] == "ConfigMap", f"{f}: a Secret object is checked in"
                for k, v in (doc.get("data") or {}).items():
                    assert not AWS_KEY_ID.search(str(v)) and not LITERAL_SECRET.search(str(v)), f"{f}: {k}"
    assert refs >= 8  # both S3 variables in every training pod template


def test_config_tree_has_no_credential_fields():
    """Credentials cannot enter a config (and hence a ConfigMap or config_hash): no such field exists."""
    from r1zero.config import Config

    def fields(model, prefix=""):
        for name in type(model).model_fields:
            value = getattr(model, name)
            yield prefix + name
            if hasattr(type(value), "model_fields"):
                yield from fields(value, prefix + name + ".")

    names = list(fields(Config()))
    assert "store.endpoint_url" in names
    # cluster.s3_secret and grpo.rollout.key_secret are *names* of Kubernetes Secrets, not their content
    names_of_secrets = ("cluster.s3_secret", "grpo.rollout.key_secret")
    bad = [n for n in names if CRED_FIELD.search(n.rsplit(".", 1)[-1]) and n not in names_of_secrets]
    assert not bad, bad


def test_launcher_rbac_has_no_wildcards_secrets_or_escalation():
    docs = [d for f in (REPO / "manifests").rglob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d]
    roles = [d for d in docs if d.get("kind") in ("Role", "ClusterRole")]
    assert roles and all(r["kind"] == "Role" for r in roles)  # namespaced only
    assert not [d for d in docs if d.get("kind") == "ClusterRoleBinding"]
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["metadata"]["name"], rule)
            assert not {"secrets", "pods/exec", "pods/attach", "serviceaccounts/token", "roles", "rolebindings"} \
                & set(rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule


# Every Kubernetes API call the launcher makes -> the (apiGroup, resource, verb) it needs.
NEEDED = {
    ("kubeflow.org", "pytorchjobs", "create"): "launch_cluster: TrainingClient.create_job",
    ("kubeflow.org", "pytorchjobs", "get"): "launch_cluster: wait_for_job_conditions -> get_job",
    ("kubeflow.org", "pytorchjobs", "delete"): "launch_cluster: delete_job; components.runtime.delete_run_jobs",
    ("kubeflow.org", "pytorchjobs", "list"): "components.runtime.delete_run_jobs (label selector)",
    ("kubeflow.org", "mpijobs", "list"): "components.runtime.delete_run_jobs (label selector)",
    ("kubeflow.org", "mpijobs", "delete"): "components.runtime.delete_run_jobs",
    ("", "pods", "list"): "launch: TrainingClient.get_job_pods (log streamer, master tail)",
    ("", "pods/log", "get"): "launch: core_api.read_namespaced_pod_log, TrainingClient.get_job_logs",
    ("", "configmaps", "create"): "launch_cluster: create_namespaced_config_map",
    ("trainer.kubeflow.org", "trainjobs", "create"): "launch_trainjob: create_namespaced_custom_object",
    ("trainer.kubeflow.org", "trainjobs", "get"): "launch_trainjob: get_namespaced_custom_object (wait)",
    ("trainer.kubeflow.org", "trainjobs", "list"): "components.runtime.delete_run_jobs (label selector)",
    ("trainer.kubeflow.org", "trainjobs", "delete"): "launch_trainjob; components.runtime.delete_run_jobs",
}


def test_launcher_rbac_is_exactly_what_the_code_calls():
    from r1zero.cluster import launch

    docs = list(yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == set(NEEDED), {"extra": sorted(granted - set(NEEDED)), "missing": sorted(set(NEEDED) - granted)}
    # the code still makes those calls (if one goes away, so must its grant)
    src = Path(launch.__file__).read_text() + (REPO / "components" / "runtime.py").read_text()
    for call in ("create_job", "wait_for_job_conditions", "delete_job", "get_job_pods", "read_namespaced_pod_log",
                 "create_namespaced_config_map", "list_namespaced_custom_object", "delete_namespaced_custom_object"):
        assert call in src, call
    assert launch.JOB_KINDS == {"PyTorchJob"}  # the only kind launch creates on a cluster


@pytest.mark.slow
def test_canary_credentials_never_written(s3_server, s3_bucket, tmp_path):
    env = cli_env(AWS_ACCESS_KEY_ID=CANARY_ID, AWS_SECRET_ACCESS_KEY=CANARY_SECRET, AWS_DEFAULT_REGION="us-east-1",
                  R1ZERO_S3_ENDPOINT=s3_server.endpoint, R1ZERO_CACHE=str(tmp_path / "cache"))
    b = f"s3://{s3_bucket}"
    runs = [
        run_cli("data", "mix", "--config", "configs/tiny.yaml", *TINY_DATA, "--out", f"{b}/data", env=env),
        run_cli("pretrain", "--config", "configs/tiny.yaml", *TINY_TRAIN, "--set", "pretrain.steps=4",
                "--set", "pretrain.checkpoint_every=2", "--set", "telemetry.enabled=true", "--set", "telemetry.port=0",
                "--set", "telemetry.bind=127.0.0.1", "--data", f"{b}/data", "--out", f"{b}/pretrain", env=env),
        run_cli("insight", "detect", "--metrics", f"{b}/pretrain/metrics.jsonl", "--out", tmp_path / "ev.json",
                "--no-plots", env=env),
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    failing = run_cli("data", "show", f"{b}/nothing-here", env=env)
    assert failing.returncode == 2
    logs = "".join(r.stdout + r.stderr for r in [*runs, failing])
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])]
    assert any("checkpoints/step-00000002" in k for k in keys) and any(k.endswith("model.safetensors") for k in keys)
    blobs = {k: client.get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in keys}
    blobs.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    for canary in (CANARY_SECRET, CANARY_ID):
        assert canary not in logs
        leaked = [k for k, v in blobs.items() if canary.encode() in v]
        assert not leaked, (canary, leaked)


def test_telemetry_exposition_holds_no_secret(monkeypatch):
    from r1zero import telemetry
    from r1zero.config import TelemetryConfig

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_ID)
    tel = telemetry.start(TelemetryConfig(enabled=True, port=0, bind="127.0.0.1"), job="canary", rank=0,
                          stage="pretrain", local_rank=0, comm=False)
    try:
        tel.observe_step(0.1, tokens=128, loss=2.0, lr=1e-3, step=1)
        tel.set_gauges(reward=0.5, accuracy=0.25)
        body = urllib.request.urlopen(tel.url, timeout=10).read().decode()
    finally:
        tel.close()
    assert "r1zero_" in body and 'job="canary"' in body
    assert CANARY_SECRET not in body and CANARY_ID not in body
