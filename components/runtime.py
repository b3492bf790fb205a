"""Glue the KFP components call: resolve the config, run a stage locally or launch it on the
cluster, and record what the stage did. Plain Python (no kfp import) so it is unit-testable.

Each component body is a few lines importing from here (KFP serialises only the function body,
so the code it calls must be installed in the image: the runtime image installs this package).

Targets:
- ``local``: run the stage in-process on this machine (``kfp.local``, ``make run``).
- ``cluster``: render the sized PyTorchJob for the stage with :mod:`r1zero.cluster`, submit it
  with the Training Operator SDK and wait; the job reads and writes the same artifact URIs
  through :mod:`r1zero.store` (S3).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

STAGE_FILE = "stage.json"  # every stage output dir records its wall seconds here


def load_cfg(config_yaml: str, overrides: list[str] | None = None):
    """Build the typed config from the YAML text passed as a pipeline parameter."""
    import yaml

    from r1zero import store
    from r1zero.config import apply_override, build_config

    tree = yaml.safe_load(config_yaml) or {}
    for ov in overrides or []:
        apply_override(tree, ov)
    cfg = build_config(tree)
    store.configure(cfg.store)
    return cfg


def artifact_uri(artifact) -> str:
    """Where a stage should write/read an artifact.

    Locally the artifact's ``path`` is a directory on this machine. In a cluster, KFP stores
    artifacts in object storage: ``minio://bucket/key`` (KFP's bundled MinIO) and ``s3://`` are
    both S3 for r1zero.store, so the PyTorchJob pods can read them directly.
    """
    uri = getattr(artifact, "uri", "") or ""
    if uri.startswith("minio://"):
        return "s3://" + uri[len("minio://"):]
    if uri.startswith("s3://"):
        return uri
    return artifact.path


def record_stage(out_dir: str | os.PathLike, name: str, seconds: float, **extra) -> None:
    from r1zero.store import atomic_write_text

    p = Path(out_dir)
    if p.is_dir():
        atomic_write_text(p / STAGE_FILE, json.dumps({"stage": name, "seconds": round(seconds, 3), **extra},
                                                     sort_keys=True))


def read_stage_seconds(path: str | os.PathLike) -> float | None:
    f = Path(path) / STAGE_FILE
    if f.is_file():
        return float(json.loads(f.read_text())["seconds"])
    return None


def log_metrics(metrics, values: dict) -> None:
    """Log numeric values to a KFP Metrics artifact (names made KFP-safe)."""
    for k, v in sorted(values.items()):
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        metrics.log_metric(k.replace("/", "_"), float(v))


# ---------------------------------------------------------------------------------------------
# stages


def run_data_mix(config_yaml: str, data, metrics) -> None:
    from r1zero.data.mix import run_mix

    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    manifest = run_mix(cfg, artifact_uri(data))
    record_stage(data.path, "data_mix", time.perf_counter() - t0)
    log_metrics(metrics, {"rows_in": manifest["rows_in"], "rows_kept": manifest["rows_kept"],
                          **{f"ratio_{k}": v for k, v in manifest["ratios"].items()}})


RUN_LABEL = "r1zero/pipeline-run"


def stage_job_docs(cfg, stage: str, uris: dict[str, str], run_id: str) -> list[dict]:
    """The stage's [ConfigMap, PyTorchJob], named and labelled for this pipeline run.

    Names get the run id's first 8 characters so concurrent runs never collide; the label lets
    the exit handler find and delete what this run left behind.
    """
    from r1zero.cluster.render import dns1035, render_stage

    docs = render_stage(cfg, stage, "pytorchjob", uris=uris)
    suffix = "".join(c for c in run_id.lower() if c.isalnum())[:8]
    for d in docs:
        meta = d["metadata"]
        if d["kind"] != "ConfigMap" and suffix:
            meta["name"] = dns1035(f"{meta['name']}-{suffix}")
        meta.setdefault("labels", {})[RUN_LABEL] = dns1035(run_id or "none", limit=63)
    return docs


def _launch_on_cluster(cfg, stage: str, args: dict[str, str], run_id: str = "") -> dict:
    """Render the stage's PyTorchJob, create it with the Training Operator SDK and wait.

    ``launch_cluster`` waits with ``wait_timeout`` (not the API request timeout) and raises with
    the job conditions and the master's last log lines when the job fails.
    """
    from r1zero import store
    from r1zero.cluster.launch import launch_cluster

    launch_cluster(stage_job_docs(cfg, stage, args, run_id), namespace=cfg.cluster.namespace)
    return json.loads(store.read_bytes(store.join(args["out"], "summary.json")))


def _sync_back(uri: str, artifact) -> None:
    """The job wrote the artifact to object storage; mirror it into the task's output path so
    KFP's own upload of that path re-puts the same content instead of an empty directory."""
    from r1zero import store

    if store.is_s3(uri):
        store.materialize(uri, artifact.path)


