"""The checked-in manifests/ tree: equal to what the code renders, valid, least privilege, checkov-clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1zero.cluster.render import dump_yaml
from r1zero.cluster.tree import OVERLAYS, tree_files
from r1zero.cluster.validate import load_crds_from_dir, validate_paths

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "crds"
MANIFESTS = ROOT / "manifests"
CHECKOV_PIN = "checkov==3.3.30"
CHECKOV_VENV = ROOT / ".venv-checkov"


def test_checked_in_manifests_equal_rendered():
    rendered = tree_files()
    on_disk = {str(p.relative_to(MANIFESTS)): p.read_text(encoding="utf-8")
               for p in MANIFESTS.rglob("*") if p.is_file()}
    missing = sorted(set(rendered) - set(on_disk))
    extra = sorted(set(on_disk) - set(rendered))
    stale = sorted(k for k in set(rendered) & set(on_disk) if rendered[k] != on_disk[k])
    hint = "regenerate with: r1zero render --all --out manifests"
    assert not missing, f"missing {missing}; {hint}"
    assert not extra, f"not generated {extra}; {hint}"
    assert not stale, f"drifted {stale}; {hint}"


def test_tree_validates_against_crds():
    rep = validate_paths([MANIFESTS], load_crds_from_dir(CRDS))
    assert rep.ok, rep.errors
    assert rep.checked >= 30
    assert sum("kustomization" in n for n in rep.notes) == 1 + len(OVERLAYS)


def test_launcher_rbac_is_least_privilege():
    docs = list(yaml.safe_load_all((MANIFESTS / "base" / "rbac.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ServiceAccount", "ServiceAccount", "Role", "RoleBinding"]  # namespaced, nothing cluster-wide
    # the identity KFP runs the launcher steps under is bound (else create_job gets HTTP 403)
    from r1zero.config import Config

    c = Config().cluster
    assert {"kind": "ServiceAccount", "name": c.kfp_service_account, "namespace": c.kfp_namespace} in \
        docs[3]["subjects"]
    docs = docs[1:]
    rules = docs[1]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    # exactly what launch_cluster and the exit handler call (verbs per rule: tests/reliability/test_security.py)
    assert granted == {("kubeflow.org", "pytorchjobs"), ("kubeflow.org", "mpijobs"), ("trainer.kubeflow.org", "trainjobs"),
                       ("", "pods"), ("", "pods/log"), ("", "configmaps")}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        if rule["resources"][0] in ("pods", "pods/log"):
            assert set(rule["verbs"]) <= {"get", "list", "watch"}


def test_argocd_and_overlays():
    apps = list(yaml.safe_load_all((MANIFESTS / "argocd" / "applications.yaml").read_text()))
    assert {a["spec"]["source"]["path"] for a in apps} == {f"manifests/overlays/{o}" for o in OVERLAYS}
    for a in apps:
        assert "ServerSideApply=true" in a["spec"]["syncPolicy"]["syncOptions"]
    health = yaml.safe_load((MANIFESTS / "argocd" / "argocd-cm-health.yaml").read_text())
    assert "resource.customizations.health.kubeflow.org_PyTorchJob" in health["data"]
    waves = {}
    for f in (MANIFESTS / "base").glob("*.yaml"):
        for d in yaml.safe_load_all(f.read_text()):
            if d and d.get("kind") != "Kustomization":
                waves[d["kind"]] = int(d["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
    assert waves["Namespace"] < waves["Role"] <= waves["ConfigMap"] < waves["PodMonitor"] < waves["CronJob"]
    for overlay in OVERLAYS:
        k = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())
        assert k["resources"] == ["../../base"]
        base_names = {d["metadata"]["name"] for f in (MANIFESTS / "base").glob("*.yaml")
                      for d in yaml.safe_load_all(f.read_text()) if d and "metadata" in d}
        for p in k["patches"]:
            assert p["target"]["name"] in base_names  # every patch hits an object of the base
    a100 = yaml.safe_load((MANIFESTS / "overlays" / "a100-80gb" / "kustomization.yaml").read_text())
    cfg_patch = yaml.safe_load(a100["patches"][0]["patch"])
    assert yaml.safe_load(cfg_patch["data"]["config.yaml"])["cluster"]["gpu"] == "a100-80gb"


def _pods_from_jobs(out: Path) -> int:
    """Each replica's pod template of the reference jobs as a Pod, so checkov (which knows no
    training CRDs) scans the training pods' security posture too."""
    n = 0
    for f in sorted((MANIFESTS / "jobs").rglob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            for key in ("pytorchReplicaSpecs", "mpiReplicaSpecs"):
                for rtype, rs in (d.get("spec", {}).get(key) or {}).items():
                    t = rs["template"]
                    pod = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": f"{d['metadata']['name']}-{rtype.lower()}",
                                        "namespace": d["metadata"]["namespace"], **t["metadata"]},
                           "spec": t["spec"]}
                    (out / f"pod-{f.parent.name}-{f.stem}-{rtype}.yaml").write_text(dump_yaml([pod]))
                    n += 1
    return n


