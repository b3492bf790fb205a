"""Launch a rendered training job: on a cluster with the Training Operator, or emulated locally.

    r1zero launch out/k8s/pretrain-pytorchjob.yaml                  # TrainingClient, kube context
    r1zero launch out/k8s/pretrain-pytorchjob.yaml --local          # processes on this machine

Cluster (:func:`launch_cluster`; a TrainJob goes to :func:`launch_trainjob`, Kubernetes API
directly): creates the manifest's ConfigMaps, then the PyTorchJob through
kubeflow-training's ``TrainingClient``; waits with ``wait_timeout`` (the SDK's ``timeout`` is the
per-request API timeout, a common mistake in the KFP launcher sample), streams the pods' new log
lines at every poll (incrementally: ``since_seconds`` + timestamps), raises :class:`JobFailed` with the conditions and the master's last log
lines on Failed, and deletes the job per ``delete``: ``on-success`` (default; a failed job stays
for inspection), ``always`` or ``never``.

Local (:func:`launch_local`): emulates the training operator for a PyTorchJob. Every replica pod
(Master = node rank 0, Worker i = node rank i+1) becomes one local process running the
``pytorch`` container's command with the environment the operator injects
(``pkg/controller.v1/pytorch/envvar.go`` @ release-1.9): PYTHONUNBUFFERED, MASTER_ADDR/PORT,
PET_MASTER_ADDR/PORT, WORLD_SIZE (= pods x nprocPerNode), RANK (= node rank), PET_NODE_RANK,
PET_NNODES, PET_NPROC_PER_NODE. ``<job>-master-0`` resolves to 127.0.0.1 and the master port is
a free local port. ConfigMap volumes are written to a temp dir and their mount paths rewritten in
the command, args and env; emptyDir mounts use the local path when it exists and is writable
(/tmp, /dev/shm), else a temp dir; generic ephemeral volumes (the scratch claim) get a temp dir; ``$(VAR)`` references are expanded as the kubelet does; secret
env vars come from this process's environment when set. Not emulated: restarts/backoff, images
(the local Python environment stands in for the image), resource limits.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import yaml

from r1zero.errors import UserError

JOB_KINDS = {"PyTorchJob"}  # TrainingClient (kubeflow-training 1.9) speaks kubeflow.org/v1 only


class JobFailed(RuntimeError):
    """The job reached Failed (or a local replica exited non-zero)."""


def load_manifest(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"manifest not found: {p}")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as err:
        raise UserError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not all(isinstance(d, dict) and "kind" in d for d in docs):
        raise UserError(f"{p}: every document must be a Kubernetes object with a kind")
    return docs


def find_job(docs: list[dict], kinds=("PyTorchJob", "MPIJob", "TrainJob")) -> dict:
    jobs = [d for d in docs if d.get("kind") in kinds]
    if len(jobs) != 1:
        raise UserError(f"the manifest must hold exactly one training job ({', '.join(kinds)}); found {len(jobs)}")
    return jobs[0]


# ---------------------------------------------------------------------------------------------
# cluster


def _log_time(stamp: str) -> tuple[str, int]:
    """Sortable key of a kubelet RFC3339Nano timestamp (its trailing zeros are trimmed, so plain
    string order is wrong: ``...:05.1Z`` > ``...:05.12Z``)."""
    body = stamp.rstrip("Z")
    whole, _, frac = body.partition(".")
    return whole, int((frac + "000000000")[:9])


def _log_streamer(client, namespace: str, name: str, out, clock=time.time, list_pods=None, container: str = "pytorch"):
    """A wait callback printing each pod's log lines that appeared since the last poll.

    Incremental: after a pod's first read, each poll asks only for ``since_seconds`` (the time
    since that pod's previous read, plus one second of overlap) with ``timestamps``; lines at or
    before the last printed timestamp are the overlap and are skipped. A week-long job's log is
    thus read once, not once per poll. ``list_pods`` (default: TrainingClient.get_job_pods) and
    ``container`` serve other kinds (a TrainJob's JobSet pods, container ``node``).
    """
    if list_pods is None:
        def list_pods():
            return client.get_job_pods(name=name, namespace=namespace)

    last_read: dict[str, float] = {}
    last_key: dict[str, tuple[str, int]] = {}
    seen_at_last: dict[str, set[str]] = {}  # lines printed with exactly the last timestamp

    def callback(_job) -> None:
        try:
            pods = list_pods()
        except (RuntimeError, TimeoutError):
            return
        for pod in pods:
            pname = pod.metadata.name
            if pod.status is None or pod.status.phase == "Pending":
                continue
            kwargs = {}
            if pname in last_read:
                kwargs["since_seconds"] = max(1, math.ceil(clock() - last_read[pname]) + 1)
            started = clock()
            try:
                text = client.core_api.read_namespaced_pod_log(name=pname, namespace=namespace, container=container,
                                                               timestamps=True, **kwargs)
            except Exception:  # noqa: BLE001 - a pod that is not ready yet: try next poll
                continue
            last_read[pname] = started
            for raw in text.splitlines():
                stamp, _, line = raw.partition(" ")
                key = _log_time(stamp)
                prev = last_key.get(pname)
                if prev is not None and (key < prev or (key == prev and raw in seen_at_last[pname])):
                    continue
                if key != prev:
                    last_key[pname], seen_at_last[pname] = key, set()
                seen_at_last[pname].add(raw)
                print(f"[{pname}] {line}", file=out, flush=True)

    return callback


def _master_tail(client, namespace: str, name: str, lines: int) -> str:
    try:
        logs, _ = client.get_job_logs(name=name, namespace=namespace, is_master=True)
    except (RuntimeError, TimeoutError, ValueError):
        return ""
    text = "\n".join(logs.values())
    return " | ".join(text.strip().splitlines()[-lines:])


def make_client(namespace: str, kind: str = "PyTorchJob", client_configuration=None, config_file: str | None = None):
    from kubeflow.training import TrainingClient

    return TrainingClient(config_file=config_file, client_configuration=client_configuration, namespace=namespace,
                          job_kind=kind)


def launch_cluster(docs: list[dict], *, client=None, namespace: str | None = None, wait_timeout: float = 7 * 24 * 3600,
                   polling_interval: float = 15, delete: str = "on-success", tail_lines: int = 20,
                   out=sys.stdout) -> dict:
    """Create the job (and its ConfigMaps), wait for Succeeded/Failed, stream logs, clean up."""
    from kubeflow.training.utils.utils import FakeResponse
    from kubernetes.client.rest import ApiException

    if delete not in ("on-success", "always", "never"):
        raise UserError(f"--delete {delete!r}: choose on-success, always or never")
    job = find_job(docs)
    kind = job["kind"]
    if kind == "TrainJob":
        return launch_trainjob(docs, api_client=client.api_client if client is not None else None,
                               namespace=namespace, wait_timeout=wait_timeout, polling_interval=polling_interval,
                               delete=delete, tail_lines=tail_lines, out=out)
    if kind not in JOB_KINDS:
        raise UserError(f"launch on a cluster supports {', '.join(sorted(JOB_KINDS))} (kubeflow-training "
                        f"TrainingClient); apply a {kind} with `kubectl apply --server-side -f`")
    name = job["metadata"]["name"]
    ns = namespace or job["metadata"].get("namespace") or "default"
    client = client or make_client(ns, kind)
    for cm in (d for d in docs if d.get("kind") == "ConfigMap"):
        body = {**cm, "metadata": {**cm["metadata"], "namespace": ns}}
        try:
            client.core_api.create_namespaced_config_map(namespace=ns, body=body)
        except ApiException as err:
            if err.status != 409:  # names carry the config hash: an existing one has this content
                raise RuntimeError(f"cannot create ConfigMap {ns}/{cm['metadata']['name']}: {err.reason}") from None
    model = client.api_client.deserialize(FakeResponse({**job, "metadata": {**job["metadata"], "namespace": ns}}),
                                          "KubeflowOrgV1PyTorchJob")
    client.create_job(job=model, namespace=ns)
    print(f"created {kind} {ns}/{name}", file=out, flush=True)
    status = "Failed"
    try:
        final = client.wait_for_job_conditions(
            name=name, namespace=ns, job_kind=kind, expected_conditions={"Succeeded", "Failed"},
            wait_timeout=wait_timeout, polling_interval=polling_interval,
            callback=_log_streamer(client, ns, name, out))
        conditions = client.get_job_conditions(job=final, job_kind=kind)
        status = "Succeeded" if any(c.type == "Succeeded" and c.status == "True" for c in conditions) else "Failed"
        if status == "Failed":
            why = "; ".join(f"{c.type}: {c.reason or ''} {c.message or ''}".strip() for c in conditions)
            tail = _master_tail(client, ns, name, tail_lines)
            raise JobFailed(f"{kind} {ns}/{name} failed ({why}); last log lines: {tail or '<none>'}")
    finally:
        if delete == "always" or (delete == "on-success" and status == "Succeeded"):
            client.delete_job(name=name, namespace=ns, job_kind=kind)
            print(f"deleted {kind} {ns}/{name}", file=out, flush=True)
    print(f"{kind} {ns}/{name} succeeded", file=out, flush=True)
    return {"name": name, "namespace": ns, "status": status}


TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # Trainer v2 runs a TrainJob as a JobSet of its name


class _CoreClient:
    """The member of TrainingClient the log streamer reads logs with, for a plain CoreV1Api."""

    def __init__(self, core_api):
        self.core_api = core_api


def launch_trainjob(docs: list[dict], *, api_client=None, namespace: str | None = None,
                    wait_timeout: float = 7 * 24 * 3600, polling_interval: float = 15, delete: str = "on-success",
                    tail_lines: int = 20, out=sys.stdout, clock=time.monotonic) -> dict:
    """Kubeflow Trainer v2: create the TrainJob (and its ConfigMaps) with the Kubernetes API, wait
    for its ``Complete`` or ``Failed`` condition, stream its JobSet pods' logs (container ``node``)
    incrementally, raise :class:`JobFailed` with the conditions and the last log lines on failure,
    and delete it per ``delete``. (kubeflow-training's TrainingClient 1.9 speaks only v1 kinds.)"""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.rest import ApiException

    if delete not in ("on-success", "always", "never"):
        raise UserError(f"--delete {delete!r}: choose on-success, always or never")
    job = find_job(docs, kinds=("TrainJob",))
    name = job["metadata"]["name"]
    ns = namespace or job["metadata"].get("namespace") or "default"
    if api_client is None:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()
        api_client = k8s.ApiClient()
    core, custom = k8s.CoreV1Api(api_client), k8s.CustomObjectsApi(api_client)
    group, version, plural = TRAINJOB_API
    for cm in (d for d in docs if d.get("kind") == "ConfigMap"):
        try:
            core.create_namespaced_config_map(namespace=ns, body={**cm, "metadata": {**cm["metadata"], "namespace": ns}})
        except ApiException as err:
            if err.status != 409:  # names carry the config hash: an existing one has this content
                raise RuntimeError(f"cannot create ConfigMap {ns}/{cm['metadata']['name']}: {err.reason}") from None
    custom.create_namespaced_custom_object(group, version, ns, plural,
                                           {**job, "metadata": {**job["metadata"], "namespace": ns}})
    print(f"created TrainJob {ns}/{name}", file=out, flush=True)

    def pods():
        return core.list_namespaced_pod(ns, label_selector=f"{JOBSET_LABEL}={name}").items

    stream = _log_streamer(_CoreClient(core), ns, name, out, list_pods=pods, container="node")
    status, start = "Failed", clock()
    try:
        while True:
            obj = custom.get_namespaced_custom_object(group, version, ns, plural, name)
            stream(obj)
            conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []
                     if c.get("status") == "True"}
            if "Complete" in conds:
                status = "Succeeded"
                break
            if "Failed" in conds:
                tail: list[str] = []
                for pod in pods():
                    try:
                        text = core.read_namespaced_pod_log(pod.metadata.name, ns, container="node",
                                                            tail_lines=tail_lines)
                    except ApiException:
                        continue
                    tail += text.strip().splitlines()
                why = "; ".join(f"{t}: {c.get('reason', '')} {c.get('message', '')}".strip() for t, c in conds.items())
                raise JobFailed(f"TrainJob {ns}/{name} failed ({why}); last log lines: "
                                f"{' | '.join(tail[-tail_lines:]) or '<none>'}")
            if clock() - start > wait_timeout:
                raise TimeoutError(f"TrainJob {ns}/{name}: no Complete/Failed condition after {wait_timeout:.0f} s")
            time.sleep(polling_interval)
    finally:
        if delete == "always" or (delete == "on-success" and status == "Succeeded"):
            custom.delete_namespaced_custom_object(group, version, ns, plural, name)
            print(f"deleted TrainJob {ns}/{name}", file=out, flush=True)
    print(f"TrainJob {ns}/{name} succeeded", file=out, flush=True)
    return {"name": name, "namespace": ns, "status": status}


# ---------------------------------------------------------------------------------------------
# local emulation


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def operator_env(job_name: str, node_rank: int, n_pods: int, nproc: int, port: int) -> dict[str, str]:
    """What training-operator v1 injects into every PyTorchJob pod (Master present, non-elastic)."""
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",  # stands for <job>-master-0 (headless Service of the Master)
        "MASTER_PORT": str(port),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
        "WORLD_SIZE": str(n_pods * nproc),
        "RANK": str(node_rank),
        "PET_NODE_RANK": str(node_rank),
        "PET_NNODES": str(n_pods),
        "PET_NPROC_PER_NODE": str(nproc),
    }


