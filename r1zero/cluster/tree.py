"""The checked-in GitOps tree ``manifests/``: kustomize base + overlays, Argo CD, reference jobs.

    r1zero render --all --out manifests
    python -m r1zero.cluster.render manifests

Layout (every file is generated here; ``tests/cluster/test_tree.py`` fails on drift):

    manifests/base/          namespace, launcher RBAC, NetworkPolicy, r1zero config ConfigMap,
                             PodMonitor + PrometheusRule + Grafana dashboard (r1zero.telemetry),
                             the retraining CronJob; kustomization.yaml
    manifests/overlays/{dev-cpu,a100-40gb,a100-80gb}/kustomization.yaml
                             inline patches: the preset's config, metrics ports, image tags
    manifests/argocd/        one Application per overlay (server-side apply, sync waves) and the
                             argocd-cm health checks for PyTorchJob / MPIJob / TrainJob
    manifests/jobs/<preset>/ reference renders of every stage x kind (KFP creates the real ones
                             per run; GitOps manages the platform, not ephemeral jobs)

Argo CD sync waves: namespace -1, RBAC/config/network 0, monitoring 1, CronJob 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

from r1zero.cluster.render import (
    CHECKOV_SKIPS,
    CONFIG_DIR,
    KINDS,
    LAUNCHER_SA,
    PART_OF,
    RUN_AS,
    STAGES,
    dump_yaml,
    render_stage,
)
from r1zero.cluster.sandbox_manifests import sandbox_objects
from r1zero.images import REGISTRY, TAG

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_CM = "r1zero-config"
RETRAIN_SA = "r1zero-retrain"
# KFP's in-cluster auth: a projected service-account token with this audience at this path
# (kfp.client.ServiceAccountTokenVolumeCredentials; KFP docs "Connect the SDK to the API").
KFP_TOKEN_DIR = "/var/run/secrets/kubeflow/pipelines"
KFP_AUDIENCE = "pipelines.kubeflow.org"
OVERLAYS = {  # overlay -> (preset, overrides)
    "dev-cpu": ("configs/tiny.yaml", []),
    "a100-40gb": ("configs/a100-13b.yaml", ["cluster.gpu=a100-40gb"]),
    "a100-80gb": ("configs/a100-13b.yaml", []),
}
JOB_PRESETS = {"tiny": ("configs/tiny.yaml", []), "a100-13b": ("configs/a100-13b.yaml", [])}
WAVE = "argocd.argoproj.io/sync-wave"
# Argo CD Lua health checks (argo-cd docs/operator-manual/health.md, "Custom Health Checks"):
# the operators report conditions; the last True condition decides.
HEALTH_LUA = """hs = {status = "Progressing", message = "waiting for conditions"}
if obj.status ~= nil and obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.status == "True" then
      if c.type == "Succeeded" or c.type == "Complete" then
        hs.status = "Healthy"
      elseif c.type == "Failed" then
        hs.status = "Degraded"
      elseif c.type == "Suspended" then
        hs.status = "Suspended"
      else
        hs.status = "Progressing"
      end
      hs.message = c.message or c.type
    end
  end
