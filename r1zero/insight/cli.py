"""``r1zero insight detect``: events (jump, knee, reflection, length_growth, aha) in a metrics JSONL.

    r1zero insight detect --metrics runs/tiny/grpo/metrics.jsonl --out runs/tiny/insight/events.json
    r1zero insight detect --metrics all_seeds.jsonl --out events.json --set insight.min_sigma=4

Writes the JSON document and one PNG per metric beside it, and prints how many runs show each
event kind (with the spread of their steps).
"""

from __future__ import annotations

from r1zero.cli import add_config_args, add_group, config_from_args


def _detect(args) -> int:
    from r1zero.insight.detect import run_detect

    cfg = config_from_args(args)
    doc = run_detect(args.metrics, args.out, cfg, plots=not args.no_plots)
    s = doc["summary"]
    print(f"{len(doc['events'])} events in {s['n_runs']} run(s), {len(s['metrics'])} metric(s); "
          f"rows kept {s['rows']['kept']}/{s['rows']['in']}"
          + (f" (quarantined {s['rows']['quarantined']})" if s["rows"]["quarantined"] else ""))
    for kind, k in s["by_kind"].items():
        st = k["first_step"]
        print(f"  {kind:>13}: {k['runs_with_event']}/{k['n_runs']} runs, first step {st['mean']:.1f} "
              f"+- {st['std']:.1f} (range {st['min']:.0f}-{st['max']:.0f})")
    print(f"wrote {args.out}")
    return 0


def register(sub) -> None:
    isub = add_group(sub, "insight", "detect aha moments and other events in training metrics")
    d = isub.add_parser("detect", help="detect events in a metrics JSONL; write JSON + PNGs")
    add_config_args(d)
    d.add_argument("--metrics", required=True, help='metrics JSONL ({"step","name","value"[,"run"]} per line)')
    d.add_argument("--out", required=True, help="output JSON file (PNGs are written beside it)")
    d.add_argument("--no-plots", action="store_true", help="skip the per-metric PNGs")
    d.set_defaults(func=_detect)
