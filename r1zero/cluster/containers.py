"""Start a rendered training job's replicas as containers of its image on a private docker network.

    r1zero launch --local --containers out/k8s/pretrain-pytorchjob.yaml
    r1zero launch --local --containers out/k8s/pretrain-mpijob.yaml --staging-dir runs/staging
    r1zero launch --local --containers retrain.yaml   # a CronJob (+ its ConfigMap): one run now

Stands in for the operator and the kubelet on one machine with a Docker engine (the docker CLI,
through subprocess). Every replica pod becomes one container of the rendered image, on a user-made
network created for the launch (``r1zero-<job>-<id>``), reachable under the DNS names the operator's
headless Services give it. What each pod gets:

- the rendered ``command`` (as the entrypoint) and ``args``, ``workingDir``;
- the env the operator injects (sources below), then the container's ``env`` with ``$(VAR)``
  expansion; ``secretKeyRef`` values come from this process's environment when set (optional ones
  may be absent), as in ``--local``;
- securityContext (container over pod): ``runAsUser``/``runAsGroup`` (``--user``), ``fsGroup``
  (``--group-add``, and owner of the emptyDir/scratch directories), dropped/added capabilities,
  ``readOnlyRootFilesystem`` (``--read-only``), ``allowPrivilegeEscalation: false``
  (``no-new-privileges``); ``runAsNonRoot`` is checked against the image's user;
- volumes: ConfigMaps (files, read-only), ``emptyDir`` (a fresh directory; ``medium: Memory`` at
  ``/dev/shm`` becomes ``--shm-size`` of its ``sizeLimit``, elsewhere a tmpfs), generic ephemeral
  volumes (a fresh directory per pod), projected service-account tokens (``R1ZERO_LOCAL_SA_TOKEN``
  or a random token), PersistentVolumeClaims (``<staging>/<claim>``, shared by the
  pods like a ReadWriteMany volume), the MPIJob's hostfile ConfigMap and ssh key Secret;
- ``resources.limits`` cpu and memory (``--cpus``, ``--memory``).

Env contracts: PyTorchJob as training-operator v1 (``pkg/controller.v1/pytorch/envvar.go`` @
release-1.9: ``MASTER_ADDR`` = ``localhost`` on the Master, ``<job>-master-0`` elsewhere,
``MASTER_PORT`` = the ``pytorchjob-port`` container port, ``WORLD_SIZE``, ``RANK``, ``PET_*``).
TrainJob (``trainer.kubeflow.org/v1alpha1``) with the ``torch-distributed`` ClusterTrainingRuntime
as Kubeflow Trainer v2's torch plugin (``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` =
the JobSet completion index, ``PET_MASTER_ADDR`` = ``<job>-node-0-0.<job>``, ``PET_MASTER_PORT`` =
29400; container ``node``). MPIJob (``kubeflow.org/v2beta1``, OpenMPI) as mpi-operator v2: workers
``<job>-worker-<i>.<job>.<ns>.svc`` in ``/etc/mpi/hostfile`` (``slots=<slotsPerWorker>``), a fresh
ECDSA key pair mounted at ``sshAuthMountPath`` (``id_rsa``, ``id_rsa.pub``, ``authorized_keys``),
``OMPI_MCA_*`` and ``K_MPI_JOB_ROLE`` env; the launcher starts once every worker's sshd answers
(``launcherCreationPolicy: WaitForWorkersReady``) and its exit decides the job.

Not emulated: restarts/backoff (a failed replica fails the job), scheduling, GPUs, Services other
than DNS names, Secret volumes other than the MPI ssh keys.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from r1zero.cluster.launch import JobFailed, expand_vars, find_job
from r1zero.errors import UserError
from r1zero.images import docker, image_exists, image_user, require_engine

TRAINJOB_MASTER_PORT = 29400  # Kubeflow Trainer v2 torch plugin: constants.ContainerTrainerPort
PYTORCHJOB_PORT = 23456  # training-operator v1 default `pytorchjob-port`
SSHD_PORT = 2222  # images/sshd_config: non-root sshd (mpi-operator's non-root layout)
MPI_CONFIG_DIR = "/etc/mpi"


@dataclass
class Pod:
    """One replica pod, as a container: what `docker run` needs."""

    name: str
    image: str
    entrypoint: list[str] | None  # k8s `command` (None: the image's ENTRYPOINT)
    args: list[str] | None  # k8s `args` (None: the image's CMD)
    env: dict[str, str]
    aliases: list[str]
    user: str | None = None  # "uid:gid"
    groups: list[int] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    read_only: bool = False
    no_new_privileges: bool = False
    run_as_non_root: bool = False
    cpus: float | None = None
    memory: int | None = None
    shm_size: int | None = None
    workdir: str | None = None
    mounts: list[tuple[str, str, str, bool]] = field(default_factory=list)  # (kind, source, target, ro)
    service: bool = False  # MPI worker (sshd): stopped when the launcher ends, its exit not judged


# ---------------------------------------------------------------------------------------------
# quantities (Kubernetes resource.Quantity, the subset manifests use)

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_bytes(q) -> int:
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        raise UserError(f"memory quantity {q!r} not understood (expected e.g. 4Gi, 512Mi)")
    return int(float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1))


def parse_cpu(q) -> float:
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


# ---------------------------------------------------------------------------------------------
# plan: manifest -> pods


class _Ctx:
    """Per-launch state shared by the pod builders: config maps, directories, fsGroup ownership."""

    def __init__(self, docs: list[dict], root: Path, staging: Path, job: dict):
        self.configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}
        self.root, self.staging, self.job = root, staging, job
        self.name = job["metadata"]["name"]
        self.namespace = job["metadata"].get("namespace") or "default"

    def dir(self, *parts: str, owner: tuple[int, int] | None = None) -> Path:
        d = self.root.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        _own(d, owner)
        return d


def _own(path: Path, owner: tuple[int, int] | None) -> None:
    """A volume directory writable by the pod: owned by its uid/fsGroup (as the kubelet does), else 1777."""
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
        os.chmod(path, 0o2775)
    else:
        os.chmod(path, 0o1777)


def _security(pod_spec: dict, c: dict) -> dict:
    sc = {**(pod_spec.get("securityContext") or {}), **{k: v for k, v in (c.get("securityContext") or {}).items()}}
    return sc


def _container_pod(ctx: _Ctx, pod_name: str, pod_spec: dict, c: dict, operator_env: dict[str, str],
                   aliases: list[str], image: str | None = None) -> Pod:
    sc = _security(pod_spec, c)
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    fs_group = (pod_spec.get("securityContext") or {}).get("fsGroup")
    owner = (int(uid), int(fs_group if fs_group is not None else gid or uid)) if uid is not None else None
    pod = Pod(name=pod_name, image=image or c.get("image") or "", entrypoint=c.get("command"), args=c.get("args"),
              env={}, aliases=aliases, workdir=c.get("workingDir"))
    if not pod.image:
        raise UserError(f"{pod_name}: container {c.get('name')!r} names no image")
    if uid is not None:
        pod.user = f"{int(uid)}:{int(gid if gid is not None else uid)}"
    if fs_group is not None:
        pod.groups.append(int(fs_group))
    caps = sc.get("capabilities") or {}
    pod.cap_drop, pod.cap_add = list(caps.get("drop") or []), list(caps.get("add") or [])
    pod.read_only = bool(sc.get("readOnlyRootFilesystem"))
    pod.no_new_privileges = sc.get("allowPrivilegeEscalation") is False
    pod.run_as_non_root = bool(sc.get("runAsNonRoot"))
    if sc.get("privileged"):
        raise UserError(f"{pod_name}: privileged containers are not started locally")
    limits = (c.get("resources") or {}).get("limits") or {}
    if "cpu" in limits:
        pod.cpus = parse_cpu(limits["cpu"])
    if "memory" in limits:
        pod.memory = parse_bytes(limits["memory"])

    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        vol = volumes.get(m["name"])
        if vol is None:
            raise UserError(f"{pod_name}: volumeMount {m['name']!r} has no volume")
        target, ro = m["mountPath"], bool(m.get("readOnly"))
        if "configMap" in vol:
            cm = vol["configMap"]["name"]
            if cm not in ctx.configmaps:
                raise UserError(f"{pod_name}: ConfigMap {cm!r} is not in the manifest")
            d = ctx.dir("configmaps", cm)
            for key, text in ctx.configmaps[cm].items():
                (d / key).write_text(text, encoding="utf-8")
                os.chmod(d / key, 0o644)
            pod.mounts.append(("bind", str(d), target, True))
        elif "emptyDir" in vol:
            ed = vol["emptyDir"] or {}
            size = parse_bytes(ed["sizeLimit"]) if ed.get("sizeLimit") else None
            if target == "/dev/shm" and ed.get("medium") == "Memory":
                pod.shm_size = size or 64 * 2**20
            elif ed.get("medium") == "Memory":
                pod.mounts.append(("tmpfs", f"tmpfs-size={size}" if size else "", target, False))
            else:
                pod.mounts.append(("bind", str(ctx.dir("pods", pod_name, m["name"], owner=owner)), target, ro))
        elif "ephemeral" in vol:  # generic ephemeral volume: provisioned with the pod, gone with it
            pod.mounts.append(("bind", str(ctx.dir("pods", pod_name, m["name"], owner=owner)), target, ro))
        elif "persistentVolumeClaim" in vol:
            d = ctx.staging / vol["persistentVolumeClaim"]["claimName"]
            d.mkdir(parents=True, exist_ok=True)
            _own(d, owner)
            pod.mounts.append(("bind", str(d), target, ro))
        elif "projected" in vol and all("serviceAccountToken" in src for src in vol["projected"].get("sources", [])):
            # the pod's service-account token (e.g. KFP's audience): R1ZERO_LOCAL_SA_TOKEN stands in for it
            d = ctx.dir("pods", pod_name, m["name"])
            for src in vol["projected"]["sources"]:
                f = d / src["serviceAccountToken"]["path"]
                f.write_text(os.environ.get("R1ZERO_LOCAL_SA_TOKEN") or uuid.uuid4().hex)
                os.chmod(f, 0o644)
            pod.mounts.append(("bind", str(d), target, True))
        elif "secret" in vol and vol["secret"].get("secretName", "").endswith("-ssh"):
            pod.mounts.append(("bind", str(ctx.root / "ssh"), target, True))
        else:
            kind = next((k for k in vol if k != "name"), "?")
            raise UserError(f"{pod_name}: volume {m['name']!r} of type {kind} is not started locally "
                            "(configMap, emptyDir, ephemeral, persistentVolumeClaim)")

    env = dict(operator_env)
    for e in c.get("env", []):
        src = e.get("valueFrom") or {}
        if "value" in e:
            env[e["name"]] = expand_vars(str(e["value"]), env)
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            if e["name"] in os.environ:
                env[e["name"]] = os.environ[e["name"]]
            elif not ref.get("optional"):
                raise UserError(f"{pod_name}: secret {ref['name']}/{ref['key']} for {e['name']}: set {e['name']} "
                                "in the environment to stand in for it")
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[e["name"]] = ctx.configmaps.get(ref["name"], {}).get(ref["key"], "")
    pod.env = env
    if pod.entrypoint:
        pod.entrypoint = [expand_vars(a, env) for a in pod.entrypoint]
    if pod.args is not None:
        pod.args = [expand_vars(a, env) for a in pod.args]
    return pod


def _nproc(value) -> int:
    try:
        return 1 if value in (None, "auto", "cpu") else int(value)
    except (TypeError, ValueError):
        raise UserError(f"nprocPerNode {value!r}: expected an integer, auto or cpu here (no GPUs)") from None


def _pytorchjob(ctx: _Ctx) -> list[Pod]:
    spec = ctx.job["spec"]
    reps = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in reps:
        raise UserError("PyTorchJob has no Master replica: the operator would set no MASTER_ADDR/RANK/WORLD_SIZE")
    n_workers = int((reps.get("Worker") or {}).get("replicas", 0))
    n_pods, nproc = 1 + n_workers, _nproc(spec.get("nprocPerNode"))
    pods = []
    for rank in range(n_pods):
        rtype, idx = ("Master", 0) if rank == 0 else ("Worker", rank - 1)
        pod_spec = reps[rtype]["template"]["spec"]
        c = next((c for c in pod_spec.get("containers", []) if c.get("name") == "pytorch"), None)
        if c is None:
            raise UserError(f"{rtype} has no container named 'pytorch'")
        port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "pytorchjob-port"),
                    PYTORCHJOB_PORT)
        master = "localhost" if rtype == "Master" else f"{ctx.name}-master-0"
        env = {"PYTHONUNBUFFERED": "1", "MASTER_PORT": str(port), "PET_MASTER_PORT": str(port),
               "MASTER_ADDR": master, "PET_MASTER_ADDR": master, "WORLD_SIZE": str(n_pods * nproc),
               "RANK": str(rank), "PET_NPROC_PER_NODE": str(nproc), "PET_NNODES": str(n_pods),
               "PET_NODE_RANK": str(rank)}
        name = f"{ctx.name}-{rtype.lower()}-{idx}"
        pods.append(_container_pod(ctx, name, pod_spec, c, env, [name, f"{name}.{ctx.namespace}.svc"]))
    return pods


def _trainjob(ctx: _Ctx) -> list[Pod]:
    spec = ctx.job["spec"]
    ref = spec.get("runtimeRef") or {}
    if ref.get("name") != "torch-distributed":
        raise UserError(f"TrainJob runtime {ref.get('name')!r}: only the torch-distributed runtime is started locally")
    tr = spec.get("trainer") or {}
    n, nproc = int(tr.get("numNodes", 1)), _nproc(tr.get("numProcPerNode"))
    container = {"name": "node", "image": tr.get("image"), "command": tr.get("command"), "args": tr.get("args"),
                 "env": list(tr.get("env") or []), "resources": tr.get("resourcesPerNode") or {}, "volumeMounts": []}
    pod_spec: dict = {"volumes": []}
    for o in spec.get("podSpecOverrides") or []:
        if not any(t.get("name") == "node" for t in o.get("targetJobs") or []):
            continue
        pod_spec["volumes"] += o.get("volumes") or []
        for k in ("securityContext",):
            if k in o:
                pod_spec[k] = o[k]
        for oc in o.get("containers") or []:
            if oc.get("name") == "node":
                container["volumeMounts"] += oc.get("volumeMounts") or []
                container["env"] += oc.get("env") or []
                if "securityContext" in oc:
                    container["securityContext"] = oc["securityContext"]
    master = f"{ctx.name}-node-0-0.{ctx.name}"
    pods = []
    for i in range(n):
        env = {"PYTHONUNBUFFERED": "1", "PET_NNODES": str(n), "PET_NPROC_PER_NODE": str(nproc),
               "PET_NODE_RANK": str(i), "PET_MASTER_ADDR": master, "PET_MASTER_PORT": str(TRAINJOB_MASTER_PORT)}
        host = f"{ctx.name}-node-0-{i}"
        pods.append(_container_pod(ctx, host, pod_spec, container, env, [host, f"{host}.{ctx.name}"]))
    return pods


def _mpijob(ctx: _Ctx) -> list[Pod]:
    spec = ctx.job["spec"]
    reps = spec.get("mpiReplicaSpecs") or {}
    if "Launcher" not in reps or "Worker" not in reps:
        raise UserError("MPIJob needs a Launcher and a Worker replica spec")
    n_workers, slots = int(reps["Worker"].get("replicas", 1)), int(spec.get("slotsPerWorker", 1))
    ssh_path = spec.get("sshAuthMountPath", "/root/.ssh")
    hosts = [f"{ctx.name}-worker-{i}.{ctx.name}.{ctx.namespace}.svc" for i in range(n_workers)]
    ctx.configmaps[f"{ctx.name}-config"] = {
        "hostfile": "".join(f"{h} slots={slots}\n" for h in hosts),
        "discover_hosts.sh": "#!/bin/sh\n" + "".join(f"echo {h}\n" for h in hosts)}
    pods = []
    for rtype, count in (("Worker", n_workers), ("Launcher", 1)):
        pod_spec = dict(reps[rtype]["template"]["spec"])
        c = dict(pod_spec["containers"][0])
        pod_spec["volumes"] = [*pod_spec.get("volumes", []),
                               {"name": "mpi-job-config", "configMap": {"name": f"{ctx.name}-config"}},
                               {"name": "ssh-auth", "secret": {"secretName": f"{ctx.name}-ssh"}}]
        c["volumeMounts"] = [*c.get("volumeMounts", []), {"name": "ssh-auth", "mountPath": ssh_path}]
        role = rtype.lower()
        env = {"K_MPI_JOB_ROLE": role}
        if rtype == "Launcher":
            c["volumeMounts"].append({"name": "mpi-job-config", "mountPath": MPI_CONFIG_DIR})
            env.update({"OMPI_MCA_orte_keep_fqdn_hostnames": "true",
                        "OMPI_MCA_orte_default_hostfile": f"{MPI_CONFIG_DIR}/hostfile",
                        "OMPI_MCA_plm_rsh_args": "-o ConnectionAttempts=10",
                        "OMPI_MCA_orte_set_default_slots": str(slots)})
        for i in range(count):
            name = f"{ctx.name}-{role}-{i}" if rtype == "Worker" else f"{ctx.name}-launcher"
            aliases = [name, f"{name}.{ctx.name}.{ctx.namespace}.svc"]
            pod = _container_pod(ctx, name, pod_spec, c, env, aliases)
            pod.service = rtype == "Worker"
            pods.append(pod)
    return pods


def _cronjob(ctx: _Ctx) -> list[Pod]:
    """One run of the CronJob now (as `kubectl create job --from=cronjob/NAME`): one pod per container."""
    pod_spec = ctx.job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if len(pod_spec.get("containers", [])) != 1:
        raise UserError("CronJob: exactly one container is started locally")
    name = f"{ctx.name}-manual-0"
    return [_container_pod(ctx, name, pod_spec, pod_spec["containers"][0], {}, [name])]


PLANNERS = {"PyTorchJob": _pytorchjob, "TrainJob": _trainjob, "MPIJob": _mpijob, "CronJob": _cronjob}


def plan(docs: list[dict], root: Path, staging: Path) -> tuple[dict, list[Pod]]:
    job = find_job(docs, kinds=tuple(PLANNERS))
    return job, PLANNERS[job["kind"]](_Ctx(docs, root, staging, job))


# ---------------------------------------------------------------------------------------------
# images: the commands a manifest names must exist in the image and run as its uid


def check_pod_image(pod: Pod) -> dict:
    """The image exists, runs as the pod's uid and holds the command; facts for the caller (and tests)."""
    if not image_exists(pod.image):
        raise UserError(f"image {pod.image} not found in the local Docker engine ({pod.name}): build it with "
                        "`make images` (or docker pull it)")
    user = pod.user or image_user(pod.image) or "0"
    if pod.run_as_non_root and user.split(":")[0] in ("0", "root", ""):
        raise UserError(f"{pod.name}: runAsNonRoot but {pod.image} runs as root and the pod sets no runAsUser")
    cmd = (pod.entrypoint or [None])[0]
    probe = ["run", "--rm", "--network", "none", "--user", user, "--entrypoint", "/bin/sh", pod.image, "-c",
             'id -u; command -v "$1" || echo MISSING', "sh", cmd or "sh"]
    out = docker(*probe, check=False, timeout=120)
    lines = out.stdout.split()
    if out.returncode != 0 or not lines:
        raise UserError(f"{pod.name}: {pod.image} does not start as {user}: {out.stderr.strip()[:200]}")
    if cmd and lines[-1] == "MISSING":
        raise UserError(f"{pod.name}: image {pod.image} has no command {cmd!r} (the manifest's command): "
                        "rebuild the image with `make images` or render the job for an image that has it")
    return {"pod": pod.name, "image": pod.image, "uid": lines[0], "command": cmd, "path": lines[-1] if cmd else None}


