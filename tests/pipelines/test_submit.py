"""`r1zero pipeline submit` against a loopback KFP v2beta1 contract server (no live Kubeflow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.submit import pipeline_arguments, submit, to_kfp_cron
from r1zero.config import load_config
from r1zero.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from kfp_contract_server import KFPContractServer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "pipelines" / "r1zero_pipeline.yaml"


@pytest.fixture
def cfg():
    return load_config(REPO / "configs" / "tiny.yaml")


@pytest.mark.parametrize("expr, want", [("0 3 * * 0", "0 0 3 * * 0"), ("*/15 * * * *", "0 */15 * * * *"),
                                        ("30 0 9 ? * 2-6", "30 0 9 ? * 2-6")])
def test_cron_conversion(expr, want):
    assert to_kfp_cron(expr) == want


@pytest.mark.parametrize("bad", ["* * *", "1 2 3 4 5 6 7", ""])
def test_bad_cron_is_user_error(bad):
    with pytest.raises(UserError, match="cron"):
        to_kfp_cron(bad)


def test_unknown_param_is_refused(cfg):
    with pytest.raises(UserError, match="unknown pipeline parameter"):
        pipeline_arguments(cfg, "", ["nope=1"], warm_start=False)


def test_run_request_body(cfg):
    with KFPContractServer(token="s3cret") as srv:
        res = submit(cfg, host=srv.url, namespace=None, experiment="r1zero-exp", params=["target=cluster"],
                     schedule=None, dry_run=False, token="s3cret", registry_uri="s3://models/r1zero",
                     package=str(PACKAGE))
    assert res["run_id"] == "run-1"
    (run,) = srv.runs
    assert run["display_name"] == "tiny-run"
    assert run["experiment_id"] == "exp-1"
    spec = run["pipeline_spec"].get("pipeline_spec", run["pipeline_spec"])
    assert spec["pipelineInfo"]["name"] == "r1zero"
    params = run["runtime_config"]["parameters"]
    assert params["target"] == "cluster" and params["registry_uri"] == "s3://models/r1zero"
    assert params["warm_start"] is False
    assert yaml.safe_load(params["config_yaml"])["name"] == "tiny"
    # the one serialisation: the parameter is Config.to_yaml and reads back to the same config
    from r1zero.config import config_from_yaml

    assert params["config_yaml"] == cfg.to_yaml() and config_from_yaml(params["config_yaml"]).hash() == cfg.hash()
    # the run's pods use the service account the manifests bind to the launcher Role
    assert run["service_account"] == cfg.cluster.kfp_service_account == "pipeline-runner"
    assert all(r["auth"] == "Bearer s3cret" for r in srv.requests)


def test_recurring_run_warm_starts_with_six_field_cron(cfg):
    with KFPContractServer() as srv:
        res = submit(cfg, host=srv.url, namespace=None, experiment="retrain", params=[], schedule="0 3 * * 0",
                     dry_run=False, token="t", registry_uri="s3://models/r1zero", package=str(PACKAGE))
    assert res["recurring_run_id"] == "rr-1"
    (rr,) = srv.recurring
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    assert rr["max_concurrency"] in ("1", 1)
    assert rr["runtime_config"]["parameters"]["warm_start"] is True
    assert rr["service_account"] == "pipeline-runner"
    assert rr["experiment_id"] in srv.experiments


def test_dry_run_contacts_nothing(cfg):
    res = submit(cfg, host="http://127.0.0.1:9", namespace="ns", experiment="e", params=[], schedule="0 3 * * 0",
                 dry_run=True, token=None, registry_uri="", package=str(PACKAGE))
    assert res["dry_run"] and res["cron"] == "0 0 3 * * 0"


def test_cli_submit_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "r1zero.cli", "pipeline", "submit", "--config", "configs/tiny.yaml",
                          "--host", "http://127.0.0.1:9", "--token", "x", "--schedule", "bad cron"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "cron" in out.stderr
    down = subprocess.run([sys.executable, "-m", "r1zero.cli", "pipeline", "submit", "--config", "configs/tiny.yaml",
                           "--host", "http://127.0.0.1:9", "--token", "x"], capture_output=True, text=True, cwd=REPO)
    assert down.returncode == 2 and "Traceback" not in down.stderr, down.stderr[-2000:]
