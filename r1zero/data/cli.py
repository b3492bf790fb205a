"""``r1zero data mix|show``: build the data artifact, or print a built artifact's manifest summary.

    r1zero data mix --config configs/tiny.yaml --out runs/tiny/data
    r1zero data mix --config configs/tiny.yaml --set data.n_train=100000 --out s3://bucket/data
    r1zero data show runs/tiny/data
"""

from __future__ import annotations

import json

from r1zero.cli import add_config_args, add_group, config_from_args


def _mix(args) -> int:
    from r1zero.data.mix import run_mix

    cfg = config_from_args(args)
    manifest = run_mix(cfg, args.out)
    if args.json:
        print(json.dumps({k: manifest[k] for k in ("rows_in", "rows_kept", "rows_quarantined", "ratios", "counts")},
                         sort_keys=True))
    return 0


def _show(args) -> int:
    from r1zero.data.manifest import load_manifest
    from r1zero.data.mix import summary_lines

    m = load_manifest(args.data)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
    else:
        print("\n".join(summary_lines(m)))
    return 0


def register(sub) -> None:
    dsub = add_group(sub, "data", "data mixing: procedural tasks + imports -> shards, tokenizer, manifest")
    mix = dsub.add_parser("mix", help="generate, import, filter, dedup and write the data artifact")
    add_config_args(mix)
    mix.add_argument("--out", required=True, help="output URI: a local dir or s3://bucket/prefix")
    mix.add_argument("--json", action="store_true", help="also print the key manifest fields as one JSON line")
    mix.set_defaults(func=_mix)
    show = dsub.add_parser("show", help="print the summary of a data artifact's manifest")
    show.add_argument("data", help="data artifact URI (local dir or s3://)")
    show.add_argument("--json", action="store_true", help="print the whole manifest")
    show.set_defaults(func=_show)