end
return hs
"""


def _load(preset: str, overrides: list[str]):
    from r1zero.config import load_config

    return load_config(REPO_ROOT / preset, overrides)


def _wave(obj: dict, wave: int) -> dict:
    obj.setdefault("metadata", {}).setdefault("annotations", {})[WAVE] = str(wave)
    return obj


def namespace(cfg) -> dict:
    """Pod Security Admission: restricted, except that RDMA pods add IPC_LOCK, which only the
    privileged level admits (restricted and baseline allow no such capability); warn/audit then
    still report against restricted."""
    level = "privileged" if cfg.cluster.rdma_resource and cfg.cluster.gpu != "cpu" else "restricted"
    return _wave({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": cfg.cluster.namespace, "labels": {
                      **PART_OF, "pod-security.kubernetes.io/enforce": level,
                      "pod-security.kubernetes.io/warn": "restricted",
                      "pod-security.kubernetes.io/audit": "restricted"}}}, -1)


def rbac(cfg) -> list[dict]:
    """The pipeline launcher's ServiceAccount: create/watch/delete training jobs, read their pods,
    logs and events, and manage the per-job config ConfigMaps. Nothing cluster-wide."""
    ns = cfg.cluster.namespace
    meta = {"namespace": ns, "labels": dict(PART_OF)}
    # Exactly the calls the launcher makes (tests/reliability/test_security.py keeps this in step):
    rules = [
        # launch_cluster (TrainingClient): create_job, get_job while waiting, delete_job;
        # delete_run_jobs (components/runtime.py, the exit handler): list by run label + delete
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create", "get", "list", "delete"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["mpijobs"], "verbs": ["list", "delete"]},
        # launch_trainjob (Kubernetes API): create, get while waiting, delete; the exit handler: list
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "list", "delete"]},
        # the log stream: TrainingClient.get_job_pods (list) and read_namespaced_pod_log (pods/log get)
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        # the job's config ConfigMap (an existing one, HTTP 409, is reused as is)
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]
    c = cfg.cluster
    # KFP runs the pipeline's pods (the launcher steps among them) under its runner service
    # account in its own namespace; binding it here is what lets `create_job` succeed (no 403).
    subjects = [{"kind": "ServiceAccount", "name": LAUNCHER_SA, "namespace": ns},
                {"kind": "ServiceAccount", "name": c.kfp_service_account, "namespace": c.kfp_namespace}]
    return [_wave(o, 0) for o in (
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": LAUNCHER_SA, **meta},
         "automountServiceAccountToken": True},
        # the retraining CronJob's identity toward KFP (a projected token, no Kubernetes API access)
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": RETRAIN_SA, **meta},
         "automountServiceAccountToken": False},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": LAUNCHER_SA, **meta},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": LAUNCHER_SA, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER_SA},
         "subjects": subjects},
    )]


TRAINING_COMPONENTS = ["pretrain", "grpo", "eval"]
DNS_EGRESS = {  # kube-dns / CoreDNS in kube-system
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def network_policies(cfg) -> list[dict]:
    """Training pods: ingress from their peers and Prometheus; egress only to peers (NCCL,
    rendezvous, ssh), DNS and the object store (``cluster.s3_cidrs`` on ``cluster.s3_port``).
    The retraining CronJob: no ingress; egress to DNS and the KFP API only. Other pods of the
    namespace (the sandbox) get their own policies."""
    c = cfg.cluster
    meta = {"namespace": c.namespace, "labels": dict(PART_OF)}
    kfp_port = urlparse(c.kfp_host).port or (443 if c.kfp_host.startswith("https") else 80)
    training = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "r1zero-training", **meta},
        "spec": {
            "podSelector": {"matchLabels": dict(PART_OF), "matchExpressions": [
                {"key": "app.kubernetes.io/component", "operator": "In", "values": TRAINING_COMPONENTS}]},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [
                {"podSelector": {}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            ]}],
            "egress": [
                {"to": [{"podSelector": {}}]},
                DNS_EGRESS,
                {"to": [{"ipBlock": {"cidr": cidr}} for cidr in c.s3_cidrs],
                 "ports": [{"protocol": "TCP", "port": c.s3_port}]},
            ],
        },
    }
    retrain = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "r1zero-retrain", **meta},
        "spec": {
            "podSelector": {"matchLabels": {**PART_OF, "app.kubernetes.io/component": "retrain"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                DNS_EGRESS,
                {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": c.kfp_namespace}}}],
                 "ports": [{"protocol": "TCP", "port": kfp_port}]},
            ],
        },
    }
    return [_wave(training, 0), _wave(retrain, 0)]


def config_configmap(cfg) -> dict:
    return _wave({"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": CONFIG_CM, "namespace": cfg.cluster.namespace, "labels": dict(PART_OF)},
                  "data": {"config.yaml": cfg.to_yaml(), "KFP_HOST": cfg.cluster.kfp_host}}, 0)


def retrain_cronjob(cfg) -> dict:
    """Scheduled retraining: submits the compiled pipeline to KFP. The pipeline is package data of
    the runtime image (``pipelines/r1zero_pipeline.yaml``, the submit command's default
    ``--package``). Auth: the projected service-account token at the path KFP's SDK reads by
    default (``ServiceAccountTokenVolumeCredentials``) and, with ``cluster.kfp_token_ref``, a
    bearer token from that Secret's ``token`` key (``KFP_TOKEN``)."""
    c = cfg.cluster
    res = {"cpu": "250m", "memory": "512Mi"}
    env = [{"name": "KFP_HOST", "valueFrom": {"configMapKeyRef": {"name": CONFIG_CM, "key": "KFP_HOST"}}},
           {"name": "HOME", "value": "/tmp"}]
    if c.kfp_token_ref:
        env.append({"name": "KFP_TOKEN", "valueFrom": {"secretKeyRef": {"name": c.kfp_token_ref, "key": "token"}}})
    container = {
        "name": "submit", "image": c.runtime_image, "imagePullPolicy": "Always",
        "command": ["r1zero"],
        "args": ["pipeline", "submit", "--host", "$(KFP_HOST)", "--config", f"{CONFIG_DIR}/config.yaml",
                 "--experiment", "scheduled-retraining", "--registry", c.registry_uri, "--warm-start"],
        "env": env,
        "resources": {"requests": dict(res), "limits": dict(res)},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "kfp-token", "mountPath": KFP_TOKEN_DIR, "readOnly": True}],
    }
    pod = {
        "metadata": {"labels": {**PART_OF, "app.kubernetes.io/component": "retrain"},
                     "annotations": {"sidecar.istio.io/inject": "false", **CHECKOV_SKIPS}},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False, "serviceAccountName": RETRAIN_SA,
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": CONFIG_CM}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                        {"name": "kfp-token", "projected": {"sources": [{"serviceAccountToken": {
                            "path": "token", "audience": KFP_AUDIENCE, "expirationSeconds": 7200}}]}}],
        },
    }
    return _wave({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "r1zero-retrain", "namespace": c.namespace, "labels": dict(PART_OF),
                     "annotations": dict(CHECKOV_SKIPS)},
        "spec": {"schedule": c.retrain_schedule, "timeZone": "Etc/UTC", "concurrencyPolicy": "Forbid",
                 "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3, "startingDeadlineSeconds": 3600,
                 "jobTemplate": {"spec": {"backoffLimit": 2, "activeDeadlineSeconds": 1800,
                                          "ttlSecondsAfterFinished": 86400, "template": pod}}},
    }, 2)


