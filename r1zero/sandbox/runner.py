"""Run one untrusted Python program in a sandboxed child process and return its verdict.

    from r1zero.sandbox import run_code
    res = run_code("print(1 + 1)", timeout_s=2.0, memory_mb=256)
    res.status, res.stdout            # ("ok", "2\\n")

    r1zero sandbox run prog.py --timeout 2 --memory-mb 256      # same, verdict as JSON

How: a fresh ``python -I -S -B`` (isolated: no env vars, no site-packages, no cwd on sys.path)
starts :mod:`r1zero.sandbox._bootstrap` in a new session (its own process group) with a scrubbed
environment and a fresh temp dir as cwd. The bootstrap applies rlimits, an empty network namespace,
a dedicated unprivileged uid and an audit hook before the program runs (see docs/sandbox.md for
what each layer can and cannot stop). This side enforces the wall-clock deadline, caps the output
it keeps, and afterwards SIGKILLs the process group and every process still owned by the job's
uid, so nothing the program started outlives the call.

Status: ``ok`` (exit 0), ``error`` (non-zero exit, e.g. an exception), ``timeout`` (wall deadline
or CPU rlimit), ``memory`` (MemoryError under the address-space limit), ``killed`` (died from a
signal such as SIGSEGV, or flooded its output past the drain limit).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from r1zero.errors import UserError
from r1zero.sandbox._bootstrap import MEMORY_EXIT, SETUP_EXIT

BOOTSTRAP = str(Path(__file__).with_name("_bootstrap.py"))
OUTPUT_LIMIT = 64 * 1024  # bytes kept per stream
DRAIN_FACTOR = 16  # output beyond OUTPUT_LIMIT * DRAIN_FACTOR (total) kills the program
STARTUP_GRACE_S = 0.5  # interpreter start-up is not charged to the program's timeout
FSIZE_MB = 16  # largest file the program may write
NOFILE = 64
NPROC = 16  # per sandbox uid; only enforced once the uid is dropped (root ignores NPROC)
# Dedicated uids for sandbox jobs (one per concurrent job, claimed with a lock file), far from the
# usual system (<1000) and user (1000-59999) ranges and below 65534 (nobody) so user namespaces
# that map 65536 ids still contain them. Override with R1ZERO_SANDBOX_UID_BASE.
UID_BASE = int(os.environ.get("R1ZERO_SANDBOX_UID_BASE", "62000"))
UID_SLOTS = 512
STATUSES = ("ok", "error", "timeout", "memory", "killed")


@dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    returncode: int | None  # negative = killed by that signal; None = never started
    stdout: str
    stderr: str
    seconds: float  # wall time from start to exit
    truncated: bool = False  # some output was dropped (beyond OUTPUT_LIMIT)
    protections: tuple[str, ...] = field(default=())  # what the bootstrap reported as active
    pid: int | None = None  # the child's pid (= its process group id); gone when run_code returns

    def to_json(self, with_protections: bool = False) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 4)
        d["protections"] = list(self.protections)
        d.pop("pid")
        if not with_protections:
            d.pop("protections")
            d.pop("truncated")
        return d


# ---------------------------------------------------------------------------------------------
# interpreter and uid plan (computed once per process)


def _world_readable_tree(path: str) -> bool:
    """True when every ancestor of ``path`` is o+x and ``path`` itself o+rx (an unprivileged uid
    can import from it)."""
    p = Path(path).resolve()
    try:
        if p.stat().st_mode & 0o005 != 0o005:
            return False
        return all(a.stat().st_mode & 0o001 for a in p.parents)
    except OSError:
        return False


def _stdlib_dir(python: str) -> str | None:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return os.path.dirname(os.__file__)
    try:
        out = subprocess.run([python, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                             capture_output=True, text=True, timeout=10, check=True, env={})
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class _Plan:
    python: str
    drop_uid: bool
    note: str  # why the uid is (not) dropped


@functools.lru_cache(maxsize=1)
def plan() -> _Plan:
    """Pick the interpreter and decide whether jobs run under a dedicated uid.

    Dropping the uid needs root and an interpreter whose stdlib that uid can read. A Python inside
    a private (0700) home directory, e.g. a pyenv install, is not readable, so a system python of the same minor version is
    used instead when there is one; otherwise jobs keep the caller's uid (recorded, not hidden).
    """
    python = os.environ.get("R1ZERO_SANDBOX_PYTHON") or sys.executable
    if os.geteuid() != 0:
        return _Plan(python, False, "not root: uid not dropped")
    lib = _stdlib_dir(python)
    if lib and _world_readable_tree(lib):
        return _Plan(python, True, "dedicated uid")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            lib = _stdlib_dir(cand)
            if lib and _world_readable_tree(lib):
                return _Plan(cand, True, f"dedicated uid ({cand}: {python}'s stdlib is not world-readable)")
    return _Plan(python, False, "stdlib not readable by an unprivileged uid: uid not dropped")


@contextlib.contextmanager
def _uid_slot(enabled: bool):
    """Claim a sandbox uid nobody else (thread or process) is using, via a flock'd lock file."""
    if not enabled:
        yield None
        return
    lock_dir = Path(tempfile.gettempdir()) / "r1zero-sandbox-uids"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    start = (os.getpid() * 7) % UID_SLOTS  # spread processes over the range
    while True:
        for i in range(UID_SLOTS):
            uid = UID_BASE + (start + i) % UID_SLOTS
            fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                # "dirty" = an earlier owner died mid-job (the host was killed) and may have left
                # processes running under this uid: sweep them before reuse.
                if os.pread(fd, 5, 0) == b"dirty":
                    _kill_uid(uid)
                os.pwrite(fd, b"dirty", 0)
                yield uid
                _kill_uid(uid)
                os.pwrite(fd, b"clean", 0)
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.01)