def run_pretrain(config_yaml: str, target: str, data, model, metrics, run_id: str = "") -> None:
    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    # a base with no continued pretraining is copied, not trained: no job to launch
    if target == "cluster" and not (cfg.model.base and cfg.pretrain.steps == 0):
        summary = _launch_on_cluster(cfg, "pretrain", {"data": artifact_uri(data), "out": artifact_uri(model)},
                                     run_id)
        _sync_back(artifact_uri(model), model)
    else:
        from r1zero.train.pretrain import run_pretrain as _run

        summary = _run(cfg, artifact_uri(data), artifact_uri(model))
    record_stage(model.path, "pretrain", time.perf_counter() - t0)
    log_metrics(metrics, _flat(summary))


def run_grpo(config_yaml: str, target: str, policy_uri: str, data, model, metrics, run_id: str = "") -> None:
    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    if target == "cluster":
        summary = _launch_on_cluster(cfg, "grpo", {"policy": policy_uri, "data": artifact_uri(data),
                                                   "out": artifact_uri(model)}, run_id)
        _sync_back(artifact_uri(model), model)
    else:
        from r1zero.grpo.trainer import run_grpo as _run

        summary = _run(cfg, policy_uri, artifact_uri(data), artifact_uri(model))
    record_stage(model.path, "grpo", time.perf_counter() - t0)
    log_metrics(metrics, _flat(summary))


def run_evaluate(config_yaml: str, model, data, result, report, metrics, baseline=None) -> float:
    from r1zero.eval.evaluate import run_eval

    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    curves = [str(p) for p in [Path(model.path) / "metrics.jsonl"] if p.is_file()]
    out = run_eval(cfg, artifact_uri(model), artifact_uri(data), artifact_uri(result),
                   baseline_uri=artifact_uri(baseline) if baseline is not None else None, curves=curves or None)
    record_stage(result.path, "evaluate", time.perf_counter() - t0)
    html = Path(result.path) / "report.html"
    if html.is_file():
        Path(report.path).write_text(html.read_text(encoding="utf-8"), encoding="utf-8")
    acc = float(out["accuracy"])
    log_metrics(metrics, out)
    return acc


def run_insight(config_yaml: str, rl_model, result, metrics) -> None:
    from r1zero.insight.detect import run_detect

    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    out_dir = Path(result.path)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(rl_model.path) / "metrics.jsonl"
    report = run_detect(str(src), str(out_dir / "insights.json"), cfg)
    record_stage(out_dir, "detect_insight", time.perf_counter() - t0)
    kinds: dict[str, int] = {}
    for e in report.get("events", []):
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    log_metrics(metrics, {f"events_{k}": v for k, v in kinds.items()} | {"events": len(report.get("events", []))})


# ---------------------------------------------------------------------------------------------
# promotion (model registry = a URI prefix holding the promoted model and its metrics)


