"""Process groups and the one home of every collective the training code issues.

    env = read_env()                   # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    ctx = init(dims, env)              # default group + the DeviceMesh (ctx.mesh)
    all_reduce(t, group)               # every helper checks t is on the backend's device
    shutdown()                         # destroys every process group

torchrun and a PyTorchJob running bare ``torchrun`` set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``. A plain ``python -m r1zero ...`` run has none of them and becomes
a world of one on loopback with a free port. The backend is gloo on CPU and nccl on CUDA.

Collectives: NCCL takes only CUDA tensors (a CPU tensor fails at run time on the GPU cluster but
passes on gloo), so every helper here calls :func:`check_device` first, which compares the
tensor's device with the group's backend (nccl -> cuda, gloo -> cpu). ``expect_device`` lets a
test stand in another device type for a backend (the fake process group) and plant a wrong one.
Tensor collectives of the training code (pretraining, GRPO, the MoE balancing step) go through
these helpers; the composable engines (FSDP2, DTensor, pipelining) issue their own on the
parameters' device.
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
    mesh: object = None  # torch DeviceMesh (r1zero.train.parallelize.build_mesh)
    coords: dict[str, int] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_rank0(self) -> bool:
        return self.env.rank == 0


def init_default_group(env: DistEnv, device: torch.device) -> None:
    """Initialise the default process group (idempotent)."""
    if dist.is_initialized():
        return
    backend = "gloo" if device.type == "cpu" else "nccl"
    if not env.launched:
        # one rank, nobody to rendezvous with: an in-memory store, no port and nothing written to
        # os.environ (RANK/MASTER_PORT set here were inherited by child processes as a launch: a
        # test's subprocess tried to listen on the port this process's store still held)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        return
    restart = _int_env("TORCHELASTIC_RESTART_COUNT", 0)
    if env.launched and restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps ONE agent TCPStore across restart rounds (torch 2.13: static rendezvous, and
        # the c10d rendezvous's shared store), so a restarted group would read the dead workers'
        # gloo/nccl addresses of the earlier round ("connectFullMesh failed ... Connection refused").
        # This round's keys get their own prefix.
        from datetime import timedelta

        store = dist.PrefixStore(f"r1zero/restart-{restart}", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False,
            timeout=timedelta(minutes=30)))
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=30))
        return
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, device_id=device if
                            device.type == "cuda" else None)


def init(dims: ParallelDims, env: DistEnv | None = None) -> DistContext:
    """Initialise torch.distributed and build the layout's DeviceMesh (collective)."""
    from r1zero.train.parallelize import build_mesh

    env = env or read_env()
    device = device_for(env)
    init_default_group(env, device)
    mesh = build_mesh(dims, device.type)
    return DistContext(env=env, dims=dims, device=device, mesh=mesh, coords=dims.coords(env.rank))


def shutdown() -> None:
    """Destroy every process group (the mesh's subgroups too) so the interpreter exits cleanly and
    a later run in the same process (a resume) does not reuse dead groups."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# collectives: the one home

_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu"}
_EXPECT: dict[str, str] = {}  # backend -> device type override (tests)


class expect_device:
    """Context manager: treat ``backend``'s tensors as belonging on ``device_type`` (tests)."""

    def __init__(self, backend: str, device_type: str):
        self.backend, self.device_type = backend, device_type

    def __enter__(self):
        self.prev = _EXPECT.get(self.backend)
        _EXPECT[self.backend] = self.device_type
        return self

    def __exit__(self, *exc):
        if self.prev is None:
            _EXPECT.pop(self.backend, None)
        else:
            _EXPECT[self.backend] = self.prev


def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


def expected_device_type(group=None) -> str | None:
    """Device type the group's backend takes tensors on (None: any)."""
    b = _backend(group)
    return _EXPECT.get(b, _BACKEND_DEVICE.get(b))


def check_device(t: torch.Tensor, group=None, what: str = "collective") -> None:
    """Raise when ``t`` is not on the device the group's backend needs (NCCL: CUDA)."""
    want = expected_device_type(group)
    if want is not None and t.device.type != want:
        raise RuntimeError(f"{what}: tensor on {t.device} handed to the {_backend(group)} backend, "
                           f"which needs {want} tensors")


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In place over ``group`` (no-op in a group of one); ``op``: sum, max, min."""
    if t is None or not _active(group):
        return t
    check_device(t, group, "all_reduce")
    red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(t, op=red, group=group)
    return t


def broadcast(t: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    if not _active(group):
        return t
    check_device(t, group, "broadcast")
    dist.broadcast(t, src=src, group=group)
    return t


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, group=None) -> torch.Tensor:
    check_device(inp, group, "all_to_all_single")
    check_device(out, group, "all_to_all_single")
    dist.all_to_all_single(out, inp, group=group)
    return out


def mean_over(values: list[torch.Tensor], group=None) -> float:
    """Mean of per-micro-batch scalars over this rank's values and the group's ranks."""
    t = torch.stack([v.detach().float() for v in values]).mean()
    if _active(group):
        all_reduce(t, group)
        t = t / dist.get_world_size(group)
    return float(t)


def broadcast_flag(flag: bool, device: torch.device, group=None) -> bool:
    """Rank 0's boolean on every rank (e.g. "the time budget is spent")."""
    if not _active(group):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    broadcast(t, src=0, group=group)
    return bool(t.item())


def barrier(group=None) -> None:
    if _active(group):
        dist.barrier(group=group)


def all_gather_object(obj, group=None) -> list:
    if not _active(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    if not _active(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_to_rank0(t: torch.Tensor | None, owner: int, device: torch.device) -> torch.Tensor | None:
    """Rank 0 receives ``t`` from global rank ``owner`` (point to point; shape sent first)."""
    rank, size = world()
    if size == 1 or owner == 0:
        return t if rank == 0 else None
    if rank == owner:
        t = t.contiguous().to(device)
        dist.send_object_list([(tuple(t.shape), t.dtype)], dst=0, device=device if device.type == "cuda" else None)
        check_device(t, None, "send")
        dist.send(t, dst=0)
        return None
    if rank == 0:
        box = [None]
        dist.recv_object_list(box, src=owner, device=device if device.type == "cuda" else None)
        shape, dtype = box[0]
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=owner)
        return buf
    return None


def new_group(ranks: list[int]):
    return dist.new_group(ranks)


def tied_embedding_group(mesh):
    """This rank's {first stage, last stage} group for a tied embedding split over the pipeline
    (Megatron's embedding group); every rank creates every group (``new_group`` is collective)."""
    pp = mesh.size(0)
    grid = mesh.mesh.reshape(pp, -1)
    mine = None
    rank = dist.get_rank()
    for col in range(grid.shape[1]):
        ranks = sorted({int(grid[0, col]), int(grid[pp - 1, col])})
        g = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks:
            mine = g
    return mine
