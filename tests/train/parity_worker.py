"""Runs several ``r1zero pretrain`` layouts one after another in the same launched processes.

    torchrun --nproc-per-node 2 tests/train/parity_worker.py CONFIG DATA OUTROOT name:k=v,k=v ...

Each spec ``name:k=v,...`` becomes ``r1zero pretrain --config CONFIG --data DATA
--out OUTROOT/name --set k=v ...`` through the real CLI; process groups are created and destroyed
per run (each on its own port), so one launch (one interpreter start per rank) covers several
layouts. A spec ending in ``!N`` simulates a preemption: every rank's N-th training step raises,
the run dies, and the next spec with the same name resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import sys

from r1zero.cli import main
from r1zero.train.dist import free_port


class Preempted(Exception):
    pass


def _crash_at(n: int):
    """Patch the engine so that the n-th train_step of this run raises (then restore)."""
    from r1zero.train.engine import TrainEngine

    real = TrainEngine.train_step
    calls = {"n": 0}

    def step(self, micro):
        calls["n"] += 1
        if calls["n"] == n:
            raise Preempted(f"simulated preemption at step {n}")
        return real(self, micro)

    TrainEngine.train_step = step

    def restore():
        TrainEngine.train_step = real

    return restore


def _agent_store():
    """A client of torchrun's agent TCPStore (on MASTER_PORT for the whole launch)."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                         is_master=False, timeout=timedelta(minutes=10))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    config, data, root, *specs = args
    agent = _agent_store()
    for i, spec in enumerate(specs):
        if i:
            # a fresh rendezvous port per run: re-creating the TCP store on the port the previous
            # (destroyed) group used can hang while the old listening socket lingers; torchrun's
            # agent store (which outlives the runs) carries rank 0's free port to the others
            if os.environ["RANK"] == "0":
                agent.set(f"parity/port/{i}", str(free_port()))
            os.environ["MASTER_PORT"] = agent.get(f"parity/port/{i}").decode()
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 of this run hosts its store
        spec, _, crash = spec.partition("!")
        name, _, sets = spec.partition(":")
        argv = ["pretrain", "--config", config, "--data", data, "--out", f"{root}/{name}"]
        for kv in filter(None, sets.split(",")):
            argv += ["--set", kv]
        restore = _crash_at(int(crash)) if crash else None
        try:
            rc = main(argv)
        except Preempted:
            continue
        finally:
            if restore:
                restore()
        if rc:
            sys.exit(rc)
