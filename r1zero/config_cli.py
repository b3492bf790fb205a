"""``r1zero config show|validate``: print or check the resolved config tree."""

from __future__ import annotations

import json

import yaml

from r1zero.cli import add_config_args, add_group, config_from_args


def _show(args) -> int:
    cfg = config_from_args(args)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _validate(args) -> int:
    cfg = config_from_args(args)
    print(f"ok: {cfg.name} (config hash {cfg.hash()[:12]})")
    return 0


def register(sub) -> None:
    csub = add_group(sub, "config", "show or validate the resolved config")
    show = csub.add_parser("show", help="print the resolved config (preset + --set overrides)")
    add_config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=_show)
    val = csub.add_parser("validate", help="check a config; exit 2 with the offending fields")
    add_config_args(val)
    val.set_defaults(func=_validate)
