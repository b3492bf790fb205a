"""Sandbox bootstrap: the first code that runs inside every sandboxed child process.

Not imported by r1zero: :mod:`r1zero.sandbox.runner` starts it as a script,

    python -I -S -B _bootstrap.py cpu_s=2 mem_bytes=268435456 ... report_fd=5

in a fresh temp dir (the cwd) holding ``main.py``, the untrusted program. It applies the OS
protections in an order that still works once privileges are gone, reports which ones took hold on
an inherited pipe (closed before the untrusted code runs, so the program cannot forge the report),
installs a PEP 578 audit hook, then executes ``main.py`` as ``__main__``:

1. rlimits (hard == soft): CPU seconds, address space, file size, open files, processes, core 0.
2. a new, empty network namespace (``unshare(CLONE_NEWNET)`` through libc; needs CAP_SYS_ADMIN).
3. a dedicated unprivileged uid/gid (when started as root), so file permissions, RLIMIT_NPROC and
   ``kill`` permission checks apply and every leftover process can be found by uid.
4. the audit hook: writes only under the cwd, reads only under the cwd and the stdlib, no
   sockets, subprocesses, signals, ctypes, rlimit changes or gc/code tampering. Audit hooks are a
   tripwire, not a security boundary (PEP 578 says so); layers 1-3 are the boundary.

Must stay stdlib-only and importable by any CPython 3.11 (the runner may pick the system python).
"""

import os
import resource
import sys

MEMORY_EXIT = 86  # exit status meaning "MemoryError escaped the program" (runner maps it to "memory")
SETUP_EXIT = 87  # the bootstrap itself failed before running the program
CLONE_NEWNET = 0x40000000  # <linux/sched.h>

_BLOCKED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "cffi", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
    "_testinternalcapi", "_testmultiphase",
})
_BLOCKED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect",
    "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.getnameinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "ctypes.string_at", "ctypes.wstring_at", "ctypes.addressof", "ctypes.call_function",
    "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sqlite3.enable_load_extension", "sqlite3.load_extension", "webbrowser.open", "os.setxattr",
    "os.removexattr", "os.chflags", "os.lchflags",
})
# events whose listed argument positions are paths the program wants to *modify*
_WRITE_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,),
    "shutil.copytree": (1,), "shutil.move": (1,), "tempfile.mkstemp": (0,), "tempfile.mkdtemp": (0,),
    "os.mkfifo": (0,), "os.mknod": (0,),
}
_READ_PATH_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "glob.glob": (0,), "os.chdir": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _limit(applied: list, name: str, value: int) -> None:
    which = getattr(resource, name)
    try:
        resource.setrlimit(which, (value, value))
        applied.append(f"{name}={value}")
    except (ValueError, OSError) as err:
        applied.append(f"!{name}: {err}")


def _apply_rlimits(cfg: dict, applied: list) -> None:
    # CPU: SIGXCPU at the soft limit; hard = soft + 1 s then SIGKILL (setrlimit(2)).
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
        applied.append(f"RLIMIT_CPU={cfg['cpu_s']}")
    except (ValueError, OSError) as err:
        applied.append(f"!RLIMIT_CPU: {err}")
    _limit(applied, "RLIMIT_AS", cfg["mem_bytes"])
    _limit(applied, "RLIMIT_FSIZE", cfg["fsize_bytes"])
    _limit(applied, "RLIMIT_NOFILE", cfg["nofile"])
    _limit(applied, "RLIMIT_CORE", 0)
    if cfg.get("uid") is not None:
        # NPROC counts per real uid and is ignored for root (CAP_SYS_RESOURCE), so it only bites
        # once the uid is dropped below.
        _limit(applied, "RLIMIT_NPROC", cfg["nproc"])


def _unshare_network(applied: list) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            applied.append(f"!netns: {os.strerror(ctypes.get_errno())}")
        else:
            applied.append("netns")
    except Exception as err:  # noqa: BLE001 - any failure just means "not active"
        applied.append(f"!netns: {err}")
    finally:
        for mod in ("ctypes", "ctypes._endian", "_ctypes"):
            sys.modules.pop(mod, None)


