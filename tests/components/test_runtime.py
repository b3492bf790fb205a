"""Component glue: artifact URIs, stage timing, promotion registry (local and S3), summary."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from components import runtime


def test_artifact_uri_maps_kfp_object_stores(tmp_path):
    assert runtime.artifact_uri(SimpleNamespace(uri="minio://mlpipeline/v2/a", path="/minio/x")) == "s3://mlpipeline/v2/a"
    assert runtime.artifact_uri(SimpleNamespace(uri="s3://b/k", path="/s3/b/k")) == "s3://b/k"
    assert runtime.artifact_uri(SimpleNamespace(uri="", path=str(tmp_path))) == str(tmp_path)


def test_stage_seconds_round_trip(tmp_path):
    runtime.record_stage(tmp_path, "pretrain", 12.3456)
    assert runtime.read_stage_seconds(tmp_path) == 12.346
    assert runtime.read_stage_seconds(tmp_path / "nope") is None


def _model(tmp_path, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    return SimpleNamespace(path=str(d), uri="")


def test_promotion_registry_local(tmp_path):
    reg = str(tmp_path / "registry")
    assert runtime.champion_accuracy(reg) == -1.0 and runtime.champion_model_uri(reg) == ""
    dest = runtime.promote(reg, _model(tmp_path).path, 0.42, "run1")
    assert runtime.champion_accuracy(reg) == 0.42
    assert runtime.champion_model_uri(reg) == dest
    assert (Path(dest) / "config.json").is_file()
    assert runtime.champion_accuracy("") == -1.0


def test_promotion_registry_s3(s3_server, s3_bucket, tmp_path):
    reg = f"s3://{s3_bucket}/registry"
    assert runtime.champion_accuracy(reg) == -1.0
    runtime.promote(reg, _model(tmp_path).path, 0.5, "run2")
    assert runtime.champion_accuracy(reg) == 0.5
    assert runtime.champion_model_uri(reg) == f"s3://{s3_bucket}/registry/models/run2"
    # S3 to S3: a server-side copy of every object (the weights never pass through this process)
    runtime.promote(reg, f"s3://{s3_bucket}/registry/models/run2", 0.6, "run3")
    from r1zero import store

    assert store.read_bytes(f"s3://{s3_bucket}/registry/models/run3/config.json") == b"{}"
    assert runtime.champion_model_uri(reg) == f"s3://{s3_bucket}/registry/models/run3"
    with pytest.raises(RuntimeError, match="nothing to promote"):
        runtime.promote(reg, f"s3://{s3_bucket}/nothing-here", 0.7, "run4")


def _eval_dir(tmp_path, name, acc):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"accuracy": acc, "overall": {
        "pass@1": {"mean": acc, "lo": acc - 0.05, "hi": acc + 0.05, "n": 100},
        "format_rate": {"mean": 0.9, "lo": 0.8, "hi": 0.95, "n": 100}}, "by_domain": {}}))
    (d / "per_problem.jsonl").write_text("\n".join(json.dumps({"format_rate": f, "pass@1": c}) for f, c in
                                                         [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1.0, 1.0)]))
    runtime.record_stage(d, name, 3.0)
    return str(d)


def test_build_summary(tmp_path):
    dirs = {}
    for n in ["data", "base", "rl", "ins"]:
        (tmp_path / n).mkdir()
        runtime.record_stage(tmp_path / n, n, 1.5)
        dirs[n] = str(tmp_path / n)
    (tmp_path / "ins" / "insights.json").write_text(json.dumps({"events": [
        {"run": "0", "metric": "eval/accuracy", "kind": "jump", "step": 12, "before": 0.2, "after": 0.5,
         "width_steps": 3, "score": 9.0}]}))
    s = runtime.build_summary(dirs["data"], dirs["base"], dirs["rl"], _eval_dir(tmp_path, "be", 0.2),
                              _eval_dir(tmp_path, "re", 0.45), dirs["ins"])
    assert s["base_accuracy"] == 0.2 and s["rl_accuracy"] == 0.45
    assert s["improvement"] == pytest.approx(0.25)
    assert s["events"][0]["kind"] == "jump"
    assert s["rl"]["accuracy_formatted"] == pytest.approx(2 / 3) and s["rl"]["format_rate"] == 0.9
    assert set(s["stage_seconds"]) == {"data_mix", "pretrain", "grpo", "evaluate_base", "evaluate_rl",
                                       "detect_insight"}
    md = runtime.summary_markdown(s)
    assert "| RL | 0.450 [0.400, 0.500] |" in md and "| jump | eval/accuracy | 12 |" in md


def test_cleanup_is_a_no_op_locally():
    assert "nothing to clean up" in runtime.cleanup(None, "local", "SUCCEEDED", "run")


def test_stage_job_docs_are_unique_per_run_and_labelled():
    from r1zero.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    uris = {"data": "s3://b/data", "out": "s3://b/model"}
    a = runtime.stage_job_docs(cfg, "pretrain", uris, "3f2a9c1e-aaaa-bbbb")
    b = runtime.stage_job_docs(cfg, "pretrain", uris, "77aa0000-cccc-dddd")
    job_a = next(d for d in a if d["kind"] == "PyTorchJob")
    job_b = next(d for d in b if d["kind"] == "PyTorchJob")
    assert job_a["metadata"]["name"] != job_b["metadata"]["name"]
    assert job_a["metadata"]["name"].endswith("-3f2a9c1e")
    assert job_a["metadata"]["labels"][runtime.RUN_LABEL] == "r-3f2a9c1e-aaaa-bbbb"
    cmd = job_a["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "s3://b/data" in cmd["args"] and "s3://b/model" in cmd["args"]


def test_delete_run_jobs_uses_the_run_label():
    class FakeApi:
        def __init__(self):
            self.calls, self.deleted = [], []

        def list_namespaced_custom_object(self, group, version, ns, plural, label_selector):
            self.calls.append((plural, label_selector))
            return {"items": [{"metadata": {"name": f"{plural[:3]}-job"}}]} if plural == "pytorchjobs" else {"items": []}

        def delete_namespaced_custom_object(self, group, version, ns, plural, name, body):
            self.deleted.append((ns, plural, name))

    api = FakeApi()
    out = runtime.delete_run_jobs("r1zero", "run-123", api=api)
    assert out == ["pytorchjobs/pyt-job"]
    assert api.deleted == [("r1zero", "pytorchjobs", "pyt-job")]
    assert {c[1] for c in api.calls} == {"r1zero/pipeline-run=run-123"}


def test_summary_without_the_data_artifact(tmp_path):
    """The summary takes the data stage's seconds as a number: the data set is not downloaded."""
    for n in ["base", "rl", "ins"]:
        (tmp_path / n).mkdir()
    runtime.record_stage(tmp_path / "base", "pretrain", 2.0)
    runtime.record_stage(tmp_path / "rl", "grpo", 3.0)
    s = runtime.build_summary(None, str(tmp_path / "base"), str(tmp_path / "rl"), _eval_dir(tmp_path, "be", 0.2),
                              _eval_dir(tmp_path, "re", 0.3), str(tmp_path / "ins"), data_seconds=1.25)
    assert s["stage_seconds"]["data_mix"] == 1.25 and s["stage_seconds"]["grpo"] == 3.0


