"""A catalogue of hostile programs the sandbox must contain (issue 9: untrusted code).

Each entry is a program template plus the statuses a contained run may end with. Placeholders:
``{canary}`` (a file outside the sandbox that must survive), ``{secret_name}`` (an env var set in
the parent whose value must never appear in the output) and ``{port}`` (a loopback TCP port the
caller listens on; no connection may arrive).

    from r1zero.sandbox.hostile import HOSTILE, render
    for name, h in HOSTILE.items():
        res = run_code(render(h, canary="...", secret_name="...", port=1234), timeout_s=1.0)

``tests/sandbox/test_hostile.py`` runs all of them and checks the host afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hostile:
    source: str
    allowed: frozenset[str]  # statuses that count as contained
    why: str  # which layer is expected to stop it


def _h(source: str, allowed: str, why: str) -> Hostile:
    return Hostile(source.strip() + "\n", frozenset(allowed.split()), why)


HOSTILE: dict[str, Hostile] = {
    "infinite_loop": _h("while True:\n    pass", "timeout", "RLIMIT_CPU / wall deadline"),
    "fork_bomb": _h("""
import os
while True:
    try:
        os.fork()
    except Exception:
        os.fork()
""", "error timeout", "audit hook (os.fork), RLIMIT_NPROC under the sandbox uid, group kill"),
    "memory_bomb": _h("""
chunks = []
while True:
    chunks.append(bytes(32 * 1024 * 1024))
""", "memory", "RLIMIT_AS (address space, so the bomb fails at allocation, before pages are touched)"),
    "huge_output": _h("""
import sys
while True:
    sys.stdout.write("A" * 65536)
""", "killed", "output drain limit"),
    "write_outside": _h("""
with open({canary!r}, "w") as fh:
    fh.write("pwned")
""", "error", "audit hook (open for write outside cwd), file permissions under the sandbox uid"),
    "delete_files": _h("""
import os, shutil
try:
    os.remove({canary!r})
finally:
    shutil.rmtree(os.path.dirname({canary!r}))
""", "error", "audit hook (os.remove / shutil.rmtree), file permissions"),
    "read_env_secret": _h("""
import os
print(dict(os.environ))
print(os.environ.get({secret_name!r}))
print(open("/proc/%d/environ" % os.getppid()).read())
""", "error", "scrubbed environment; audit hook + uid for /proc/<parent>/environ"),
    "network": _h("""
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
s.sendall(b"exfiltrated")
""", "error", "audit hook (socket.*), empty network namespace"),
    "raw_socket_connect": _h("""
import _socket
s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
s.connect(("127.0.0.1", {port}))
""", "error", "audit hook (socket.__new__), empty network namespace"),
    "subprocess": _h("""
import subprocess
subprocess.run(["sh", "-c", "echo pwned > " + {canary!r}])
""", "error", "audit hook (subprocess.Popen), RLIMIT_NPROC"),
    "os_system": _h("""
import os
os.system("echo pwned > " + {canary!r})
""", "error", "audit hook (os.system)"),
    "signal_parent": _h("""
import os, signal
os.kill(os.getppid(), signal.SIGKILL)
""", "error", "audit hook (os.kill); kill(2) EPERM across uids"),
    "deep_recursion": _h("""
import sys
sys.setrecursionlimit(10 ** 7)
def down(n):
    return down(n + 1) + 1
down(0)
""", "killed memory error timeout", "3.11 keeps Python frames off the C stack: RLIMIT_AS or the deadline ends it; a C-stack overflow would SIGSEGV only the child"),
    "ctypes_crash": _h("""
import ctypes
ctypes.string_at(0)
""", "error", "audit hook (import ctypes)"),
    "segfault": _h("""
import faulthandler
faulthandler._sigsegv()
""", "killed", "a crash ends only the child (status killed)"),
    "sleep_past_deadline": _h("""
import time
time.sleep(3600)
""", "timeout", "wall deadline + process-group kill"),
    "close_stdout": _h("""
import os
os.close(1)
os.close(2)
while True:
    pass
""", "timeout", "deadline does not depend on the pipes"),
    "shadowed_module": _h("""
import os, sys
with open("json.py", "w") as fh:
    fh.write("raise SystemExit('shadowed json imported')\\n")
import json
print(json.dumps([1, 2]))
stdlib = os.path.dirname(os.__file__)
with open(os.path.join(stdlib, "sitecustomize.py"), "w") as fh:
    fh.write("print('hijacked')\\n")
""", "error", "-I (no cwd on sys.path); audit hook + permissions keep the stdlib read-only"),
    "dir_fd_escape": _h("""
import os
fd = os.open(os.path.dirname(os.__file__), os.O_RDONLY | os.O_DIRECTORY)
os.open("r1zero_sandbox_pwned.py", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
""", "error", "audit hook (no directory fds outside the cwd), stdlib permissions under the sandbox uid"),
    "thread_bomb": _h("""
import threading, time
while True:
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
""", "error memory timeout killed", "RLIMIT_NPROC / RLIMIT_AS (thread stacks), group kill"),
    "fill_disk": _h("""
with open("big.bin", "wb") as fh:
    while True:
        fh.write(b"0" * (1 << 20))
""", "killed error", "RLIMIT_FSIZE (SIGXFSZ)"),
    "raise_rlimits": _h("""
import resource
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
x = bytearray(2 << 30)
""", "error memory", "audit hook (resource.setrlimit); hard limit, no CAP_SYS_RESOURCE under the uid"),
    "read_secrets_file": _h("""
print(open("/etc/shadow").read())
""", "error", "audit hook (reads outside cwd/stdlib), file permissions"),
}


def render(h: Hostile, canary: str, secret_name: str, port: int) -> str:
    return h.source.format(canary=canary, secret_name=secret_name, port=port)
