"""``r1zero eval``: evaluate a model on the eval split (and the named benchmarks), optionally
against a baseline.

    r1zero eval --config configs/tiny.yaml --model runs/tiny/grpo --data runs/tiny/data --out runs/tiny/eval
    r1zero eval --config configs/tiny.yaml --model runs/tiny/grpo --data runs/tiny/data --out runs/tiny/eval \\
        --baseline runs/tiny/pretrain --curves runs/tiny/pretrain/metrics.jsonl runs/tiny/grpo/metrics.jsonl
"""

from __future__ import annotations

import json

from r1zero.cli import add_config_args, config_from_args

SHOWN = ("accuracy", "pass@k", "maj@k", "mean@n", "format_rate", "reflection_rate", "length_mean")


def _eval(args) -> int:
    from r1zero.eval.evaluate import run_eval

    cfg = config_from_args(args)
    flat = run_eval(cfg, args.model, args.data, args.out, baseline_uri=args.baseline, curves=args.curves or None)
    if args.json:
        print(json.dumps(flat, sort_keys=True))
        return 0
    k = min(cfg.eval.k, cfg.eval.n_samples)
    for key in SHOWN:
        line = f"{key.replace('@k', f'@{k}'):>16}: {flat[key]:.4f}"
        if f"delta/{key if key != 'accuracy' else 'pass@1'}" in flat:
            line += f"  (vs baseline {flat['delta/' + (key if key != 'accuracy' else 'pass@1')]:+.4f})"
        print(line)
    for name in (b.name for b in cfg.eval.benchmarks):  # each named benchmark, evaluated whole
        pre = f"bench/{name}/"
        line = f"{name:>16}: pass@1 {flat[pre + 'pass@1']:.4f} (n={flat[pre + 'n']:.0f})"
        if f"delta/{pre}pass@1" in flat:
            line += f"  (vs baseline {flat[f'delta/{pre}pass@1']:+.4f})"
        print(line)
    print(f"wrote metrics.json, kfp_metrics.json, per_problem.jsonl, report.html to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: pass@1/pass@k/maj@k per domain, report.html")
    add_config_args(p)
    p.add_argument("--model", required=True, help="model dir or URI (any transformers causal LM + tokenizer)")
    p.add_argument("--data", required=True, help="data artifact (uses its eval split)")
    p.add_argument("--out", required=True, help="output dir or URI")
    p.add_argument("--baseline", help="baseline model dir, or an earlier eval output dir, to compare against")
    p.add_argument("--curves", nargs="*", default=[], metavar="METRICS_JSONL",
                   help="training metrics.jsonl files to plot (with detected events) in the report")
    p.add_argument("--json", action="store_true", help="print the flat metrics as one JSON line")
    p.set_defaults(func=_eval)