def monitoring(cfg) -> list[dict]:
    """PodMonitor, PrometheusRule and the Grafana dashboard ConfigMap from r1zero.telemetry."""
    try:
        from r1zero.telemetry.manifests import monitoring_objects
    except ImportError:  # hook: the telemetry package provides the content
        return []
    return [_wave(o, 1) for o in monitoring_objects(cfg)]


def base_files(cfg) -> dict[str, list[dict]]:
    files = {
        "namespace.yaml": [namespace(cfg)],
        "rbac.yaml": rbac(cfg),
        "networkpolicy.yaml": network_policies(cfg),
        "config.yaml": [config_configmap(cfg)],
        "cronjob.yaml": [retrain_cronjob(cfg)],
        "sandbox.yaml": sandbox_objects(cfg),  # the code-reward sandbox service (its own module)
    }
    mon = monitoring(cfg)
    if mon:
        files["monitoring.yaml"] = mon
    return files


def _patch(target: dict, body: dict) -> dict:
    return {"target": target, "patch": dump_yaml([body])}


def overlay_kustomization(base_cfg, cfg) -> dict:
    patches = [_patch({"kind": "ConfigMap", "name": CONFIG_CM},
                      {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIG_CM},
                       "data": {"config.yaml": cfg.to_yaml()}})]
    if namespace(cfg) != namespace(base_cfg):  # e.g. RDMA: Pod Security level privileged
        patches.append(_patch({"kind": "Namespace", "name": base_cfg.cluster.namespace},
                              {"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": base_cfg.cluster.namespace,
                                            "labels": namespace(cfg)["metadata"]["labels"]}}))
    for base_obj, obj in zip(monitoring(base_cfg), monitoring(cfg), strict=True):
        if base_obj != obj:  # replace the preset-dependent monitoring objects whole, keeping base names
            obj = {**obj, "metadata": {**obj["metadata"], "name": base_obj["metadata"]["name"]}}
            target = {"kind": obj["kind"], "name": base_obj["metadata"]["name"]}
            if "/" in obj["apiVersion"]:
                target["group"] = obj["apiVersion"].split("/")[0]
            patches.append(_patch(target, obj))
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": cfg.cluster.namespace,
        "resources": ["../../base"],
        "images": [{"name": f"{REGISTRY}/r1zero-runtime", "newTag": TAG},
                   {"name": f"{REGISTRY}/r1zero-train", "newTag": TAG}],
        "labels": [{"pairs": {"r1zero/overlay": cfg.name}, "includeSelectors": False}],
        "patches": patches,
    }


