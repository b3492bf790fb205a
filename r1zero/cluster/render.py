"""Render training jobs and the GitOps tree as Kubernetes manifests (plain dicts -> sorted YAML).

    r1zero render --config configs/a100-13b.yaml --stage pretrain --kind pytorchjob --out out/k8s
    r1zero render --all --out manifests        # regenerate the checked-in kustomize tree
    python -m r1zero.cluster.render manifests  # same, without the CLI

One job = a ConfigMap holding the resolved config (mounted at ``/etc/r1zero``) + the job:
- PyTorchJob ``kubeflow.org/v1`` (training-operator release-1.9): Master (1) + Workers, container
  ``pytorch`` running bare ``torchrun`` (the operator injects PET_NNODES, PET_NPROC_PER_NODE,
  PET_NODE_RANK, PET_MASTER_ADDR/PORT, so torchrun needs no topology flags), ``nprocPerNode``;
- MPIJob ``kubeflow.org/v2beta1`` (mpi-operator): a launcher running DeepSpeed's launcher over
  the hostfile the operator mounts (``/etc/mpi/hostfile``) + workers with ``slotsPerWorker``;
- TrainJob ``trainer.kubeflow.org/v1alpha1`` (Kubeflow Trainer v2, where new operator work
  happens; the v1 training-operator is in maintenance) on the ``torch-distributed``
  ClusterTrainingRuntime, with the same env (S3 credentials by secretKeyRef), volumes
  (config, ``/dev/shm``, scratch) and scheduling as the v1 kinds.

Stages: ``pretrain`` and ``grpo`` (sized: nodes x GPUs), ``eval`` (one GPU pod: at 13B scale the
model does not fit a CPU launcher pod). Options: RDMA (``cluster.rdma_resource``: the resource,
IPC_LOCK, ``NCCL_IB_*``), gang scheduling (``cluster.gang``), a generic ephemeral scratch volume
sized from the model (``scratch_size``) for the S3 cache and checkpoint staging.

Output is deterministic: stable names from the config name and stage, ``sort_keys`` YAML.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from r1zero.cluster import rollout_manifests as rollout
from r1zero.errors import UserError
from r1zero.images import UID

STAGES = ("pretrain", "grpo", "eval")
KINDS = ("pytorchjob", "mpijob", "trainjob")
CONFIG_DIR = "/etc/r1zero"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
LAUNCHER_SA = "r1zero-launcher"
RUN_AS = UID  # the one non-root uid/gid of the images and every pod (r1zero/images.py, images/)
PART_OF = {"app.kubernetes.io/part-of": "r1zero"}
# GPU Feature Discovery product labels (NVIDIA gpu-feature-discovery, label nvidia.com/gpu.product).
GPU_PRODUCT = {
    "a100-40gb": "NVIDIA-A100-SXM4-40GB",
    "a100-80gb": "NVIDIA-A100-SXM4-80GB",
    "h100-80gb": "NVIDIA-H100-80GB-HBM3",
}
SCRATCH_DIR = "/scratch"  # generic ephemeral volume: R1ZERO_CACHE (S3 downloads) + checkpoint staging
# Gang schedulers' scheduler names: Volcano's default, and scheduler-plugins' second scheduler
# (as-a-second-scheduler chart, coscheduling plugin).
GANG_SCHEDULER = {"volcano": "volcano", "coscheduling": "scheduler-plugins-scheduler"}
PYTORCHJOB_PORT = 23456  # training-operator default `pytorchjob-port` (pytorch_defaults.go)
# Checkov skips, justified: batch training pods serve no traffic, so probes make no sense; images
# are pinned by tag in r1zero/images.py (a digest is only known after the registry push).
CHECKOV_SKIPS = {
    "checkov.io/skip1": "CKV_K8S_8=batch training pod serves no HTTP endpoint for a liveness probe",
    "checkov.io/skip2": "CKV_K8S_9=batch training pod receives no traffic, so no readiness probe",
    "checkov.io/skip3": "CKV_K8S_43=images pinned by release tag in r1zero/images.py; digest known only after push",
}


def dns1035(name: str, limit: int = 50) -> str:
    """A DNS-1035 label (starts with a letter; [a-z0-9-]; the operator appends -master-0 etc.)."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "r-" + s
    return s[:limit].rstrip("-")


