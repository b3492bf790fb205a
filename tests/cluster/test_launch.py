"""``r1zero launch``: TrainingClient against a loopback API server; local operator emulation."""

from __future__ import annotations

import io
import json
import textwrap
from types import SimpleNamespace

import pytest
import yaml

from r1zero.cli import main
from r1zero.cluster.launch import JobFailed, expand_vars, launch_cluster, launch_local, make_client
from r1zero.cluster.render import dump_yaml, render_stage
from r1zero.config import load_config
from r1zero.errors import UserError


def _docs(overrides=()):
    return render_stage(load_config("configs/tiny.yaml", list(overrides)), "pretrain", "pytorchjob")


def test_cluster_success_streams_logs_and_deletes(fake_k8s):
    state, conf = fake_k8s([["Created"], ["Created", "Running"], ["Created", "Running", "Succeeded"]],
                           ["", "step 1 loss 6.1\n", "step 1 loss 6.1\nstep 2 loss 5.0\ndone\n"])
    client = make_client("r1zero", client_configuration=conf)
    out = io.StringIO()
    res = launch_cluster(_docs(), client=client, wait_timeout=5, polling_interval=0.05, out=out)
    assert res == {"name": "tiny-pretrain", "namespace": "r1zero", "status": "Succeeded"}
    assert [c["metadata"]["name"] for c in state.configmaps] == [_docs()[0]["metadata"]["name"]]
    assert state.deleted == ["tiny-pretrain"]
    text = out.getvalue()
    # each log line printed once, although the polls' windows overlap by a second
    assert text.count("[tiny-pretrain-master-0] step 1 loss 6.1") == 1
    assert text.count("[tiny-pretrain-master-0] step 2 loss 5.0") == 1
    assert "[tiny-pretrain-master-0] done" in text
    # incremental: the first read takes the log so far, every later one only a since_seconds window
    q = state.log_queries
    assert len(q) >= 2 and all(x["timestamps"][0].lower() == "true" for x in q)
    assert "sinceSeconds" not in q[0] and all("sinceSeconds" in x for x in q[1:])
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/r1zero/pytorchjobs") in state.requests
    # a re-launch with the same config finds its ConfigMap (409) and goes on
    state2_job = launch_cluster(_docs(), client=client, wait_timeout=5, polling_interval=0.05, out=io.StringIO())
    assert state2_job["status"] == "Succeeded"


def test_cluster_failure_raises_with_conditions_and_log_tail(fake_k8s):
    state, conf = fake_k8s([["Created", "Running"], ["Created", "Running", "Failed"]],
                           ["loading\n", "loading\nTraceback\nRuntimeError: CUDA out of memory\n"],
                           fail_message="PyTorchJob tiny-pretrain is failed because 1 Master replica(s) failed.")
    client = make_client("r1zero", client_configuration=conf)
    with pytest.raises(JobFailed) as err:
        launch_cluster(_docs(), client=client, wait_timeout=5, polling_interval=0.05, out=io.StringIO())
    msg = str(err.value)
    assert "1 Master replica(s) failed" in msg and "CUDA out of memory" in msg
    assert state.deleted == []  # on-success policy keeps a failed job for inspection


def test_cluster_timeout_uses_wait_timeout(fake_k8s):
    state, conf = fake_k8s([["Created", "Running"]], ["working\n"])
    client = make_client("r1zero", client_configuration=conf)
    with pytest.raises(TimeoutError):
        launch_cluster(_docs(), client=client, wait_timeout=0.3, polling_interval=0.05, delete="always",
                       out=io.StringIO())
    assert state.deleted == ["tiny-pretrain"]  # delete=always cleans up even on timeout
    assert state.gets >= 3  # polled until wait_timeout, not one API-timeout-long request


