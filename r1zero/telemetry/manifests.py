"""Monitoring objects for a training job: PodMonitor, PrometheusRule, Grafana dashboard ConfigMap.

    from r1zero.config import load_config
    from r1zero.telemetry.manifests import monitoring_objects, rules_yaml, container_ports
    objs = monitoring_objects(load_config("configs/a100-13b.yaml"))   # list of plain dicts
    open("rules.yml", "w").write(rules_yaml(objs[1]))                 # promtool check rules rules.yml

The cluster renderer writes these beside the PyTorchJob. The PodMonitor scrapes container ports
named ``metrics-<local rank>`` (``container_ports(cfg)`` gives the list for the ``pytorch``
container): each process serves ``telemetry.port + LOCAL_RANK``. ``honorLabels`` keeps the
exporter's own ``job``/``rank``/``stage`` labels instead of Prometheus' target ``job``.

Alert thresholds (PrometheusRule ``r1zero.training``):
- GPU utilisation below 90% for 10 min, and communication above 12% of step time for 10 min: the
  article's efficiency budget for the 1024-GPU A100 run;
- loss NaN (or any NaN-skipped step), immediately;
- no completed step for 15 minutes;
- expert imbalance: max/mean expert load above 2 (Switch Transformer runs use capacity factors of
  1-2, Fedus et al. 2021 sec. 2.1: beyond 2x the mean, tokens overflow any sane capacity) or more
  than 5% of routed tokens dropped, for 10 min;
- an aha event (info).
"""

from __future__ import annotations

import json
import re

import yaml

GPU_UTIL_MIN = 0.90  # the article's utilisation target
COMM_RATIO_MAX = 0.12  # the article's communication-overhead budget
STALL_SECONDS = 15 * 60
MOE_MAX_LOAD = 2.0  # max/mean expert load; Switch capacity factor range 1-2 (Fedus et al. 2021)
MOE_MAX_DROPPED = 0.05
JOB_LABEL = "training.kubeflow.org/job-name"  # set by the training operator on every job pod
DASHBOARD_LABEL = {"grafana_dashboard": "1"}  # kube-prometheus-stack Grafana sidecar default
PART_OF = {"app.kubernetes.io/part-of": "r1zero", "app.kubernetes.io/component": "monitoring"}