def _nproc(value) -> int:
    if value in (None, "auto", "cpu"):
        return 1
    if value == "gpu":
        import torch

        return max(1, torch.cuda.device_count())
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"nprocPerNode {value!r}: expected an integer, auto, cpu or gpu") from None


def _writable(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK)


def _rewriter(remap: dict[str, str]):
    """Map a container path under a remapped mount to its local directory (longest mount first)."""
    mounts = sorted(remap, key=len, reverse=True)

    def rewrite(s: str) -> str:
        for mp in mounts:
            if s == mp or s.startswith(mp.rstrip("/") + "/"):
                return remap[mp] + s[len(mp):]
        return s

    return rewrite


def _pod_plan(job: dict, docs: list[dict], workdir: Path, port: int) -> list[dict]:
    spec = job["spec"]
    reps = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in reps:
        raise UserError("PyTorchJob has no Master replica: the operator would set no MASTER_ADDR/RANK/WORLD_SIZE")
    n_master = int(reps["Master"].get("replicas", 1))
    n_workers = int((reps.get("Worker") or {}).get("replicas", 1 if "Worker" in reps else 0))
    if n_master != 1:
        raise UserError(f"Master.replicas must be 1 (got {n_master})")
    n_pods = 1 + n_workers
    nproc = _nproc(spec.get("nprocPerNode"))
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d.get("kind") == "ConfigMap"}
    name = job["metadata"]["name"]
    pods = []
    for rank in range(n_pods):
        rtype, idx = ("Master", 0) if rank == 0 else ("Worker", rank - 1)
        pod_spec = reps[rtype]["template"]["spec"]
        containers = [c for c in pod_spec.get("containers", []) if c.get("name") == "pytorch"]
        if not containers:
            raise UserError(f"{rtype} has no container named 'pytorch'")
        c = containers[0]
        pod_name = f"{name}-{rtype.lower()}-{idx}"
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        remap: dict[str, str] = {}
        for m in c.get("volumeMounts", []):
            vol = volumes.get(m["name"])
            if vol is None:
                raise UserError(f"{pod_name}: volumeMount {m['name']!r} has no volume")
            local = workdir / pod_name / m["name"]
            if "configMap" in vol:
                cm = vol["configMap"]["name"]
                if cm not in configmaps:
                    raise UserError(f"{pod_name}: ConfigMap {cm!r} is not in the manifest")
                local.mkdir(parents=True, exist_ok=True)
                for key, text in configmaps[cm].items():
                    (local / key).write_text(text, encoding="utf-8")
                remap[m["mountPath"]] = str(local)
            elif "emptyDir" in vol:
                if not _writable(m["mountPath"]):
                    local.mkdir(parents=True, exist_ok=True)
                    remap[m["mountPath"]] = str(local)
            elif "ephemeral" in vol:  # a per-pod volume claim: a fresh directory of this pod
                local.mkdir(parents=True, exist_ok=True)
                remap[m["mountPath"]] = str(local)
            else:
                raise UserError(f"{pod_name}: volume {m['name']!r} type is not emulated locally "
                                "(configMap, emptyDir, ephemeral)")

        rewrite = _rewriter(remap)
        env = operator_env(name, rank, n_pods, nproc, port)
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = rewrite(expand_vars(str(e["value"]), env))
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                if e["name"] in os.environ:
                    env[e["name"]] = os.environ[e["name"]]
                elif not ref.get("optional"):
                    raise UserError(f"{pod_name}: secret {ref['name']}/{ref['key']} for {e['name']}: set {e['name']} "
                                    "in the environment to emulate it")
            elif "configMapKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["configMapKeyRef"]
                env[e["name"]] = configmaps.get(ref["name"], {}).get(ref["key"], "")
        argv = [rewrite(expand_vars(a, env)) for a in [*c.get("command", []), *c.get("args", [])]]
        if not argv:
            raise UserError(f"{pod_name}: the pytorch container has no command (the image entrypoint is not emulated)")
        pods.append({"name": pod_name, "argv": argv, "env": env, "cwd": c.get("workingDir")})
    return pods