def _uid_pids(uid: int) -> list[int]:
    """Live processes owned by ``uid``: ``/proc/<pid>`` belongs to the process's effective uid, so
    one stat per pid (psutil's status parsing costs ~10x more, on every sandbox call)."""
    pids = []
    with contextlib.suppress(OSError), os.scandir("/proc") as it:
        for entry in it:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int) -> int:
    """SIGKILL every live process owned by ``uid``; returns how many were signalled."""
    n = 0
    for _ in range(50):  # a racing forker gets a few rounds; NPROC bounds how many it can have
        victims = []
        for pid in _uid_pids(uid):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and p.uids().real == uid:
                    victims.append(p)
        if not victims:
            return n
        for p in victims:
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.send_signal(signal.SIGKILL)
                n += 1
        psutil.wait_procs(victims, timeout=0.2)
    return n


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# running


def _pump(proc: subprocess.Popen, stdin: bytes, deadline: float, limit: int) -> tuple[bytes, bytes, bool, str]:
    """Feed stdin, collect capped stdout/stderr until exit or deadline.

    Returns (stdout, stderr, truncated, why) where why is "" (exited), "timeout" or "flood".
    """
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    if stdin:
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pending = memoryview(stdin)
    total, truncated, why, exited_at = 0, False, "", None
    while True:
        now = time.monotonic()
        if now >= deadline:
            why = "timeout"
            break
        if exited_at is None and _exited(proc.pid):
            exited_at = now
        # Done once the program is gone and its output drained; a grandchild still holding the
        # pipes gets 0.2 s and is then killed by the caller. Closed pipes alone end nothing.
        if exited_at is not None and (not sel.get_map() or now - exited_at > 0.2):
            break
        if not sel.get_map():
            time.sleep(min(0.01, deadline - now))
            continue
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            fd = key.fd
            if fd == stdin_fd:
                try:
                    n = os.write(fd, pending[:65536])
                    pending = pending[n:]
                except (BrokenPipeError, BlockingIOError, OSError):
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    proc.stdin.close()
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(fd)
                continue
            total += len(chunk)
            keep = max(0, limit - len(bufs[fd]))
            bufs[fd] += chunk[:keep]
            truncated |= len(chunk) > keep
            if total > limit * DRAIN_FACTOR:
                why = "flood"
                break
        if why:
            break
    sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), truncated, why


