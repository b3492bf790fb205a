"""Time spent in torch.distributed / DeepSpeed collectives, measured on the calls a job makes.

:class:`CommTimer` patches the collective entry points of ``torch.distributed`` (and of
``deepspeed.comm`` when DeepSpeed is imported; its ``TorchBackend`` forwards to
``torch.distributed``) with wall-clock timers, and accumulates seconds and call counts per
operation into a small dict. Nothing here touches Prometheus: the exporter reads
:meth:`CommTimer.snapshot` at scrape time, so a timed call costs two ``perf_counter`` reads and
a dict update.

    timer = CommTimer().install()      # before deepspeed.initialize(): DeepSpeed caches some
    dist.all_reduce(t)                 # function references at init time
    timer.snapshot()                   # {"all_reduce": (seconds, calls), ...}
    timer.uninstall()

What is measured, and why:
- synchronous ops: the wall time of the call (the caller is blocked for exactly that long, which
  includes waiting for slower ranks: straggler time is communication overhead as seen by this
  rank);
- ``async_op=True`` ops (and ``isend``/``irecv``): from the call until the work completes (a
  callback on ``work.get_future()``; where a backend has no future, until ``wait()`` returns),
  i.e. the time the collective was in flight. Communication overlapped with compute therefore
  counts in full (an upper bound of the exposed cost).
- overlapping collectives (queued async buckets, several threads) are counted once: seconds are
  the union of the in-flight intervals, so comm seconds never exceed wall seconds and the per-step
  ratio stays in 0-1. Each op is charged the part of its interval not already counted.
- DDP all-reduces gradients from C++ (its Reducer calls the process group directly), which no
  Python patch sees: :meth:`CommTimer.attach_ddp` registers DDP's stock ``allreduce_hook``, which
  goes through the (timed) ``torch.distributed.all_reduce``. DeepSpeed needs nothing extra.
- CUDA tensors: host wall time of an NCCL call is only its launch, so the timer records CUDA
  events on the current stream around the op and resolves them lazily in :meth:`snapshot` (the
  stream has passed them by the end of a step; ``snapshot`` synchronises on the end events).
- nested calls (``all_gather_object`` calls ``all_gather``; DeepSpeed's ``all_reduce`` calls
  torch's) are counted once, by the outermost timed call, through a thread-local depth.

Op names are reduced to a bounded set (the Prometheus ``op`` label): all_reduce, all_gather,
reduce_scatter, all_to_all, broadcast, send, recv, send_recv, reduce, gather, scatter, barrier.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

# function name (torch.distributed / deepspeed.comm) -> bounded op label
OP_OF: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "inference_all_reduce": "all_reduce",
    "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather_object": "all_gather",
    "allgather_fn": "all_gather",
    "all_gather_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_fn": "reduce_scatter",
    "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "broadcast_object_list": "broadcast",
    "send": "send",
    "isend": "send",
    "recv": "recv",
    "irecv": "recv",
    "batch_isend_irecv": "send_recv",
    "reduce": "reduce",
    "gather": "gather",
    "scatter": "scatter",
    "barrier": "barrier",
    "monitored_barrier": "barrier",
}
OPS: tuple[str, ...] = tuple(sorted(set(OP_OF.values())))
_ASYNC_BY_NAME = {"isend", "irecv", "batch_isend_irecv"}  # always return work handles
_MAX_PENDING = 4096  # un-waited async handles / unresolved CUDA events kept before dropping


def _modules() -> list:
    """Modules whose attributes are patched: torch.distributed (+ its c10d module), deepspeed.comm."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    mods = [dist, c10d]
    for name in ("deepspeed.comm", "deepspeed.comm.comm"):
        mod = sys.modules.get(name)  # only when the job already imported DeepSpeed
        if mod is not None:
            mods.append(mod)
    return mods


def _first_tensor(args, kwargs):
    import torch

    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, list | tuple) and v and isinstance(v[0], torch.Tensor):
            return v[0]
    return None