def _dns(name: str) -> str:
    """A DNS-1123 label from a config name (lower case, [a-z0-9-], at most 63 chars)."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (s or "r1zero")[:50].rstrip("-")


def _meta(cfg, suffix: str, labels: dict | None = None) -> dict:
    return {"name": f"{_dns(cfg.name)}-{suffix}", "namespace": cfg.cluster.namespace,
            "labels": {**PART_OF, "r1zero/run": _dns(cfg.name), **(labels or {})}}


def container_ports(cfg) -> list[dict]:
    """The ``ports`` entries the ``pytorch`` container needs, one per process on the node."""
    base = cfg.telemetry.port or 9108  # port 0 (ephemeral) cannot be scraped: use the default
    return [{"name": f"metrics-{i}", "containerPort": base + i, "protocol": "TCP"}
            for i in range(cfg.cluster.procs_per_node)]


def pod_monitor(cfg) -> dict:
    endpoints = [{"port": p["name"], "path": "/metrics", "interval": cfg.telemetry.scrape_interval,
                  "honorLabels": True} for p in container_ports(cfg)]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(cfg, "training"),
        "spec": {
            "selector": {"matchExpressions": [{"key": JOB_LABEL, "operator": "Exists"}]},
            "namespaceSelector": {"matchNames": [cfg.cluster.namespace]},
            "podMetricsEndpoints": endpoints,
            "podTargetLabels": [JOB_LABEL, "training.kubeflow.org/replica-type",
                                "training.kubeflow.org/replica-index"],
        },
    }


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict:
    rule = {"alert": name, "expr": expr}
    if for_ != "0m":
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def alert_rules() -> list[dict]:
    """The alerting rules (plain Prometheus rule dicts)."""
    who = "{{ $labels.job }} rank {{ $labels.rank }} ({{ $labels.stage }})"
    return [
        _alert("R1ZeroGPUUtilizationLow",
               f"avg_over_time(r1zero_gpu_utilization_ratio[5m]) < {GPU_UTIL_MIN}", "10m", "warning",
               "GPU utilisation below 90% for 10 minutes",
               f"{who}: GPU {{{{ $labels.gpu }}}} utilisation is {{{{ $value | humanizePercentage }}}}."),
        _alert("R1ZeroCommOverheadHigh",
               f"avg_over_time(r1zero_comm_time_ratio[5m]) > {COMM_RATIO_MAX}", "10m", "warning",
               "Communication above 12% of step time for 10 minutes",
               f"{who}: collectives take {{{{ $value | humanizePercentage }}}} of each step."),
        _alert("R1ZeroLossNaN",
               "(r1zero_loss != r1zero_loss) or (increase(r1zero_nan_skips_total[10m]) > 0)", "0m", "critical",
               "Training loss is NaN or steps are being skipped",
               f"{who}: the loss is not finite or non-finite steps were skipped."),
        _alert("R1ZeroNoStepProgress",
               f"time() - r1zero_last_step_timestamp_seconds > {STALL_SECONDS}", "0m", "critical",
               "No training step completed for 15 minutes",
               f"{who}: last step finished {{{{ $value | humanizeDuration }}}} ago."),
        _alert("R1ZeroExpertImbalance",
               f"(r1zero_moe_max_load_ratio > {MOE_MAX_LOAD}) or (r1zero_moe_dropped_ratio > {MOE_MAX_DROPPED})",
               "10m", "warning", "MoE experts imbalanced for 10 minutes",
               f"{who}: layer {{{{ $labels.layer }}}} max/mean load or dropped fraction is {{{{ $value }}}}."),
        _alert("R1ZeroAhaEvent", "increase(r1zero_aha_events_total[10m]) > 0", "0m", "info",
               "Aha moment detected",
               f"{who}: the reflection rate jumped together with accuracy."),
    ]


def prometheus_rule(cfg) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta(cfg, "alerts"),
        "spec": {"groups": [{"name": "r1zero.training", "rules": alert_rules()}]},
    }


def rules_yaml(rule_obj: dict) -> str:
    """The plain Prometheus rules file inside a PrometheusRule object (for promtool)."""
    return yaml.safe_dump({"groups": rule_obj["spec"]["groups"]}, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Grafana dashboard

_SEL = 'job=~"$job", stage=~"$stage"'


def _panel(title: str, exprs: list[tuple[str, str]], unit: str = "short", max_: float | None = None) -> dict:
    field = {"unit": unit}
    if max_ is not None:
        field.update(min=0, max=max_)
    return {"type": "timeseries", "title": title, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": field, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": e, "legendFormat": legend}
                        for i, (e, legend) in enumerate(exprs)]}


def _row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def dashboard(cfg) -> dict:
    """Grafana dashboard JSON model (schemaVersion 39) with the training, GRPO, MoE and GPU panels."""
    r = "{{rank}}"
    panels = [
        _row("Training"),
        _panel("Step duration p50 / p95", [
            (f"histogram_quantile(0.5, sum by (le, job) (rate(r1zero_step_duration_seconds_bucket{{{_SEL}}}[5m])))",
             "p50 {{job}}"),
            (f"histogram_quantile(0.95, sum by (le, job) (rate(r1zero_step_duration_seconds_bucket{{{_SEL}}}[5m])))",
             "p95 {{job}}")], "s"),
        _panel("Tokens / s (job)", [(f"sum by (job) (rate(r1zero_tokens_total{{{_SEL}}}[5m]))", "{{job}}")]),
        _panel("MFU", [(f"r1zero_mfu_ratio{{{_SEL}}}", r)], "percentunit", 1),
        _panel("Loss", [(f"r1zero_loss{{{_SEL}}}", r)]),
        _panel("Learning rate", [(f"r1zero_learning_rate{{{_SEL}}}", r)]),
        _panel("Step", [(f"r1zero_step{{{_SEL}}}", r)]),
        _panel("NaN-skipped steps", [(f"increase(r1zero_nan_skips_total{{{_SEL}}}[10m])", r)]),
        _panel("Checkpoint duration p95", [
            (f"histogram_quantile(0.95, sum by (le, job) (rate(r1zero_checkpoint_duration_seconds_bucket{{{_SEL}}}[30m])))",
             "{{job}}")], "s"),
        _row("Communication"),
        _panel("Comm time ratio (budget 12%)", [(f"r1zero_comm_time_ratio{{{_SEL}}}", r)], "percentunit", 1),
        _panel("Comm seconds / s by op", [
            (f"sum by (op) (rate(r1zero_comm_seconds_total{{{_SEL}}}[5m]))", "{{op}}")], "s"),
        _panel("Comm seconds / s by purpose (FSDP, TP, pipeline, experts, weight sync)", [
            (f"sum by (purpose) (rate(r1zero_comm_purpose_seconds_total{{{_SEL}}}[5m]))", "{{purpose}}")], "s"),
        _panel("Comm bytes / s by purpose", [
            (f"sum by (purpose) (rate(r1zero_comm_purpose_bytes_total{{{_SEL}}}[5m]))", "{{purpose}}")], "Bps"),
        _row("GRPO"),
        _panel("Reward", [(f"r1zero_grpo_reward{{{_SEL}}}", r)]),
        _panel("Accuracy / format / reflection", [
            (f"r1zero_grpo_accuracy_ratio{{{_SEL}}}", "accuracy " + r),
            (f"r1zero_grpo_format_ratio{{{_SEL}}}", "format " + r),
            (f"r1zero_grpo_reflection_ratio{{{_SEL}}}", "reflection " + r)], "percentunit", 1),
        _panel("KL", [(f"r1zero_grpo_kl{{{_SEL}}}", r)]),
        _panel("Completion length", [(f"r1zero_grpo_completion_length_tokens{{{_SEL}}}", r)]),
        _panel("Aha events", [(f"increase(r1zero_aha_events_total{{{_SEL}}}[10m])", r)]),
        _row("MoE"),
        _panel("Max / mean expert load", [(f"max by (layer) (r1zero_moe_max_load_ratio{{{_SEL}}})", "L{{layer}}")]),
        _panel("Dropped token fraction", [(f"max by (layer) (r1zero_moe_dropped_ratio{{{_SEL}}})", "L{{layer}}")],
               "percentunit", 1),
        _panel("Router entropy", [(f"avg by (layer) (r1zero_moe_router_entropy_nats{{{_SEL}}})", "L{{layer}}")]),
        _row("GPU (NVML, per rank)"),
        _panel("GPU utilisation (target 90%)", [(f"r1zero_gpu_utilization_ratio{{{_SEL}}}", r)], "percentunit", 1),
        _panel("GPU memory used", [(f"r1zero_gpu_memory_used_bytes{{{_SEL}}}", r)], "bytes"),
        _panel("GPU monitoring status", [(f"r1zero_gpu_monitoring_info{{{_SEL}}}", "{{rank}} {{reason}}")]),
    ]
    if cfg.cluster.gpu != "cpu":  # DCGM exporter (NVIDIA/dcgm-exporter) runs on GPU nodes
        panels += [
            _row("DCGM exporter"),
            _panel("DCGM GPU util", [("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL) / 100", "{{Hostname}}/{{gpu}}")],
                   "percentunit", 1),
            _panel("DCGM tensor pipe active", [("avg by (Hostname, gpu) (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE)",
                                                "{{Hostname}}/{{gpu}}")], "percentunit", 1),
            _panel("DCGM NVLink TX bytes/s", [("sum by (Hostname) (DCGM_FI_PROF_NVLINK_TX_BYTES)", "{{Hostname}}")],
                   "Bps"),
            _panel("DCGM framebuffer used", [("sum by (Hostname, gpu) (DCGM_FI_DEV_FB_USED) * 1024 * 1024",
                                              "{{Hostname}}/{{gpu}}")], "bytes"),
        ]
    x = y = 0
    for i, p in enumerate(panels):
        p["id"] = i + 1
        if p["type"] == "row":
            x, y = 0, y + (8 if x else 0)
            p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
            continue
        p["gridPos"] = {"h": 8, "w": 8, "x": x, "y": y}
        x += 8
        if x >= 24:
            x, y = 0, y + 8

    def var(name: str, query: str) -> dict:
        return {"name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "multi": True,
                "current": {"text": "All", "value": "$__all"}, "refresh": 2}

    return {
        "title": f"r1zero training ({cfg.name})", "uid": f"r1zero-{_dns(cfg.name)}"[:40], "schemaVersion": 39,
        "tags": ["r1zero", "training"], "timezone": "utc", "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            var("job", "label_values(r1zero_steps_total, job)"),
            var("stage", 'label_values(r1zero_steps_total{job=~"$job"}, stage)'),
        ]},
        "panels": panels,
    }


def dashboard_configmap(cfg) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, "dashboard", DASHBOARD_LABEL),
        "data": {"r1zero-training.json": json.dumps(dashboard(cfg), indent=1, sort_keys=True)},
    }


def monitoring_objects(cfg) -> list[dict]:
    """[PodMonitor, PrometheusRule, dashboard ConfigMap] for ``cfg`` (plain dicts, YAML-ready)."""
    return [pod_monitor(cfg), prometheus_rule(cfg), dashboard_configmap(cfg)]
