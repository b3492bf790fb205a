"""``r1zero render | validate | launch``: manifests for the cluster, checked offline, run or emulated.

    r1zero render --config configs/a100-13b.yaml --stage pretrain --kind pytorchjob --out out/k8s
    r1zero render --all --out manifests
    r1zero validate manifests/ --crd-dir ../shared/crds
    r1zero launch out/k8s/pretrain-pytorchjob.yaml [--local [--containers]]

``r1zero.cli`` registers each command group explicitly with one of the ``register_*`` functions
below (imported only when that group is used).
"""

from __future__ import annotations

import sys
from pathlib import Path

from r1zero.cli import add_config_args, config_from_args
from r1zero.errors import UserError


def _render(args) -> int:
    from r1zero import store
    from r1zero.cluster.render import dump_yaml, render_stage

    if args.all:
        from r1zero.cluster.tree import write_tree

        paths = write_tree(Path(args.out))
        print(f"wrote {len(paths)} files under {args.out}")
        return 0
    if not args.stage or not args.kind:
        raise UserError("render needs --stage and --kind (or --all)")
    cfg = config_from_args(args)
    uris = {k: v for k, v in {"data": args.data, "out": args.model_out, "policy": args.policy}.items() if v}
    objs = render_stage(cfg, args.stage, args.kind, uris)
    text = dump_yaml(objs)
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.out) / f"{args.stage}-{args.kind}.yaml"
    store.atomic_write_bytes(path, text.encode())
    print(path)
    return 0


def _validate(args) -> int:
    from r1zero.cluster.validate import KUBE_VERSION, load_crds_from_cluster, load_crds_from_dir, validate_paths

    if args.from_cluster and args.crd_dir:
        raise UserError("use either --crd-dir or --from-cluster")
    crds = load_crds_from_cluster() if args.from_cluster else (load_crds_from_dir(args.crd_dir) if args.crd_dir else {})
    rep = validate_paths(args.paths, crds, args.kube_version or KUBE_VERSION)
    for n in rep.notes:
        print(f"note: {n}")
    for e in rep.errors:
        print(f"error: {e}")
    print(f"{rep.checked} objects checked, {len(rep.errors)} errors")
    return 0 if rep.ok else 1


def _launch(args) -> int:
    from r1zero.cluster.launch import JobFailed, launch_cluster, launch_local, load_manifest

    docs = load_manifest(args.manifest)
    if args.containers and not args.local:
        raise UserError("--containers starts the job on this machine: use it with --local")
    try:
        if args.containers:
            from r1zero.cluster.containers import launch_containers

            launch_containers(docs, timeout=args.wait_timeout, staging=args.staging_dir)
        elif args.local:
            launch_local(docs, timeout=args.wait_timeout)
        else:
            job = next((d for d in docs if d.get("kind") == "PyTorchJob"), None)
            client = None
            if job is not None:
                from r1zero.cluster.launch import make_client

                ns = args.namespace or job["metadata"].get("namespace") or "default"
                client = make_client(ns, config_file=args.kubeconfig)
            launch_cluster(docs, client=client, namespace=args.namespace,
                           wait_timeout=args.wait_timeout or 7 * 24 * 3600,
                           polling_interval=args.polling_interval, delete=args.delete)
    except (JobFailed, TimeoutError) as err:
        print(f"r1zero: launch failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


def register_render(sub) -> None:
    from r1zero.cluster.render import KINDS, STAGES

    p = sub.add_parser("render", help="write Kubernetes manifests for a stage (PyTorchJob/MPIJob/TrainJob)")
    add_config_args(p)
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--out", required=True, help="output directory ('-' = stdout); with --all the manifests/ root")
    p.add_argument("--all", action="store_true", help="regenerate the whole kustomize/Argo CD tree into --out")
    p.add_argument("--data", help="data artifact URI (default: <cluster.checkpoint_uri>/<name>/data)")
    p.add_argument("--policy", help="grpo: policy model URI (default: .../<name>/pretrain)")
    p.add_argument("--model-out", help="stage output URI (default: .../<name>/<stage>)")
    p.set_defaults(func=_render)


def register_validate(sub) -> None:
    p = sub.add_parser("validate", help="validate manifests: schemas, unknown fields, webhook rules, policy")
    p.add_argument("paths", nargs="+", help="YAML files or directories")
    p.add_argument("--crd-dir", help="directory of CustomResourceDefinition YAML files")
    p.add_argument("--from-cluster", action="store_true", help="read the CRDs from the current kube context")
    p.add_argument("--kube-version", help="Kubernetes version for built-in kinds (default 1.30.0)")
    p.set_defaults(func=_validate)


def register_launch(sub) -> None:
    p = sub.add_parser("launch", help="run a rendered PyTorchJob on the cluster (TrainingClient) or locally")
    p.add_argument("manifest", help="YAML with the job (and its ConfigMap), from `r1zero render`")
    p.add_argument("--local", action="store_true", help="emulate the training operator with local processes")
    p.add_argument("--containers", action="store_true",
                   help="with --local: every replica as a container of the rendered image (Docker engine)")
    p.add_argument("--staging-dir", help="with --containers: host directory backing PersistentVolumeClaims "
                   "(default: a temp dir)")
    p.add_argument("--namespace", help="override the manifest's namespace")
    p.add_argument("--kubeconfig", help="kube config file (default: ~/.kube/config, or in-cluster)")
    p.add_argument("--wait-timeout", type=float, help="seconds to wait for the job (default: 7 days cluster, none local)")
    p.add_argument("--polling-interval", type=float, default=15.0, help="seconds between status polls")
    p.add_argument("--delete", choices=["on-success", "always", "never"], default="on-success",
                   help="delete the job afterwards (default on-success: failed jobs stay for inspection)")
    p.set_defaults(func=_launch)


def register(sub) -> None:
    """All three groups (idempotent: skips names already present)."""
    for name, fn in (("render", register_render), ("validate", register_validate), ("launch", register_launch)):
        if name not in sub.choices:
            fn(sub)