def test_cli_launch_cluster_failure_exits_1(fake_k8s, tmp_path, capsys):
    state, conf = fake_k8s([["Created", "Running", "Failed"]], ["boom: NCCL timeout\n"])
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": conf.host}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(dump_yaml(_docs()))
    rc = main(["launch", str(manifest), "--kubeconfig", str(kubeconfig), "--polling-interval", "0.05",
               "--wait-timeout", "5"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "failed" in err and "NCCL timeout" in err
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/r1zero/pytorchjobs") in state.requests


def test_cluster_refuses_kinds_trainingclient_cannot_create():
    docs = render_stage(load_config("configs/tiny.yaml"), "pretrain", "mpijob")
    with pytest.raises(UserError, match="supports PyTorchJob"):
        launch_cluster(docs, client=object())


def test_log_stream_reads_only_new_lines_after_the_first_poll(fake_k8s):
    """Polls long after a line appeared no longer download it (sinceSeconds cuts it server-side)."""
    from r1zero.cluster.launch import _log_streamer

    state, conf = fake_k8s([["Created", "Running"]], ["old line\n"])
    client = make_client("r1zero", client_configuration=conf)
    state.jobs["tiny-pretrain"] = {"metadata": {"name": "tiny-pretrain"}}
    out = io.StringIO()
    t = [1000.0]
    cb = _log_streamer(client, "r1zero", "tiny-pretrain", out, clock=lambda: t[0])
    cb(None)  # first read: the whole log so far
    state.stamps = [s - 3600 for s in state.stamps]  # that line is an hour old now
    t[0] += 30
    cb(None)
    assert state.log_bytes[0] > 0 and state.log_bytes[1] == 0
    assert state.log_queries[1]["sinceSeconds"] == ["31"]
    assert out.getvalue().count("old line") == 1


def test_expand_vars():
    env = {"A": "1", "B": "x"}
    assert expand_vars("$(A)-$(B)-$(C)-$$(A)", env) == "1-x-$(C)-$(A)"


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    if os.environ["RANK"] == os.environ.get("FAIL_RANK"):
        sys.exit(3)  # this replica dies before the rendezvous; the emulator must stop the other
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE",
            "PET_MASTER_ADDR", "MASTER_ADDR", "R1ZERO_STAGE", "PYTHONUNBUFFERED"]
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"sum": t.item(), "config": open(os.environ["R1ZERO_CONFIG"]).read(),
                   "config_arg": sys.argv[2], **{k: os.environ.get(k) for k in keys}}, f)
    dist.destroy_process_group()