def champion_accuracy(registry_uri: str) -> float:
    """Accuracy of the currently promoted model, or -1 when nothing was promoted yet."""
    from r1zero import store

    if not registry_uri:
        return -1.0
    uri = store.join(registry_uri, "promoted.json")
    if not store.exists(uri):
        return -1.0
    return float(json.loads(store.read_bytes(uri))["accuracy"])


def champion_model_uri(registry_uri: str) -> str:
    """URI of the last promoted model ('' when none): retraining warm-starts from it."""
    from r1zero import store

    if not registry_uri:
        return ""
    uri = store.join(registry_uri, "promoted.json")
    if not store.exists(uri):
        return ""
    return json.loads(store.read_bytes(uri))["model_uri"]


def promote(registry_uri: str, model, accuracy: float, run_name: str) -> str:
    """Copy the model under the registry and point ``promoted.json`` at it (written last)."""
    from r1zero import store

    dest = store.join(registry_uri, "models", run_name)
    store.publish(model.path, dest)
    store.write_bytes(store.join(registry_uri, "promoted.json"),
                      json.dumps({"model_uri": dest, "accuracy": accuracy, "run": run_name}, sort_keys=True).encode())
    return dest


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------
# exit handler and summary


def cleanup(cfg, target: str, state: str, run_name: str) -> str:
    """Delete training jobs left behind by this pipeline run (cluster only)."""
    if target != "cluster":
        return f"local run ({state}): nothing to clean up"
    deleted = delete_run_jobs(cfg.cluster.namespace, run_name)
    return f"{state}: deleted {len(deleted)} job(s): {', '.join(deleted) or '-'}"


JOB_RESOURCES = [("kubeflow.org", "v1", "pytorchjobs"), ("kubeflow.org", "v2beta1", "mpijobs")]


def delete_run_jobs(namespace: str, run_id: str, api=None) -> list[str]:
    """Delete the PyTorchJobs/MPIJobs labelled with this pipeline run (the exit handler's job)."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    from r1zero.cluster.render import dns1035

    if api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api = client.CustomObjectsApi()
    selector = f"{RUN_LABEL}={dns1035(run_id or 'none', limit=63)}"
    deleted = []
    for group, version, plural in JOB_RESOURCES:
        try:
            items = api.list_namespaced_custom_object(group, version, namespace, plural, label_selector=selector)
        except ApiException as err:
            if err.status == 404:  # that operator is not installed
                continue
            raise
        for item in items.get("items", []):
            name = item["metadata"]["name"]
            api.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                                body=client.V1DeleteOptions(propagation_policy="Foreground"))
            deleted.append(f"{plural}/{name}")
    return deleted


def _eval_summary(result_dir: str) -> dict:
    """The headline figures of an evaluation's metrics.json (see r1zero.eval.evaluate)."""
    m = json.loads((Path(result_dir) / "metrics.json").read_text())
    overall = m["overall"]

    def est(block, key):
        e = block.get(key) or {}
        return e.get("mean"), ([e["lo"], e["hi"]] if e.get("lo") is not None else None)

    def headline(block):
        acc, ci = est(block, "pass@1")
        return {"n": block.get("n_problems"), "accuracy": acc, "ci": ci, "pass@k": est(block, "pass@k")[0],
                "maj@k": est(block, "maj@k")[0], "format_rate": est(block, "format_rate")[0],
                "reflection_rate": est(block, "reflection_rate")[0],
                "length_mean": (block.get("length_sampled") or {}).get("mean")}

    acc, ci = est(overall, "pass@1")
    return {"accuracy": acc, "ci": ci,
            "benchmarks": {name: headline(b) for name, b in m.get("benchmarks", {}).items()},
            "format_rate": est(overall, "format_rate")[0],
            # early RL gains are often format only: accuracy among well-formatted greedy answers
            "accuracy_formatted": _accuracy_formatted(Path(result_dir) / "per_problem.jsonl"),
            "pass@k": est(overall, "pass@k")[0], "maj@k": est(overall, "maj@k")[0],
            "by_domain": {d: est(b, "pass@1")[0] for d, b in m.get("by_domain", {}).items()}}


