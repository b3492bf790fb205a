"""Runs several ``r1zero pretrain`` layouts one after another in the same launched processes.

    deepspeed --num_gpus 2 tests/train/parity_worker.py CONFIG DATA OUTROOT name:k=v,k=v ...
    torchrun --nproc-per-node 4 tests/train/parity_worker.py CONFIG DATA OUTROOT name:k=v,k=v

Each spec ``name:k=v,...`` becomes ``r1zero pretrain --config CONFIG --data DATA
--out OUTROOT/name --set k=v ...`` through the real CLI; process groups are created and destroyed
per run (each on its own port), so one launch (one interpreter start per rank) covers several layouts.
"""

from __future__ import annotations

import os
import sys

from r1zero.cli import main

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    config, data, root, *specs = args
    base_port = int(os.environ["MASTER_PORT"])
    for i, spec in enumerate(specs):
        # a fresh rendezvous port per run: re-creating the TCP store on the port the previous
        # (destroyed) group used can hang while the old listening socket lingers
        os.environ["MASTER_PORT"] = str(base_port + i)
        name, _, sets = spec.partition(":")
        argv = ["pretrain", "--config", config, "--data", data, "--out", f"{root}/{name}"]
        for kv in filter(None, sets.split(",")):
            argv += ["--set", kv]
        rc = main(argv)
        if rc:
            sys.exit(rc)
