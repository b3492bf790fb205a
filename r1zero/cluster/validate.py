"""Validate Kubernetes manifests offline: schemas, unknown fields, operator webhook rules, policy.

    r1zero validate manifests/ --crd-dir ../shared/crds
    r1zero validate job.yaml --from-cluster          # read the CRDs from the current kube context

Per document:
- built-in kinds (core, apps, batch, rbac, networking, ...): kubernetes-validate, strict mode
  (unknown fields rejected), against Kubernetes ``KUBE_VERSION``;
- custom resources: the CRD's ``openAPIV3Schema`` with jsonschema, plus a strict walk that
  rejects fields the schema does not declare (CRD schemas carry no additionalProperties: false),
  plus the operator's webhook rules (PyTorchJob: DNS-1035 name, only Master/Worker, a container
  named ``pytorch`` with an image in every replica, exactly one Master, Worker when elastic;
  MPIJob: one Launcher; TrainJob: DNS-1035 name);
- Argo CD ``Application``: a small built-in schema (no CRD ships with this project);
- ``kustomization.yaml``: not a resource; skipped with a note;
- policy on every pod template: no ``:latest`` or untagged image, requests and limits for cpu and
  memory on every container;
- the parallel layout of a rendered pretraining job (with its config ConfigMap in the same
  file): the config's layout must divide at the job's world size and fit the GPU, the checks
  ``r1zero plan --dry-run`` applies before any pod starts (:func:`layout_errors`).

A problem is reported as ``path#doc kind/name: message``; the CLI exits 1 when any error is found.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from r1zero.errors import UserError

KUBE_VERSION = "1.30.0"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
BUILTIN_GROUPS = {"", "apps", "batch", "rbac.authorization.k8s.io", "networking.k8s.io", "policy", "autoscaling",
                  "storage.k8s.io", "scheduling.k8s.io", "coordination.k8s.io", "apiextensions.k8s.io",
                  "admissionregistration.k8s.io", "node.k8s.io", "discovery.k8s.io", "certificates.k8s.io"}

# Argo CD Application: the fields this project uses (argo-cd pkg/apis/application/v1alpha1/types.go).
ARGO_APPLICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "argoproj.io/v1alpha1"}, "kind": {"const": "Application"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["source", "destination"], "additionalProperties": False,
            "properties": {
                "project": {"type": "string"},
                "source": {"type": "object", "required": ["repoURL"], "additionalProperties": False,
                           "properties": {"repoURL": {"type": "string"}, "path": {"type": "string"},
                                          "targetRevision": {"type": "string"}, "chart": {"type": "string"}}},
                "destination": {"type": "object", "additionalProperties": False,
                                "properties": {"server": {"type": "string"}, "name": {"type": "string"},
                                               "namespace": {"type": "string"}}},
                "syncPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "automated": {"type": "object", "additionalProperties": False,
                                  "properties": {"prune": {"type": "boolean"}, "selfHeal": {"type": "boolean"},
                                                 "allowEmpty": {"type": "boolean"}}},
                    "syncOptions": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z]+=[a-z]+$"}},
                    "retry": {"type": "object"}}},
                "ignoreDifferences": {"type": "array"},
                "revisionHistoryLimit": {"type": "integer"},
            },
        },
    },
}


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


# ---------------------------------------------------------------------------------------------
# CRDs


# libyaml's loader when built in: the PyTorchJob CRD is ~600 KB of YAML (seconds in pure Python).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=32)
def _crds_in_file(path: str, mtime_ns: int, size: int) -> dict:
    out = {}
    with open(path, encoding="utf-8") as f:
        for doc in yaml.load_all(f, Loader=_Loader):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                out.update(_crd_schemas(doc))
    return out


def load_crds_from_dir(crd_dir: str | Path) -> dict[tuple[str, str, str], dict]:
    """(group, version, kind) -> openAPIV3Schema from every CRD YAML in ``crd_dir`` (cached per file)."""
    d = Path(crd_dir)
    if not d.is_dir():
        raise UserError(f"--crd-dir {d}: not a directory")
    out = {}
    for p in sorted(d.glob("*.y*ml")):
        st = p.stat()
        out.update(_crds_in_file(str(p.resolve()), st.st_mtime_ns, st.st_size))
    return out


def load_crds_from_cluster(api_client=None) -> dict[tuple[str, str, str], dict]:
    """Read the installed CRDs (current kube context, or in-cluster config, or ``api_client``)."""
    import json

    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_kube_config()
        except Exception:  # noqa: BLE001 - fall back to in-cluster config, report one line if neither works
            try:
                config.load_incluster_config()
            except Exception as err:  # noqa: BLE001
                raise UserError(f"--from-cluster: no kube config or in-cluster config ({err})") from None
        api_client = client.ApiClient()
    # Raw JSON: the generated models would rename schema keys (x-kubernetes-*) on the round trip.
    resp = client.ApiextensionsV1Api(api_client).list_custom_resource_definition(_preload_content=False)
    out = {}
    for crd in json.loads(resp.data).get("items", []):
        out.update(_crd_schemas(crd))
    return out


def _crd_schemas(doc: dict) -> dict:
    spec = doc["spec"]
    return {(spec["group"], v["name"], spec["names"]["kind"]): v.get("schema", {}).get("openAPIV3Schema", {})
            for v in spec.get("versions", [])}


# ---------------------------------------------------------------------------------------------
# checks


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields present in ``obj`` but not declared by ``schema`` (strict mode for CRD schemas)."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(addl, dict):
                out += unknown_fields(v, addl, f"{path}.{k}")
            elif props is not None and addl is not True and not (path == "" and k in ("apiVersion", "kind", "metadata", "status")):
                out.append(f"{path}.{k}".lstrip("."))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def _schema_errors(obj: dict, schema: dict) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def webhook_errors(obj: dict) -> list[str]:
    """The training operators' admission rules (schemas cannot express them)."""
    kind, name = obj.get("kind"), obj.get("metadata", {}).get("name", "")
    errs = []
    if kind in ("PyTorchJob", "MPIJob", "TrainJob") and not DNS1035.match(name or ""):
        errs.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = obj.get("spec", {}) or {}
    if kind == "PyTorchJob":
        reps = spec.get("pytorchReplicaSpecs", {}) or {}
        for rtype, rs in reps.items():
            if rtype not in ("Master", "Worker"):
                errs.append(f"replica type {rtype!r} is not Master or Worker")
            containers = ((rs or {}).get("template", {}).get("spec", {}) or {}).get("containers", []) or []
            pt = [c for c in containers if c.get("name") == "pytorch"]
            if not pt:
                errs.append(f"{rtype}: no container named 'pytorch'")
            elif not pt[0].get("image"):
                errs.append(f"{rtype}: container 'pytorch' has no image")
        master = reps.get("Master")
        if master is None:
            errs.append("no Master replica (without it the operator sets no MASTER_ADDR/RANK/WORLD_SIZE)")
        elif master.get("replicas", 1) != 1:
            errs.append(f"Master.replicas must be 1 (got {master.get('replicas')})")
        if spec.get("elasticPolicy") and "Worker" not in reps:
            errs.append("elasticPolicy needs a Worker replica")
    elif kind == "MPIJob":
        reps = spec.get("mpiReplicaSpecs", {}) or {}
        if (reps.get("Launcher") or {}).get("replicas", 1) != 1:
            errs.append("Launcher.replicas must be 1")
        if "Launcher" not in reps:
            errs.append("no Launcher replica")
    return errs