def _accuracy_formatted(per_problem: Path) -> float | None:
    if not per_problem.is_file():
        return None
    recs = [json.loads(x) for x in per_problem.read_text(encoding="utf-8").splitlines() if x.strip()]
    recs = [r for r in recs if "benchmark" not in r] or recs  # the eval split, as "overall" (benchmarks apart)
    fmt = [r for r in recs if r.get("format_rate", 0.0) >= 1.0]
    return sum(r["pass@1"] for r in fmt) / len(fmt) if fmt else None


def build_summary(data_dir, base_dir, rl_dir, base_eval_dir, rl_eval_dir, insight_dir) -> dict:
    base = _eval_summary(base_eval_dir)
    rl = _eval_summary(rl_eval_dir)
    ins_file = Path(insight_dir) / "insights.json"
    events = json.loads(ins_file.read_text()).get("events", []) if ins_file.is_file() else []
    stages = {}
    for name, d in [("data_mix", data_dir), ("pretrain", base_dir), ("grpo", rl_dir),
                    ("evaluate_base", base_eval_dir), ("evaluate_rl", rl_eval_dir), ("detect_insight", insight_dir)]:
        s = read_stage_seconds(d)
        if s is not None:
            stages[name] = s
    benchmarks = {name: {"base": base["benchmarks"].get(name), "rl": b,
                         "improvement": None if (base["benchmarks"].get(name) or {}).get("accuracy") is None
                         or b["accuracy"] is None else b["accuracy"] - base["benchmarks"][name]["accuracy"]}
                  for name, b in rl["benchmarks"].items()}
    return {
        "base_accuracy": base["accuracy"], "base_ci": base["ci"],
        **({"benchmarks": benchmarks} if benchmarks else {}),
        "rl_accuracy": rl["accuracy"], "rl_ci": rl["ci"],
        "improvement": None if base["accuracy"] is None or rl["accuracy"] is None
        else rl["accuracy"] - base["accuracy"],
        "base": base, "rl": rl,
        "events": events,
        "stage_seconds": stages,
        "total_seconds": round(sum(stages.values()), 3),
    }


def summary_markdown(s: dict) -> str:
    def fmt(acc, ci):
        if acc is None:
            return "n/a"
        return f"{acc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = ["| | greedy pass@1 (95% CI) |", "|---|---|",
             f"| base | {fmt(s['base_accuracy'], s['base_ci'])} |", f"| RL | {fmt(s['rl_accuracy'], s['rl_ci'])} |"]
    if s.get("benchmarks"):
        lines += ["", "| benchmark | n | base pass@1 (95% CI) | RL pass@1 (95% CI) |", "|---|---|---|---|"]
        for name, b in s["benchmarks"].items():
            base_b = b["base"] or {}
            lines.append(f"| {name} | {b['rl']['n']} | {fmt(base_b.get('accuracy'), base_b.get('ci'))} | "
                         f"{fmt(b['rl']['accuracy'], b['rl']['ci'])} |")
    lines += ["", "| event | metric | step | before -> after |", "|---|---|---|---|"]
    for e in s["events"]:
        lines.append(f"| {e['kind']} | {e['metric']} | {e['step']} | {e.get('before')} -> {e.get('after')} |")
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in s["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def write_summary(data, base, rl, base_eval, rl_eval, insight, summary, table) -> None:
    from r1zero.store import atomic_write_text

    s = build_summary(data.path, base.path, rl.path, base_eval.path, rl_eval.path, insight.path)
    Path(summary.path).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(summary.path) / "summary.json", json.dumps(s, indent=2, sort_keys=True))
    Path(table.path).write_text(summary_markdown(s), encoding="utf-8")
