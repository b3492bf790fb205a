"""Submit the compiled pipeline to Kubeflow Pipelines, once or on a schedule.

Uses ``kfp.Client``: ``create_run_from_pipeline_package`` for one run and
``create_recurring_run`` for scheduled retraining. KFP's cron has six fields, seconds first
(robfig/cron); the usual five-field form is accepted and converted by prefixing ``0`` seconds.

Auth, in order: a bearer token (``--token``/``KFP_TOKEN``); inside a cluster the pod's service
account token (``kfp.client.ServiceAccountTokenVolumeCredentials``); else the kubeconfig
(``kfp.Client`` loads it when no host/credentials are given).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from r1zero.errors import UserError

_SA_TOKEN = "/var/run/secrets/kubeflow/pipelines/token"


def to_kfp_cron(expr: str) -> str:
    """Accept 5-field cron (min hour dom mon dow) or KFP's 6-field form; return 6 fields."""
    fields = expr.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise UserError(f"--schedule {expr!r}: expected 5 cron fields (e.g. '0 3 * * 0') or 6 (seconds first)")


def parse_params(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in pairs:
        if "=" not in p:
            raise UserError(f"--param {p!r}: expected NAME=VALUE")
        k, _, v = p.partition("=")
        out[k.strip()] = yaml.safe_load(v) if v else ""
    return out


def pipeline_arguments(cfg, registry_uri: str, params: list[str], warm_start: bool) -> dict[str, object]:
    args: dict[str, object] = {
        "config_yaml": cfg.to_yaml(),  # the one serialisation (r1zero.config)
        "target": "cluster",
        "registry_uri": registry_uri,
        "warm_start": warm_start,
    }
    extra = parse_params(params)
    unknown = sorted(set(extra) - set(args))
    if unknown:
        raise UserError(f"--param: unknown pipeline parameter(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(sorted(args))}")
    args.update(extra)
    return args


def make_client(host: str | None, namespace: str | None, token: str | None):
    import kfp

    if token:
        return kfp.Client(host=host, namespace=namespace, existing_token=token)
    if Path(_SA_TOKEN).is_file() or os.environ.get("KF_PIPELINES_SA_TOKEN_PATH"):
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return kfp.Client(host=host, namespace=namespace, credentials=ServiceAccountTokenVolumeCredentials())
    return kfp.Client(host=host, namespace=namespace)


def submit(cfg, *, host: str | None, namespace: str | None, experiment: str, params: list[str],
           schedule: str | None, dry_run: bool, token: str | None, registry_uri: str, package: str,
           run_name: str | None = None, warm_start: bool = False) -> dict:
    if not Path(package).is_file():
        raise UserError(f"compiled pipeline not found: {package} (run `r1zero pipeline compile`)")
    # Scheduled retraining warm-starts from the last promoted model and mixes the newest data.
    arguments = pipeline_arguments(cfg, registry_uri, params, warm_start=warm_start or schedule is not None)
    cron = to_kfp_cron(schedule) if schedule else None
    name = run_name or (f"{cfg.name}-retrain" if cron else f"{cfg.name}-run")
    # the run's pods use the service account the manifests bind to the launcher Role
    plan = {"host": host, "namespace": namespace, "experiment": experiment, "name": name, "cron": cron,
            "parameters": sorted(arguments), "package": str(package),
            "service_account": cfg.cluster.kfp_service_account}
    if dry_run:
        return {"dry_run": True, **plan}
    if not host and not token and not Path(_SA_TOKEN).is_file():
        # kfp.Client() would try the kubeconfig; say what is missing if there is none either.
        if not (Path.home() / ".kube" / "config").is_file() and not os.environ.get("KUBECONFIG"):
            raise UserError("no KFP endpoint: pass --host URL (or KFP_HOST), run in-cluster, or set a kubeconfig")
    try:
        client = make_client(host, namespace, token)
        if cron:
            exp = client.create_experiment(experiment, namespace=namespace)
            job = client.create_recurring_run(
                experiment_id=exp.experiment_id, job_name=name, cron_expression=cron, max_concurrency=1,
                no_catchup=True, params=arguments, pipeline_package_path=str(package), enabled=True,
                service_account=cfg.cluster.kfp_service_account)
            return {**plan, "recurring_run_id": job.recurring_run_id}
        res = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=name, experiment_name=experiment, namespace=namespace,
            enable_caching=True, service_account=cfg.cluster.kfp_service_account)
        return {**plan, "run_id": res.run_id}
    except UserError:
        raise
    except Exception as err:  # kfp raises ApiException, MaxRetryError, ... : one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"KFP submit to {host}: {type(err).__name__}: {first}") from None