def _drop_privileges(cfg: dict, applied: list) -> None:
    uid = cfg.get("uid")
    if uid is None:
        return
    try:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        applied.append(f"uid={uid}")
    except OSError as err:
        applied.append(f"!uid: {err}")


def _install_audit_hook(workdir: str, readable: tuple) -> None:
    realpath, fsdecode, join = os.path.realpath, os.fsdecode, os.path.join
    workdir = realpath(workdir)
    write_roots = (workdir, "/dev/null")
    proc_self = f"/proc/{os.getpid()}"
    read_roots = (*write_roots, *readable, "/dev/urandom", "/dev/zero", proc_self)

    def resolve(path):
        p = fsdecode(path)
        return realpath(p if p.startswith("/") else join(os.getcwd(), p))

    def inside(path, roots) -> bool:
        if isinstance(path, int) or path is None:
            return True  # an fd the program already holds, or "no path" (e.g. listdir() default)
        p = resolve(path)
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def deny(event, detail=""):
        raise PermissionError(f"sandbox: {event} denied{': ' + str(detail) if detail else ''}")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if not inside(path, write_roots if writing else read_roots):
                deny(event, path)
            # The event does not carry os.open's dir_fd, so a directory fd from outside the cwd
            # would let later relative paths escape the check: no directory fds outside the cwd.
            if mode is None and not isinstance(path, int) and not inside(path, write_roots) \
                    and os.path.isdir(resolve(path)):
                deny(event, f"directory fd {path}")
        elif event == "import":
            if args[0] in _BLOCKED_IMPORTS or args[0].split(".")[0] in _BLOCKED_IMPORTS:
                deny(event, args[0])
        elif event in _BLOCKED_EVENTS:
            deny(event)
        elif event in _WRITE_PATH_EVENTS:
            for i in _WRITE_PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i], write_roots):
                    deny(event, args[i])
        elif event in _READ_PATH_EVENTS:
            for i in _READ_PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i], read_roots):
                    deny(event, args[i])
        elif event == "sqlite3.connect":
            if args and args[0] not in (":memory:", b":memory:", "") and not inside(args[0], write_roots):
                deny(event, args[0])
        elif event == "object.__setattr__" and len(args) > 1 and args[1] in ("__code__", "__globals__"):
            deny(event, args[1])

    sys.addaudithook(hook)


def parse_args(argv: list) -> dict:
    """``key=int`` arguments (``uid=`` empty for "keep the uid"); no json: importing it costs ~20 ms
    (it pulls in ``re``) on every sandbox start."""
    cfg = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        cfg[key] = int(value) if value else None
    return cfg


def _setup() -> str:
    """Apply every protection and return the program source; runs before any untrusted code."""
    cfg = parse_args(sys.argv[1:])
    with open("main.py", encoding="utf-8") as fh:  # read before privileges go
        source = fh.read()
    applied: list = []
    _apply_rlimits(cfg, applied)
    if cfg.get("netns", True):
        _unshare_network(applied)
    _drop_privileges(cfg, applied)
    if cfg.get("audit_hook", True):
        readable = tuple(os.path.realpath(p) for p in sys.path if p and os.path.isdir(p))
        _install_audit_hook(os.getcwd(), readable)
        applied.append("audit_hook")
    os.write(cfg["report_fd"], "\n".join(applied).encode())
    os.close(cfg["report_fd"])
    return source


def main() -> None:
    try:
        source = _setup()
    except Exception as err:  # noqa: BLE001 - the runner reports it as a sandbox error
        os.write(2, f"sandbox setup failed: {type(err).__name__}: {err}\n".encode())
        os._exit(SETUP_EXIT)
    import types

    module = types.ModuleType("__main__")  # a fresh __main__: the program never sees this module
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    try:
        exec(compile(source, "main.py", "exec"), module.__dict__)
    except MemoryError:
        try:
            os.write(2, b"MemoryError\n")
        finally:
            os._exit(MEMORY_EXIT)
    # any other exception propagates: the interpreter prints the traceback and exits 1


if __name__ == "__main__":
    main()
