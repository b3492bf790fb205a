"""Helpers for the reliability tests: the real CLI as a subprocess, tiny config overrides.

``run_cli(*args)`` runs ``python -m r1zero.cli ...`` (the same entry point as the ``r1zero`` script)
from the repo root with progress bars off. Imported by the tests with ``sys.path``
set to this directory (``tests/`` has its own conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A data artifact small enough to mix in seconds; vocab 300 = 256 bytes + specials + a few merges.
TINY_DATA = ["--set", "data.n_train=160", "--set", "data.n_eval=30", "--set", "data.vocab_size=300",
             "--set", "data.tokenizer_rows=160", "--set", "data.max_difficulty=1"]

# A seconds-scale model/pretraining config (mirrors tests/train's tiny_config).
TINY_TRAIN = ["--set", "model.vocab_size=320", "--set", "model.d_model=32", "--set", "model.n_layers=2",
              "--set", "model.n_heads=2", "--set", "model.max_seq_len=256", "--set", "model.moe.n_experts=4",
              "--set", "model.moe.top_k=2", "--set", "model.moe.n_shared=1", "--set", "model.moe.d_expert=32",
              "--set", "pretrain.seq_len=32", "--set", "pretrain.micro_batch=4", "--set", "pretrain.warmup_steps=2",
              "--set", "pretrain.log_every=2", "--set", "pretrain.heldout_per_domain=2",
              "--set", "pretrain.heldout_max_new_tokens=4", "--set", "telemetry.enabled=false"]


# The session's pretrained tiny policy (tests/reliability/conftest.py ``tiny_policy``): 20 steps with
# checkpoints at 10, 15 and 20 (kept), so tests can repeat it or resume it.
TINY_POLICY = [*TINY_TRAIN, "--set", "pretrain.steps=20", "--set", "pretrain.checkpoint_every=5",
               "--set", "pretrain.keep_last=3"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "R1ZERO_PROGRESS": "0", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONWARNINGS": "ignore"}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict | None = None, timeout: float = 300.0, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1zero.cli", *map(str, args)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def torchrun_cmd(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    """``torchrun --nproc-per-node N --max-restarts R -m r1zero.cli ...`` on loopback with a free port.

    Static rendezvous (``--master-addr/--master-port``), as a PyTorchJob's ``PET_MASTER_*`` give
    bare ``torchrun``. torchrun keeps its store across restart rounds; r1zero.train.dist prefixes
    each round's keys (without that the restarted gloo group reads the dead rank's address).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "r1zero.cli", *map(str, args)]


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker process with ``RANK=rank`` under a torchrun launcher, if any."""
    import psutil

    try:
        kids = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in kids:
        try:
            env = p.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return p.pid
    return None


def metric_rows(path: Path, exclude: tuple[str, ...] = ()) -> list[tuple[int, str, float]]:
    """``metrics.jsonl`` as sorted (step, name, value) tuples, without names containing ``exclude``."""
    import json

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted((r["step"], r["name"], r["value"]) for r in rows if not any(x in r["name"] for x in exclude))
