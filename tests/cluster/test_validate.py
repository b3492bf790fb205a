"""Validation catches what the API server and the operators' webhooks would reject."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from r1zero.cli import main
from r1zero.cluster.render import dump_yaml, render_stage
from r1zero.cluster.validate import load_crds_from_dir, unknown_fields, validate_object, validate_paths
from r1zero.config import load_config

CRDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "crds"


@pytest.fixture(scope="module")
def crds():
    return load_crds_from_dir(CRDS)


@pytest.fixture(scope="module")
def jobs():
    cfg = load_config("configs/a100-13b.yaml")
    return {k: render_stage(cfg, "pretrain", k) for k in ("pytorchjob", "mpijob", "trainjob")}


def test_rendered_jobs_are_valid(crds, jobs):
    for kind, (cm, job) in jobs.items():
        assert validate_object(cm, crds) == ([], []), kind
        errors, _ = validate_object(job, crds)
        assert errors == [], (kind, errors)


def test_crd_schema_and_unknown_fields(crds, jobs):
    job = copy.deepcopy(jobs["pytorchjob"][1])
    job["spec"]["runPolicy"]["backoffLimit"] = "three"  # schema: integer
    job["spec"]["nprocsPerNode"] = "8"  # typo: an unknown field the schema alone would accept
    tpl = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    tpl["containers"][0]["resource"] = {}  # typo deep inside the PodTemplateSpec
    errors, _ = validate_object(job, crds)
    text = "\n".join(errors)
    assert "backoffLimit" in text and "integer" in text
    assert "spec.nprocsPerNode: unknown field" in text
    assert "spec.pytorchReplicaSpecs.Worker.template.spec.containers[0].resource: unknown field" in text
    schema = crds[("kubeflow.org", "v1", "PyTorchJob")]
    assert unknown_fields(jobs["pytorchjob"][1], schema) == []


def test_webhook_rules(crds, jobs):
    job = copy.deepcopy(jobs["pytorchjob"][1])
    job["metadata"]["name"] = "9-bad.name"
    reps = job["spec"]["pytorchReplicaSpecs"]
    reps["Master"]["replicas"] = 2
    reps["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    reps["Chief"] = copy.deepcopy(reps["Master"])
    errors = "\n".join(validate_object(job, crds)[0])
    assert "not a DNS-1035 label" in errors
    assert "Master.replicas must be 1" in errors
    assert "Worker: no container named 'pytorch'" in errors
    assert "replica type 'Chief'" in errors
    del reps["Master"]
    assert "no Master replica" in "\n".join(validate_object(job, crds)[0])
    mpi = copy.deepcopy(jobs["mpijob"][1])
    mpi["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] = 2
    assert "Launcher.replicas must be 1" in "\n".join(validate_object(mpi, crds)[0])


def test_policy_image_tags_and_resources(crds, jobs):
    job = copy.deepcopy(jobs["pytorchjob"][1])
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    c["image"] = "ghcr.io/r1zero/r1zero-train:latest"
    del c["resources"]["limits"]["memory"]
    errors = "\n".join(validate_object(job, crds)[0])
    assert "untagged or 'latest'" in errors and "no limits for memory" in errors
    c["image"] = "ghcr.io/r1zero/r1zero-train"
    assert "untagged" in "\n".join(validate_object(job, crds)[0])


def test_builtin_kinds_strict(crds):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}, "dat": {}}
    assert any("dat" in e for e in validate_object(cm, crds)[0])
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "one", "selector": {}, "template": {}}}
    assert validate_object(dep, crds)[0]
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "no schema for example.com/v1 Widget" in validate_object(unknown, crds)[0][0]


def test_paths_kustomization_and_argo(tmp_path, crds):
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\n")
    app = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": {"name": "a"},
           "spec": {"source": {"repoURL": "https://x", "path": "p"}, "destination": {"namespace": "n"},
                    "syncPolicy": {"syncOptions": ["ServerSideApply=true"]}}}
    bad = copy.deepcopy(app)
    bad["spec"]["sauce"] = {}
    (tmp_path / "a.yaml").write_text(dump_yaml([app, bad]))
    rep = validate_paths([tmp_path], crds)
    assert rep.checked == 2
    assert any("kustomization" in n for n in rep.notes)
    assert len(rep.errors) == 1 and "sauce" in rep.errors[0] and "a.yaml#1" in rep.errors[0]


def test_cli_exit_codes(tmp_path, capsys, jobs):
    good = tmp_path / "good.yaml"
    good.write_text(dump_yaml(jobs["pytorchjob"]))
    assert main(["validate", str(good), "--crd-dir", str(CRDS)]) == 0
    assert "2 objects checked, 0 errors" in capsys.readouterr().out
    bad_job = copy.deepcopy(jobs["pytorchjob"][1])
    bad_job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(dump_yaml([bad_job]))
    assert main(["validate", str(bad), "--crd-dir", str(CRDS)]) == 1
    assert "Master.replicas must be 1" in capsys.readouterr().out
    # without CRDs a custom resource has no schema: an error, not a silent pass
    assert main(["validate", str(good)]) == 1
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert main(["validate", str(good), "--crd-dir", str(tmp_path / "nodir")]) == 2
    (tmp_path / "broken.yaml").write_text("a: [\n")
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 1
    assert yaml.safe_load(good.read_text().split("---")[0])["kind"] == "ConfigMap"


def test_crds_from_cluster(fake_k8s, jobs):
    """--from-cluster reads the installed CRDs from the API server (here a loopback fake)."""
    from kubernetes import client

    from r1zero.cluster.validate import load_crds_from_cluster

    state, conf = fake_k8s([["Created"]], [""])
    state.crds = [d for f in sorted(CRDS.glob("kubeflow.org_pytorchjobs*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    crds = load_crds_from_cluster(client.ApiClient(conf))
    assert set(crds) == {("kubeflow.org", "v1", "PyTorchJob")}
    assert validate_object(jobs["pytorchjob"][1], crds)[0] == []
    bad = copy.deepcopy(jobs["pytorchjob"][1])
    bad["spec"]["runPolicy"]["cleanupPolicy"] = "All"
    assert "spec.runPolicy.cleanupPolicy: unknown field" in validate_object(bad, crds)[0]


def _file_with(tmp_path, cm, job, name="job.yaml"):
    path = tmp_path / name
    path.write_text(dump_yaml([cm, job]), encoding="utf-8")
    return path


def test_rendered_pretraining_layout_is_checked(crds, jobs, tmp_path):
    """The dry run's layout checks on rendered jobs: world size from the replicas, layout from
    the mounted config; a layout that does not divide or fit is reported with the constraint."""
    for kind, (cm, job) in jobs.items():
        assert validate_paths([_file_with(tmp_path, cm, job)], crds).errors == [], kind
    cm, job = copy.deepcopy(jobs["pytorchjob"][0]), copy.deepcopy(jobs["pytorchjob"][1])
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 63  # 64 nodes x 8 = 512 ranks
    errors = "\n".join(validate_paths([_file_with(tmp_path, cm, job)], crds).errors)
    assert "dp(1024) * tp(1) * pp(1) = 1024 but world size is 512" in errors
    tree = yaml.safe_load(cm["data"]["config.yaml"])
    tree["model"].update(n_heads=64, n_kv_heads=2)
    tree["parallel"].update(tp=4, dp=256, ep_across_nodes=True)
    tree["pretrain"]["grad_accum"] = 4  # 1 x 4 x 256 = the global batch of 1024
    cm["data"]["config.yaml"] = yaml.safe_dump(tree)
    job = copy.deepcopy(jobs["pytorchjob"][1])
    errors = "\n".join(validate_paths([_file_with(tmp_path, cm, job)], crds).errors)
    assert "n_kv_heads(2) not divisible by tp(4)" in errors
    # the 13B model on one 4-GPU node (dp 4, parameters kept gathered) needs ~80 GB per rank
    cfg = load_config("configs/a100-13b.yaml", ["cluster.nodes=1", "cluster.gpus_per_node=4", "parallel.dp=4",
                                                "parallel.tp=1", "parallel.pp=1", "parallel.ep=1",
                                                "cluster.global_batch=32", "pretrain.grad_accum=8"])
    cm, job = render_stage(cfg, "pretrain", "pytorchjob")
    errors = "\n".join(validate_paths([_file_with(tmp_path, cm, job)], crds).errors)
    assert "parallel layout does not fit" in errors and "a100-80gb" in errors
    assert main(["validate", str(tmp_path / "job.yaml"), "--crd-dir", str(CRDS)]) == 1


def test_grpo_prompts_per_step_against_the_job_world(crds, tmp_path, capsys):
    """A GRPO job whose prompts do not divide over its ranks would exit at startup on every pod:
    `r1zero render` refuses it (exit 2, one line) and `r1zero validate` reports a rendered one."""
    cfg = load_config("configs/a100-13b.yaml")
    cm, job = render_stage(cfg, "grpo", "pytorchjob")
    assert validate_paths([_file_with(tmp_path, cm, job)], crds).errors == []
    bad = load_config("configs/a100-13b.yaml", ["grpo.prompts_per_step=512"])
    assert main(["render", "--config", "configs/a100-13b.yaml", "--set", "grpo.prompts_per_step=512",
                 "--stage", "grpo", "--kind", "pytorchjob", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grpo.prompts_per_step (512)" in err[0] and "1024 ranks" in err[0]
    tree = yaml.safe_load(cm["data"]["config.yaml"])
    tree["grpo"]["prompts_per_step"] = bad.grpo.prompts_per_step
    cm["data"]["config.yaml"] = yaml.safe_dump(tree)
    errors = "\n".join(validate_paths([_file_with(tmp_path, cm, job)], crds).errors)
    assert "grpo.prompts_per_step (512) must be divisible by the GRPO world size (1024 ranks)" in errors