def job_name(cfg, stage: str) -> str:
    return dns1035(f"{cfg.name}-{stage}")


def default_uris(cfg, stage: str) -> dict[str, str]:
    """Where a stage reads and writes when no URI is given: under cluster.checkpoint_uri/<name>/."""
    base = f"{cfg.cluster.checkpoint_uri.rstrip('/')}/{dns1035(cfg.name)}"
    uris = {"data": f"{base}/data", "out": f"{base}/{stage}"}
    if stage == "grpo":
        uris["policy"] = f"{base}/pretrain"
    if stage == "eval":
        uris["model"] = f"{base}/grpo"
    return uris


def stage_args(stage: str, uris: dict[str, str], config_file: str = CONFIG_FILE) -> list[str]:
    """``r1zero <stage>`` arguments: the command line of the pods (config from the mounted
    ConfigMap) and of a local run (components/runtime.py passes its own config file)."""
    args = [stage, "--config", config_file]
    if stage == "grpo":
        args += ["--policy", uris["policy"]]
    if stage == "eval":
        args += ["--model", uris["model"]]
    args += ["--data", uris["data"], "--out", uris["out"]]
    if stage == "eval" and uris.get("baseline"):
        args += ["--baseline", uris["baseline"]]
    return args


def scratch_size(cfg, stage: str) -> str:
    """Per-pod scratch: checkpoint staging + the S3 download cache, sized from the model.

    Staging holds one checkpoint's share of this node: 16 B/param (bf16 weights 2 + fp32 master
    4 + Adam m and v 8 + 2 spare; ZeRO paper, mixed-precision Adam), split over the nodes when
    ZeRO shards the optimizer (stage >= 1), whole otherwise. The cache holds the bf16 weights the
    stage downloads (2 B/param: the GRPO policy, the evaluated model) plus 1 GiB of data. 25%
    headroom, rounded up to whole GiB, at least 2 GiB.
    """
    if cfg.cluster.scratch_size:
        return cfg.cluster.scratch_size
    from r1zero.sizing_cli import spec_from_config

    params = spec_from_config(cfg).total_params()
    shards = cfg.cluster.nodes if cfg.parallel.zero_stage >= 1 else 1
    staging = 0 if stage == "eval" else 16 * params / shards
    cache = 2 * params + 2**30
    gib = -(-int(1.25 * (staging + cache)) // 2**30)
    return f"{max(2, gib)}Gi"


class _Dumper(yaml.SafeDumper):
    """Sorted, block-style YAML without anchors; multi-line strings as literal blocks."""

    def ignore_aliases(self, data):
        return True


def _str(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def config_map(cfg, name: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": cfg.cluster.namespace, "labels": {**PART_OF, "r1zero/run": dns1035(cfg.name)}},
        "data": {"config.yaml": cfg.to_yaml()},  # the one serialisation (r1zero.config)
    }


def _gpu(cfg) -> bool:
    return cfg.cluster.gpu != "cpu" and cfg.cluster.gpus_per_node > 0


def resources(cfg) -> dict:
    """Requests = limits (Guaranteed QoS: the kubelet never evicts a training pod first)."""
    c = cfg.cluster
    res = {"cpu": c.cpu_request, "memory": c.memory_request}
    if _gpu(cfg):
        res["nvidia.com/gpu"] = str(c.gpus_per_node)
        if c.rdma_resource:
            res[c.rdma_resource] = "1"
    return {"requests": dict(res), "limits": dict(res)}


def container_env(cfg, stage: str) -> list[dict]:
    c = cfg.cluster
    env = [
        {"name": "R1ZERO_CONFIG", "value": CONFIG_FILE},
        {"name": "R1ZERO_STAGE", "value": stage},
        {"name": "R1ZERO_PROGRESS", "value": "0"},
        # HOME on the small /tmp emptyDir; the S3 cache and checkpoint staging on the scratch volume
        {"name": "HOME", "value": "/tmp"},
        {"name": "R1ZERO_CACHE", "value": f"{SCRATCH_DIR}/cache"},
        *s3_secret_env(cfg),
    ]
    if cfg.store.endpoint_url:
        env.append({"name": "R1ZERO_S3_ENDPOINT", "value": cfg.store.endpoint_url})
    if rollout.uses_vllm(cfg, stage) and cfg.grpo.rollout.mode == "server":  # the rollout servers' key
        env.append(rollout.key_env(cfg.grpo.rollout.key_secret or rollout.key_secret(job_name(cfg, stage))))
    if _gpu(cfg):
        # NCCL: surface init problems, fail fast on hangs (torch >= 2.2 name); bootstrap over eth0.
        env += [
            {"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
            {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
        ]
        if c.rdma_resource:  # RDMA: NCCL uses the IB/RoCE HCAs the device plugin hands the pod
            env += [{"name": "NCCL_IB_DISABLE", "value": "0"}, {"name": "NCCL_IB_HCA", "value": c.ib_hca}]
            if c.ib_gid_index is not None:
                env.append({"name": "NCCL_IB_GID_INDEX", "value": str(c.ib_gid_index)})
        else:  # no RDMA resource in the pod: NCCL would probe absent HCAs
            env.append({"name": "NCCL_IB_DISABLE", "value": "1"})
    else:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    return env


def s3_secret_env(cfg) -> list[dict]:
    """The S3 Secret's keys as env (the same keys the pipeline IR maps: docs/cluster.md)."""
    keys = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    if not cfg.store.endpoint_url:  # the endpoint then comes from the Secret
        keys.append("R1ZERO_S3_ENDPOINT")
    return [{"name": k, "valueFrom": {"secretKeyRef": {"name": cfg.cluster.s3_secret, "key": k, "optional": True}}}
            for k in keys]


def security_context(cfg) -> dict:
    """Container securityContext: non-root, read-only root, no capabilities; RDMA adds IPC_LOCK
    (verbs pin memory: ibv_reg_mr needs an unlimited memlock)."""
    caps: dict = {"drop": ["ALL"]}
    if _gpu(cfg) and cfg.cluster.rdma_resource:
        caps["add"] = ["IPC_LOCK"]
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "capabilities": caps,
            "seccompProfile": {"type": "RuntimeDefault"}}


def pod_volumes(cfg, stage: str, cm_name: str) -> list[dict]:
    """config (ConfigMap), /dev/shm (memory), /tmp (HOME, small) and the scratch ephemeral volume."""
    c = cfg.cluster
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": scratch_size(cfg, stage)}}}
    if c.storage_class:
        claim["storageClassName"] = c.storage_class
    return [
        {"name": "config", "configMap": {"name": cm_name}},
        # NCCL and DataLoader workers need a large /dev/shm; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        # generic ephemeral volume: provisioned with the pod, deleted with it, sized from the model
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": dict(PART_OF)}, "spec": claim}}},
    ]


VOLUME_MOUNTS = [
    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
    {"name": "dshm", "mountPath": "/dev/shm"},
    {"name": "tmp", "mountPath": "/tmp"},
    {"name": "scratch", "mountPath": SCRATCH_DIR},
]


def gang_scheduler_name(cfg) -> str | None:
    return GANG_SCHEDULER.get(cfg.cluster.gang) or cfg.cluster.scheduler_name


def _ports(cfg) -> list[dict]:
    try:
        from r1zero.telemetry.manifests import container_ports
    except ImportError:  # telemetry not installed: one port at telemetry.port
        return [{"name": "metrics-0", "containerPort": cfg.telemetry.port or 9108, "protocol": "TCP"}]
    return container_ports(cfg)


def pod_template(cfg, stage: str, container_name: str, command: list[str], args: list[str], cm_name: str,
                 extra_volumes: tuple = (), extra_mounts: tuple = (), ports: list[dict] | None = None,
                 res: dict | None = None) -> dict:
    c = cfg.cluster
    ports = ports if ports is not None else _ports(cfg)
    container = {
        "name": container_name,
        "image": c.image,
        "imagePullPolicy": "Always",  # re-checks the tag's digest; layers stay cached on the node
        "command": command,
        "args": args,
        "env": container_env(cfg, stage),
        "resources": res or resources(cfg),
        "ports": ports,
        "securityContext": security_context(cfg),
        "volumeMounts": [*VOLUME_MOUNTS, *extra_mounts],
    }
    spec = {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [*pod_volumes(cfg, stage, cm_name), *extra_volumes],
    }
    if _gpu(cfg):
        spec.update(gpu_placement(cfg))
    if gang_scheduler_name(cfg):
        spec["schedulerName"] = gang_scheduler_name(cfg)
    if c.priority_class:
        spec["priorityClassName"] = c.priority_class
    labels = {**PART_OF, "app.kubernetes.io/component": stage, "r1zero/run": dns1035(cfg.name)}
    annotations = {"sidecar.istio.io/inject": "false", **CHECKOV_SKIPS,
                   "checkov.io/skip4": "CKV_K8S_35=S3 credentials come by secretKeyRef env because boto3 reads "
                                       "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment"}
    if ports:  # for annotation-based scrapers; the PodMonitor (r1zero.telemetry) is the primary path
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(ports[0]["containerPort"]),
                            "prometheus.io/path": "/metrics"})
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": spec}


def gpu_placement(cfg) -> dict:
    return {"nodeSelector": {"nvidia.com/gpu.product": GPU_PRODUCT[cfg.cluster.gpu]},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


def run_policy(cfg) -> dict:
    c = cfg.cluster
    rp = {"cleanPodPolicy": "Running", "backoffLimit": c.backoff_limit,
          "ttlSecondsAfterFinished": c.ttl_seconds_after_finished}
    if c.active_deadline_seconds:
        rp["activeDeadlineSeconds"] = c.active_deadline_seconds
    if c.gang in GANG_SCHEDULER or c.scheduler_name:
        # Gang scheduling: the operator creates a PodGroup needing every pod (--gang-scheduler-name
        # volcano or scheduler-plugins). Kueue instead admits the whole job by its queue label.
        sp = {"minAvailable": c.nodes}
        if c.queue:
            sp["queue"] = c.queue
        if c.priority_class:
            sp["priorityClass"] = c.priority_class
        rp["schedulingPolicy"] = sp
    return rp


def kueue_labels(cfg) -> dict:
    """Kueue's queue label: Kueue suspends the job until the whole workload (every pod) fits."""
    c = cfg.cluster
    return {"kueue.x-k8s.io/queue-name": c.queue} if c.queue and c.gang in ("kueue", "none") else {}


def _job_meta(cfg, stage: str, name: str, uris: dict[str, str]) -> dict:
    labels = {**PART_OF, "app.kubernetes.io/component": stage, "r1zero/run": dns1035(cfg.name)}
    labels.update(kueue_labels(cfg))
    # Checkpoints live under the stage output (the trainers' default <out>/checkpoints unless the
    # config names another URI); a restarted pod resumes from the newest complete one.
    annotations = {"r1zero/config-hash": cfg.hash()[:16], "r1zero/output": uris["out"]}
    if stage != "eval":
        annotations["r1zero/checkpoints"] = ((cfg.pretrain.checkpoint_uri if stage == "pretrain" else None)
                                             or f"{uris['out'].rstrip('/')}/checkpoints")
    return {"name": name, "namespace": cfg.cluster.namespace, "labels": labels, "annotations": annotations}


def render_pytorchjob(cfg, stage: str, uris: dict[str, str], cm_name: str) -> dict:
    c = cfg.cluster
    name = job_name(cfg, stage)
    nproc = c.gpus_per_node if _gpu(cfg) else c.procs_per_node
    # bare torchrun: topology comes from the operator's PET_* variables.
    template = pod_template(cfg, stage, "pytorch", ["torchrun"], ["-m", "r1zero.cli", *stage_args(stage, uris)],
                            cm_name)
    template["spec"]["containers"][0]["ports"].append(
        {"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"})
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if c.nodes > 1:
        replicas["Worker"] = {"replicas": c.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    spec = {"nprocPerNode": str(nproc), "pytorchReplicaSpecs": replicas, "runPolicy": run_policy(cfg)}
    if c.elastic_max_nodes:
        if c.nodes < 2:
            raise UserError("cluster.elastic_max_nodes needs cluster.nodes >= 2 (elastic jobs need Workers)")
        spec["elasticPolicy"] = {"minReplicas": c.nodes, "maxReplicas": c.elastic_max_nodes, "rdzvBackend": "c10d",
                                 "maxRestarts": c.backoff_limit}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _job_meta(cfg, stage, name, uris),
            "spec": spec}


def render_mpijob(cfg, stage: str, uris: dict[str, str], cm_name: str) -> dict:
    c = cfg.cluster
    name = job_name(cfg, stage)
    slots = c.gpus_per_node if _gpu(cfg) else c.procs_per_node
    # DeepSpeed's launcher reads the MPI hostfile the mpi-operator mounts and ssh-starts one
    # process per slot on every worker (deepspeed --hostfile; launcher `pdsh` is the default).
    launcher_cmd = ["deepspeed", "--hostfile", "/etc/mpi/hostfile", "--no_local_rank", "--module", "r1zero.cli",
                    *stage_args(stage, uris)]
    small = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    launcher = pod_template(cfg, stage, "launcher", launcher_cmd[:1], launcher_cmd[1:], cm_name, ports=[], res=small)
    launcher["spec"].pop("nodeSelector", None)
    launcher["spec"].pop("tolerations", None)
    # sshd in the worker image keeps running; the mpi-operator mounts the ssh keys.
    worker = pod_template(cfg, stage, "worker", ["/usr/sbin/sshd"], ["-De", "-f", "/home/r1zero/.sshd_config"], cm_name)
    return {
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": _job_meta(cfg, stage, name, uris),
        "spec": {
            "slotsPerWorker": slots, "runLauncherAsWorker": False, "sshAuthMountPath": "/home/r1zero/.ssh",
            "launcherCreationPolicy": "WaitForWorkersReady", "mpiImplementation": "OpenMPI",
            "runPolicy": run_policy(cfg),
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "OnFailure", "template": launcher},
                "Worker": {"replicas": c.nodes, "restartPolicy": "OnFailure", "template": worker},
            },
        },
    }


