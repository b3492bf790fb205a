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

- CUDA intervals are placed on the host clock: one reference event per device is recorded on an
  idle device next to a ``perf_counter`` reading, and each op's start/end events become
  ``t_ref + ref.elapsed_time(event)``. An op's time therefore lands in the step window in which
  the GPU ran it (not the one in which it was resolved), and ops overlapping on several streams
  are counted once by the same interval union as host-timed ops.
- asynchronous CUDA ops (``async_op=True``, ``isend``/``irecv``, the ``P2POp`` lists of
  ``batch_isend_irecv`` that ``torch.distributed.pipelining`` sends) are timed to completion: the
  end event is recorded on ``wait()``, after which the waiting stream is behind the transfer.
- FSDP2 (``all_gather_single`` / ``reduce_scatter_single``) and DTensor's functional collectives
  (``torch.distributed._functional_collectives``: the TP redistributions) are patched too. A
  functional collective returns a lazy tensor that is waited inside the next op that uses it, so
  its time is the call's (the launch on CUDA, the whole op on gloo); calls and bytes are exact.

Purpose: :meth:`CommTimer.name_group` tags a process group (``"fsdp"``, ``"tp"``, ``"pipeline"``,
``"expert"``, ``"weight_sync"``; :meth:`CommTimer.name_mesh` tags the engine's DeviceMesh dims),
and every op on it is charged to a bounded ``purpose`` label (:data:`PURPOSES`):
fsdp_all_gather, fsdp_reduce_scatter, tp, pipeline_send_recv, expert_all_to_all,
grpo_weight_sync, other (untagged groups and unexpected op kinds on a tagged group). Bytes are
those of the largest buffer handed to the op (for all-gather / reduce-scatter: the full,
unsharded buffer).

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
    "all_gather_single": "all_gather",  # FSDP2's all-gather (torch >= 2.13)
    "reduce_scatter_single": "reduce_scatter",  # FSDP2's reduce-scatter (torch >= 2.13)
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
# torch.distributed._functional_collectives (DTensor / TP) -> op label
FUNCOL_OP_OF: dict[str, str] = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_tensor": "all_gather",
    "all_gather_tensor_autograd": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_autograd": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "all_to_all_single_autograd": "all_to_all",
    "broadcast": "broadcast",
}
# What a tagged group is for -> the purpose label of each op kind on it.
PURPOSES: tuple[str, ...] = ("fsdp_all_gather", "fsdp_reduce_scatter", "tp", "pipeline_send_recv",
                             "expert_all_to_all", "grpo_weight_sync", "other")
GROUP_KINDS = ("fsdp", "tp", "pipeline", "expert", "weight_sync")


def purpose_of(group_kind: str | None, op: str) -> str:
    """The purpose label of ``op`` on a group tagged ``group_kind`` (None: untagged)."""
    if group_kind == "fsdp" and op in ("all_gather", "reduce_scatter"):
        return f"fsdp_{op}"
    if group_kind == "tp":
        return "tp"
    if group_kind == "pipeline" and op in ("send", "recv", "send_recv"):
        return "pipeline_send_recv"
    if group_kind == "expert" and op == "all_to_all":
        return "expert_all_to_all"
    if group_kind == "weight_sync":
        return "grpo_weight_sync"
    return "other"


def host_time(t_ref: float, ref_to_event_ms: float) -> float:
    """Host ``perf_counter`` time of a CUDA event ``ref_to_event_ms`` after the reference event."""
    return t_ref + ref_to_event_ms / 1000.0
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


def _tensors(args, kwargs) -> list:
    """Tensors handed to a collective (``P2POp`` lists included)."""
    import torch

    out = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list | tuple):
            for x in v:
                if isinstance(x, torch.Tensor):
                    out.append(x)
                elif isinstance(getattr(x, "tensor", None), torch.Tensor):  # P2POp
                    out.append(x.tensor)
    return out


def _first_tensor(args, kwargs):
    ts = _tensors(args, kwargs)
    return ts[0] if ts else None


def _nbytes(tensors) -> int:
    best = 0
    for t in tensors:
        try:
            best = max(best, t.numel() * t.element_size())
        except (RuntimeError, TypeError):  # meta / fake tensors without storage size
            pass
    return best


def _group_name(args, kwargs) -> str | None:
    """The ``group_name`` of the process group an op runs on (None: the default group)."""
    import torch.distributed as dist

    cands = [kwargs.get("group"), *args]
    for v in cands:
        if isinstance(v, dist.ProcessGroup):
            return v.group_name
        if isinstance(v, list | tuple) and v and isinstance(getattr(v[0], "group", None), dist.ProcessGroup):
            return v[0].group.group_name  # P2POp list
    return None