@pytest.mark.slow
def test_checkov_passes_on_manifests(tmp_path):
    """checkov in its own venv (it downgrades `packaging`, which breaks pytest in the main venv)."""
    checkov = CHECKOV_VENV / "bin" / "checkov"
    if not checkov.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True)
        subprocess.run([str(CHECKOV_VENV / "bin" / "pip"), "install", "-q", CHECKOV_PIN], check=True, timeout=900)
    scan = tmp_path / "scan"
    shutil.copytree(MANIFESTS, scan)
    n_pods = _pods_from_jobs(scan)
    assert n_pods == 22  # 2 presets x 3 stages x (PyTorchJob Master[+Worker] + MPIJob Launcher+Worker)
    res = subprocess.run([str(checkov), "-d", str(scan), "--framework", "kubernetes", "--skip-download", "-o", "json"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(res.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert not failed, failed
    assert report["summary"]["passed"] > 1000 and report["summary"]["parsing_errors"] == 0
    # every skip is one of the justified inline annotations
    skip_ids = {c["check_id"] for c in report["results"]["skipped_checks"]}
    assert skip_ids <= {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_35", "CKV_K8S_43"}
    for f in scan.rglob("*.yaml"):
        assert ":latest" not in f.read_text()


def _merge(base, patch):
    """Strategic-merge as kustomize applies it to these objects: maps merge, lists are replaced
    (ConfigMap data and CRD lists carry no merge keys)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return patch


def test_overlays_build_to_valid_objects():
    """No kustomize binary here: apply each overlay's inline patches to the base the way kustomize's
    strategic merge does and validate the built objects."""
    crds = load_crds_from_dir(CRDS)
    base = [d for f in sorted((MANIFESTS / "base").glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]
    from r1zero.cluster.validate import validate_object

    for overlay in OVERLAYS:
        k = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())
        built = []
        for obj in base:
            for p in k["patches"]:
                t = p["target"]
                if obj["kind"] == t["kind"] and obj["metadata"]["name"] == t["name"]:
                    obj = _merge(obj, yaml.safe_load(p["patch"]))
            obj = _merge(obj, {"metadata": {"namespace": k["namespace"]}} if obj["kind"] != "Namespace" else {})
            built.append(obj)
        for obj in built:
            errors, _ = validate_object(obj, crds)
            assert errors == [], (overlay, obj["kind"], errors)
        cm = next(o for o in built if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "r1zero-config")
        from r1zero.config import build_config

        cfg = build_config(yaml.safe_load(cm["data"]["config.yaml"]))  # the pods' config loads
        assert cfg.cluster.gpu == ("cpu" if overlay == "dev-cpu" else overlay)
        pm = next(o for o in built if o["kind"] == "PodMonitor")
        n_ports = 1 if overlay == "dev-cpu" else 8
        assert len(pm["spec"]["podMetricsEndpoints"]) == n_ports


def test_kubectl_kustomize_builds_every_overlay():
    """The real kustomize (kubectl's, v5) builds each overlay; the built objects validate."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize v5) is needed: see .ci/run"
    crds = load_crds_from_dir(CRDS)
    from r1zero.cluster.validate import validate_object

    for overlay in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / "overlays" / overlay)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, (overlay, out.stderr)
        built = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert {d["kind"] for d in built} >= {"Namespace", "Role", "RoleBinding", "NetworkPolicy", "CronJob",
                                              "ConfigMap"}
        for obj in built:
            errors, _ = validate_object(obj, crds)
            assert errors == [], (overlay, obj["kind"], errors)
            assert obj["metadata"].get("namespace", "r1zero") == "r1zero"
            assert obj["metadata"]["labels"]["r1zero/overlay"]


def test_rdma_overlay_namespace_admits_ipc_lock():
    from r1zero.cluster.tree import namespace, overlay_kustomization
    from r1zero.config import Config, load_config

    rdma = load_config(ROOT / "configs" / "a100-13b.yaml", ["cluster.rdma_resource=rdma/ib"])
    assert namespace(rdma)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert namespace(Config())["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    k = overlay_kustomization(Config(), rdma)
    ns_patch = next(yaml.safe_load(p["patch"]) for p in k["patches"] if p["target"]["kind"] == "Namespace")
    assert ns_patch["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_training_egress_is_not_open():
    docs = list(yaml.safe_load_all((MANIFESTS / "base" / "networkpolicy.yaml").read_text()))
    pols = {d["metadata"]["name"]: d["spec"] for d in docs}
    train = pols["r1zero-training"]
    assert {} not in train["egress"] and all(rule.get("to") for rule in train["egress"])
    ports = sorted((p["protocol"], p["port"]) for r in train["egress"] for p in r.get("ports", []))
    assert ports == [("TCP", 53), ("TCP", 443), ("UDP", 53)]  # DNS and the object store; peers on any port
    assert {"podSelector": {}} in train["egress"][0]["to"]
    expr = train["podSelector"]["matchExpressions"][0]
    assert expr["key"] == "app.kubernetes.io/component" and set(expr["values"]) == {"pretrain", "grpo", "eval"}
    retrain = pols["r1zero-retrain"]
    assert retrain["ingress"] == [] and [p["port"] for r in retrain["egress"] for p in r["ports"]] == [53, 53, 8888]


def test_retrain_cronjob_submits_the_packaged_pipeline_with_a_token():
    import tomllib

    from r1zero.cluster.tree import retrain_cronjob
    from r1zero.config import Config

    cj = yaml.safe_load((MANIFESTS / "base" / "cronjob.yaml").read_text())
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    # no --package: the submit default is the compiled pipeline shipped as package data
    assert c["command"] == ["r1zero"] and c["args"][:2] == ["pipeline", "submit"] and "--package" not in c["args"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "r1zero_pipeline.yaml" in pyproject["tool"]["setuptools"]["package-data"]["pipelines"]
    from pipelines.cli import DEFAULT_PACKAGE

    assert DEFAULT_PACKAGE.name == "r1zero_pipeline.yaml" and DEFAULT_PACKAGE.parent.name == "pipelines"
    env = {e["name"]: e for e in c["env"]}
    token = next(v for v in pod["volumes"] if v["name"] == "kfp-token")["projected"]["sources"][0]
    assert token["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "kfp-token")["mountPath"]
    from pipelines.submit import _SA_TOKEN

    assert _SA_TOKEN == f"{mount}/token"  # where kfp's ServiceAccountTokenVolumeCredentials reads it
    assert pod["serviceAccountName"] == "r1zero-retrain" and "KFP_TOKEN" not in env
    cfg = Config()
    cfg.cluster.kfp_token_ref = "kfp-token"
    c2 = retrain_cronjob(cfg)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    ref = {e["name"]: e for e in c2["env"]}["KFP_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "kfp-token", "key": "token"}


def test_docs_create_every_s3_secret_key_the_pipeline_maps():
    """docs/cluster.md's `kubectl create secret` names every key the compiled IR reads from it."""
    import re

    ir = yaml.safe_load_all((ROOT / "pipelines" / "r1zero_pipeline.yaml").read_text())
    keys = set()
    for doc in ir:
        for ex in ((doc or {}).get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
                   .get("executors", {}).values()):
            for sec in ex.get("secretAsEnv", []):
                keys |= {m["secretKey"] for m in sec["keyToEnv"]}
    assert keys >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "R1ZERO_S3_ENDPOINT"}
    doc = (ROOT / "docs" / "cluster.md").read_text()
    cmd = re.search(r"create secret generic r1zero-s3(.*?)`", doc, re.S).group(1)
    assert keys <= set(re.findall(r"--from-literal=([A-Z0-9_]+)=", cmd))