def render_trainjob(cfg, stage: str, uris: dict[str, str], cm_name: str) -> dict:
    """TrainJob on the ``torch-distributed`` ClusterTrainingRuntime. The runtime owns the pod
    template (securityContext, PET_* env); the job overrides what r1zero needs: env with the S3
    Secret, and, through ``podSpecOverrides`` on the runtime's ``node`` job and container, the
    config, ``/dev/shm``, ``/tmp`` and scratch volumes and the GPU placement."""
    c = cfg.cluster
    name = job_name(cfg, stage)
    override = {"targetJobs": [{"name": "node"}], "volumes": pod_volumes(cfg, stage, cm_name),
                "containers": [{"name": "node", "volumeMounts": [dict(m) for m in VOLUME_MOUNTS]}]}
    if _gpu(cfg):
        override.update(gpu_placement(cfg))
    meta = _job_meta(cfg, stage, name, uris)
    if c.gang in GANG_SCHEDULER:
        raise UserError(f"cluster.gang {c.gang}: a TrainJob's PodGroup comes from its runtime's podGroupPolicy; "
                        "use cluster.gang kueue (or none) with --kind trainjob")
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": meta,
        "spec": {
            "runtimeRef": {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                           "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": c.image, "command": ["torchrun"], "args": ["-m", "r1zero.cli", *stage_args(stage, uris)],
                "numNodes": c.nodes, "numProcPerNode": c.gpus_per_node if _gpu(cfg) else c.procs_per_node,
                "resourcesPerNode": resources(cfg),
                "env": container_env(cfg, stage),
            },
            # The torch-distributed runtime's replicated job and container are both named "node".
            "podSpecOverrides": [override],
        },
    }


