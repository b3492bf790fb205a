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
    assert kinds == ["ServiceAccount", "Role", "RoleBinding"]  # namespaced, nothing cluster-wide
    rules = docs[1]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    # exactly what launch_cluster and the exit handler call (verbs per rule: tests/reliability/test_security.py)
    assert granted == {("kubeflow.org", "pytorchjobs"), ("kubeflow.org", "mpijobs"), ("", "pods"), ("", "pods/log"),
                       ("", "configmaps")}
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
    assert n_pods == 16
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
