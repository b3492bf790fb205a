"""GRPO's vLLM rollout server and its client: the engine in another process or pod, weights
pushed in buckets after each update (``grpo.rollout.mode: server``; :mod:`r1zero.grpo.vllm_rollout`
holds the engine itself and the colocated mode).

    R1ZERO_ROLLOUT_KEY=... .venv-vllm/bin/python -m r1zero.grpo.vllm_rollout serve --model DIR --port 7100

Protocol (an authenticated ``multiprocessing.connection`` socket): ``sample``; ``push`` (one
safetensors bucket of ``(standard name, tensor)`` pairs of about ``push_bucket_mb``) ... ``commit``
(the post-load fixups run once); ``stats``; ``bye`` (end this session) or ``close`` (stop the server
once its other sessions have ended). ``ranks_per_server`` trainer ranks share one server: the
group's first rank pushes, the others wait at a barrier until the push has committed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Client, Connection, Listener

import torch

from r1zero.errors import UserError
from r1zero.generate import GenerationOutput
from r1zero.grpo.vllm_rollout import KEY_ENV, VllmSampler, _dtype, _export, _first_line, _named_tensors
from r1zero.train import dist as rdist
from r1zero.train.dist import free_port


def _pack(named: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors payload of ``(standard name, tensor)`` pairs (one bucket of a server push)."""
    from safetensors.torch import save

    out, seen = {}, set()
    for k, v in named:
        v = v.contiguous()
        if v.data_ptr() in seen:  # a tied tensor: safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return save(out)