def _funcol_group_name(args, kwargs) -> str | None:
    """Group name of a functional collective's ``group`` argument (mesh, (mesh, dim), pg, name)."""
    import torch.distributed._functional_collectives as funcol

    group = kwargs.get("group")
    if group is None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        for v in args[1:]:
            if isinstance(v, dist.ProcessGroup | DeviceMesh | str) or (
                    isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], DeviceMesh)):
                group = v
                break
    if group is None:
        return None
    try:
        return str(funcol._resolve_group_name(group))
    except Exception:  # noqa: BLE001 - an unexpected group spec only loses the purpose label
        return None


def _compiling() -> bool:
    import torch

    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


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
        self._cuda_events: list[tuple[str, object, object, str]] = []  # (op, start, end, purpose)
        self._cuda_ref: dict[int, tuple[object, float]] = {}  # device -> (reference event, host time)
        self._groups: dict[str, str] = {}  # process group name -> kind (GROUP_KINDS)
        self._p_seconds: dict[str, float] = dict.fromkeys(PURPOSES, 0.0)
        self._p_calls: dict[str, int] = dict.fromkeys(PURPOSES, 0)
        self._p_bytes: dict[str, int] = dict.fromkeys(PURPOSES, 0)
        self._saved: list[tuple[object, str, Callable]] = []
        self._saved_wait: Callable | None = None
        self.installed = False

    # -- purposes --------------------------------------------------------------------------
    def name_group(self, group, kind: str) -> None:
        """Tag a process group with what its collectives are for (one of :data:`GROUP_KINDS`)."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r} (known: {', '.join(GROUP_KINDS)})")
        self._groups[group.group_name] = kind

    def name_mesh(self, mesh, kinds: dict[str, str]) -> None:
        """Tag a DeviceMesh's named dims, e.g. ``{"dp": "fsdp", "edp": "fsdp", "tp": "tp",
        "pp": "pipeline", "ep": "expert"}`` (dims of size 1 have no traffic and are skipped)."""
        for dim, kind in kinds.items():
            try:
                sub = mesh[dim]
            except (KeyError, RuntimeError, ValueError):  # no such dim (nor a flattened one)
                continue
            self.name_group(sub.get_group(), kind)

    def _purpose(self, group_name: str | None, op: str) -> str:
        return purpose_of(self._groups.get(group_name) if group_name is not None else None, op)

    def purposes(self) -> dict[str, tuple[float, int, int]]:
        """``{purpose: (seconds, calls, bytes)}`` since install (all purposes, zeros included)."""
        if self._cuda_events:
            self._resolve_cuda()
        with self._lock:
            return {p: (self._p_seconds[p], self._p_calls[p], self._p_bytes[p]) for p in PURPOSES}

    # -- accounting ------------------------------------------------------------------------
    def add(self, op: str, seconds: float, calls: int = 1, purpose: str = "other", nbytes: int = 0) -> None:
        with self._lock:
            self._seconds[op] += seconds
            self._calls[op] += calls
            self._p_seconds[purpose] += seconds
            self._p_calls[purpose] += calls
            self._p_bytes[purpose] += nbytes
            self._recent.append((time.perf_counter(), seconds))

    def add_interval(self, op: str, t0: float, t1: float, purpose: str = "other", nbytes: int = 0) -> None:
        """Charge ``op`` with the part of [t0, t1] (perf_counter) not already counted."""
        with self._lock:
            start = max(t0, self._busy_until)
            if t1 > start:
                self._seconds[op] += t1 - start
                self._p_seconds[purpose] += t1 - start
                self._busy_until = t1
                self._recent.append((t1, t1 - start))
            self._calls[op] += 1
            self._p_calls[purpose] += 1
            self._p_bytes[purpose] += nbytes

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

    def _reference(self):
        """(reference event, its host time) of the current CUDA device, made once on an idle device."""
        import torch

        dev = torch.cuda.current_device()
        ref = self._cuda_ref.get(dev)
        if ref is None:
            torch.cuda.synchronize(dev)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()  # the device was idle: the event completed now, at this host time
            ref = self._cuda_ref[dev] = (ev, time.perf_counter())
        return ref

    def _resolve_cuda(self) -> None:
        with self._ev_lock:  # scrapes call this from the HTTP thread
            events, self._cuda_events = self._cuda_events, []
        spans = []
        for op, start, end, purpose, nbytes, (ref, t_ref) in events:
            end.synchronize()
            spans.append((host_time(t_ref, ref.elapsed_time(start)), host_time(t_ref, ref.elapsed_time(end)),
                          op, purpose, nbytes))
        for t0, t1, op, purpose, nbytes in sorted(spans):  # start order: the union counts overlap once
            self.add_interval(op, t0, t1, purpose, nbytes)

    def snapshot(self) -> dict[str, tuple[float, int]]:
        """``{op: (seconds, calls)}`` accumulated since install (all ops, zeros included)."""
        if self._cuda_events:
            self._resolve_cuda()
        with self._lock:
            return {op: (self._seconds[op], self._calls[op]) for op in OPS}

    def total_seconds(self) -> float:
        return sum(s for s, _ in self.snapshot().values())

    # -- wrapping --------------------------------------------------------------------------
    def _wrap(self, name: str, fn: Callable, functional: bool = False) -> Callable:
        op = (FUNCOL_OP_OF if functional else OP_OF)[name]
        timer = self
        always_async = name in _ASYNC_BY_NAME and not functional

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            local = timer._local
            depth = getattr(local, "depth", 0)
            if depth or _compiling():  # an inner call of a timed op: the outer one counts the time
                return fn(*args, **kwargs)
            tensors = _tensors(args, kwargs)
            group = _funcol_group_name(args, kwargs) if functional else _group_name(args, kwargs)
            purpose, nbytes = timer._purpose(group, op), _nbytes(tensors)
            if tensors and tensors[0].is_cuda:
                return timer._timed_cuda(op, fn, args, kwargs, purpose, nbytes,
                                         waitable=always_async or bool(kwargs.get("async_op")))
            local.depth = 1
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                local.depth = 0
            if (always_async or kwargs.get("async_op")) and out is not None:
                timer._remember(out, op, t0, purpose, nbytes)
            else:
                timer.add_interval(op, t0, time.perf_counter(), purpose, nbytes)
            return out

        timed.__r1zero_timed__ = fn  # marks the wrapper; holds the original
        return timed

    def _timed_cuda(self, op, fn, args, kwargs, purpose: str, nbytes: int, waitable: bool):
        import torch

        ref = self._reference()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self._local.depth = 1
        start.record()
        try:
            out = fn(*args, **kwargs)
        finally:
            self._local.depth = 0
        if waitable and out is not None:  # to completion: the end event is recorded on wait()
            self._remember(out, op, (start, end), purpose, nbytes, ref)
        else:
            end.record()
            self._queue_cuda(op, start, end, purpose, nbytes, ref)
        return out

    def _queue_cuda(self, op, start, end, purpose: str = "other", nbytes: int = 0, ref=None) -> None:
        with self._ev_lock:
            self._cuda_events.append((op, start, end, purpose, nbytes, ref or self._reference()))
        if len(self._cuda_events) > _MAX_PENDING:
            self._resolve_cuda()

    def _remember(self, work, op: str, t0, purpose: str = "other", nbytes: int = 0, ref=None) -> None:
        works = work if isinstance(work, list) else [work]  # batch_isend_irecv returns a list
        if not works:
            return
        last = works[-1]  # the last handle completes the batch
        if not isinstance(t0, tuple):
            try:
                fut = last.get_future()
            except (AttributeError, RuntimeError):  # backend without futures: time until wait()
                fut = None
            if fut is not None:
                fut.add_done_callback(lambda _f: self.add_interval(op, t0, time.perf_counter(), purpose, nbytes))
                return
        with self._lock:
            if len(self._pending) >= _MAX_PENDING:  # never-waited handles: forget the oldest
                self._pending.pop(next(iter(self._pending)))
            self._pending[id(last)] = (op, t0, last, purpose, nbytes, ref)

    def _on_wait(self, work) -> None:
        with self._lock:
            entry = self._pending.pop(id(work), None)
        if entry is None:
            return
        op, t0, _, purpose, nbytes, ref = entry
        if isinstance(t0, tuple):  # CUDA: (start, end) events
            start, end = t0
            end.record()  # after wait() the current stream waits for the transfer
            self._queue_cuda(op, start, end, purpose, nbytes, ref)
        else:
            self.add_interval(op, t0, time.perf_counter(), purpose, nbytes)

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
        import torch.distributed._functional_collectives as funcol

        for name in FUNCOL_OP_OF:
            fn = getattr(funcol, name, None)
            if fn is None or not callable(fn) or hasattr(fn, "__r1zero_timed__"):
                continue
            self._saved.append((funcol, name, fn))
            setattr(funcol, name, self._wrap(name, fn, functional=True))
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
