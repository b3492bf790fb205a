"""The compiled pipeline IR is checked in and must equal what the code compiles (drift test)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipelines.r1zero_pipeline import compile_pipeline

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "pipelines" / "r1zero_pipeline.yaml"


def test_compiled_pipeline_has_not_drifted(tmp_path):
    fresh = Path(compile_pipeline(str(tmp_path / "p.yaml"))).read_text()
    assert fresh == CHECKED_IN.read_text(), "run `r1zero pipeline compile` and commit pipelines/r1zero_pipeline.yaml"


def _docs():
    return list(yaml.safe_load_all(CHECKED_IN.read_text()))


def test_pipeline_shape():
    spec, platform = _docs()
    tasks = spec["root"]["dag"]["tasks"]
    assert "exit-handler-1" in tasks and "cleanup-jobs" in tasks
    assert tasks["cleanup-jobs"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for name in ["data-mix", "pretrain", "grpo", "evaluate", "evaluate-2", "detect-insight", "summarize",
                 "champion"]:
        assert name in inner, name
    # launcher tasks: caching off and retries
    for name in ["pretrain", "grpo"]:
        assert inner[name]["cachingOptions"] == {} or not inner[name]["cachingOptions"].get("enableCache")
        assert inner[name]["retryPolicy"]["maxRetryCount"] == 2
    # promotion gate: dsl.If on the RL eval metric
    conds = [t for t in inner.values() if "triggerPolicy" in t and "condition" in t["triggerPolicy"]]
    assert any("evaluate-2" in t["triggerPolicy"]["condition"] and "champion" in t["triggerPolicy"]["condition"]
               for t in conds)
    # the champion is re-evaluated on THIS run's data (not a stored accuracy from another split)
    champ = inner["champion"]["inputs"]["parameters"]
    assert champ["data_uri"]["taskOutputParameter"] == {"producerTask": "data-mix", "outputParameterKey": "uri"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config_yaml", "target", "registry_uri", "warm_start"}


def test_kubernetes_platform_config():
    _, platform = _docs()
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pre = execs["exec-pretrain"]
    assert pre["secretAsEnv"][0]["secretName"] == "r1zero-s3"
    assert not any("pvcMount" in e for e in execs.values())  # no PVC that nothing creates
    assert pre["nodeSelector"]["labels"] == {"r1zero.io/pool": "cpu"}
    assert pre["tolerations"][0]["key"] == "r1zero.io/pool"
    assert int(str(pre["activeDeadlineSeconds"])) == 7 * 24 * 3600
    assert pre["podMetadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_stages_pass_only_what_they_read():
    """No task takes a model or the data set as an input artifact (the KFP launcher would download
    it into the CPU pod): models and data travel as URIs; curves and eval results are small."""
    spec, _ = _docs()
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    big = {("data-mix", "data"), ("pretrain", "model"), ("grpo", "model")}
    for name, task in inner.items():
        for arg in (task.get("inputs", {}).get("artifacts") or {}).values():
            src = arg.get("taskOutputArtifact")
            if src:
                assert (src["producerTask"], src["outputArtifactKey"]) not in big, (name, src)
    insight = inner["detect-insight"]["inputs"]["artifacts"]
    assert insight["curves"]["taskOutputArtifact"] == {"producerTask": "grpo", "outputArtifactKey": "curves"}
    for ev in ("evaluate", "evaluate-2"):
        assert inner[ev]["inputs"]["parameters"]["model_uri"]["taskOutputParameter"]["outputParameterKey"] == "Output"
