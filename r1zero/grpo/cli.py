"""``r1zero grpo``: RL with verifiable rewards from a base policy (no SFT: the "Zero" recipe).

    r1zero grpo --config configs/tiny.yaml --policy runs/tiny/pretrain --data runs/tiny/data --out runs/tiny/grpo
    r1zero grpo --config configs/tiny.yaml --set grpo.algorithm=ppo ...        # baselines: ppo | rloo
    torchrun --nproc-per-node 2 -m r1zero.cli grpo --config configs/tiny.yaml --policy ... --data ... --out ...

The policy is any transformers causal LM directory (r1zero's MoE, a Llama, ...) with tokenizer
files. Prints the run summary (JSON) on rank 0. Rerunning with the same ``--out`` resumes from the
newest valid checkpoint.
"""

from __future__ import annotations

import argparse
import json

from r1zero.cli import add_config_args, config_from_args


def _run(args) -> int:
    from r1zero.grpo.trainer import run_grpo

    cfg = config_from_args(args)
    summary = run_grpo(cfg, args.policy, args.data, args.out)
    if summary is not None:
        print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def register(sub) -> None:
    p = sub.add_parser("grpo", help="GRPO (or PPO/RLOO) RL on verifiable rewards from a base policy")
    add_config_args(p)
    p.add_argument("--policy", required=True, help="policy model dir URI (any transformers causal LM)")
    p.add_argument("--data", required=True, help="data artifact URI (from `r1zero data mix`)")
    p.add_argument("--out", required=True, help="output model dir URI (local path or s3://)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)