def _pod_specs(obj: dict):
    """Every pod spec inside a workload or training job, with a label for messages."""
    kind, spec = obj.get("kind"), obj.get("spec", {}) or {}
    if kind == "Pod":
        yield "spec", spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield "template", spec.get("template", {}).get("spec", {})
    elif kind == "CronJob":
        yield "jobTemplate", spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    elif kind in ("PyTorchJob", "MPIJob"):
        for key in ("pytorchReplicaSpecs", "mpiReplicaSpecs"):
            for rtype, rs in (spec.get(key) or {}).items():
                yield rtype, (rs or {}).get("template", {}).get("spec", {})
    elif kind == "TrainJob":
        t = spec.get("trainer") or {}
        yield "trainer", {"containers": [{"name": "node", "image": t.get("image"), "resources": t.get("resourcesPerNode")}]}


def policy_errors(obj: dict) -> list[str]:
    errs = []
    for where, pod in _pod_specs(obj):
        for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            image = c.get("image") or ""
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                errs.append(f"{where}/{c.get('name')}: image {image!r} is untagged or 'latest'")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (res.get(part) or {})]
                if missing:
                    errs.append(f"{where}/{c.get('name')}: no {part} for {', '.join(missing)}")
    return errs


def validate_object(obj: dict, crds: dict, kube_version: str = KUBE_VERSION) -> tuple[list[str], list[str]]:
    """(errors, notes) for one document."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return ["not a Kubernetes object (apiVersion and kind required)"], []
    api, kind = obj["apiVersion"], obj["kind"]
    group, _, version = api.rpartition("/")
    errors: list[str] = []
    notes: list[str] = []
    if group in BUILTIN_GROUPS:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except ValidationError as err:
            errors.append(f"{'.'.join(str(p) for p in err.path) or '<root>'}: {err.message}")
        except SchemaNotFoundError:
            errors.append(f"no Kubernetes {kube_version} schema for {api} {kind}")
    elif (group, version, kind) in crds:
        schema = crds[(group, version, kind)]
        errors += _schema_errors(obj, schema)
        errors += [f"{p}: unknown field" for p in unknown_fields(obj, schema)]
    elif api == "argoproj.io/v1alpha1" and kind == "Application":
        errors += _schema_errors(obj, ARGO_APPLICATION_SCHEMA)
        notes.append("Argo CD Application checked against the built-in schema (no CRD)")
    else:
        errors.append(f"no schema for {api} {kind}: pass the CRD with --crd-dir or use --from-cluster")
    errors += webhook_errors(obj)
    errors += policy_errors(obj)
    return errors, notes


# ---------------------------------------------------------------------------------------------
# parallel layout of rendered training jobs (the checks of ``r1zero plan --dry-run``)


def job_world_size(obj: dict) -> int | None:
    """Processes a rendered training job starts: PyTorchJob (Master + Worker) x nprocPerNode,
    MPIJob Worker x slotsPerWorker, TrainJob numNodes x numProcPerNode; None for other kinds."""
    kind, spec = obj.get("kind"), obj.get("spec", {}) or {}
    try:
        if kind == "PyTorchJob":
            reps = spec.get("pytorchReplicaSpecs", {}) or {}
            nodes = sum(int((rs or {}).get("replicas", 1)) for rs in reps.values())
            return nodes * int(spec.get("nprocPerNode", 1))
        if kind == "MPIJob":
            worker = (spec.get("mpiReplicaSpecs", {}) or {}).get("Worker") or {}
            return int(worker.get("replicas", 1)) * int(spec.get("slotsPerWorker", 1))
        if kind == "TrainJob":
            t = spec.get("trainer") or {}
            return int(t.get("numNodes", 1)) * int(t.get("numProcPerNode", 1))
    except (TypeError, ValueError):
        return None
    return None


def _config_maps_named(obj) -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        cm = obj.get("configMap")
        if isinstance(cm, dict) and isinstance(cm.get("name"), str):
            out.add(cm["name"])
        for v in obj.values():
            out |= _config_maps_named(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _config_maps_named(v)
    return out


def layout_errors(job: dict, config_maps: dict[str, str]) -> list[str]:
    """The dry run's layout checks on a rendered pretraining job: the config it mounts must
    divide at the job's world size (heads, kv-heads, experts, layers, batch, world size) and fit
    the GPU by the planner (``r1zero.sizing.stage_memory``, which agrees with the dry run within
    10%; run ``r1zero plan --dry-run`` for the measured figure). A rendered GRPO job: its
    ``grpo.prompts_per_step`` must divide over the job's ranks (``Config.grpo_world_problems``)."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    component = labels.get("app.kubernetes.io/component")
    if component not in ("pretrain", "grpo"):
        return []
    world = job_world_size(job)
    texts = [config_maps[n] for n in sorted(_config_maps_named(job)) if n in config_maps]
    if world is None or not texts:
        return []
    from r1zero.config import build_config
    from r1zero.errors import UserError as _UserError
    from r1zero.sizing import GPUS, usable_bytes
    from r1zero.sizing_cli import planner_layout_bytes
    from r1zero.train.dryrun import layout_problems

    try:
        cfg = build_config(yaml.load(texts[0], Loader=_Loader) or {})
    except (_UserError, yaml.YAMLError) as err:
        return [f"mounted config: {str(err).splitlines()[0]}"]
    if component == "grpo":  # its memory checks come with the GRPO dry run (issue 16)
        return [f"grpo: {e}" for e in cfg.grpo_world_problems(world)]
    errs = [f"parallel layout: {e}" for e in layout_problems(cfg, world)]
    if not errs and cfg.cluster.gpu in GPUS:
        need, usable = planner_layout_bytes(cfg)["total"], usable_bytes(GPUS[cfg.cluster.gpu])
        if need > usable:
            errs.append(f"parallel layout does not fit: {need / 1e9:.1f} GB per rank > {usable / 1e9:.1f} GB usable "
                        f"on {cfg.cluster.gpu} (planner; r1zero plan --dry-run measures it)")
    return errs


