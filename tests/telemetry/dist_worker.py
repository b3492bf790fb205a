"""Multi-process worker for the telemetry tests, run under torchrun (gloo, CPU):

    torchrun --standalone --nproc_per_node 2 tests/telemetry/dist_worker.py SCENARIO OUT_DIR

Scenarios:
- ``ops``: every timed collective once (sync, async, nested, DeepSpeed's comm); writes the
  CommTimer snapshot of each rank to ``OUT_DIR/ops-<rank>.json``.
- ``delay``: steps of known cost (rank 0 "computes" C s, rank 1 C + D s, then an all-reduce, so
  rank 0 waits D s in the collective), under torch.profiler; writes the exported per-step comm
  ratio, the profiler's collective time and the step times to ``OUT_DIR/delay-<rank>.json``.
- ``purposes``: FSDP2, DTensor TP, pipeline P2P and expert all-to-all on tagged groups; writes
  ``CommTimer.purposes()`` per rank to ``OUT_DIR/purposes-<rank>.json``.
- ``train``: a small DDP model trained until ``OUT_DIR/stop`` appears, exporting on an ephemeral
  loopback port written to ``OUT_DIR/port-<rank>``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from r1zero.config import TelemetryConfig
from r1zero.telemetry import CommTimer, start

LOOPBACK = TelemetryConfig(port=0, bind="127.0.0.1")


def scenario_ops(out: Path, rank: int) -> None:
    import deepspeed.comm as dscomm  # import first so that install() patches deepspeed.comm too

    timer = CommTimer().install()
    t = torch.ones(4)
    dist.all_reduce(t)
    dist.all_reduce(t, async_op=True).wait()
    dist.all_gather([torch.zeros(4), torch.zeros(4)], t)
    dist.all_gather_into_tensor(torch.zeros(8), t)
    dist.reduce_scatter_tensor(torch.zeros(2), t)
    dist.all_to_all_single(torch.zeros(4), t)
    dist.broadcast(t, src=0)
    if rank == 0:
        dist.send(t, dst=1)
        dist.isend(t, dst=1).wait()
    else:
        dist.recv(t, src=0)
        dist.irecv(t, src=0).wait()
    dist.barrier()
    dist.all_gather_object([None, None], {"rank": rank})  # nested: all_gather inside, counted once
    dscomm.init_distributed(dist_backend="gloo", verbose=False)
    dscomm.all_reduce(t)  # DeepSpeed -> torch.distributed: counted once
    snap = timer.snapshot()
    timer.uninstall()
    restored = dist.all_reduce.__name__ == "all_reduce" and not hasattr(dist.all_reduce, "__r1zero_timed__")
    dist.all_reduce(t)  # after uninstall: not counted
    after = timer.snapshot()
    (out / f"ops-{rank}.json").write_text(json.dumps({"snap": snap, "after": after, "restored": restored}))


def scenario_delay(out: Path, rank: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    compute_s, delay_s, steps = 0.06, 0.04, 12
    tel = start(LOOPBACK, job="acc", rank=rank, stage="pretrain")
    t = torch.ones(1 << 14)
    ratios, step_s = [], []
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            time.sleep(compute_s + (delay_s if rank == 1 else 0.0))
            dist.all_reduce(t)
            seconds = time.perf_counter() - t0
            tel.observe_step(seconds, tokens=1)
            ratios.append(tel.metrics.comm_ratio.labels(**tel.labels)._value.get())
            step_s.append(seconds)
    prof_comm = sum(e.time_range.elapsed_us() for e in prof.events() if e.name.startswith("gloo:")) / 1e6
    tel.close()
    (out / f"delay-{rank}.json").write_text(json.dumps({
        "ratios": ratios, "step_s": step_s, "profiler_comm_s": prof_comm,
        "compute_s": compute_s, "delay_s": delay_s}))


def scenario_train(out: Path, rank: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tel = start(LOOPBACK, job="live", rank=rank, stage="pretrain")
    tel.comm_timer().attach_ddp(model)  # DDP all-reduces from C++ unless routed through a hook
    (out / f"port-{rank}").write_text(str(tel.port))
    g = torch.Generator().manual_seed(rank)
    deadline = time.monotonic() + 90  # the test stops us well before; never run forever
    step = 0
    while not (out / "stop").exists() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        x = torch.randn(16, 32, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x.flip(1))
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
        step += 1
        time.sleep(0.02)  # keep 2 shared cores usable for Prometheus
        tel.observe_step(time.perf_counter() - t0, tokens=16, loss=loss.item(), lr=0.05, step=step)
    tel.close()


def scenario_purposes(out: Path, rank: int) -> None:
    """One FSDP2 step, one DTensor tensor-parallel forward, pipeline P2P and an expert all-to-all,
    each on a group tagged with what it is for; writes ``timer.purposes()`` per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    timer = CommTimer().install()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    timer.name_mesh(mesh, {"dp": "fsdp"})
    tp = dist.new_group([0, 1])
    pp = dist.new_group([0, 1])
    ep = dist.new_group([0, 1])
    timer.name_group(tp, "tp")
    timer.name_group(pp, "pipeline")
    timer.name_group(ep, "expert")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    fully_shard(model, mesh=mesh)
    model(torch.randn(4, 16)).sum().backward()  # FSDP2: all-gather forward, reduce-scatter backward
    before_tp = timer.purposes()
    from torch.distributed.device_mesh import DeviceMesh

    tp_mesh = DeviceMesh.from_group(tp, "cpu", mesh_dim_names=("tp",))
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    parallelize_module(mlp, tp_mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    mlp(torch.randn(4, 16))  # RowwiseParallel's output all-reduce: a functional collective on tp
    t = torch.ones(64)
    peer = 1 - rank
    ops = [dist.P2POp(dist.isend, t, peer, group=pp), dist.P2POp(dist.irecv, torch.zeros(64), peer, group=pp)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    dist.all_to_all_single(torch.zeros(8), torch.ones(8), group=ep)
    dist.all_reduce(torch.ones(2))  # untagged default group: "other"
    snap = timer.purposes()
    timer.uninstall()
    (out / f"purposes-{rank}.json").write_text(json.dumps({"fsdp_only": before_tp, "all": snap}))


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    {"ops": scenario_ops, "delay": scenario_delay, "train": scenario_train,
     "purposes": scenario_purposes}[scenario](out, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("R1ZERO_PROGRESS", "0")
    main()
