"""r1zero.cluster.containers: rendered jobs planned as containers (fast) and trained in them (slow).

The slow tests start every replica of the tiny preset's rendered PyTorchJob, MPIJob and TrainJob as
containers of the built train image (session fixture ``images``, tests/conftest.py) under the
manifest's security context, reading data from and writing the model to a moto S3 server that
listens on the test network's gateway (the containers reach nothing else of this machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from r1zero.cluster.containers import launch_containers, parse_bytes, plan
from r1zero.cluster.launch import load_manifest
from r1zero.cluster.render import dump_yaml, render_stage
from r1zero.config import load_config
from r1zero.errors import UserError
from r1zero.images import UID

TINY = ["data.n_train=200", "data.n_eval=12", "pretrain.steps=3", "pretrain.micro_batch=2", "pretrain.seq_len=32",
        "pretrain.warmup_steps=1", "pretrain.log_every=1", "pretrain.heldout_per_domain=0"]


def _plan(kind, tmp_path, overrides=()):
    docs = render_stage(load_config("configs/tiny.yaml", [*TINY, *overrides]), "pretrain", kind)
    return plan(docs, tmp_path / "root", tmp_path / "staging")


def _by_name(pods):
    return {p.name: p for p in pods}


def _common_security(pod):
    assert pod.user == f"{UID}:{UID}" and UID in pod.groups
    assert pod.cap_drop == ["ALL"] and pod.read_only and pod.no_new_privileges and pod.run_as_non_root
    assert pod.memory is not None and pod.cpus is not None and pod.shm_size is not None
    targets = {t: (kind, ro) for kind, _, t, ro in pod.mounts}
    assert targets["/etc/r1zero"] == ("bind", True) and targets["/tmp"][1] is False


def test_pytorchjob_env_contract_and_security(tmp_path):
    job, pods = _plan("pytorchjob", tmp_path)
    pods = _by_name(pods)
    assert set(pods) == {"tiny-pretrain-master-0", "tiny-pretrain-worker-0"}
    m, w = pods["tiny-pretrain-master-0"], pods["tiny-pretrain-worker-0"]
    # training-operator v1 envvar.go: the Master reaches itself on localhost, workers by Service name
    assert m.env["MASTER_ADDR"] == "localhost" and w.env["MASTER_ADDR"] == "tiny-pretrain-master-0"
    assert m.env["PET_MASTER_ADDR"] == "localhost" and w.env["PET_MASTER_ADDR"] == "tiny-pretrain-master-0"
    assert (m.env["RANK"], w.env["RANK"]) == ("0", "1") and (m.env["PET_NODE_RANK"], w.env["PET_NODE_RANK"]) == ("0", "1")
    assert m.env["WORLD_SIZE"] == "2" and m.env["PET_NNODES"] == "2" and m.env["PET_NPROC_PER_NODE"] == "1"
    assert m.env["MASTER_PORT"] == "23456"
    assert m.entrypoint == ["torchrun"] and m.args[:3] == ["-m", "r1zero.cli", "pretrain"]
    assert "tiny-pretrain-master-0" in m.aliases
    for p in pods.values():
        _common_security(p)
        assert p.env["R1ZERO_STAGE"] == "pretrain"


def test_trainjob_env_contract(tmp_path):
    job, pods = _plan("trainjob", tmp_path)
    assert [p.name for p in pods] == ["tiny-pretrain-node-0-0", "tiny-pretrain-node-0-1"]
    for i, p in enumerate(pods):
        assert p.env["PET_NODE_RANK"] == str(i) and p.env["PET_NNODES"] == "2"
        assert p.env["PET_MASTER_ADDR"] == "tiny-pretrain-node-0-0.tiny-pretrain"
        assert p.env["PET_MASTER_PORT"] == "29400"
        assert p.entrypoint == ["torchrun"] and f"{p.name}.tiny-pretrain" in p.aliases
        assert p.memory == parse_bytes(job["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"])


def test_mpijob_hostfile_ssh_and_roles(tmp_path):
    job, pods = _plan("mpijob", tmp_path)
    pods = _by_name(pods)
    workers = [p for p in pods.values() if p.service]
    launcher = pods["tiny-pretrain-launcher"]
    assert len(workers) == job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] and not launcher.service
    hostfile = (tmp_path / "root" / "configmaps" / "tiny-pretrain-config" / "hostfile").read_text().split("\n")
    assert hostfile[0] == "tiny-pretrain-worker-0.tiny-pretrain.r1zero.svc slots=1"
    assert "tiny-pretrain-worker-0.tiny-pretrain.r1zero.svc" in pods["tiny-pretrain-worker-0"].aliases
    assert launcher.env["K_MPI_JOB_ROLE"] == "launcher" and workers[0].env["K_MPI_JOB_ROLE"] == "worker"
    assert launcher.env["OMPI_MCA_orte_default_hostfile"] == "/etc/mpi/hostfile"
    ssh = job["spec"]["sshAuthMountPath"]
    for p in pods.values():
        _common_security(p)
        assert (ssh, True) in {(t, ro) for _, _, t, ro in p.mounts}
    assert workers[0].entrypoint[0] == "/usr/sbin/sshd" and launcher.entrypoint == ["deepspeed"]


def test_plan_errors_name_the_problem(tmp_path):
    docs = render_stage(load_config("configs/tiny.yaml", TINY), "pretrain", "pytorchjob")
    job = docs[-1]
    vol = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    vol.append({"name": "host", "hostPath": {"path": "/etc"}})
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "host", "mountPath": "/host"})
    with pytest.raises(UserError, match="volume 'host' of type hostPath"):
        plan(docs, tmp_path / "r", tmp_path / "s")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "r1zero.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_no_engine_is_one_line_exit_2(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(dump_yaml(render_stage(load_config("configs/tiny.yaml", TINY), "pretrain", "pytorchjob")))
    out = _cli("launch", "--local", "--containers", str(manifest), env={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "no Docker engine" in out.stderr
    out = _cli("launch", "--containers", str(manifest))
    assert out.returncode == 2 and "--local" in out.stderr


# ---------------------------------------------------------------------------------------------
# slow: built images, real containers


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the setup may build the images cold
def test_cli_missing_image_and_missing_command_exit_2(images, tmp_path):
    docs = render_stage(load_config("configs/tiny.yaml", TINY), "pretrain", "pytorchjob")
    job = docs[-1]
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        spec["template"]["spec"]["containers"][0]["image"] = "r1zero-no-such-image:0"
    (tmp_path / "a.yaml").write_text(dump_yaml(docs))
    out = _cli("launch", "--local", "--containers", str(tmp_path / "a.yaml"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "r1zero-no-such-image:0 not found" in out.stderr and "make images" in out.stderr
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        c = spec["template"]["spec"]["containers"][0]
        c["image"], c["command"] = images["runtime"], ["torchrun-missing"]
    (tmp_path / "b.yaml").write_text(dump_yaml(docs))
    out = _cli("launch", "--local", "--containers", str(tmp_path / "b.yaml"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "has no command 'torchrun-missing'" in out.stderr


@pytest.fixture(scope="module")
def s3_on_network(tmp_path_factory, wait_http):
    """A docker network and a moto S3 server on its gateway address (reachable from its containers)."""
    import boto3

    from r1zero.images import docker, require_engine

    require_engine()
    net = f"r1zero-test-{os.getpid()}"
    docker("network", "create", net)
    gw = docker("network", "inspect", "--format", "{{(index .IPAM.Config 0).Gateway}}", net).stdout.strip()
    import socket

    with socket.socket() as s:
        s.bind((gw, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", gw, "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{gw}:{port}"
    try:
        wait_http(endpoint + "/moto-api/")
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="r1zero")
        yield {"network": net, "endpoint": endpoint, "client": client, "env": creds}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        docker("network", "rm", net, check=False)


@pytest.fixture(scope="module")
def tiny_data(s3_on_network, tmp_path_factory):
    """The tiny mix, written to the network's S3 by `r1zero data mix` on this machine."""
    uri = "s3://r1zero/ci/data"
    sets = [a for o in TINY for a in ("--set", o)]
    out = _cli("data", "mix", "--config", "configs/tiny.yaml", *sets, "--set",
               f"store.endpoint_url={s3_on_network['endpoint']}", "--out", uri, env=s3_on_network["env"])
    assert out.returncode == 0, out.stderr[-2000:]
    return uri


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the setup may build the images cold
@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob", "mpijob"])
def test_rendered_job_trains_tiny_in_containers(kind, images, s3_on_network, tiny_data, tmp_path, monkeypatch, capsys):
    """`r1zero render` output, untouched, started in the train image: dp=2 pretraining to the end."""
    s3 = s3_on_network
    cfg = load_config("configs/tiny.yaml", [*TINY, f"store.endpoint_url={s3['endpoint']}"])
    out_uri = f"s3://r1zero/ci/pretrain-{kind}"
    docs = render_stage(cfg, "pretrain", kind, {"data": tiny_data, "out": out_uri})
    manifest = tmp_path / f"{kind}.yaml"
    manifest.write_text(dump_yaml(docs))
    for k, v in s3["env"].items():  # stand in for the r1zero-s3 Secret (secretKeyRef)
        monkeypatch.setenv(k, v)
    result = launch_containers(load_manifest(manifest), timeout=900, network=s3["network"])
    assert result["status"] == "Succeeded"
    assert {f["uid"] for f in result["images"]} == {str(UID)}
    key = f"ci/pretrain-{kind}/summary.json"
    summary = json.loads(s3["client"].get_object(Bucket="r1zero", Key=key)["Body"].read())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["final_loss"] < summary["first_loss"] + 1.0
    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket="r1zero", Prefix=f"ci/pretrain-{kind}/")["Contents"]}
    assert f"ci/pretrain-{kind}/config.json" in keys
