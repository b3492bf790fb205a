"""``r1zero run`` and ``r1zero pipeline compile|submit``.

    r1zero run --config configs/tiny.yaml --out runs/tiny          # kfp.local, CPU, end to end
    r1zero run --runner docker --config configs/tiny.yaml          # the same, each task in the runtime image
    r1zero pipeline compile [--out pipelines/r1zero_pipeline.yaml]
    r1zero pipeline submit --host https://kfp.example.com --config configs/a100-13b.yaml \
        --registry s3://models/r1zero [--schedule "0 3 * * 0"] [--dry-run]

These live under ``pipelines/`` (not the core library) because they import kfp; ``r1zero.cli``
finds them through the ``r1zero.commands`` entry points (``pyproject.toml``): ``run`` ->
:func:`register_run`, ``pipeline`` -> :func:`register_pipeline`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from r1zero.cli import add_config_args, add_group, config_from_args
from r1zero.errors import UserError

DEFAULT_PACKAGE = Path(__file__).with_name("r1zero_pipeline.yaml")


def _run(args) -> int:
    from pipelines.local_run import run_local

    cfg = config_from_args(args)
    run_local(cfg, Path(args.out), registry_uri=args.registry, warm_start=args.warm_start, runner=args.runner)
    return 0


def _compile(args) -> int:
    from pipelines.r1zero_pipeline import compile_pipeline

    compile_pipeline(args.out)
    print(f"compiled {args.out}")
    return 0


def _submit(args) -> int:
    from pipelines.submit import submit

    cfg = config_from_args(args)
    result = submit(cfg, host=args.host, namespace=args.namespace, experiment=args.experiment,
                    params=args.param, schedule=args.schedule, dry_run=args.dry_run, token=args.token,
                    registry_uri=cfg.cluster.registry_uri if args.registry is None else args.registry,
                    package=args.package, run_name=args.run_name,
                    warm_start=args.warm_start)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def register(sub) -> None:
    """Both groups (idempotent)."""
    register_run(sub)
    register_pipeline(sub)


def register_run(sub) -> None:
    if "run" not in sub.choices:
        p = sub.add_parser("run", help="run the whole pipeline locally through kfp.local (CPU)")
        add_config_args(p, required=True)
        p.add_argument("--out", default="runs/tiny", help="run directory (artifacts, report, summary.json)")
        p.add_argument("--registry", default=None, help="model registry URI for the promotion gate "
                       "(default: OUT/registry)")
        p.add_argument("--warm-start", action="store_true", help="GRPO starts from the last promoted model")
        p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                       help="subprocess: tasks run with this interpreter (fastest); docker: each task runs "
                       "in the runtime image (`python -m r1zero.images build` first)")
        p.set_defaults(func=_run)


def register_pipeline(sub) -> None:
    if "pipeline" in sub.choices:
        return
    psub = add_group(sub, "pipeline", "compile or submit the Kubeflow pipeline")
    c = psub.add_parser("compile", help="compile the pipeline to IR YAML")
    c.add_argument("--out", default=str(DEFAULT_PACKAGE), help="output YAML path")
    c.set_defaults(func=_compile)
    s = psub.add_parser("submit", help="submit a run, or a recurring run with --schedule, to Kubeflow Pipelines")
    add_config_args(s, required=True)
    s.add_argument("--host", default=os.environ.get("KFP_HOST"), help="KFP API endpoint (env KFP_HOST); "
                   "omit in-cluster")
    s.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user)")
    s.add_argument("--experiment", default="r1zero", help="experiment name (created when missing)")
    s.add_argument("--param", action="append", default=[], metavar="K=V", help="pipeline parameter (repeatable)")
    s.add_argument("--schedule", default=None, metavar="CRON",
                   help="recurring run: 5-field cron (converted) or KFP's 6-field form (seconds first)")
    s.add_argument("--registry", default=None, help="model registry URI (promotion gate, warm start); "
                   "default cluster.registry_uri, '' disables promotion")
    s.add_argument("--warm-start", action="store_true", help="GRPO starts from the last promoted model "
                   "(implied by --schedule; the retraining CronJob passes it)")
    s.add_argument("--token", default=os.environ.get("KFP_TOKEN"), help="bearer token (env KFP_TOKEN); else "
                   "in-cluster service account, else kubeconfig")
    s.add_argument("--package", default=str(DEFAULT_PACKAGE), help="compiled pipeline YAML")
    s.add_argument("--run-name", default=None, help="run (or recurring run) name")
    s.add_argument("--dry-run", action="store_true", help="print what would be submitted; contact nothing")
    s.set_defaults(func=_submit)


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(prog="pipelines.cli")
    register(ap.add_subparsers())
    a = ap.parse_args()
    try:
        sys.exit(a.func(a))
    except UserError as e:
        print(f"r1zero: error: {e}", file=sys.stderr)
        sys.exit(2)