def rollout_errors(docs: list, config_maps: dict[str, str]) -> list[str]:
    """A GRPO job in vLLM server mode: every ``R1ZERO_ROLLOUT_KEY`` env of the job (and of its
    servers) takes key ``R1ZERO_ROLLOUT_KEY`` of the Secret the config names
    (``grpo.rollout.key_secret``; the Secret itself is never rendered). When its
    ``server_address`` names StatefulSet pods (``<sts>-{rank}.<svc>.<namespace>.svc:<port>``, or
    ``-{server}.`` with ``ranks_per_server`` ranks per server) rendered in the same file: world /
    ranks_per_server servers (``replicas``), the StatefulSet's headless Service, the port."""
    from r1zero.cluster.rollout_manifests import KEY_ENV
    from r1zero.config import build_config
    from r1zero.errors import UserError as _UserError

    by = {(d.get("kind"), (d.get("metadata") or {}).get("name")): d for d in docs if isinstance(d, dict)}
    errs = []
    for job in by.values():
        if ((job.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") != "grpo":
            continue
        texts = [config_maps[n] for n in sorted(_config_maps_named(job)) if n in config_maps]
        if not texts:
            continue
        try:
            r = build_config(yaml.load(texts[0], Loader=_Loader) or {}).grpo.rollout
        except (_UserError, yaml.YAMLError):
            continue  # reported by layout_errors
        if r.engine != "vllm" or r.mode != "server":
            continue
        name = (job.get("metadata") or {}).get("name")
        errs += _key_errors(name, job, r.key_secret, KEY_ENV)
        slot = "-{server}." if "-{server}." in (r.server_address or "") else "-{rank}."
        if not r.server_address or slot not in r.server_address:
            continue
        host, _, port = r.server_address.rpartition(":")
        sts_name, _, rest = host.partition(slot)
        svc_name, ns = rest.split(".")[:2] if rest.count(".") >= 1 else (rest, "")
        sts = by.get(("StatefulSet", sts_name))
        if sts is None:
            continue  # servers run elsewhere
        errs += _key_errors(f"{name}: StatefulSet {sts_name}", sts, r.key_secret, KEY_ENV)
        spec = sts.get("spec") or {}
        world, rps = job_world_size(job), r.ranks_per_server if slot == "-{server}." else 1
        if world is not None and world % rps:
            errs.append(f"{name}: grpo.rollout.ranks_per_server ({rps}) does not divide the {world} trainer ranks")
        elif world is not None and spec.get("replicas") != world // rps:
            errs.append(f"{name}: {world} trainer ranks at {rps} per server need {world // rps} rollout servers, "
                        f"but StatefulSet {sts_name} has {spec.get('replicas')} "
                        f"(server_address uses {slot.strip('-.')})")
        if spec.get("serviceName") != svc_name:
            errs.append(f"{name}: server_address names Service {svc_name} but StatefulSet {sts_name} has "
                        f"serviceName {spec.get('serviceName')}")
        if ns and (sts.get("metadata") or {}).get("namespace") != ns:
            errs.append(f"{name}: server_address names namespace {ns}, StatefulSet {sts_name} is in "
                        f"{(sts.get('metadata') or {}).get('namespace')}")
        svc = by.get(("Service", svc_name))
        if svc is None or (svc.get("spec") or {}).get("clusterIP") != "None":
            errs.append(f"{name}: no headless Service {svc_name} for the per-rank server names")
        elif port.isdigit() and int(port) not in [p.get("port") for p in svc["spec"].get("ports") or []]:
            errs.append(f"{name}: Service {svc_name} does not expose the server_address port {port}")
        ports = [p.get("containerPort") for c in (spec.get("template") or {}).get("spec", {}).get("containers") or []
                 for p in c.get("ports") or []]
        if port.isdigit() and int(port) not in ports:
            errs.append(f"{name}: StatefulSet {sts_name} listens on {ports}, not the server_address port {port}")
    return errs


def _env_entries(obj, env_name: str) -> list[dict]:
    """Every container env entry named ``env_name`` anywhere in a manifest (any job kind)."""
    if isinstance(obj, list):
        return [e for x in obj for e in _env_entries(x, env_name)]
    if not isinstance(obj, dict):
        return []
    found = [obj] if obj.get("name") == env_name and ("value" in obj or "valueFrom" in obj) else []
    return found + [e for v in obj.values() for e in _env_entries(v, env_name)]


def _key_errors(what: str, obj: dict, secret: str | None, key_env: str) -> list[str]:
    """The server key reaches ``obj``'s containers only by a reference to the config's Secret."""
    if not secret:
        return [f"{what}: grpo.rollout.key_secret is not set in the config (the Secret holding {key_env})"]
    entries = _env_entries(obj, key_env)
    if not entries:
        return [f"{what}: no {key_env} env (the rollout server key, from Secret {secret})"]
    errs = []
    for e in entries:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef") or {}
        if "value" in e:
            errs.append(f"{what}: {key_env} has a literal value (keys do not belong in manifests: secretKeyRef)")
        elif ref.get("name") != secret or ref.get("key") != key_env:
            errs.append(f"{what}: {key_env} references Secret {ref.get('name')} key {ref.get('key')}, but the "
                        f"config names Secret {secret} key {key_env}")
    return errs


def _files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml") and q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return out


def validate_paths(paths, crds: dict, kube_version: str = KUBE_VERSION) -> Report:
    rep = Report()
    for f in _files(paths):
        if f.name in ("kustomization.yaml", "kustomization.yml"):
            rep.notes.append(f"{f}: kustomization (build input, not a resource) - skipped")
            continue
        try:
            docs = [d for d in yaml.load_all(f.read_text(encoding="utf-8"), Loader=_Loader) if d is not None]
        except yaml.YAMLError as err:
            rep.errors.append(f"{f}: not valid YAML: {str(err).splitlines()[0]}")
            continue
        config_maps = {d.get("metadata", {}).get("name"): d["data"]["config.yaml"] for d in docs
                       if isinstance(d, dict) and d.get("kind") == "ConfigMap"
                       and isinstance(d.get("data"), dict) and "config.yaml" in d["data"]}
        for i, doc in enumerate(docs):
            rep.checked += 1
            label = f"{f}#{i} {doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}" if isinstance(doc, dict) else f"{f}#{i}"
            errs, notes = validate_object(doc, crds, kube_version)
            if isinstance(doc, dict) and config_maps:
                errs = errs + layout_errors(doc, config_maps)
            rep.errors += [f"{label}: {e}" for e in errs]
            rep.notes += [f"{label}: {n}" for n in notes]
        if config_maps:
            rep.errors += [f"{f}: {e}" for e in rollout_errors(docs, config_maps)]
    return rep
