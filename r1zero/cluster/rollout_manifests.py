"""vLLM rollout servers for a rendered GRPO job (``grpo.rollout.engine: vllm``, ``mode: server``).

    r1zero render --config configs/a100-13b.yaml --stage grpo --kind pytorchjob \\
        --set grpo.rollout.engine=vllm --set grpo.rollout.mode=server --out out/k8s
    kubectl -n r1zero create secret generic <job>-rollout-key --from-literal=R1ZERO_ROLLOUT_KEY=$(openssl rand -hex 32)

With ``grpo.rollout.engine: vllm`` the GRPO job's pods run the vLLM image (``r1zero.images.VLLM_IMAGE``:
vLLM lives in the trainer process when colocated). With ``mode: server`` and no
``grpo.rollout.server_address`` of its own, the render adds, beside the ConfigMap and the job:

- a headless Service ``<job>-rollout`` (``clusterIP: None``, port 7100, ``publishNotReadyAddresses``
  so a rank's name resolves while its server still loads: the trainer waits ``start_timeout_s``);
- a StatefulSet ``<job>-rollout`` with one server per ``grpo.rollout.ranks_per_server`` trainer
  ranks (``replicas`` = world / ranks_per_server, default one per rank; ``podManagementPolicy:
  Parallel``): pod ``<job>-rollout-<i>`` serves ranks ``i*k .. i*k+k-1``. Each runs
  ``python -m r1zero.grpo.vllm_rollout serve --model <policy URI>`` as the images' non-root uid,
  read-only root, with the key from the Secret ``grpo.rollout.key_secret`` (default
  ``<job>-rollout-key``; ``secretKeyRef``, not optional: no key, no start), a startup + readiness + liveness probe on the TCP port (the server
  opens it once its engine is built) and the job's resources (one GPU per server on a GPU cluster).

The job's config gets ``grpo.rollout.server_address:
<job>-rollout-{rank}.<job>-rollout.<namespace>.svc:7100`` (``{server}`` in place of ``{rank}``
with ranks_per_server > 1); each trainer rank expands it from its rank
(:func:`r1zero.grpo.rollout_server.server_address`), so it reaches its pod by its stable per-pod DNS
name; the trainer pods get the same key env, and the config names the Secret
(``grpo.rollout.key_secret``, which ``r1zero validate`` checks against every ``secretKeyRef``).
The Secret itself is never rendered (no key in git): the user creates it once with the command
above (also in the StatefulSet's ``r1zero/key-secret`` annotation). The vLLM image carries sshd, pdsh and DeepSpeed's
launcher like the train image, so every job kind (PyTorchJob, MPIJob, TrainJob) runs in it.
"""

from __future__ import annotations

from r1zero.errors import UserError
from r1zero.images import TAG, TRAIN_IMAGE, VLLM_IMAGE

# r1zero.grpo.vllm_rollout.PORT (not imported: that module imports torch; tests check they agree)
ROLLOUT_PORT = 7100
KEY_ENV = "R1ZERO_ROLLOUT_KEY"  # r1zero.grpo.vllm_rollout.KEY_ENV
COMPONENT = "rollout"


def uses_vllm(cfg, stage: str) -> bool:
    return stage == "grpo" and cfg.grpo.rollout.engine == "vllm"


def renders_servers(cfg, stage: str) -> bool:
    """Server mode with no address of the user's own: the render starts the servers."""
    r = cfg.grpo.rollout
    return uses_vllm(cfg, stage) and r.mode == "server" and not r.server_address


def vllm_image(image: str) -> str:
    """The vLLM image beside the job's image: the default train image maps to ``VLLM_IMAGE``; an
    image of another registry named ``.../r1zero-train:<tag>`` to ``.../r1zero-vllm:<tag>``;
    any other image is the user's choice and kept."""
    if image == TRAIN_IMAGE:
        return VLLM_IMAGE
    repo, _, name = image.rpartition("/")
    if name.startswith("r1zero-train:"):
        return f"{repo}/r1zero-vllm:{name.split(':', 1)[1] or TAG}".lstrip("/")
    return image


def server_name(job: str) -> str:
    return f"{job}-rollout"


def key_secret(job: str) -> str:
    return f"{job}-rollout-key"


def server_address(job: str, namespace: str, ranks_per_server: int = 1) -> str:
    """The trainers' ``grpo.rollout.server_address``: the StatefulSet pod of their rank
    (``{rank}``), or of their group of ``ranks_per_server`` ranks (``{server}`` = rank // it)."""
    name = server_name(job)
    slot = "{rank}" if ranks_per_server == 1 else "{server}"
    return f"{name}-{slot}.{name}.{namespace}.svc:{ROLLOUT_PORT}"


def key_env(secret: str) -> dict:
    """The server key's env entry: a reference to key ``R1ZERO_ROLLOUT_KEY`` of Secret ``secret``."""
    return {"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": KEY_ENV}}}


