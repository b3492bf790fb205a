"""The ``r1zero`` command line: one subcommand per stage, ``--help`` everywhere.

    r1zero config show --config configs/tiny.yaml --set data.mix.math=0.35
    r1zero data mix --config configs/tiny.yaml --out out/data

Each stage module exposes ``register(subparsers)`` which adds its parser and sets
``func=<callable(args) -> int>``. Modules are imported lazily per command group so that
``r1zero config show`` does not import torch. A :class:`r1zero.errors.UserError` anywhere becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from r1zero.errors import EXIT_USAGE, UserError

# command group -> module providing ``register(subparsers)``. Keep one line per group.
COMMANDS: dict[str, str] = {
    "config": "r1zero.config_cli",
    "data": "r1zero.data.cli",
    "sandbox": "r1zero.sandbox.cli",
    "eval": "r1zero.eval.cli",
    "insight": "r1zero.insight.cli",
    "experiment": "r1zero.insight.experiment_cli",
    "pretrain": "r1zero.train.cli",
    "grpo": "r1zero.grpo.cli",
    "plan": "r1zero.sizing_cli",
    "render": "r1zero.cluster.cli_render",
    "validate": "r1zero.cluster.cli_validate",
    "launch": "r1zero.cluster.cli_launch",
    # kfp lives above the core: these commands are loaded by name from the pipelines layer.
    "run": "pipelines.cli",
    "pipeline": "pipelines.cli",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with exit 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The ``--config F`` / ``--set k=v`` pair every stage accepts."""
    p.add_argument("--config", required=required, help="preset YAML (e.g. configs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.mix.math=0.35 (repeatable)")


def add_group(sub, name: str, help: str):
    """Add a command group (``r1zero NAME ACTION ...``); returns the subparsers for its actions."""
    p = sub.add_parser(name, help=help)
    actions = p.add_subparsers(dest=f"{name}_command", metavar="ACTION", parser_class=type(p))
    actions.required = True
    return actions


def config_from_args(args):
    from r1zero import store
    from r1zero.config import load_config

    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", []))
    store.configure(cfg.store)
    return cfg


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All groups when ``only`` is None; else import just ``only``'s module (others get placeholders)."""
    parser = _Parser(prog="r1zero", description="R1-Zero-style reasoning training pipeline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    wanted = [m for n, m in COMMANDS.items() if only is None or n == only]
    for module in dict.fromkeys(wanted):  # a module may register several groups
        importlib.import_module(module).register(sub)
    for name in COMMANDS:
        if name not in sub.choices:
            # cheap placeholder so the name shows in --help without importing heavy modules
            sub.add_parser(name, help=f"{name} commands (see r1zero {name} --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in COMMANDS else None
    try:
        parser = build_parser(only if only else ("__none__" if argv and argv[0] not in ("-h", "--help") else None))
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.parse_args([*argv, "--help"])
            return EXIT_USAGE
        return int(func(args) or 0)
    except UserError as err:
        print(f"r1zero: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("r1zero: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