class CommTimer:
    """Accumulates seconds and calls per op for the collectives of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ev_lock = threading.Lock()
        self._seconds: dict[str, float] = dict.fromkeys(OPS, 0.0)
        self._calls: dict[str, int] = dict.fromkeys(OPS, 0)
        self._local = threading.local()
        self._pending: dict[int, tuple[str, float, object]] = {}  # id(work) -> (op, t0, work)
        self._busy_until = 0.0  # end of the latest counted in-flight interval (perf_counter)
        self._recent: deque[tuple[float, float]] = deque(maxlen=1 << 16)  # (end, seconds) per op
        self._cuda_events: list[tuple[str, object, object]] = []  # (op, start, end)
        self._saved: list[tuple[object, str, Callable]] = []
        self._saved_wait: Callable | None = None
        self.installed = False

    # -- accounting ------------------------------------------------------------------------
    def add(self, op: str, seconds: float, calls: int = 1) -> None:
        with self._lock:
            self._seconds[op] += seconds
            self._calls[op] += calls
            self._recent.append((time.perf_counter(), seconds))

    def add_interval(self, op: str, t0: float, t1: float) -> None:
        """Charge ``op`` with the part of [t0, t1] (perf_counter) not already counted."""
        with self._lock:
            start = max(t0, self._busy_until)
            if t1 > start:
                self._seconds[op] += t1 - start
                self._busy_until = t1
                self._recent.append((t1, t1 - start))
            self._calls[op] += 1

    def seconds_between(self, t0: float, t1: float) -> float:
        """Comm seconds counted for ops that ended in [t0, t1] (perf_counter clock); older records
        are dropped, so call it with non-decreasing ``t0`` (once per step)."""
        if self._cuda_events:
            self._resolve_cuda()
        with self._lock:
            recent = self._recent
            while recent and recent[0][0] < t0:
                recent.popleft()
            return sum(sec for end, sec in recent if end <= t1)

    def _resolve_cuda(self) -> None:
        with self._ev_lock:  # scrapes call this from the HTTP thread
            events, self._cuda_events = self._cuda_events, []
        for op, start, end in events:
            end.synchronize()
            self.add(op, start.elapsed_time(end) / 1000.0)  # elapsed_time is in ms

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """``{op: (seconds, calls)}`` accumulated since install (all ops, zeros included)."""
        if self._cuda_events:
            self._resolve_cuda()
        with self._lock:
            return {op: (self._seconds[op], self._calls[op]) for op in OPS}

    def total_seconds(self) -> float:
        return sum(s for s, _ in self.snapshot().values())

    # -- wrapping --------------------------------------------------------------------------
    def _wrap(self, name: str, fn: Callable) -> Callable:
        op = OP_OF[name]
        timer = self
        always_async = name in _ASYNC_BY_NAME

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            local = timer._local
            depth = getattr(local, "depth", 0)
            if depth:  # an inner call of a timed op: the outer one counts the time
                return fn(*args, **kwargs)
            tensor = _first_tensor(args, kwargs)
            cuda = tensor is not None and tensor.is_cuda
            if cuda:
                return timer._timed_cuda(op, fn, args, kwargs)
            local.depth = 1
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                local.depth = 0
            if (always_async or kwargs.get("async_op")) and out is not None:
                timer._remember(out, op, t0)
            else:
                timer.add_interval(op, t0, time.perf_counter())
            return out

        timed.__r1zero_timed__ = fn  # marks the wrapper; holds the original
        return timed

    def _timed_cuda(self, op, fn, args, kwargs):
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self._local.depth = 1
        start.record()
        try:
            out = fn(*args, **kwargs)
        finally:
            self._local.depth = 0
        if kwargs.get("async_op") and out is not None:
            self._remember(out, op, (start, end))
        else:
            end.record()
            self._queue_cuda(op, start, end)
        return out

    def _queue_cuda(self, op, start, end) -> None:
        with self._ev_lock:
            self._cuda_events.append((op, start, end))
        if len(self._cuda_events) > _MAX_PENDING:
            self._resolve_cuda()

    def _remember(self, work, op: str, t0) -> None:
        works = work if isinstance(work, list) else [work]  # batch_isend_irecv returns a list
        last = works[-1]  # the last handle completes the batch
        if not isinstance(t0, tuple):
            try:
                fut = last.get_future()
            except (AttributeError, RuntimeError):  # backend without futures: time until wait()
                fut = None
            if fut is not None:
                fut.add_done_callback(lambda _f: self.add_interval(op, t0, time.perf_counter()))
                return
        with self._lock:
            if len(self._pending) >= _MAX_PENDING:  # never-waited handles: forget the oldest
                self._pending.pop(next(iter(self._pending)))
            self._pending[id(last)] = (op, t0, last)

    def _on_wait(self, work) -> None:
        with self._lock:
            entry = self._pending.pop(id(work), None)
        if entry is None:
            return
        op, t0, _ = entry
        if isinstance(t0, tuple):  # CUDA: (start, end) events
            start, end = t0
            end.record()
            self._queue_cuda(op, start, end)
        else:
            self.add_interval(op, t0, time.perf_counter())

    def attach_ddp(self, ddp_model) -> None:
        """Route a DistributedDataParallel model's gradient all-reduce through the timed Python path."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp_model.register_comm_hook(None, allreduce_hook)  # None = the default process group

    # -- install / uninstall ---------------------------------------------------------------
    def install(self) -> CommTimer:
        """Patch the collectives (idempotent). Returns self."""
        if self.installed:
            return self
        import torch.distributed as dist

        wrappers: dict[int, Callable] = {}  # one wrapper per function re-exported by several modules
        for mod in _modules():
            for name in OP_OF:
                fn = getattr(mod, name, None)
                if fn is None or not callable(fn) or hasattr(fn, "__r1zero_timed__"):
                    continue
                self._saved.append((mod, name, fn))
                if id(fn) not in wrappers:
                    wrappers[id(fn)] = self._wrap(name, fn)
                setattr(mod, name, wrappers[id(fn)])
        work_cls = getattr(dist, "Work", None)
        if work_cls is not None and not hasattr(work_cls.wait, "__r1zero_timed__"):
            orig_wait = work_cls.wait
            timer = self

            @functools.wraps(orig_wait)
            def wait(work, *args, **kwargs):
                out = orig_wait(work, *args, **kwargs)
                if timer._pending:
                    timer._on_wait(work)
                return out

            wait.__r1zero_timed__ = orig_wait
            work_cls.wait = wait
            self._saved_wait = orig_wait
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Restore the original functions (the accumulated figures stay readable)."""
        if not self.installed:
            return
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()
        if self._saved_wait is not None:
            import torch.distributed as dist

            dist.Work.wait = self._saved_wait
            self._saved_wait = None
        self.installed = False

    def __enter__(self) -> CommTimer:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