def test_local_stage_runs_the_pods_command_line(tmp_path, monkeypatch):
    """run_stage's local door is `r1zero <stage>` with render's arguments and a config file holding
    Config.to_yaml: a bad config value surfaces as that command's error."""
    from r1zero.cluster.render import stage_args
    from r1zero.config import load_config

    cfg = load_config("configs/tiny.yaml")
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        seen["config"] = open(argv[argv.index("--config") + 1]).read()
        return 0

    monkeypatch.setattr("r1zero.cli.main", fake_main)
    uris = {"data": "s3://b/d", "out": "s3://b/o"}
    runtime.run_stage(cfg, "pretrain", "local", uris)
    cfg_file = seen["argv"][seen["argv"].index("--config") + 1]
    assert seen["argv"] == stage_args("pretrain", uris, config_file=cfg_file)
    assert seen["config"] == cfg.to_yaml()
    monkeypatch.setattr("r1zero.cli.main", lambda argv: 2)
    with pytest.raises(RuntimeError, match="r1zero pretrain.*exited 2"):
        runtime.run_stage(cfg, "pretrain", "local", uris)


def test_cluster_stages_move_only_small_files_through_the_pod(s3_server, s3_bucket, tmp_path, monkeypatch):
    """target=cluster: the job writes the artifact's S3 URI; the task's pod keeps only the stage
    record (no weights), copies the curves, and an eval result's small files come back."""
    from r1zero import store
    from r1zero.config import load_config

    launched = []

    def fake_job(cfg, stage, uris, run_id=""):  # what the rendered job's pods write to S3
        launched.append((stage, dict(uris)))
        src = tmp_path / f"job-{stage}"
        src.mkdir()
        if stage == "eval":
            (src / "metrics.json").write_text(json.dumps({"accuracy": 0.25, "overall": {}}))
            (src / "kfp_metrics.json").write_text(json.dumps({"accuracy": 0.25}))
            (src / "report.html").write_text("<html>r</html>")
        else:
            (src / "model.safetensors").write_bytes(b"\0" * 4096)
            (src / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
            (src / "summary.json").write_text(json.dumps({"steps": 1, "final_loss": 2.0}))
        store.publish(src, uris["out"])

    monkeypatch.setattr(runtime, "_launch_on_cluster", fake_job)
    cfg_yaml = load_config("configs/tiny.yaml").to_yaml()

    def art(name):
        return SimpleNamespace(path=str(tmp_path / "pod" / name), uri=f"minio://{s3_bucket}/run/{name}",
                               metadata={})

    class M:
        def __init__(self):
            self.logged = {}

        def log_metric(self, k, v):
            self.logged[k] = v

    model, curves = art("model"), art("curves")
    uri = runtime.run_pretrain(cfg_yaml, "cluster", f"s3://{s3_bucket}/data", model, curves, M(), run_id="r1")
    assert uri == f"s3://{s3_bucket}/run/model" and launched[0] == ("pretrain", {"data": f"s3://{s3_bucket}/data",
                                                                                 "out": uri})
    assert sorted(p.name for p in Path(model.path).iterdir()) == ["stage.json"]  # no weights in the pod
    assert sorted(p.name for p in Path(curves.path).iterdir()) == ["metrics.jsonl", "stage.json", "summary.json"]
    result, report, metrics = art("result"), art("report"), M()
    acc = runtime.run_evaluate(cfg_yaml, "cluster", uri, f"s3://{s3_bucket}/data", result, report, metrics,
                               run_id="r1")
    assert acc == 0.25 and metrics.logged["accuracy"] == 0.25
    assert launched[1] == ("eval", {"model": uri, "data": f"s3://{s3_bucket}/data", "out": f"s3://{s3_bucket}/run/result"})
    assert Path(report.path).read_text() == "<html>r</html>"


def test_stage_job_docs_follow_cluster_job_kind():
    """cluster.job_kind trainjob: the pipeline launches Kubeflow Trainer v2 TrainJobs."""
    from r1zero.config import load_config

    cfg = load_config("configs/tiny.yaml", ["cluster.job_kind=trainjob"])
    cm, job = runtime.stage_job_docs(cfg, "eval", {"model": "s3://b/m", "data": "s3://b/d", "out": "s3://b/e"},
                                     "run-abc12345")
    assert job["kind"] == "TrainJob" and job["metadata"]["labels"][runtime.RUN_LABEL] == "run-abc12345"
    assert job["metadata"]["name"].endswith("-runabc12") and job["spec"]["trainer"]["numNodes"] == 1
    assert ("trainer.kubeflow.org", "v1alpha1", "trainjobs") in runtime.JOB_RESOURCES


def test_a_vllm_grpo_stage_runs_in_the_vllm_environment(monkeypatch, tmp_path):
    """GRPO with vLLM rollouts needs vLLM, which this interpreter lacks: the local stage runs the
    same command line with R1ZERO_VLLM_PYTHON (`make run` sets it), or refuses in one line."""
    import importlib.util

    from r1zero.config import load_config
    from r1zero.errors import UserError

    assert importlib.util.find_spec("vllm") is None  # the project's venv: vLLM has its own
    cfg = load_config("configs/tiny.yaml", ["grpo.rollout.engine=vllm"])
    assert runtime.stage_python(cfg, "pretrain") is None
    assert runtime.stage_python(load_config("configs/tiny.yaml"), "grpo") is None
    monkeypatch.delenv(runtime.VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(UserError, match="R1ZERO_VLLM_PYTHON .unset"):
        runtime.stage_python(cfg, "grpo")
    monkeypatch.setenv(runtime.VLLM_PYTHON_ENV, str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="names no interpreter"):
        runtime.stage_python(cfg, "grpo")
    py = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    monkeypatch.setenv(runtime.VLLM_PYTHON_ENV, str(py))
    assert runtime.stage_python(cfg, "grpo") == str(py)
