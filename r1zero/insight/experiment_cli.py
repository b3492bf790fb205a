"""``r1zero experiment aha``: N seeds (x a sweep) through the whole pipeline; how often is there an aha?

    r1zero experiment aha --config configs/tiny.yaml --runs 5 --out runs/aha
    r1zero experiment aha --config configs/tiny.yaml --runs 5 --sweep grpo.algorithm=grpo,ppo,rloo --out runs/aha

See :mod:`r1zero.insight.experiment` for what is measured and how seeds are shared.
"""

from __future__ import annotations

from r1zero.cli import add_config_args, add_group, config_from_args


def _aha(args) -> int:
    from r1zero.insight.experiment import markdown_table, parse_sweep, run_experiment

    config_from_args(args)  # validate the config (and configure the store) before any work
    result = run_experiment(args.config, args.overrides, args.runs, parse_sweep(args.sweep), args.out,
                            seed_scope=args.seed_scope)
    print(markdown_table(result["variants"]), end="")
    print(f"wrote experiment.json, experiment.md, experiment.png, events.json to {args.out}")
    return 0


def register(sub) -> None:
    esub = add_group(sub, "experiment", "repeatability experiments over seeds and sweeps")
    a = esub.add_parser("aha", help="run the pipeline for N seeds per variant; count aha moments")
    add_config_args(a)
    a.add_argument("--runs", type=int, default=5, help="seeds per variant (default 5)")
    a.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a config key over values, e.g. grpo.algorithm=grpo,ppo,rloo (repeatable)")
    a.add_argument("--seed-scope", choices=("rl", "all"), default="rl",
                   help="rl: seeds vary RL+eval, data and base model shared (default); all: every stage")
    a.add_argument("--out", required=True, help="output directory")
    a.set_defaults(func=_aha)
