"""The built images (slow; session fixture ``images`` builds them or reuses up-to-date ones).

Every command a checked-in manifest or the compiled pipeline names exists in its image and starts
as the manifest's uid; the runtime image carries the compiled pipeline; both push to a loopback
registry (Debian's docker-registry, started here on a free port).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from r1zero.cluster.containers import Pod, check_pod_image, plan
from r1zero.cluster.launch import load_manifest
from r1zero.images import TAG, UID, docker, image_user, push
from r1zero.train.dist import free_port

REPO = Path(__file__).resolve().parents[2]
JOB_MANIFESTS = sorted((REPO / "manifests" / "jobs").rglob("*.yaml"))

# slow; the first test's setup may build the images cold (about 11 min here), within the timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_images_run_as_the_one_uid(images):
    for image in images.values():
        assert image_user(image) == str(UID)
        out = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--entrypoint", "/bin/sh",
                     image, "-c", "id -u; id -g; test -w /tmp && echo tmp-writable; echo $HOME")
        assert out.stdout.split() == [str(UID), str(UID), "tmp-writable", "/home/r1zero"]


def test_runtime_image_carries_the_compiled_pipeline(runtime_image):
    script = ("import hashlib, pipelines.cli as c; "
              "print(c.DEFAULT_PACKAGE, hashlib.sha256(c.DEFAULT_PACKAGE.read_bytes()).hexdigest())")
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "python", runtime_image, "-c", script)
    path, digest = out.stdout.split()
    assert path.startswith("/opt/venv/lib/python3.11/site-packages/pipelines/")
    assert digest == hashlib.sha256((REPO / "pipelines" / "r1zero_pipeline.yaml").read_bytes()).hexdigest()
    help_ = docker("run", "--rm", "--network", "none", runtime_image, "pipeline", "submit", "--help").stdout
    assert "--package" in help_


def test_train_image_has_sshd_pdsh_and_the_deepspeed_launcher(train_image):
    out = docker("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", train_image, "-c",
                 "for c in sshd pdsh ssh ssh-keygen g++ deepspeed torchrun; do command -v $c; done; /usr/sbin/sshd -t -f "
                 "/home/r1zero/.sshd_config -h /etc/hostname 2>&1 | head -1; pdsh -L 2>&1 | grep -c ssh")
    lines = out.stdout.split("\n")
    assert lines[:7] == ["/usr/sbin/sshd", "/usr/bin/pdsh", "/usr/bin/ssh", "/usr/bin/ssh-keygen", "/usr/bin/g++",
                         "/opt/venv/bin/deepspeed", "/opt/venv/bin/torchrun"], out.stdout
    assert int(lines[-2]) >= 1, "pdsh has its ssh rcmd module"


@pytest.mark.parametrize("manifest", JOB_MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_job_command_exists_in_its_image_as_the_manifests_uid(manifest, images, vllm_image, tmp_path):
    # vllm_image: GRPO jobs with vLLM rollouts run in it (a100-13b), so it must be built, not left over
    job, pods = plan(load_manifest(manifest), tmp_path / "root", tmp_path / "staging")
    seen = set()
    for pod in pods:
        key = (pod.image, pod.user, (pod.entrypoint or [""])[0])
        if key in seen:
            continue
        seen.add(key)
        facts = check_pod_image(pod)
        assert facts["uid"] == str(UID), facts
        assert facts["path"], facts


def test_cronjob_and_pipeline_commands_exist_in_the_runtime_image(images, tmp_path):
    checked = 0
    for doc in load_manifest(REPO / "manifests" / "base" / "cronjob.yaml"):
        if doc["kind"] != "CronJob":
            continue
        spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for c in spec["containers"]:
            sc = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
            pod = Pod(name=doc["metadata"]["name"], image=c["image"], entrypoint=c.get("command"), args=c.get("args"),
                      env={}, aliases=[], user=f"{sc['runAsUser']}:{sc['runAsGroup']}", run_as_non_root=True)
            facts = check_pod_image(pod)
            assert facts["uid"] == str(UID) and facts["path"], facts
            checked += 1
    ir = next(yaml.safe_load_all((REPO / "pipelines" / "r1zero_pipeline.yaml").read_text()))
    for name, ex in ir["deploymentSpec"]["executors"].items():
        c = ex["container"]
        pod = Pod(name=name, image=c["image"], entrypoint=c["command"], args=c.get("args"), env={}, aliases=[])
        facts = check_pod_image(pod)
        assert facts["uid"] == str(UID) and facts["path"], facts
        checked += 1
    assert checked >= 2


def test_images_push_to_a_loopback_registry(images, tmp_path, wait_http):
    port = free_port()
    cfg = tmp_path / "registry.yml"
    cfg.write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {tmp_path}/data}}}}\n"
                   f"http: {{addr: 127.0.0.1:{port}}}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    pushed: list[str] = []
    try:
        wait_http(base + "/v2/")
        pushed = push(f"127.0.0.1:{port}", log=lambda m: None)
        assert pushed == [f"127.0.0.1:{port}/r1zero/r1zero-runtime:{TAG}", f"127.0.0.1:{port}/r1zero/r1zero-train:{TAG}"]
        catalog = json.loads(urllib.request.urlopen(base + "/v2/_catalog").read())["repositories"]
        assert catalog == ["r1zero/r1zero-runtime", "r1zero/r1zero-train"]
        for repo in catalog:
            tags = json.loads(urllib.request.urlopen(f"{base}/v2/{repo}/tags/list").read())["tags"]
            assert tags == [TAG]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for name in pushed:
            docker("rmi", name, check=False)


def test_retraining_cronjob_submits_the_packaged_pipeline_from_the_runtime_image(images, tmp_path, monkeypatch):
    """manifests/base's CronJob, run once in the runtime image under its security context: `r1zero
    pipeline submit` reads the compiled pipeline packaged in the image and submits it to the KFP
    contract server (on the test network's gateway) with the mounted service-account token."""
    import sys
    import threading
    from http.server import ThreadingHTTPServer

    from r1zero.cluster.containers import launch_containers

    sys.path.insert(0, str(REPO / "tests" / "pipelines"))
    from kfp_contract_server import KFPContractServer

    net = f"r1zero-test-kfp-{tmp_path.name[-12:]}"
    docker("network", "create", net)
    gw = docker("network", "inspect", "--format", "{{(index .IPAM.Config 0).Gateway}}", net).stdout.strip()
    server = KFPContractServer(token="sa-token-for-the-test")
    server.httpd.server_close()  # serve on the gateway, the one address of this machine the pod can reach
    server.httpd = ThreadingHTTPServer((gw, 0), server.httpd.RequestHandlerClass)
    server.thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    host = f"http://{gw}:{server.httpd.server_address[1]}"
    docs = [d for f in ("config.yaml", "cronjob.yaml") for d in load_manifest(REPO / "manifests" / "base" / f)]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "r1zero-config")
    cm["data"]["KFP_HOST"] = host
    monkeypatch.setenv("R1ZERO_LOCAL_SA_TOKEN", "sa-token-for-the-test")
    try:
        with server:
            result = launch_containers([cm, next(d for d in docs if d["kind"] == "CronJob")], timeout=600, network=net)
    finally:
        docker("network", "rm", net, check=False)
    assert result["status"] == "Succeeded" and result["images"][0]["uid"] == str(UID)
    runs = [r for r in server.requests if r["method"] == "POST" and r["path"].endswith(("/runs", "/recurringruns"))]
    assert runs and all(r["auth"] == "Bearer sa-token-for-the-test" for r in server.requests)
    spec = runs[-1]["body"]["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # with a platform spec, kfp nests it
    # what the image packages (test_runtime_image_carries_the_compiled_pipeline: the repo's file at build time)
    text = docker("run", "--rm", "--network", "none", "--entrypoint", "python", images["runtime"], "-c",
                  "import pipelines.cli as c; print(c.DEFAULT_PACKAGE.read_text())").stdout
    packaged = next(yaml.safe_load_all(text))
    # kfp.Client rewrites caching options and the display name; the components and executors are the package's
    assert spec["deploymentSpec"] == packaged["deploymentSpec"] and spec["components"] == packaged["components"]