RENDERERS = {"pytorchjob": render_pytorchjob, "mpijob": render_mpijob, "trainjob": render_trainjob}


def fit_parallel(cfg):
    """The job's world size is nodes x processes per node; the trainers require dp*tp*pp to equal
    it, so dp is derived from the cluster shape (tp and pp are model choices and stay)."""
    c, par = cfg.cluster, cfg.parallel
    world = c.nodes * (c.gpus_per_node if _gpu(cfg) else c.procs_per_node)
    if par.dp * par.tp * par.pp == world:
        return cfg
    if world % (par.tp * par.pp):
        raise UserError(f"cluster world size {world} (nodes {c.nodes} x {world // c.nodes} per node) is not "
                        f"divisible by parallel.tp*pp = {par.tp * par.pp}")
    cfg = cfg.model_copy(deep=True)
    cfg.parallel.dp = world // (par.tp * par.pp)
    return cfg


def render_stage(cfg, stage: str, kind: str, uris: dict[str, str] | None = None) -> list[dict]:
    """[ConfigMap, job] for one stage; GRPO in vLLM server mode adds the rollout servers'
    [Service, StatefulSet] (r1zero/cluster/rollout_manifests.py)."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    if kind not in RENDERERS:
        raise UserError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    if _gpu(cfg) and cfg.cluster.gpu not in GPU_PRODUCT:
        raise UserError(f"cluster.gpu {cfg.cluster.gpu!r} has no GPU product label")
    if cfg.cluster.gpu != "cpu" and cfg.cluster.gpus_per_node == 0:
        raise UserError(f"cluster.gpu is {cfg.cluster.gpu} but cluster.gpus_per_node is 0")
    if stage == "eval":  # one process on one GPU (or one CPU pod): evaluation is not distributed
        cfg = cfg.model_copy(deep=True)
        cfg.cluster.nodes, cfg.cluster.procs_per_node = 1, 1
        cfg.cluster.gpus_per_node = min(cfg.cluster.gpus_per_node, 1)
        cfg.cluster.elastic_max_nodes = None
        cfg.parallel.dp = cfg.parallel.tp = cfg.parallel.pp = cfg.parallel.ep = 1
    cfg = fit_parallel(cfg)
    if stage == "grpo":  # fail at render time, not when 1,024 pods have started
        for problem in cfg.grpo_world_problems(cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp):
            raise UserError(f"{cfg.name}: {problem}")
    servers = rollout.renders_servers(cfg, stage)
    cfg = rollout.prepare(cfg, stage, job_name(cfg, stage))  # vLLM image; servers' per-rank address
    uris = {**default_uris(cfg, stage), **(uris or {})}
    cm_name = f"{job_name(cfg, stage)}-config-{cfg.hash()[:8]}"
    objs = [config_map(cfg, cm_name), RENDERERS[kind](cfg, stage, uris, cm_name)]
    if servers:
        world = cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp
        objs += rollout.render_servers(cfg, job_name(cfg, stage), world, uris["policy"])
    return objs


def dump_yaml(objs: list[dict]) -> str:
    """Deterministic multi-document YAML (sorted keys, block style)."""
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=120)
                         for o in objs)


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


if __name__ == "__main__":
    from r1zero.cluster.tree import write_tree

    for p in write_tree(Path(sys.argv[1] if len(sys.argv) > 1 else "manifests")):
        print(p)
