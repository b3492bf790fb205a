"""Rendered PyTorchJob / MPIJob / TrainJob: structure, GPU knobs, determinism, CLI."""

from __future__ import annotations

import yaml

from r1zero.cli import main
from r1zero.cluster.render import dump_yaml, fit_parallel, render_stage
from r1zero.config import load_config

TINY = "configs/tiny.yaml"
A100 = "configs/a100-13b.yaml"


def _job(preset, stage="pretrain", kind="pytorchjob", overrides=()):
    cfg = load_config(preset, list(overrides))
    cm, job = render_stage(cfg, stage, kind)
    return cfg, cm, job


def test_pytorchjob_tiny_structure():
    cfg, cm, job = _job(TINY)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "tiny-pretrain"
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 1  # tiny: 2 nodes
    assert job["spec"]["nprocPerNode"] == "1"
    c = reps["Master"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch"
    # bare torchrun: no topology flags, the operator's PET_* variables carry them
    assert c["command"] == ["torchrun"]
    assert not any(a.startswith(("--nnodes", "--nproc", "--node", "--master", "--rdzv")) for a in c["args"])
    assert c["args"][:4] == ["-m", "r1zero.cli", "pretrain", "--config"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["resources"]["requests"] == c["resources"]["limits"]
    # the resolved config travels in the ConfigMap the pod mounts
    loaded = yaml.safe_load(cm["data"]["config.yaml"])
    assert loaded["name"] == "tiny" and loaded["parallel"]["dp"] == 2  # dp fitted to 2 nodes x 1
    vols = {v["name"]: v for v in reps["Master"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    annotations = reps["Master"]["template"]["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "false"
    pod = reps["Master"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == cfg.cluster.s3_secret
    assert {p["name"] for p in c["ports"]} >= {"metrics-0", "pytorchjob-port"}
    rp = job["spec"]["runPolicy"]
    assert rp["cleanPodPolicy"] == "Running" and rp["backoffLimit"] == 3 and "ttlSecondsAfterFinished" in rp


def test_pytorchjob_a100_gpu_knobs():
    cfg, _, job = _job(A100, overrides=["cluster.rdma_resource=rdma/rdma_shared_device_a", "cluster.queue=research",
                                        "cluster.scheduler_name=volcano", "cluster.priority_class=high",
                                        "cluster.elastic_max_nodes=160", "cluster.active_deadline_seconds=864000"])
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert reps["Worker"]["replicas"] == 127 and job["spec"]["nprocPerNode"] == "8"
    pod = reps["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["schedulerName"] == "volcano"
    res = pod["containers"][0]["resources"]["limits"]
    assert res["nvidia.com/gpu"] == "8" and res["rdma/rdma_shared_device_a"] == "1"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NCCL_IB_DISABLE"] == "0" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    rp = job["spec"]["runPolicy"]
    assert rp["schedulingPolicy"] == {"minAvailable": 128, "queue": "research", "priorityClass": "high"}
    assert rp["activeDeadlineSeconds"] == 864000
    assert job["spec"]["elasticPolicy"]["maxReplicas"] == 160
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"
    assert len(pod["containers"][0]["ports"]) == 8 + 1  # one metrics port per local rank + master port


def test_grpo_args_and_uris():
    _, _, job = _job(TINY, stage="grpo")
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[2] == "grpo"
    assert args[args.index("--policy") + 1].endswith("/tiny/pretrain")
    assert args[args.index("--out") + 1].endswith("/tiny/grpo")


def test_mpijob_and_trainjob():
    _, _, mpi = _job(A100, kind="mpijob")
    assert mpi["apiVersion"] == "kubeflow.org/v2beta1"
    assert mpi["spec"]["slotsPerWorker"] == 8
    reps = mpi["spec"]["mpiReplicaSpecs"]
    assert reps["Launcher"]["replicas"] == 1 and reps["Worker"]["replicas"] == 128
    launcher = reps["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["command"] == ["deepspeed"] and "/etc/mpi/hostfile" in launcher["args"]
    _, _, tj = _job(A100, kind="trainjob")
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert tj["spec"]["trainer"]["numNodes"] == 128 and tj["spec"]["trainer"]["numProcPerNode"] == 8
    assert tj["spec"]["runtimeRef"]["name"] == "torch-distributed"


def test_deterministic_output():
    cfg = load_config(A100)
    a = dump_yaml(render_stage(cfg, "pretrain", "pytorchjob"))
    b = dump_yaml(render_stage(load_config(A100), "pretrain", "pytorchjob"))
    assert a == b
    assert "&id" not in a  # no YAML anchors: each replica spec is spelled out
    changed = dump_yaml(render_stage(load_config(A100, ["pretrain.lr=1e-4"]), "pretrain", "pytorchjob"))
    assert changed != a  # the config hash names the ConfigMap


def test_fit_parallel_and_errors():
    cfg = load_config(A100)
    assert fit_parallel(cfg) is cfg  # 128 x 8 = dp1024 * tp1 * pp1
    import pytest

    from r1zero.errors import UserError

    with pytest.raises(UserError, match="not divisible"):
        fit_parallel(load_config(A100, ["cluster.nodes=3", "cluster.gpus_per_node=3", "parallel.tp=4", "parallel.pp=2",
                                        "parallel.dp=128"]))
    with pytest.raises(UserError, match="unknown stage"):
        render_stage(cfg, "sft", "pytorchjob")
    with pytest.raises(UserError, match="gpus_per_node is 0"):
        render_stage(load_config(A100, ["cluster.gpus_per_node=0"]), "pretrain", "pytorchjob")


def test_cli_render(tmp_path, capsys):
    assert main(["render", "--config", TINY, "--stage", "pretrain", "--kind", "pytorchjob", "--out", str(tmp_path),
                 "--data", "/data/x", "--model-out", "/out/y"]) == 0
    docs = list(yaml.safe_load_all((tmp_path / "pretrain-pytorchjob.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    args = docs[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[-4:] == ["--data", "/data/x", "--out", "/out/y"]
    capsys.readouterr()
    assert main(["render", "--config", TINY, "--stage", "pretrain", "--out", str(tmp_path)]) == 2
    assert "--kind" in capsys.readouterr().err
    assert main(["render", "--config", TINY, "--stage", "pretrain", "--kind", "tfjob", "--out", "-"]) == 2


def _env(container) -> dict:
    return {e["name"]: e for e in container["env"]}


def test_rdma_option_adds_resource_ipc_lock_and_nccl_ib():
    _, _, job = _job(A100, overrides=["cluster.rdma_resource=rdma/ib", "cluster.ib_hca=mlx5_0,mlx5_1",
                                      "cluster.ib_gid_index=3"])
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["rdma/ib"] == "1" == c["resources"]["requests"]["rdma/ib"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    env = {k: v.get("value") for k, v in _env(c).items()}
    assert env["NCCL_IB_DISABLE"] == "0" and env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and env["NCCL_IB_GID_INDEX"] == "3"
    # without RDMA: no capability added, IB off (NCCL would probe HCAs the pod does not have)
    _, _, plain = _job(A100)
    c = plain["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    env = {k: v.get("value") for k, v in _env(c).items()}
    assert env["NCCL_IB_DISABLE"] == "1" and "NCCL_IB_HCA" not in env
    # the MPIJob workers and the TrainJob carry the same RDMA settings
    _, _, mpi = _job(A100, kind="mpijob", overrides=["cluster.rdma_resource=rdma/ib"])
    w = mpi["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert "IPC_LOCK" in w["securityContext"]["capabilities"]["add"]
    _, _, tj = _job(A100, kind="trainjob", overrides=["cluster.rdma_resource=rdma/ib"])
    assert tj["spec"]["trainer"]["resourcesPerNode"]["limits"]["rdma/ib"] == "1"
    assert {e["name"]: e.get("value") for e in tj["spec"]["trainer"]["env"]}["NCCL_IB_DISABLE"] == "0"


def test_gang_scheduling_options_for_128_pods():
    import pytest

    from r1zero.errors import UserError

    _, _, kueue = _job(A100, overrides=["cluster.gang=kueue", "cluster.queue=team-a"])
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "schedulingPolicy" not in kueue["spec"]["runPolicy"]  # Kueue admits the whole workload
    _, _, tj = _job(A100, kind="trainjob", overrides=["cluster.gang=kueue", "cluster.queue=team-a"])
    assert tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for gang, sched in (("volcano", "volcano"), ("coscheduling", "scheduler-plugins-scheduler")):
        for kind, reps in (("pytorchjob", "pytorchReplicaSpecs"), ("mpijob", "mpiReplicaSpecs")):
            _, _, job = _job(A100, kind=kind, overrides=[f"cluster.gang={gang}"])
            assert job["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 128
            assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
            for rs in job["spec"][reps].values():
                assert rs["template"]["spec"]["schedulerName"] == sched
    with pytest.raises(UserError, match="needs cluster.queue"):
        load_config(A100, ["cluster.gang=kueue"])
    with pytest.raises(UserError, match="podGroupPolicy"):
        _job(A100, kind="trainjob", overrides=["cluster.gang=volcano"])


def test_scratch_volume_sized_from_the_model_not_tmp():
    def scratch(job, reps="pytorchReplicaSpecs", rtype="Master"):
        spec = job["spec"][reps][rtype]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        return vols, mounts, _env(spec["containers"][0])

    _, _, big = _job(A100)
    vols, mounts, env = scratch(big)
    claim = vols["scratch"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    # 13B MoE, ZeRO-1 over 128 nodes: 16 B/param / 128 staging + 2 B/param cache + 1 GiB, +25%
    assert claim["resources"]["requests"]["storage"] == "34Gi"
    assert mounts["scratch"] == "/scratch" and env["R1ZERO_CACHE"]["value"] == "/scratch/cache"
    assert vols["tmp"]["emptyDir"]["sizeLimit"] == "1Gi" and env["HOME"]["value"] == "/tmp"
    _, _, tiny = _job(TINY)
    assert scratch(tiny)[0]["scratch"]["ephemeral"]["volumeClaimTemplate"]["spec"]["resources"]["requests"] == \
        {"storage": "2Gi"}
    _, _, set_ = _job(A100, overrides=["cluster.scratch_size=500Gi", "cluster.storage_class=local-nvme"])
    claim = scratch(set_)[0]["scratch"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "500Gi" and claim["storageClassName"] == "local-nvme"


def test_trainjob_carries_credentials_shm_and_scratch():
    cfg, cm, tj = _job(A100, stage="grpo", kind="trainjob")
    env = {e["name"]: e for e in tj["spec"]["trainer"]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "R1ZERO_S3_ENDPOINT"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": cfg.cluster.s3_secret, "key": key, "optional": True}
    (ov,) = tj["spec"]["podSpecOverrides"]
    vols = {v["name"]: v for v in ov["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": cfg.cluster.shm_size}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"] and "ephemeral" in vols["scratch"]
    (c,) = ov["containers"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/r1zero", "/dev/shm", "/tmp", "/scratch"}
    assert ov["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


def test_eval_stage_is_one_gpu_pod():
    _, cm, job = _job(A100, stage="eval")
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert set(reps) == {"Master"} and job["spec"]["nprocPerNode"] == "1"
    c = reps["Master"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["args"][2] == "eval" and c["args"][c["args"].index("--model") + 1].endswith("/a100-13b/grpo")
    assert "r1zero/checkpoints" not in job["metadata"]["annotations"]
    loaded = yaml.safe_load(cm["data"]["config.yaml"])
    assert loaded["cluster"].get("nodes", 1) == 1  # 1 is the default (left out)
    cfg = load_config(A100)
    _, job = render_stage(cfg, "eval", "pytorchjob", {"model": "s3://b/m", "data": "s3://b/d", "out": "s3://b/e",
                                                      "baseline": "s3://b/base-eval"})
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--baseline", "s3://b/base-eval"]


def test_mpijob_worker_matches_the_train_image():
    """The MPIJob worker's sshd command, config path, key mount and uid are the train image's
    (images/train.Dockerfile, images/sshd_config): one uid for images and manifests."""
    import re
    from pathlib import Path

    from r1zero.cluster.render import RUN_AS

    root = Path(__file__).resolve().parents[2]
    dockerfile = (root / "images" / "train.Dockerfile").read_text()
    sshd = (root / "images" / "sshd_config").read_text()
    _, _, job = _job(TINY, kind="mpijob")
    w = job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    c = w["containers"][0]
    assert c["command"] == ["/usr/sbin/sshd"] and "openssh-server" in dockerfile
    config_path = c["args"][c["args"].index("-f") + 1]
    assert re.search(rf"COPY\s.*images/sshd_config\s+{re.escape(config_path)}\s*$", dockerfile, re.M), config_path
    host_key = re.search(r"^HostKey\s+(\S+)", sshd, re.M).group(1)
    assert str(Path(host_key).parent) == job["spec"]["sshAuthMountPath"]
    assert int(re.search(r"^ARG UID=(\d+)", dockerfile, re.M).group(1)) == RUN_AS
    assert w["securityContext"]["runAsUser"] == c["securityContext"]["runAsUser"] == RUN_AS
    import r1zero.images as images

    assert getattr(images, "UID", RUN_AS) == RUN_AS