# ---------------------------------------------------------------------------------------------
# run


def _docker_run_args(pod: Pod, container: str, network: str) -> list[str]:
    a = ["run", "--detach", "--name", container, "--hostname", pod.name.split(".")[0], "--network", network,
         "--label", "org.r1zero.launch=containers"]
    for alias in pod.aliases:
        a += ["--network-alias", alias]
    if pod.user:
        a += ["--user", pod.user]
    for g in pod.groups:
        a += ["--group-add", str(g)]
    for cap in pod.cap_drop:
        a += ["--cap-drop", cap]
    for cap in pod.cap_add:
        a += ["--cap-add", cap]
    if pod.read_only:
        a.append("--read-only")
    if pod.no_new_privileges:
        a += ["--security-opt", "no-new-privileges"]
    if pod.cpus:
        a += ["--cpus", f"{pod.cpus:g}"]
    if pod.memory:
        a += ["--memory", str(pod.memory)]
    if pod.shm_size:
        a += ["--shm-size", str(pod.shm_size)]
    if pod.workdir:
        a += ["--workdir", pod.workdir]
    for kind, src, target, ro in pod.mounts:
        if kind == "tmpfs":
            a += ["--mount", f"type=tmpfs,destination={target}" + (f",{src}" if src else "")]
        else:
            a += ["--mount", f"type=bind,source={src},destination={target}" + (",readonly" if ro else "")]
    for k, v in pod.env.items():
        a += ["--env", f"{k}={v}"]
    if pod.entrypoint:
        a += ["--entrypoint", pod.entrypoint[0]]
    a.append(pod.image)
    if pod.entrypoint:
        a += [*pod.entrypoint[1:], *(pod.args or [])]
    elif pod.args is not None:
        a += pod.args
    return a