def create_secret_command(secret: str, namespace: str) -> str:
    """The one command that makes the Secret the pods reference (never rendered: no key in git)."""
    return (f"kubectl -n {namespace} create secret generic {secret} "
            f"--from-literal={KEY_ENV}=$(openssl rand -hex 32)")


def prepare(cfg, stage: str, job: str):
    """The config the job runs with: the vLLM image; in server mode the key's Secret name
    (``grpo.rollout.key_secret``, default ``<job>-rollout-key``) and, when the render starts the
    servers, their address."""
    if not uses_vllm(cfg, stage):
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.cluster.image = vllm_image(cfg.cluster.image)
    r = cfg.grpo.rollout
    if r.mode == "server":
        r.key_secret = r.key_secret or key_secret(job)
    if renders_servers(cfg, stage):
        r.server_address = server_address(job, cfg.cluster.namespace, r.ranks_per_server)
    return cfg


def render_servers(cfg, job: str, world: int, policy_uri: str) -> list[dict]:
    """[headless Service, StatefulSet] of ``world / ranks_per_server`` rollout servers for the
    GRPO job ``job`` (``cfg`` as :func:`prepare` returned it)."""
    from r1zero.cluster import render as R

    name, ns, r = server_name(job), cfg.cluster.namespace, cfg.grpo.rollout
    if world < 1:
        raise UserError(f"GRPO world size {world}: no rollout servers to start")
    if world % r.ranks_per_server:
        raise UserError(f"grpo.rollout.ranks_per_server ({r.ranks_per_server}) must divide the GRPO world size "
                        f"({world} ranks)")
    selector = {**R.PART_OF, "app.kubernetes.io/component": COMPONENT, "r1zero/job": job}
    labels = {**selector, "r1zero/run": R.dns1035(cfg.name)}
    args = ["--model", policy_uri, "--port", str(ROLLOUT_PORT), "--seed", str(cfg.seed),
            "--kv-cache-gib", f"{r.kv_cache_gib:g}"]
    port = [{"name": "rollout", "containerPort": ROLLOUT_PORT, "protocol": "TCP"}]
    tmpl = R.pod_template(cfg, "grpo", "rollout", ["python", "-m", "r1zero.grpo.vllm_rollout", "serve"], args,
                          "unused", ports=port, res=_resources(cfg))
    spec, c = tmpl["spec"], tmpl["spec"]["containers"][0]
    # no config file (the server takes flags) and no training env (stage, NCCL): S3 + the key
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "config"]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "config"]
    keep = ("HOME", "R1ZERO_CACHE", "R1ZERO_PROGRESS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "R1ZERO_S3_ENDPOINT")
    c["env"] = [e for e in c["env"] if e["name"] in keep] + [key_env(r.key_secret)]
    probe = {"tcpSocket": {"port": "rollout"}, "periodSeconds": 10, "timeoutSeconds": 5}
    # the port opens once the engine is built: the startup probe allows start_timeout_s for that
    c["startupProbe"] = {**probe, "failureThreshold": max(3, int(r.start_timeout_s // 10) + 1)}
    c["readinessProbe"] = {**probe, "failureThreshold": 3}
    c["livenessProbe"] = {**probe, "failureThreshold": 6}
    meta = tmpl["metadata"]
    meta["labels"] = dict(labels)
    for k in ("checkov.io/skip1", "checkov.io/skip2", "prometheus.io/scrape", "prometheus.io/port",
              "prometheus.io/path"):  # it has probes and no /metrics
        meta["annotations"].pop(k, None)
    meta["annotations"]["checkov.io/skip4"] = ("CKV_K8S_35=S3 credentials and the rollout key come by "
                                               "secretKeyRef env (boto3 and the server read the environment)")
    mapping = ("pod ordinal = trainer RANK" if r.ranks_per_server == 1 else
               f"pod ordinal = trainer RANK // {r.ranks_per_server}")
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": dict(selector),
                 "ports": [{"name": "rollout", "port": ROLLOUT_PORT, "targetPort": "rollout", "protocol": "TCP"}]},
    }
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels),
                     "annotations": {"r1zero/serves": job, "r1zero/rank-mapping": mapping,
                                     "r1zero/key-secret": create_secret_command(r.key_secret, ns)}},
        "spec": {"serviceName": name, "replicas": world // r.ranks_per_server, "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": dict(selector)}, "template": tmpl},
    }
    return [svc, sts]


def _resources(cfg) -> dict:
    """One server per rank: the training pods' CPU and memory requests, and on a GPU cluster one
    GPU (requests = limits, as the training pods)."""
    from r1zero.cluster.render import _gpu, resources

    res = resources(cfg)
    if _gpu(cfg):
        for part in ("requests", "limits"):
            res[part] = {k: v for k, v in res[part].items() if k in ("cpu", "memory")}
            res[part]["nvidia.com/gpu"] = "1"
    return res
