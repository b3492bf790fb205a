"""Process-group setup from the torch elastic environment (torchrun, ``deepspeed`` launcher, PyTorchJob).

    env = read_env()                   # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    ctx = init(dims, device)           # default group + dp/tp/pp/ep/edp groups
    ...
    shutdown()

All three launchers export the same variables (torchrun and a PyTorchJob running bare ``torchrun``
set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; the DeepSpeed
launcher sets the same names). A plain ``python -m r1zero ...`` run has none of them and becomes a
world of one on loopback with a free port. The backend is gloo on CPU and nccl on CUDA
(``deepspeed.init_distributed`` picks the accelerator; ``DS_ACCELERATOR=cpu`` forces CPU).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from r1zero.errors import UserError
from r1zero.train.parallel_dims import ParallelDims


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # True when a launcher (torchrun / deepspeed / PyTorchJob) set the variables


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = _int_env("RANK", 0)
    world = _int_env("WORLD_SIZE", 1)
    local = _int_env("LOCAL_RANK", 0)
    if world < 1 or not (0 <= rank < world):
        raise UserError(f"bad torch elastic environment: RANK={rank} WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local, launched=launched)


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


@dataclass
class DistContext:
    env: DistEnv
    dims: ParallelDims
    device: torch.device
    groups: dict[str, object] = field(default_factory=dict)  # kind -> ProcessGroup (this rank's)
    coords: dict[str, int] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0

    def group(self, kind: str):
        return self.groups[kind]


def init_default_group(env: DistEnv, device: torch.device) -> None:
    """Initialise the default process group (idempotent)."""
    if dist.is_initialized():
        return
    if not env.launched:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "gloo" if device.type == "cpu" else "nccl"
    restart = _int_env("TORCHELASTIC_RESTART_COUNT", 0)
    if env.launched and restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps ONE agent TCPStore across restart rounds (torch 2.13: static rendezvous, and
        # the c10d rendezvous's shared store), so a restarted group would read the dead workers'
        # gloo/nccl addresses of the earlier round ("connectFullMesh failed ... Connection refused").
        # This round's keys get their own prefix; deepspeed.init_distributed below then reuses the group.
        from datetime import timedelta

        store = dist.PrefixStore(f"r1zero/restart-{restart}", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False,
            timeout=timedelta(minutes=30)))
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=30))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend,
                               verbose=False, rank=env.rank, world_size=env.world_size)


def init(dims: ParallelDims, env: DistEnv | None = None) -> DistContext:
    """Initialise torch.distributed and create every dp/tp/pp/ep/edp group of ``dims``.

    ``dist.new_group`` is collective over the whole world, so every rank creates every group in
    the same order and keeps its own.
    """
    env = env or read_env()
    device = device_for(env)
    init_default_group(env, device)
    ctx = DistContext(env=env, dims=dims, device=device, coords=dims.coords(env.rank))
    for kind in ("dp", "tp", "pp", "ep", "edp"):
        for ranks in dims.group_ranks(kind):
            pg = dist.new_group(ranks) if env.world_size > 1 else dist.group.WORLD
            if env.rank in ranks:
                ctx.groups[kind] = pg
    return ctx


def shutdown() -> None:
    """Destroy the process groups, through DeepSpeed so its cached group handles are released too
    (a later run in the same process, e.g. a resume, would otherwise reuse dead groups)."""
    if not dist.is_initialized():
        return
    import deepspeed.comm as dscomm

    if dscomm.is_initialized():
        dscomm.destroy_process_group()
    else:
        dist.destroy_process_group()
