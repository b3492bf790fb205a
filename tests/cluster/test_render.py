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
    assert fit_parallel(cfg) is cfg  # 128 x 8 = dp128 * tp4 * pp2
    import pytest

    from r1zero.errors import UserError

    with pytest.raises(UserError, match="not divisible"):
        fit_parallel(load_config(A100, ["cluster.nodes=3", "cluster.gpus_per_node=3"]))
    with pytest.raises(UserError, match="unknown stage"):
        render_stage(cfg, "eval", "pytorchjob")
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