def argocd_application(cfg, overlay: str) -> dict:
    return {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
        "metadata": {"name": f"r1zero-{overlay}", "namespace": "argocd", "labels": dict(PART_OF),
                     "finalizers": ["resources-finalizer.argocd.argoproj.io"]},
        "spec": {
            "project": "default",
            "source": {"repoURL": cfg.cluster.git_repo, "targetRevision": "main", "path": f"manifests/overlays/{overlay}"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": cfg.cluster.namespace},
            # ServerSideApply: large objects (dashboards, CRDs) exceed the 262144-byte
            # last-applied annotation of client-side apply. Per-run jobs are not in the tree (KFP
            # creates them), so prune/selfHeal only govern the platform objects.
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True},
                           "syncOptions": ["ServerSideApply=true", "CreateNamespace=true", "ApplyOutOfSyncOnly=true"],
                           "retry": {"limit": 5, "backoff": {"duration": "10s", "factor": 2, "maxDuration": "5m"}}},
        },
    }


def argocd_health_cm() -> dict:
    """Merge into argocd-cm: health checks for the training kinds Argo CD does not ship."""
    keys = {f"resource.customizations.health.{g}_{k}": HEALTH_LUA
            for g, k in (("kubeflow.org", "PyTorchJob"), ("kubeflow.org", "MPIJob"), ("trainer.kubeflow.org", "TrainJob"))}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm", "namespace": "argocd",
                         "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}},
            "data": keys}


def tree_files() -> dict[str, str]:
    """Every file of manifests/ (relative path -> text)."""
    from r1zero.config import Config

    base_cfg = Config()
    out: dict[str, str] = {}
    files = base_files(base_cfg)
    for name, objs in files.items():
        out[f"base/{name}"] = dump_yaml(objs)
    out["base/kustomization.yaml"] = dump_yaml([{
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": base_cfg.cluster.namespace, "resources": sorted(files)}])
    apps = []
    for overlay, (preset, overrides) in OVERLAYS.items():
        cfg = _load(preset, overrides)
        out[f"overlays/{overlay}/kustomization.yaml"] = dump_yaml([overlay_kustomization(base_cfg, cfg)])
        apps.append(argocd_application(cfg, overlay))
    out["argocd/applications.yaml"] = dump_yaml(apps)
    out["argocd/argocd-cm-health.yaml"] = dump_yaml([argocd_health_cm()])
    for preset_name, (preset, overrides) in JOB_PRESETS.items():
        cfg = _load(preset, overrides)
        for stage in STAGES:
            for kind in KINDS:
                out[f"jobs/{preset_name}/{stage}-{kind}.yaml"] = dump_yaml(render_stage(cfg, stage, kind))
    return out


def write_tree(out_dir: Path) -> list[Path]:
    """Regenerate ``out_dir`` (removes generated sub-trees first so renamed files do not linger)."""
    out_dir = Path(out_dir)
    files = tree_files()
    for sub in ("base", "overlays", "argocd", "jobs"):
        if (out_dir / sub).is_dir():
            shutil.rmtree(out_dir / sub)
    written = []
    for rel, text in sorted(files.items()):
        p = out_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written