def buckets(named: Iterable[tuple[str, torch.Tensor]], limit_bytes: int):
    """``(name, tensor)`` pairs grouped in order into lists of at most ``limit_bytes`` (a tensor
    larger than the limit is a bucket of its own); lazy: one bucket is held at a time."""
    bucket, size = [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > limit_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def _rank() -> int:
    """This trainer's rank: the process group's, else torchrun's ``RANK`` (0 without it)."""
    rank, ws = rdist.world()
    return rank if ws > 1 else int(os.environ.get("RANK", "0"))


class ServerEngine:
    """Client of a rollout server (:func:`serve`); spawns a local one when no address is given
    (with ``ranks_per_server`` > 1: the group's first rank spawns it and shares its address)."""

    def __init__(self, model, tokenizer, rcfg, *, max_len: int, seed: int, model_dir: str | None = None,
                 dtype: str | None = None):
        self.eos_id = tokenizer.eos_token_id
        self.timeout, self.sample_timeout = rcfg.push_timeout_s, rcfg.sample_timeout_s
        self.bucket_bytes = max(1, int(rcfg.push_bucket_mb * 2**20))
        self.pushed_buckets = 0  # buckets of the last push (0 on ranks that do not push)
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None
        self.owned = False
        rps, rank = rcfg.ranks_per_server, _rank()
        ws = rdist.world()[1]
        if ws % rps:
            raise UserError(f"grpo.rollout.ranks_per_server ({rps}) must divide the GRPO world size ({ws} ranks)")
        self.leader = rank % rps == 0  # the rank that pushes its group's weights
        if rcfg.server_address:
            key = os.environ.get(KEY_ENV)
            if not key:
                raise UserError(f"grpo.rollout.server_address is set but {KEY_ENV} (the server's shared key) is not")
            self.address = server_address(rcfg.server_address, rank, ranks_per_server=rps)
            self.key = key.encode()
        elif not self.leader:
            self.address, self.key = None, b""
        else:
            self.dir, self.owned = _export(model, tokenizer, model_dir)
            self.key = secrets.token_hex(16).encode()
            self.address = ("127.0.0.1", free_port())
            self.log = tempfile.NamedTemporaryFile(prefix="r1zero-vllm-server-", suffix=".log", delete=False)
            env = {**os.environ, KEY_ENV: self.key.decode()}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "r1zero.grpo.vllm_rollout", "serve", "--model", self.dir, "--host",
                 self.address[0], "--port", str(self.address[1]), "--max-len", str(max_len), "--seed", str(seed),
                 "--kv-cache-gib", str(rcfg.kv_cache_gib), "--dtype", dtype or _dtype(model)],
                env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if not rcfg.server_address and rps > 1:  # the group's other ranks use its first rank's server
            addresses = rdist.all_gather_object((self.address, self.key) if self.leader else None)
            self.address, self.key = addresses[rank - rank % rps]
        self.conn = self._connect(rcfg.start_timeout_s)
        group = f"ranks {rank - rank % rps}-{rank - rank % rps + rps - 1}" if rps > 1 else f"rank {rank}"
        print(f"r1zero: rank {rank}: vLLM rollout server {self.address[0]}:{self.address[1]} ({group}; "
              f"{'pushes' if self.leader else 'waits for'} the weights)", file=sys.stderr, flush=True)
        if rcfg.server_address and model is not None:  # a long-lived server: this run's starting weights
            self.update_weights(model)  # (model=None: the trainer pushes them from its shards)

    def _connect(self, timeout_s: float) -> Connection:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise UserError(f"vLLM rollout server exited at startup (code {self.proc.returncode}): "
                                f"{self._last_log_line()}")
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(max(1.0, deadline - time.monotonic()))  # a hung server must not hang the handshake
            try:
                conn = Client(self.address, authkey=self.key)
                break
            except (ConnectionRefusedError, OSError, EOFError):
                if time.monotonic() > deadline:
                    self._kill()
                    raise UserError(f"vLLM rollout server at {self.address[0]}:{self.address[1]} did not answer "
                                    f"within {timeout_s:g} s (grpo.rollout.start_timeout_s)") from None
                time.sleep(0.5)
            finally:
                socket.setdefaulttimeout(previous)
        if not conn.poll(max(1.0, deadline - time.monotonic())):
            self._kill()
            raise UserError(f"vLLM rollout server at {self.address[0]}:{self.address[1]} did not become ready "
                            f"within {timeout_s:g} s (grpo.rollout.start_timeout_s): {self._last_log_line()}")
        status, msg = conn.recv()
        if status != "ready":
            self._kill()
            raise UserError(f"vLLM rollout server failed to start: {msg}")
        return conn

    def _call(self, what: str, payload, send_bytes: bytes | None = None, timeout: float | None = None):
        """One request/answer; ``push_timeout_s`` covers sending (a stopped server stops reading
        and a large payload blocks) and the answer, then the server is stopped and one line raised.
        ``what``: ``sample``, ``push`` (a bucket) or ``commit``."""
        timeout = self.timeout if timeout is None else timeout
        label = what if what in ("sample", "stats") else "weight push"
        sent: list[BaseException | None] = []

        def send() -> None:
            try:
                self.conn.send((what, payload))
                if send_bytes is not None:
                    self.conn.send_bytes(send_bytes)
                sent.append(None)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                sent.append(err)

        t0 = time.monotonic()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        sender.join(timeout)
        try:
            if sender.is_alive() or not self.conn.poll(max(0.0, timeout - (time.monotonic() - t0))):
                raise TimeoutError
            if sent and sent[0] is not None:
                raise sent[0]
            status, result = self.conn.recv()
        except TimeoutError:
            self._kill()
            knob = "push_timeout_s" if label == "weight push" else "sample_timeout_s"
            part = {"push": f", at bucket {payload}", "commit": ", at the commit"}.get(what, "")
            raise UserError(f"vLLM rollout server {label} timed out after {timeout:g} s "
                            f"(grpo.rollout.{knob}){part}") from None
        except (EOFError, OSError) as err:
            self._kill()
            raise UserError(f"vLLM rollout server connection lost during {label}: {type(err).__name__}") from None
        if status != "ok":
            raise UserError(f"vLLM rollout server {label} failed: {result}")
        return result

    def sample(self, prompt_ids, max_new_tokens, temperature, top_p, *, seed=None):
        comps, trunc, logps = self._call("sample", (prompt_ids, max_new_tokens, temperature, top_p, self.eos_id,
                                                    seed), timeout=self.sample_timeout)
        return GenerationOutput(comps, trunc), logps

    def before_update(self) -> None:
        pass

    def update_weights(self, model) -> None:
        self.load_tensors(_named_tensors(model))

    def load_tensors(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push ``(standard name, tensor)`` pairs in buckets of ``push_bucket_mb`` (one bucket held
        at a time), then commit. ``named`` may be a collective generator over the trainer's shards:
        every rank runs it to its end (a rank that does not push drains it). Then every rank waits
        at a barrier, so no rank samples before its server's push has committed."""
        named = iter(named)
        try:
            if self.leader:
                n = 0
                for bucket in buckets(named, self.bucket_bytes):
                    self._call("push", n, _pack(bucket))
                    n += 1
                self._call("commit", n)
                self.pushed_buckets = n
        finally:
            for _ in named:  # a collective generator: the other ranks still need this rank's part
                pass
        rdist.barrier()

    def _last_log_line(self) -> str:
        if self.proc is None:
            return ""
        self.log.flush()
        lines = [x for x in open(self.log.name, encoding="utf-8", errors="replace").read().splitlines() if x.strip()]
        return lines[-1][:300] if lines else "(no output)"

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:

        if self.leader and getattr(self, "conn", None) is not None and not self.conn.closed:
            try:  # how well the server batched its ranks' requests (sample requests per generate)
                st = self._call("stats", None, timeout=min(self.timeout, 5.0))
                print(f"r1zero: rank {_rank()}: vLLM rollout server {self.address[0]}:{self.address[1]}: "
                      f"{st['sample_requests']} sample requests in {st['generate_calls']} engine calls",
                      file=sys.stderr, flush=True)
            except UserError:
                pass
        try:  # a spawned server stops with the run; a pod's server only ends this session ("bye")
            self.conn.send(("close" if self.proc is not None else "bye", None))
        except (OSError, AttributeError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            os.unlink(self.log.name)
        if self.dir and self.owned:
            shutil.rmtree(self.dir, ignore_errors=True)


def server_address(address: str, rank: int | None = None, *, ranks_per_server: int = 1) -> tuple[str, int]:
    """``host:port`` of this trainer rank's rollout server. ``{rank}`` in the host is replaced by
    the rank (``RANK``, set by torchrun; 0 without it), ``{server}`` by the server's index
    ``rank // ranks_per_server``: the rendered jobs name their servers
    ``<job>-rollout-{rank}.<job>-rollout.<namespace>.svc:7100`` (one per rank) or ``...-{server}...``
    (r1zero/cluster/rollout_manifests.py)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"grpo.rollout.server_address {address!r} is not host:port")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if "{rank}" in host and ranks_per_server > 1:
        raise UserError(f"grpo.rollout.server_address {address!r}: {{rank}} names one server per rank, but "
                        f"ranks_per_server is {ranks_per_server} (use {{server}})")
    host = host.replace("{rank}", str(rank)).replace("{server}", str(rank // ranks_per_server))
    if "{" in host or "}" in host:
        raise UserError(f"grpo.rollout.server_address {address!r}: the only placeholders are {{rank}} and "
                        "{server}")
    return host, int(port)


def serving_dir(model: str) -> str:
    """A standard HF dir for the engine from ``model`` (a local dir or ``s3://`` URI of a policy;
    r1zero's own format is exported once, to a temporary dir). The trainer pushes its weights on
    connect, so this only fixes the architecture and the tokenizer."""
    import json

    from r1zero import store

    d = store.materialize(model)
    try:
        model_type = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        raise UserError(f"rollout server model {model}: no readable config.json") from None
    if model_type != "r1zero_moe":
        return str(d)
    from r1zero.model import load_causal_lm

    policy, tok = load_causal_lm(str(d))
    return _export(policy, tok)[0]


class _Weights:
    """The server's engine and the state of its weights, shared by the trainer connections.

    A push streams into one in-place reload of the engine (a loader thread consumes the buckets
    from a one-slot queue as they arrive: the server holds about one bucket), and the reload's
    post-load processing runs once, when the trainer commits. Between a push's first bucket and
    its commit the weights are mixed (``half``): sampling is refused; a push that breaks off
    leaves ``half`` set until a whole push commits."""

    _END, _ABORT = object(), object()
    # how long a sample request waits for the other open sessions' requests (the ranks that share
    # this server sample at the same moment, after the same barrier) to go in the same generate
    GATHER_S = 0.25

    def __init__(self, sampler: VllmSampler):
        self.sampler = sampler
        self.lock = threading.Lock()  # engine calls, one at a time
        self.cv = threading.Condition()  # guards pending, sessions, stats
        self.pending: list[tuple[tuple, dict]] = []  # (request, slot) not yet taken into a generate
        self.sessions = 0
        self.stats = {"sample_requests": 0, "generate_calls": 0}
        self.half = False
        self.owner: object | None = None  # the session whose push is open
        self.queue = None
        self.loader: threading.Thread | None = None
        self.error: BaseException | None = None
        self.received = 0

    def sample(self, request: tuple):
        """One session's request; whichever session holds the engine next runs every pending
        request in one ``generate`` (vLLM batches the ranks' rows together)."""
        if self.half:
            raise RuntimeError("weights are half-pushed (a push has not committed): sampling refused")
        slot: dict = {}
        deadline = time.monotonic() + self.GATHER_S
        with self.cv:
            self.pending.append((request, slot))
            self.cv.notify_all()
            while len(self.pending) < self.sessions and not slot and time.monotonic() < deadline:
                self.cv.wait(max(0.0, deadline - time.monotonic()))
        with self.lock:
            if not slot:  # not taken by another session's generate: this one runs the batch
                with self.cv:
                    batch, self.pending = self.pending, []
                try:
                    if self.half:
                        raise RuntimeError("weights are half-pushed (a push has not committed): sampling refused")
                    results = self.sampler.sample_many([r for r, _ in batch])
                    for (_, s), res in zip(batch, results):
                        s["result"] = res
                except Exception as err:  # noqa: BLE001 - every request of the batch gets it
                    for _, s in batch:
                        s["error"] = err
                with self.cv:
                    self.stats["sample_requests"] += len(batch)
                    self.stats["generate_calls"] += 1
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def _tensors(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if item is self._ABORT:
                raise RuntimeError("weight push broke off before its commit")
            yield from item

    def _load(self) -> None:
        try:
            with self.lock:
                self.sampler.load_weights(self._tensors())
        except BaseException as err:  # noqa: BLE001 - reported at the commit
            self.error = err

    def _put(self, item) -> None:
        import queue

        while True:  # the one slot frees when the loader takes the previous bucket
            if self.loader is None or not self.loader.is_alive():
                raise RuntimeError(f"the engine's reload stopped: {_first_line(self.error or RuntimeError('?'))}")
            try:
                self.queue.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def bucket(self, session: object, index: int, tensors: list[tuple[str, torch.Tensor]]) -> None:
        import queue

        if self.owner is not None and self.owner is not session:
            raise RuntimeError("another trainer's push is under way")
        if index == 0:
            if self.owner is session:
                raise RuntimeError("a new push began before the last one committed")
            self.owner, self.half, self.error, self.received = session, True, None, 0
            self.queue = queue.Queue(maxsize=1)
            self.loader = threading.Thread(target=self._load, daemon=True)
            self.loader.start()
        elif self.owner is not session or index != self.received:
            raise RuntimeError(f"bucket {index} out of order (expected {self.received})")
        self._put(tensors)
        self.received += 1

    def commit(self, session: object, n: int) -> None:
        if self.owner is not session:
            raise RuntimeError("commit without a push")
        try:
            if n != self.received:
                self._put(self._ABORT)
                raise RuntimeError(f"commit of {n} buckets, {self.received} received")
            self._put(self._END)
        finally:
            self.loader.join()
            self.owner, self.queue, self.loader = None, None, None
        if self.error is not None:
            raise RuntimeError(f"loading the pushed weights failed: {_first_line(self.error)}")
        self.half = False

    def abort(self, session: object) -> None:
        """The session ended mid-push: stop the reload; ``half`` stays set (weights mixed)."""
        if self.owner is not session:
            return
        try:
            self._put(self._ABORT)
        except RuntimeError:
            pass
        self.loader.join()
        self.owner, self.queue, self.loader = None, None, None


def serve(model: str, host: str, port: int, *, max_len: int | None, seed: int, kv_cache_gib: float,
          dtype: str = "auto") -> None:
    """The rollout server. The engine starts first, then the socket opens (so a TCP readiness
    probe on the port means "ready"); each authenticated trainer connection gets a thread, and
    engine work (``sample``, a push's reload) runs one at a time. ``bye`` ends a session,
    ``close`` (from the trainer that spawned this server) stops it once every other session has
    ended (the ranks that share it). A connection that fails the handshake (a readiness probe, a
    wrong key) is dropped."""
    from multiprocessing import AuthenticationError

    key = os.environ.get(KEY_ENV)
    if not key:
        raise UserError(f"{KEY_ENV} must be set (the key the trainer authenticates with)")
    weights = _Weights(VllmSampler(serving_dir(model), max_len=max_len, seed=seed, kv_cache_gib=kv_cache_gib,
                                   dtype=dtype))
    stop, count = threading.Event(), threading.Lock()
    state = {"open": 0, "closing": False}

    def session(conn: Connection) -> None:
        with count:
            state["open"] += 1
        with weights.cv:
            weights.sessions += 1
        try:
            with conn:
                conn.send(("ready", None))
                closing = _session(conn, weights)
        except (EOFError, OSError):
            closing = False
        with weights.cv:
            weights.sessions -= 1
        with count:
            state["open"] -= 1
            state["closing"] = state["closing"] or closing
            if state["closing"] and state["open"] == 0:
                stop.set()

    # backlog: kubelet probes and a restarted trainer may connect while a handshake is under way
    listener = Listener((host, port), authkey=key.encode(), backlog=16)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = listener.accept()
            except (EOFError, OSError, AuthenticationError):
                continue
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    print(f"rollout server ready on {host}:{port}", flush=True)
    threading.Thread(target=accept, daemon=True).start()
    stop.wait()
    listener.close()


def _session(conn: Connection, weights: _Weights) -> bool:
    """Serve one trainer connection; True when it asked the server to stop."""
    from safetensors.torch import load

    me = object()
    try:
        while True:
            try:
                what, payload = conn.recv()
            except (EOFError, OSError):
                return False
            if what in ("close", "bye"):
                return what == "close"
            try:
                if what == "sample":
                    result = weights.sample(tuple(payload))
                elif what == "stats":
                    with weights.cv:
                        result = dict(weights.stats)
                elif what == "push":
                    weights.bucket(me, int(payload), list(load(conn.recv_bytes()).items()))
                    result = None
                elif what == "commit":
                    weights.commit(me, int(payload))
                    result = None
                else:
                    raise ValueError(f"unknown request {what!r}")
                conn.send(("ok", result))
            except (EOFError, OSError):
                return False
            except Exception as err:  # noqa: BLE001 - reported to the trainer as one line
                conn.send(("error", f"{type(err).__name__}: {_first_line(err)}"))
    finally:
        weights.abort(me)
