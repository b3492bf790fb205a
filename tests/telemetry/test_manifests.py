"""Monitoring objects: CRD-schema valid, rules pass `promtool check rules` and `promtool test rules`
(a firing and a non-firing case per alert), dashboard JSON well formed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from r1zero.config import load_config
from r1zero.telemetry.manifests import alert_rules, container_ports, monitoring_objects, rules_yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / ".." / "shared" / "crds"
PRESETS = [ROOT / "configs" / "tiny.yaml", ROOT / "configs" / "a100-13b.yaml"]


def _crd_schema(filename: str) -> dict:
    crd = yaml.safe_load((CRDS / filename).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """The CRD schemas carry no additionalProperties: false, so walk them for unknown keys."""
    if isinstance(obj, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        bad = [f"{path}.{k}" for k in obj if k not in schema["properties"]]
        for k, v in obj.items():
            if k in schema["properties"]:
                bad += _unknown_fields(v, schema["properties"][k], f"{path}.{k}")
        return bad
    if isinstance(obj, list) and "items" in schema:
        return [b for i, v in enumerate(obj) for b in _unknown_fields(v, schema["items"], f"{path}[{i}]")]
    return []


@pytest.fixture(params=PRESETS, ids=lambda p: p.stem)
def objects(request):
    return monitoring_objects(load_config(request.param))


def test_objects_valid_against_crds_and_k8s_schema(objects):
    pm, rule, cm = objects
    assert [o["kind"] for o in objects] == ["PodMonitor", "PrometheusRule", "ConfigMap"]
    for obj, crd in ((pm, "monitoring.coreos.com_podmonitors.yaml"), (rule, "monitoring.coreos.com_prometheusrules.yaml")):
        schema = _crd_schema(crd)
        jsonschema.Draft202012Validator(schema).validate(obj)  # no check_schema: Go-only regex flags
        assert _unknown_fields(obj, schema) == []
    kubernetes_validate.validate(cm, "1.30", strict=True)
    # the walker can fail: a misspelt field is reported
    broken = json.loads(json.dumps(pm))
    broken["spec"]["podMetricsEndpoints"][0]["honourLabels"] = True
    assert _unknown_fields(broken, _crd_schema("monitoring.coreos.com_podmonitors.yaml")) == [
        ".spec.podMetricsEndpoints[0].honourLabels"]


def test_pod_monitor_selects_training_pods_per_local_rank():
    cfg = load_config(PRESETS[1])
    pm = monitoring_objects(cfg)[0]
    sel = pm["spec"]["selector"]["matchExpressions"]
    assert sel == [{"key": "training.kubeflow.org/job-name", "operator": "Exists"}]
    ports = container_ports(cfg)
    assert [p["containerPort"] for p in ports] == [cfg.telemetry.port + i for i in range(cfg.cluster.procs_per_node)]
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == [p["name"] for p in ports]
    assert all(e["honorLabels"] for e in pm["spec"]["podMetricsEndpoints"])
    assert all(len(p["name"]) <= 15 for p in ports)  # IANA_SVC_NAME limit


def test_dashboard_panels(objects):
    cm = objects[2]
    dash = json.loads(next(iter(cm["data"].values())))
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for name in ("r1zero_step_duration_seconds_bucket", "r1zero_comm_time_ratio", "r1zero_loss",
                 "r1zero_gpu_utilization_ratio", "r1zero_grpo_reward", "r1zero_moe_max_load_ratio",
                 "r1zero_aha_events_total", "r1zero_mfu_ratio", "r1zero_comm_seconds_total",
                 "r1zero_comm_purpose_seconds_total", "r1zero_comm_purpose_bytes_total"):
        assert name in exprs
    assert ("DCGM_FI_DEV_GPU_UTIL" in exprs) == (cm["metadata"]["name"].startswith("a100"))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"




def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not installed (apt-get install prometheus)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules(tmp_path):
    rule = monitoring_objects(load_config(PRESETS[1]))[1]
    (tmp_path / "rules.yml").write_text(rules_yaml(rule))
    res = _promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout
    # and it can fail: a broken expression is rejected
    bad = yaml.safe_load(rules_yaml(rule))
    bad["groups"][0]["rules"][0]["expr"] = "avg_over_time(r1zero_gpu_utilization_ratio[5m] < "
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    assert _promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0


def _who(rank: str) -> str:
    return f"j rank {rank} (pretrain)"


def _alert(name: str, sev: str, labels: dict, summary: str, desc: str) -> dict:
    return {"exp_labels": {"severity": sev, **labels}, "exp_annotations": {"summary": summary, "description": desc}}


L0 = {"job": "j", "rank": "0", "stage": "pretrain"}
L1 = {"job": "j", "rank": "1", "stage": "pretrain"}


def _s(name: str, labels: dict, values: str) -> dict:
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{lab}}}", "values": values}


RULE_TESTS = [
    {   # GPU utilisation: rank 0 at 50% fires after 10 min; rank 1 at 95% never fires
        "interval": "1m",
        "input_series": [_s("r1zero_gpu_utilization_ratio", {**L0, "gpu": "0"}, "0.5x30"),
                         _s("r1zero_gpu_utilization_ratio", {**L1, "gpu": "1"}, "0.95x30")],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "R1ZeroGPUUtilizationLow", "exp_alerts": []},  # still pending
            {"eval_time": "20m", "alertname": "R1ZeroGPUUtilizationLow", "exp_alerts": [
                _alert("R1ZeroGPUUtilizationLow", "warning", {**L0, "gpu": "0"},
                       "GPU utilisation below 90% for 10 minutes", f"{_who('0')}: GPU 0 utilisation is 50%.")]},
        ],
    },
    {   # comm ratio: 30% fires after 10 min, 5% does not; a 4-minute spike does not either
        "interval": "1m",
        "input_series": [_s("r1zero_comm_time_ratio", L0, "0.3x30"),
                         _s("r1zero_comm_time_ratio", L1, "0.05x10 0.5x3 0.05x17")],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": "R1ZeroCommOverheadHigh", "exp_alerts": [
                _alert("R1ZeroCommOverheadHigh", "warning", L0, "Communication above 12% of step time for 10 minutes",
                       f"{_who('0')}: collectives take 30% of each step.")]},
        ],
    },
    {   # loss NaN on rank 0, NaN-skips on rank 1 (loss finite), nothing on rank 2
        "interval": "1m",
        "input_series": [_s("r1zero_loss", L0, "2 2 NaN NaN"), _s("r1zero_loss", L1, "2 2 2 2"),
                         _s("r1zero_loss", {**L0, "rank": "2"}, "2 1.9 1.8 1.7"),
                         _s("r1zero_nan_skips_total", L0, "0 0 0 0"), _s("r1zero_nan_skips_total", L1, "0 0 1 1"),
                         _s("r1zero_nan_skips_total", {**L0, "rank": "2"}, "0 0 0 0")],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "R1ZeroLossNaN", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "R1ZeroLossNaN", "exp_alerts": [
                _alert("R1ZeroLossNaN", "critical", L0, "Training loss is NaN or steps are being skipped",
                       f"{_who('0')}: the loss is not finite or non-finite steps were skipped."),
                _alert("R1ZeroLossNaN", "critical", L1, "Training loss is NaN or steps are being skipped",
                       f"{_who('1')}: the loss is not finite or non-finite steps were skipped.")]},
        ],
    },
    {   # rank 0 stops stepping at 3 min; rank 1 keeps stepping every minute
        "interval": "1m",
        "input_series": [_s("r1zero_last_step_timestamp_seconds", L0, "0 60 120 180x27"),
                         _s("r1zero_last_step_timestamp_seconds", L1, "0+60x30")],
        "alert_rule_test": [
            {"eval_time": "17m", "alertname": "R1ZeroNoStepProgress", "exp_alerts": []},  # 14 min stalled
            {"eval_time": "20m", "alertname": "R1ZeroNoStepProgress", "exp_alerts": [
                _alert("R1ZeroNoStepProgress", "critical", L0, "No training step completed for 15 minutes",
                       f"{_who('0')}: last step finished 17m 0s ago.")]},
        ],
    },
    {   # layer 0 of rank 0 overloaded, layer 0 of rank 1 drops 20%; layer 1 balanced
        "interval": "1m",
        "input_series": [_s("r1zero_moe_max_load_ratio", {**L0, "layer": "0"}, "3x30"),
                         _s("r1zero_moe_max_load_ratio", {**L0, "layer": "1"}, "1.2x30"),
                         _s("r1zero_moe_dropped_ratio", {**L1, "layer": "0"}, "0.2x30"),
                         _s("r1zero_moe_dropped_ratio", {**L1, "layer": "1"}, "0.01x30")],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "R1ZeroExpertImbalance", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "R1ZeroExpertImbalance", "exp_alerts": [
                _alert("R1ZeroExpertImbalance", "warning", {**L0, "layer": "0"}, "MoE experts imbalanced for 10 minutes",
                       f"{_who('0')}: layer 0 max/mean load or dropped fraction is 3."),
                _alert("R1ZeroExpertImbalance", "warning", {**L1, "layer": "0"}, "MoE experts imbalanced for 10 minutes",
                       f"{_who('1')}: layer 0 max/mean load or dropped fraction is 0.2.")]},
        ],
    },
    {   # an aha event on rank 0 at minute 3; none on rank 1; resolved once out of the window
        "interval": "1m",
        "input_series": [_s("r1zero_aha_events_total", L0, "0 0 0 1x30"),
                         _s("r1zero_aha_events_total", L1, "0x30")],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "R1ZeroAhaEvent", "exp_alerts": [
                _alert("R1ZeroAhaEvent", "info", L0, "Aha moment detected",
                       f"{_who('0')}: the reflection rate jumped together with accuracy.")]},
            {"eval_time": "25m", "alertname": "R1ZeroAhaEvent", "exp_alerts": []},
        ],
    },
]


def test_promtool_test_rules_fire_and_do_not_fire(tmp_path):
    rule = monitoring_objects(load_config(PRESETS[0]))[1]
    (tmp_path / "rules.yml").write_text(rules_yaml(rule))
    tested = {t["alertname"] for case in RULE_TESTS for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}  # every alert has a unit test
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": RULE_TESTS}, sort_keys=False))
    res = _promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    # and the tests can fail: an expected alert that does not fire is reported
    wrong = json.loads(json.dumps(RULE_TESTS))
    wrong[0]["alert_rule_test"][1]["exp_alerts"][0]["exp_labels"]["gpu"] = "1"
    (tmp_path / "wrong.yml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": wrong}, sort_keys=False))
    assert _promtool("test", "rules", "wrong.yml", cwd=tmp_path).returncode != 0