def _make_ssh_keys(root: Path, image: str, uid: str) -> None:
    """mpi-operator's per-job key pair (ECDSA P-521), generated with the image's ssh-keygen."""
    d = root / "ssh"
    d.mkdir()
    script = ("ssh-keygen -q -t ecdsa -b 521 -N '' -C mpijob -f /k/id_rsa && cp /k/id_rsa.pub /k/authorized_keys "
              f"&& chown -R {uid} /k && chmod 600 /k/id_rsa")
    out = docker("run", "--rm", "--network", "none", "--user", "0", "--mount", f"type=bind,source={d},destination=/k",
                 "--entrypoint", "/bin/sh", image, "-c", script, check=False, timeout=120)
    if out.returncode != 0:
        raise UserError(f"{image}: cannot make the MPIJob ssh keys (needs ssh-keygen): {out.stderr.strip()[:200]}")


def _pump(container: str, prefix: str, tail: deque, out) -> None:
    proc = subprocess.Popen(["docker", "logs", "--follow", container], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in iter(proc.stdout.readline, ""):
        tail.append(line.rstrip("\n"))
        print(f"[{prefix}] {line}", end="", file=out, flush=True)
    proc.wait()


def _state(container: str) -> tuple[bool, int]:
    out = docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", container, check=False)
    if out.returncode != 0:
        return False, 255
    running, code = out.stdout.split()
    return running == "true", int(code)


def _wait_sshd(container: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        running, code = _state(container)
        if not running:
            raise JobFailed(f"{container}: sshd exited with {code} before the launcher started")
        probe = docker("exec", container, "sh", "-c", "test -s /tmp/sshd.pid", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    raise JobFailed(f"{container}: sshd did not start within {timeout:.0f} s")


def launch_containers(docs: list[dict], *, timeout: float | None = None, staging: str | Path | None = None,
                      network: str | None = None, tail_lines: int = 20, out=sys.stdout, keep: bool = False) -> dict:
    """Run every replica of the manifest's job as a container; raise JobFailed when the job fails.

    ``network``: an existing docker network to use instead of a fresh private one (tests put a
    loopback S3 server on its gateway); ``staging``: host directory backing PersistentVolumeClaims.
    """
    require_engine()
    run_id = uuid.uuid4().hex[:8]
    root = Path(tempfile.mkdtemp(prefix=f"r1zero-containers-{run_id}-"))
    os.chmod(root, 0o755)
    staging_dir = Path(staging) if staging else root / "staging"
    staging_dir.mkdir(parents=True, exist_ok=True)
    job, pods = plan(docs, root, staging_dir)
    name = job["metadata"]["name"]
    facts = [check_pod_image(p) for p in pods]
    if job["kind"] == "MPIJob":
        _make_ssh_keys(root, pods[0].image, pods[0].user or image_user(pods[0].image))
    own_network = network is None
    if own_network:  # private, user-made: the pods' DNS names resolve only here
        network = f"r1zero-{name}-{run_id}"[:60]
        docker("network", "create", "--label", "org.r1zero.launch=containers", network)
    containers = {p.name: f"r1zero-{run_id}-{p.name}"[:120] for p in pods}
    tails = {p.name: deque(maxlen=tail_lines) for p in pods}
    threads = []
    start = time.monotonic()
    print(f"{name}: {len(pods)} containers on network {network}", file=out, flush=True)
    try:
        for p in pods:
            if not p.service and any(q.service for q in pods):  # MPI launcher: WaitForWorkersReady
                for q in pods:
                    if q.service:
                        _wait_sshd(containers[q.name])
            docker(*_docker_run_args(p, containers[p.name], network))
            t = threading.Thread(target=_pump, args=(containers[p.name], p.name, tails[p.name], out), daemon=True)
            t.start()
            threads.append(t)
        judged = [p for p in pods if not p.service]
        codes: dict[str, int] = {}
        first_failed = None
        while len(codes) < len(judged):
            for p in judged:
                if p.name not in codes:
                    running, code = _state(containers[p.name])
                    if not running:
                        codes[p.name] = code
                        if code != 0 and first_failed is None:
                            first_failed = p.name
            for p in pods:  # a worker (sshd) dying is a failed job too
                if p.service and not _state(containers[p.name])[0] and first_failed is None:
                    first_failed = p.name
                    codes.setdefault(p.name, _state(containers[p.name])[1])
            if first_failed:
                break
            if timeout is not None and time.monotonic() - start > timeout:
                raise JobFailed(f"{name}: timed out after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        if not keep:
            docker("rm", "--force", "--volumes", *containers.values(), check=False)
            if own_network:
                docker("network", "rm", network, check=False)
        for t in threads:
            t.join(timeout=5)
        if not keep:
            _remove_tree(root, pods[0].image if pods else None)
    if first_failed:
        raise JobFailed(f"{name} failed: exit codes {codes}; last lines of {first_failed}: "
                        + " | ".join(tails[first_failed]))
    print(f"{name} succeeded ({len(pods)} containers, {time.monotonic() - start:.1f} s)", file=out, flush=True)
    return {"name": name, "status": "Succeeded", "pods": codes, "images": facts}


def _remove_tree(root: Path, image: str | None) -> None:
    """Remove the launch's directories, also files the containers' uid wrote (needs that uid or root)."""
    shutil.rmtree(root, ignore_errors=True)
    if root.exists() and image:
        docker("run", "--rm", "--network", "none", "--user", "0", "--mount", f"type=bind,source={root},destination=/r",
               "--entrypoint", "/bin/sh", image, "-c", "rm -rf /r/*", check=False)
        shutil.rmtree(root, ignore_errors=True)