def _pump(proc: subprocess.Popen, prefix: str, tail: deque, out) -> None:
    for line in iter(proc.stdout.readline, ""):
        tail.append(line.rstrip("\n"))
        print(f"[{prefix}] {line}", end="", file=out, flush=True)


def launch_local(docs: list[dict], *, timeout: float | None = None, workdir: str | Path | None = None,
                 cwd: str | Path | None = None, tail_lines: int = 20, out=sys.stdout) -> dict:
    """Run every replica of the manifest's PyTorchJob as a local process; raise JobFailed on failure."""
    job = find_job(docs)
    if job["kind"] != "PyTorchJob":
        raise UserError(f"--local emulates the PyTorchJob operator only (got {job['kind']})")
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="r1zero-launch-")) if own_tmp else Path(workdir)
    port = _free_port()
    pods = _pod_plan(job, docs, root, port)
    # The local Python environment stands in for the image: its bin dir first on PATH (torchrun).
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    procs, threads, tails = [], [], {}
    start = time.monotonic()
    try:
        for pod in pods:
            env = {**os.environ, "PATH": path, **pod["env"]}
            exe = shutil.which(pod["argv"][0], path=path) or pod["argv"][0]
            tails[pod["name"]] = deque(maxlen=tail_lines)
            p = subprocess.Popen([exe, *pod["argv"][1:]], env=env, cwd=pod["cwd"] or cwd, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p, pod["name"], tails[pod["name"]], out), daemon=True)
            t.start()
            threads.append(t)
        codes: dict[str, int] = {}
        while len(codes) < len(procs):
            for pod, p in zip(pods, procs, strict=True):
                if pod["name"] not in codes and p.poll() is not None:
                    codes[pod["name"]] = p.returncode
            if any(c != 0 for c in codes.values()):
                break  # one replica failed: the job fails (OnFailure restarts are not emulated)
            if timeout is not None and time.monotonic() - start > timeout:
                raise JobFailed(f"{job['metadata']['name']}: timed out after {timeout:.0f} s")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
        for t in threads:
            t.join(timeout=5)
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
    detected = codes
    codes = {pod["name"]: p.returncode for pod, p in zip(pods, procs, strict=True)}
    failed = {n: c for n, c in codes.items() if c != 0}
    if failed:  # name the replica that failed first, not one stopped because of it
        first = next((n for n, c in detected.items() if c != 0), next(iter(failed)))
        raise JobFailed(f"{job['metadata']['name']} failed: exit codes {failed}; last lines of {first}: "
                        + " | ".join(tails[first]))
    print(f"{job['metadata']['name']} succeeded ({len(pods)} pods, {time.monotonic() - start:.1f} s)", file=out, flush=True)
    return {"name": job["metadata"]["name"], "status": "Succeeded", "pods": codes}
