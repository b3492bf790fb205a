"""The ``r1zero`` command line: one subcommand per stage, ``--help`` everywhere.

    r1zero config show --config configs/tiny.yaml --set data.mix.math=0.35
    r1zero data mix --config configs/tiny.yaml --out out/data

Each command group is registered explicitly below by a function that imports its module only
when that group is used (so ``r1zero config show`` does not import torch) and calls the module's
``register(subparsers)``, which adds the parser and sets ``func=<callable(args) -> int>``.
Groups from layers above the core (``run`` and ``pipeline`` import kfp, in ``pipelines/``) come
through the ``r1zero.commands`` entry-point group of the installed package (``pyproject.toml``):
the core never names them. A :class:`r1zero.errors.UserError` anywhere becomes one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from r1zero.errors import EXIT_USAGE, UserError

ENTRY_POINT_GROUP = "r1zero.commands"  # name = command group, value = its register(subparsers)


@dataclass(frozen=True)
class Group:
    help: str
    register: Callable  # register(subparsers): imports the group's module and adds its parser


def _config(sub):
    from r1zero.config_cli import register
    register(sub)


def _data(sub):
    from r1zero.data.cli import register
    register(sub)


def _sandbox(sub):
    from r1zero.sandbox.cli import register
    register(sub)


def _eval(sub):
    from r1zero.eval.cli import register
    register(sub)


def _insight(sub):
    from r1zero.insight.cli import register
    register(sub)


def _experiment(sub):
    from r1zero.insight.experiment_cli import register
    register(sub)


def _pretrain(sub):
    from r1zero.train.cli import register
    register(sub)


def _grpo(sub):
    from r1zero.grpo.cli import register
    register(sub)


def _plan(sub):
    from r1zero.sizing_cli import register
    register(sub)


def _render(sub):
    from r1zero.cluster.cli import register_render
    register_render(sub)


def _validate(sub):
    from r1zero.cluster.cli import register_validate
    register_validate(sub)


def _launch(sub):
    from r1zero.cluster.cli import register_launch
    register_launch(sub)


CORE_GROUPS: dict[str, Group] = {
    "config": Group("show or check the resolved config", _config),
    "data": Group("mix, inspect and tokenize the task data", _data),
    "sandbox": Group("run untrusted code in the sandbox", _sandbox),
    "eval": Group("evaluate a model (pass@k, maj@k, CIs, report)", _eval),
    "insight": Group("detect aha moments in training curves", _insight),
    "experiment": Group("aha experiments across model sizes", _experiment),
    "pretrain": Group("MoE pretraining (dp/tp/pp/ep, ZeRO)", _pretrain),
    "grpo": Group("GRPO reinforcement learning", _grpo),
    "plan": Group("size a parallel layout for a cluster", _plan),
    "render": Group("write Kubernetes manifests for a stage", _render),
    "validate": Group("validate manifests offline", _validate),
    "launch": Group("run a rendered job on a cluster or locally", _launch),
}


def _entry_point(ep) -> Callable:
    def register(sub):
        ep.load()(sub)
    return register


def plugin_groups() -> dict[str, Group]:
    """Command groups that installed packages declare under the ``r1zero.commands`` entry points."""
    from importlib.metadata import entry_points

    return {ep.name: Group(f"{ep.name} commands ({ep.value.split(':')[0]})", _entry_point(ep))
            for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in CORE_GROUPS}


def command_groups() -> dict[str, Group]:
    return {**CORE_GROUPS, **plugin_groups()}


COMMANDS: dict[str, Group] = command_groups()


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
    for name, group in COMMANDS.items():
        if (only is None or name == only) and name not in sub.choices:
            group.register(sub)
    for name, group in COMMANDS.items():
        if name not in sub.choices:
            # cheap placeholder so the name shows in --help without importing heavy modules
            sub.add_parser(name, help=f"{group.help} (see r1zero {name} --help)")
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
