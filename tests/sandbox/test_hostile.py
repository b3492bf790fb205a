"""Every hostile program in the catalogue is contained: verdict within the time bound, host intact.

Checks per program: the status is one the catalogue allows, the wall time stays within
timeout + start-up grace + kill slack, a canary file outside the sandbox (in a world-writable
directory, so only the sandbox stops writes to it) survives unchanged, the parent (this process)
is alive, a secret env var set here never appears in the output, no process is left in the
child's process group or under its sandbox uid, and no connection reaches a loopback listener.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from r1zero.sandbox import run_code
from r1zero.sandbox.hostile import HOSTILE, render
from r1zero.sandbox.runner import STARTUP_GRACE_S, _stdlib_dir, plan

TIMEOUT_S = 1.0
KILL_SLACK_S = 1.0  # group kill, reaping, temp-dir removal on a loaded 2-core machine
SECRET_NAME, SECRET_VALUE = "R1ZERO_TEST_SECRET", "s3cr3t-7f1c9e2a-do-not-leak"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    d = tmp_path_factory.mktemp("outside")
    d.chmod(0o777)  # world-writable: file permissions alone would not protect the canary
    canary = d / "canary.txt"
    canary.write_text("intact")
    canary.chmod(0o666)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    os.environ[SECRET_NAME] = SECRET_VALUE
    yield canary, listener
    os.environ.pop(SECRET_NAME, None)
    listener.close()


def plan_stdlib() -> str:
    """The stdlib directory of the interpreter the sandbox runs (it may not be this one)."""
    return _stdlib_dir(plan().python)


def _leftovers(pid: int, uid: int | None) -> list[int]:
    left = []
    for p in psutil.process_iter(["pid", "uids", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # already dead, waiting for init to reap it
        try:
            if os.getpgid(p.info["pid"]) == pid or (uid is not None and p.info["uids"].real == uid):
                left.append(p.info["pid"])
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return left


def test_catalogue_has_the_issue_list():
    required = {"infinite_loop", "fork_bomb", "memory_bomb", "huge_output", "write_outside", "delete_files",
                "read_env_secret", "network", "subprocess", "signal_parent", "deep_recursion", "ctypes_crash",
                "sleep_past_deadline", "close_stdout", "shadowed_module"}
    assert required <= set(HOSTILE)
    assert len(HOSTILE) >= 15


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name, host):
    canary, listener = host
    h = HOSTILE[name]
    src = render(h, canary=str(canary), secret_name=SECRET_NAME, port=listener.getsockname()[1])
    t0 = time.monotonic()
    res = run_code(src, timeout_s=TIMEOUT_S, memory_mb=256)
    wall = time.monotonic() - t0
    assert res.status in h.allowed, (res.status, res.returncode, res.stderr[-500:])
    assert wall <= TIMEOUT_S + STARTUP_GRACE_S + KILL_SLACK_S, wall
    assert canary.read_text() == "intact" and canary.parent.is_dir()
    assert os.getppid() > 1 and psutil.pid_exists(os.getpid())
    assert SECRET_VALUE not in res.stdout and SECRET_VALUE not in res.stderr
    uid = next((int(p.split("=")[1]) for p in res.protections if p.startswith("uid=")), None)
    assert res.pid is not None and _leftovers(res.pid, uid) == []
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing connected
    assert not (canary.parent / "pwned").exists()
    assert not (Path(os.path.dirname(os.__file__)) / "r1zero_sandbox_pwned.py").exists()
    assert not (Path(plan_stdlib()) / "r1zero_sandbox_pwned.py").exists()


# --- each layer on its own: the OS layers hold with the audit hook switched off, and the hook
# holds with the network namespace switched off.

LAYER_CASES = ["write_outside", "delete_files", "signal_parent", "network", "raw_socket_connect", "fork_bomb",
               "read_env_secret", "infinite_loop", "memory_bomb", "fill_disk", "dir_fd_escape"]


@pytest.fixture()
def root_owned_canary(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    canary = d / "canary.txt"
    canary.write_text("intact")
    canary.chmod(0o644)
    d.chmod(0o755)
    tmp_path.chmod(0o755)
    return canary


@pytest.mark.parametrize("name", LAYER_CASES)
def test_os_layers_alone_contain(name, host, root_owned_canary):
    _, listener = host
    h = HOSTILE[name]
    src = render(h, canary=str(root_owned_canary), secret_name=SECRET_NAME, port=listener.getsockname()[1])
    if not plan().drop_uid:
        # Without root (or a stdlib the sandbox uid can read) there is no uid drop, so the OS layers
        # alone are not claimed to hold (and hostile code must not run unhooked): the report says so.
        res = run_code("pass", audit_hook=False)
        assert "audit_hook" not in res.protections and any(p.startswith("!uid") for p in res.protections)
        return
    t0 = time.monotonic()
    res = run_code(src, timeout_s=TIMEOUT_S, memory_mb=256, audit_hook=False)
    assert time.monotonic() - t0 <= TIMEOUT_S + STARTUP_GRACE_S + KILL_SLACK_S
    assert "audit_hook" not in res.protections
    assert res.status in h.allowed | {"error"}, (res.status, res.stderr[-300:])
    assert root_owned_canary.read_text() == "intact"
    assert SECRET_VALUE not in res.stdout + res.stderr
    uid = next(int(p.split("=")[1]) for p in res.protections if p.startswith("uid="))
    assert _leftovers(res.pid, uid) == []
    with pytest.raises(BlockingIOError):
        listener.accept()


@pytest.mark.parametrize("name", ["network", "raw_socket_connect"])
def test_audit_hook_alone_blocks_network(name, host):
    _, listener = host
    src = render(HOSTILE[name], canary="/nonexistent", secret_name=SECRET_NAME, port=listener.getsockname()[1])
    res = run_code(src, timeout_s=TIMEOUT_S, network_namespace=False)
    assert "netns" not in res.protections and res.status == "error"
    assert "sandbox: socket" in res.stderr
    with pytest.raises(BlockingIOError):
        listener.accept()
