"""GRPO with vLLM rollouts on a cluster: the vLLM image, and in server mode the rollout servers
(headless Service + StatefulSet, one per trainer rank) whose per-pod DNS names the trainers'
``server_address`` resolves to (r1zero/cluster/rollout_manifests.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from r1zero.cli import main
from r1zero.cluster import rollout_manifests as rollout
from r1zero.cluster.render import dump_yaml, render_stage
from r1zero.cluster.validate import load_crds_from_dir, validate_paths
from r1zero.config import load_config
from r1zero.images import TRAIN_IMAGE, UID, VLLM_IMAGE

CRDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "crds"
SERVER = ["grpo.rollout.engine=vllm", "grpo.rollout.mode=server"]


@pytest.fixture(scope="module")
def crds():
    return load_crds_from_dir(CRDS)


def _render(preset: str, kind: str, sets=SERVER):
    return render_stage(load_config(preset, list(sets)), "grpo", kind)


def _containers(job: dict) -> list[dict]:
    if job["kind"] == "TrainJob":
        return [job["spec"]["trainer"]]
    return [rs["template"]["spec"]["containers"][0] for rs in job["spec"]["pytorchReplicaSpecs"].values()]


def _world(job: dict) -> int:
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]["numNodes"] * job["spec"]["trainer"]["numProcPerNode"]
    reps = job["spec"]["pytorchReplicaSpecs"].values()
    return sum(r["replicas"] for r in reps) * int(job["spec"]["nprocPerNode"])


@pytest.mark.parametrize("preset", ["configs/tiny.yaml", "configs/a100-13b.yaml"])
@pytest.mark.parametrize("kind", ["pytorchjob", "trainjob"])
def test_server_mode_renders_one_server_per_rank_that_the_address_resolves_to(preset, kind, crds, tmp_path):
    from r1zero.grpo.rollout_server import server_address
    from r1zero.grpo.vllm_rollout import KEY_ENV, PORT

    cm, job, svc, sts = _render(preset, kind)
    assert (svc["kind"], sts["kind"]) == ("Service", "StatefulSet")
    name, ns, world = job["metadata"]["name"], job["metadata"]["namespace"], _world(job)
    # one server per trainer rank; pod <sts>-<i> behind the headless Service serves RANK i
    assert sts["spec"]["replicas"] == world and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    address = yaml.safe_load(cm["data"]["config.yaml"])["grpo"]["rollout"]["server_address"]
    for rank in (0, world - 1):
        host, port = server_address(address, rank)
        pod = f"{sts['metadata']['name']}-{rank}"  # a StatefulSet pod's name: <name>-<ordinal>
        assert host == f"{pod}.{svc['metadata']['name']}.{ns}.svc" and port == PORT == rollout.ROLLOUT_PORT
        assert port in [p["port"] for p in svc["spec"]["ports"]]
    # the server: vLLM image, the policy the job trains, the key from the Secret, probes, non-root
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == VLLM_IMAGE and c["command"] == ["python", "-m", "r1zero.grpo.vllm_rollout", "serve"]
    policy = _containers(job)[0]["args"][_containers(job)[0]["args"].index("--policy") + 1]
    assert c["args"][c["args"].index("--model") + 1] == policy
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    key = {"name": KEY_ENV, "valueFrom": {"secretKeyRef": {"name": f"{name}-rollout-key", "key": KEY_ENV}}}
    assert key in c["env"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["tcpSocket"] == {"port": "rollout"}
    assert c["securityContext"]["runAsUser"] == UID and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["resources"]["requests"] == c["resources"]["limits"] and {"cpu", "memory"} <= set(c["resources"]["limits"])
    gpu = preset.endswith("a100-13b.yaml")
    assert (c["resources"]["limits"].get("nvidia.com/gpu") == "1") == gpu
    # the trainers run the vLLM image with the same key
    for t in _containers(job):
        assert t["image"] == VLLM_IMAGE and key in t["env"]
    # schema (built-in kinds + CRDs), operator rules and the rollout cross-check of r1zero validate
    f = tmp_path / "grpo.yaml"
    f.write_text(dump_yaml([cm, job, svc, sts]))
    rep = validate_paths([f], crds)
    assert rep.errors == [] and rep.checked == 4


def test_validate_catches_a_server_count_or_name_that_misses_the_ranks(crds, tmp_path):
    cm, job, svc, sts = _render("configs/tiny.yaml", "pytorchjob")
    sts["spec"]["replicas"] += 1
    svc["metadata"]["name"] = "other"
    f = tmp_path / "grpo.yaml"
    f.write_text(dump_yaml([cm, job, svc, sts]))
    errs = validate_paths([f], crds).errors
    assert any("2 trainer ranks at 1 per server need 2 rollout servers, but StatefulSet" in e for e in errs), errs
    assert any("no headless Service" in e for e in errs), errs


def test_ranks_per_server_renders_one_server_per_group_of_ranks(crds, tmp_path, monkeypatch):
    from r1zero.grpo.rollout_server import server_address

    monkeypatch.delenv("RANK", raising=False)
    cm, job, svc, sts = _render("configs/a100-13b.yaml", "pytorchjob", [*SERVER, "grpo.rollout.ranks_per_server=8"])
    world = _world(job)
    assert world == 1024 and sts["spec"]["replicas"] == 128
    address = yaml.safe_load(cm["data"]["config.yaml"])["grpo"]["rollout"]["server_address"]
    assert "{server}" in address and "{rank}" not in address
    name = sts["metadata"]["name"]
    # ranks 0..7 share pod 0, rank 8 uses pod 1, the last rank the last pod
    for rank, pod in ((0, 0), (7, 0), (8, 1), (world - 1, 127)):
        assert server_address(address, rank, ranks_per_server=8)[0].startswith(f"{name}-{pod}.")
    f = tmp_path / "grpo.yaml"
    f.write_text(dump_yaml([cm, job, svc, sts]))
    assert validate_paths([f], crds).errors == []
    sts["spec"]["replicas"] = 1024  # one per rank: wrong for 8 ranks per server
    f.write_text(dump_yaml([cm, job, svc, sts]))
    errs = validate_paths([f], crds).errors
    assert any("at 8 per server need 128 rollout servers, but StatefulSet" in e for e in errs), errs


def test_ranks_per_server_must_divide_the_world():
    from r1zero.errors import UserError

    with pytest.raises(UserError, match=r"ranks_per_server \(3\) must divide the GRPO world size \(2 ranks\)"):
        _render("configs/tiny.yaml", "pytorchjob", [*SERVER, "grpo.rollout.ranks_per_server=3"])
    # the same check in r1zero validate (the job's own mounted config)
    cfg = load_config("configs/tiny.yaml", [*SERVER, "grpo.rollout.ranks_per_server=3", "grpo.prompts_per_step=12"])
    assert cfg.grpo_world_problems(4) == ["grpo.rollout.ranks_per_server (3) must divide the GRPO world size (4 ranks)"]
    assert cfg.grpo_world_problems(6) == []


def test_validate_checks_the_key_secret_the_config_names(crds, tmp_path):
    from r1zero.errors import UserError

    with pytest.raises(UserError, match="key_secret"):  # not a Kubernetes object name
        load_config("configs/tiny.yaml", [*SERVER, "grpo.rollout.key_secret=My_Key"])
    cm, job, svc, sts = _render("configs/tiny.yaml", "pytorchjob", [*SERVER, "grpo.rollout.key_secret=my-key"])
    assert yaml.safe_load(cm["data"]["config.yaml"])["grpo"]["rollout"]["key_secret"] == "my-key"
    assert sts["metadata"]["annotations"]["r1zero/key-secret"].startswith(
        "kubectl -n r1zero create secret generic my-key --from-literal=R1ZERO_ROLLOUT_KEY=")
    # no Secret is rendered (keys do not belong in git), only references to it
    assert "Secret" not in [o["kind"] for o in (cm, job, svc, sts)]
    f = tmp_path / "grpo.yaml"
    f.write_text(dump_yaml([cm, job, svc, sts]))
    assert validate_paths([f], crds).errors == []
    ref = _containers(job)[0]["env"]
    [key] = [e for e in ref if e["name"] == "R1ZERO_ROLLOUT_KEY"]
    key["valueFrom"]["secretKeyRef"]["name"] = "other-key"  # a job whose pods miss the config's Secret
    c = sts["spec"]["template"]["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != "R1ZERO_ROLLOUT_KEY"] + [
        {"name": "R1ZERO_ROLLOUT_KEY", "value": "in-git"}]
    f.write_text(dump_yaml([cm, job, svc, sts]))
    errs = validate_paths([f], crds).errors
    assert any("references Secret other-key key R1ZERO_ROLLOUT_KEY, but the config names Secret my-key" in e
               for e in errs), errs
    assert any("has a literal value" in e for e in errs), errs
    # a hand-written config in server mode that names no Secret
    text = yaml.safe_load(cm["data"]["config.yaml"])
    del text["grpo"]["rollout"]["key_secret"]
    cm["data"]["config.yaml"] = yaml.safe_dump(text)
    f.write_text(dump_yaml([cm, job]))
    errs = validate_paths([f], crds).errors
    assert any("grpo.rollout.key_secret is not set in the config" in e for e in errs), errs


def test_colocated_vllm_uses_the_vllm_image_and_starts_no_servers():
    objs = _render("configs/tiny.yaml", "pytorchjob", ["grpo.rollout.engine=vllm"])
    assert [o["kind"] for o in objs] == ["ConfigMap", "PyTorchJob"]
    for t in _containers(objs[1]):
        assert t["image"] == VLLM_IMAGE
        assert not any(e["name"] == "R1ZERO_ROLLOUT_KEY" for e in t["env"])
    native = _render("configs/tiny.yaml", "pytorchjob", [])
    assert _containers(native[1])[0]["image"] == TRAIN_IMAGE
    # pretraining keeps the train image whatever the rollout engine
    pre = render_stage(load_config("configs/tiny.yaml", ["grpo.rollout.engine=vllm"]), "pretrain", "pytorchjob")
    assert _containers(pre[1])[0]["image"] == TRAIN_IMAGE


def test_an_address_of_ones_own_starts_no_servers_but_passes_the_key():
    sets = [*SERVER, "grpo.rollout.server_address=rollout.example:7100"]
    cm, job = _render("configs/tiny.yaml", "pytorchjob", sets)
    assert yaml.safe_load(cm["data"]["config.yaml"])["grpo"]["rollout"]["server_address"] == "rollout.example:7100"
    assert any(e["name"] == "R1ZERO_ROLLOUT_KEY" for e in _containers(job)[0]["env"])


def test_vllm_image_follows_the_jobs_registry():
    assert rollout.vllm_image(TRAIN_IMAGE) == VLLM_IMAGE
    assert rollout.vllm_image("reg.example:5000/r1zero/r1zero-train:9.9") == "reg.example:5000/r1zero/r1zero-vllm:9.9"
    assert rollout.vllm_image("my/own:1") == "my/own:1"


def test_server_address_placeholder(monkeypatch):
    from r1zero.errors import UserError
    from r1zero.grpo.rollout_server import server_address

    monkeypatch.setenv("RANK", "5")
    assert server_address("s-{rank}.s.ns.svc:7100") == ("s-5.s.ns.svc", 7100)
    assert server_address("10.0.0.1:7100") == ("10.0.0.1", 7100)
    for bad in ("nohost", "h:port", "h-{node}:1"):
        with pytest.raises(UserError):
            server_address(bad)
    assert server_address("s-{server}.s:7100", 5, ranks_per_server=4) == ("s-1.s", 7100)
    with pytest.raises(UserError, match="use {server}"):
        server_address("s-{rank}.s:7100", 5, ranks_per_server=4)


def test_mpijob_with_vllm_runs_launcher_and_workers_in_the_vllm_image(crds, tmp_path):
    cm, job, svc, sts = _render("configs/tiny.yaml", "mpijob")
    reps = job["spec"]["mpiReplicaSpecs"]
    assert {r["template"]["spec"]["containers"][0]["image"] for r in reps.values()} == {VLLM_IMAGE}
    world = reps["Worker"]["replicas"] * job["spec"]["slotsPerWorker"]
    assert sts["spec"]["replicas"] == world
    f = tmp_path / "grpo.yaml"
    f.write_text(dump_yaml([cm, job, svc, sts]))
    assert validate_paths([f], crds).errors == []


def test_cli_render_writes_the_servers_beside_the_job(tmp_path):
    assert main(["render", "--config", "configs/tiny.yaml", "--stage", "grpo", "--kind", "pytorchjob",
                 *(x for s in SERVER for x in ("--set", s)), "--out", str(tmp_path)]) == 0
    docs = [d for f in sorted(tmp_path.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob", "Service", "StatefulSet"]


def test_a_server_starts_from_the_jobs_policy_uri(s3_bucket, tiny_lms, tmp_path, monkeypatch):
    """The StatefulSet's ``--model`` is the job's policy URI (``s3://``, r1zero's own format from
    pretraining): the server materialises it and exports a standard HF dir vLLM builds from."""
    import json

    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from r1zero import store
    from r1zero.grpo.rollout_server import serving_dir
    from r1zero.model.hf_export import ARCHITECTURES

    monkeypatch.setenv("R1ZERO_CACHE", str(tmp_path / "cache"))
    model = tiny_lms["r1zero_moe"]()
    src = tmp_path / "policy"
    model.save_pretrained(str(src))
    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 40)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>",
                            eos_token="</s>").save_pretrained(str(src))
    uri = store.publish(src, f"s3://{s3_bucket}/run/pretrain")
    out = Path(serving_dir(uri))
    assert json.loads((out / "config.json").read_text())["model_type"] in ARCHITECTURES
    assert (out / "tokenizer.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # a standard HF dir is served as it is (after the download)
    std = store.publish(out, f"s3://{s3_bucket}/run/std")
    assert json.loads((Path(serving_dir(std)) / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text())