""")


def _script_job(tmp_path, extra_env=()):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    docs = _docs()
    for rs in docs[1]["spec"]["pytorchReplicaSpecs"].values():
        c = rs["template"]["spec"]["containers"][0]
        # keep the rendered command (bare torchrun) and the config path argument; swap the module
        c["args"] = [str(script), str(tmp_path), "$(R1ZERO_CONFIG)"]
        c["env"] += list(extra_env)
    return docs


def test_local_emulation_sets_operator_environment(tmp_path):
    docs = _script_job(tmp_path)
    res = launch_local(docs, timeout=240, out=io.StringIO())
    assert res["status"] == "Succeeded" and res["pods"] == {"tiny-pretrain-master-0": 0, "tiny-pretrain-worker-0": 0}
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info["sum"] == 3.0  # all-reduce over both "pods" (1 + 2)
        assert info["RANK"] == str(r) and info["WORLD_SIZE"] == "2" and info["LOCAL_RANK"] == "0"
        assert info["GROUP_RANK"] == str(r)  # torchrun's node rank, from PET_NODE_RANK
        assert info["PET_NNODES"] == "2" and info["PET_NPROC_PER_NODE"] == "1" and info["PET_NODE_RANK"] == str(r)
        assert info["PET_MASTER_ADDR"] == "127.0.0.1" and info["PYTHONUNBUFFERED"] == "1"
        assert info["R1ZERO_STAGE"] == "pretrain"
        assert "name: tiny" in info["config"]  # the ConfigMap, materialised where the mount points
        assert info["config_arg"] != "/etc/r1zero/config.yaml" and info["config_arg"].endswith("config.yaml")


def test_local_emulation_reports_the_failing_replica(tmp_path):
    docs = _script_job(tmp_path, extra_env=[{"name": "FAIL_RANK", "value": "1"}])
    with pytest.raises(JobFailed) as err:
        launch_local(docs, timeout=240, out=io.StringIO())
    msg = str(err.value)
    # torchrun reports its child's failure with exit 1; the master, stuck in rendezvous, is stopped
    assert "'tiny-pretrain-worker-0': 1" in msg and "last lines of tiny-pretrain-worker-0" in msg
    assert "exitcode  : 3" in msg


def test_cli_launch_errors(tmp_path, capsys):
    assert main(["launch", str(tmp_path / "missing.yaml"), "--local"]) == 2
    p = tmp_path / "two.yaml"
    docs = _docs()
    p.write_text(dump_yaml([docs[0]]))
    assert main(["launch", str(p), "--local"]) == 2
    assert "exactly one training job" in capsys.readouterr().err


@pytest.mark.slow
def test_local_launch_trains_tiny_through_the_rendered_manifest(tmp_path):
    """The tiny preset's PyTorchJob (2 pods x 1 process, CPU), command line untouched: the real
    `r1zero pretrain` runs under bare torchrun with the operator's environment and trains dp=2."""
    from r1zero.data.mix import run_mix

    cfg = load_config("configs/tiny.yaml", ["data.n_train=200", "data.n_eval=12", "pretrain.steps=3",
                                            "pretrain.micro_batch=2", "pretrain.seq_len=32", "pretrain.warmup_steps=1",
                                            "pretrain.log_every=1", "pretrain.heldout_per_domain=0"])
    run_mix(cfg, str(tmp_path / "data"))
    docs = render_stage(cfg, "pretrain", "pytorchjob", {"data": str(tmp_path / "data"), "out": str(tmp_path / "model")})
    manifest = tmp_path / "pretrain-pytorchjob.yaml"
    manifest.write_text(dump_yaml(docs))
    assert main(["launch", str(manifest), "--local", "--wait-timeout", "600"]) == 0
    summary = json.loads((tmp_path / "model" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["layout"].startswith("dp=2")
    assert summary["steps"] == 3 and summary["final_loss"] < summary["first_loss"] + 1.0
    assert (tmp_path / "model" / "config.json").exists() and (tmp_path / "model" / "metrics.jsonl").exists()


def test_trainjob_is_launched_waited_streamed_and_deleted(fake_k8s):
    """Kubeflow Trainer v2: the rendered TrainJob goes through the Kubernetes API (TrainingClient 1.9
    knows only v1 kinds), its JobSet pods' logs stream incrementally, Complete ends it."""
    state, conf = fake_k8s([["Created"], ["Created"], ["Created", "Succeeded"]],
                           ["", "rank 0 step 1\n", "rank 0 step 1\nrank 0 done\n"])
    from kubernetes import client as k8s

    docs = render_stage(load_config("configs/tiny.yaml"), "pretrain", "trainjob")
    out = io.StringIO()
    res = launch_cluster(docs, client=SimpleNamespace(api_client=k8s.ApiClient(conf)), wait_timeout=5,
                         polling_interval=0.05, out=out)
    assert res == {"name": "tiny-pretrain", "namespace": "r1zero", "status": "Succeeded"}
    assert ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/r1zero/trainjobs") in state.requests
    assert state.jobs == {} and state.deleted == ["tiny-pretrain"]
    text = out.getvalue()
    assert text.count("[tiny-pretrain-node-0-0] rank 0 step 1") == 1 and "[tiny-pretrain-node-0-0] rank 0 done" in text
    assert [c["metadata"]["name"] for c in state.configmaps] == [docs[0]["metadata"]["name"]]


def test_trainjob_failure_raises_with_conditions(fake_k8s):
    state, conf = fake_k8s([["Created"], ["Created", "Failed"]], ["boom\n"], fail_message="jobset failed")
    from kubernetes import client as k8s

    docs = render_stage(load_config("configs/tiny.yaml"), "grpo", "trainjob")
    with pytest.raises(JobFailed, match="TrainJob r1zero/tiny-grpo failed .*jobset failed.*boom"):
        launch_cluster(docs, client=SimpleNamespace(api_client=k8s.ApiClient(conf)), wait_timeout=5,
                       polling_interval=0.05, out=io.StringIO())
    assert state.deleted == []  # on-success: a failed job stays for inspection
