"""``r1zero pretrain``: MoE pretraining from a data artifact to an HF model dir.

    r1zero pretrain --config configs/tiny.yaml --data runs/tiny/data --out runs/tiny/pretrain
    torchrun --nproc-per-node 2 -m r1zero.cli pretrain --config configs/tiny.yaml --set parallel.dp=2 \
        --data runs/tiny/data --out runs/tiny/pretrain
    deepspeed --num_gpus 2 --module r1zero.cli pretrain ...   # same flags (--local_rank is accepted)

Prints the summary (JSON, without the per-step loss list) on rank 0.
"""

from __future__ import annotations

import argparse
import json

from r1zero.cli import add_config_args, config_from_args


def _run(args) -> int:
    from r1zero.train.pretrain import run_pretrain

    cfg = config_from_args(args)
    summary = run_pretrain(cfg, args.data, args.out)
    if summary is not None:
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1, sort_keys=True))
    return 0


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the MoE base model (FSDP2 engine; dp/tp/pp/ep layouts)")
    add_config_args(p)
    p.add_argument("--data", required=True, help="data artifact URI (from `r1zero data mix`)")
    p.add_argument("--out", required=True, help="output model dir URI (local path or s3://)")
    # the deepspeed launcher appends --local_rank=N; the rank itself is read from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)