def _exited(pid: int) -> bool:
    """Has the child exited? Does not reap it, so its pid (= process group id) stays reserved until
    the group has been killed: no chance of signalling a recycled pid."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _status(returncode: int | None, why: str, stderr: str) -> str:
    if why == "timeout" or returncode in (-signal.SIGXCPU,):
        return "timeout"
    if why == "flood":
        return "killed"
    if returncode == MEMORY_EXIT or (returncode and stderr.rstrip().endswith("MemoryError")):
        return "memory"
    if returncode is not None and returncode < 0:
        return "killed"
    return "ok" if returncode == 0 else "error"


def _check_args(timeout_s: float, memory_mb: int) -> None:
    if not (isinstance(timeout_s, int | float) and 0 < timeout_s <= 3600):
        raise UserError(f"sandbox timeout must be in (0, 3600] seconds (got {timeout_s!r})")
    if not (isinstance(memory_mb, int) and 64 <= memory_mb <= 65536):
        raise UserError(f"sandbox memory limit must be an integer in [64, 65536] MiB (got {memory_mb!r})")


def run_code(source: str, timeout_s: float = 2.0, memory_mb: int = 256, *, stdin: str | bytes | None = None,
             output_limit: int = OUTPUT_LIMIT, network_namespace: bool = True,
             audit_hook: bool = True) -> SandboxResult:
    """Run ``source`` as ``__main__`` in the sandbox; never raises for anything the program does.

    ``timeout_s`` bounds the program's wall time (plus :data:`STARTUP_GRACE_S` for interpreter
    start-up) and its CPU time; ``memory_mb`` bounds its address space (the interpreter itself
    takes ~20 MiB of it). Bad limits raise :class:`UserError`. ``network_namespace`` and
    ``audit_hook`` exist to test the other layers on their own; leave them on.
    """
    _check_args(timeout_s, memory_mb)
    stdin_b = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    p = plan()
    t0 = time.monotonic()
    # The uid slot closes first (killing whatever still runs as that uid), then the temp dir goes.
    with tempfile.TemporaryDirectory(prefix="r1zero-sbx-", ignore_cleanup_errors=True) as work, \
            _uid_slot(p.drop_uid) as uid:
        Path(work, "main.py").write_text(source, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
        report_r, report_w = os.pipe()
        cfg = {"cpu_s": max(1, int(timeout_s + 0.999)), "mem_bytes": memory_mb << 20, "fsize_bytes": FSIZE_MB << 20,
               "nofile": NOFILE, "nproc": NPROC, "uid": "" if uid is None else uid, "netns": int(network_namespace),
               "audit_hook": int(audit_hook), "report_fd": report_w}
        argv = [f"{k}={v}" for k, v in cfg.items()]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        proc = None
        try:
            proc = subprocess.Popen([p.python, "-I", "-S", "-B", BOOTSTRAP, *argv], cwd=work, env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, pass_fds=(report_w,))
        except OSError as err:
            os.close(report_r)
            return SandboxResult("error", None, "", f"sandbox could not start: {err}", time.monotonic() - t0)
        finally:
            os.close(report_w)
        try:
            out, err, truncated, why = _pump(proc, stdin_b, t0 + timeout_s + STARTUP_GRACE_S, output_limit)
        finally:
            _kill_group(proc.pid)  # before reaping: the zombie leader keeps the pgid from being recycled
            returncode = proc.wait()
            # anything that left the group (setsid) but still runs as the job's uid is killed when
            # the uid slot is released (_uid_slot), before the temp dir goes
            for f in (proc.stdin, proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    f.close()
        seconds = time.monotonic() - t0
        protections = _read_report(report_r)
    stderr = err.decode("utf-8", "replace")
    if why == "flood":
        stderr += f"\n[sandbox] output exceeded {output_limit * DRAIN_FACTOR} bytes: killed"
    elif returncode == SETUP_EXIT:
        return SandboxResult("error", returncode, "", stderr, seconds, truncated, protections, proc.pid)
    if not p.drop_uid:
        protections = (*protections, f"!uid: {p.note}")
    return SandboxResult(_status(returncode, why, stderr), returncode, out.decode("utf-8", "replace"), stderr,
                         seconds, truncated, protections, proc.pid)


def _read_report(fd: int) -> tuple[str, ...]:
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 65536)
    except OSError:
        data = b""
    finally:
        os.close(fd)
    return tuple(line for line in data.decode("utf-8", "replace").splitlines() if line)
