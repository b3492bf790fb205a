"""run_code: statuses, output cap, stdin, limits, scrubbed env, cleanup, concurrency, bad input."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import psutil
import pytest

from r1zero.errors import UserError
from r1zero.sandbox import STATUSES, run_code
from r1zero.sandbox.runner import OUTPUT_LIMIT, STARTUP_GRACE_S, plan


def test_ok_and_stdout():
    res = run_code("print(sum(range(10)))", timeout_s=2.0)
    assert (res.status, res.returncode, res.stdout, res.stderr) == ("ok", 0, "45\n", "")
    assert 0 < res.seconds < 2.0 + STARTUP_GRACE_S


def test_error_keeps_traceback_tail():
    res = run_code("raise ValueError('boom')")
    assert res.status == "error" and res.returncode == 1
    assert res.stderr.rstrip().endswith("ValueError: boom")


def test_exit_code_is_reported():
    res = run_code("import sys; sys.exit(3)")
    assert (res.status, res.returncode) == ("error", 3)


def test_stdin_is_fed():
    res = run_code("import sys; print(sys.stdin.read()[::-1])", stdin="abc")
    assert res.stdout == "cba\n"


def test_large_stdin_does_not_deadlock():
    data = "x" * (1 << 20)  # bigger than a pipe buffer
    res = run_code("import sys; print(len(sys.stdin.read()))", stdin=data, timeout_s=5.0)
    assert res.stdout.strip() == str(len(data))


def test_output_is_truncated_to_the_bound():
    res = run_code(f"print('y' * {3 * OUTPUT_LIMIT})")
    assert res.status == "ok" and res.truncated
    assert len(res.stdout.encode()) == OUTPUT_LIMIT


def test_timeout_within_bound():
    res = run_code("import time\ntime.sleep(30)", timeout_s=0.5)
    assert res.status == "timeout"
    assert res.seconds < 0.5 + STARTUP_GRACE_S + 0.5


def test_cpu_limit_and_memory_limit():
    assert run_code("while True: pass", timeout_s=0.5).status == "timeout"
    res = run_code("x = bytes(512 * 1024 * 1024)", memory_mb=128)
    assert res.status == "memory", res.stderr
    # the same allocation fits a larger limit: the limit is what stops it
    assert run_code("x = bytes(64 * 1024 * 1024); print(len(x))", memory_mb=256).status == "ok"


def test_signal_death_is_killed():
    res = run_code("import faulthandler; faulthandler._sigsegv()")
    assert res.status == "killed" and res.returncode == -11


def test_environment_is_scrubbed_and_cwd_is_fresh_and_removed():
    os.environ["R1ZERO_RUNNER_SECRET"] = "do-not-leak"
    try:
        res = run_code("import os, json; print(json.dumps([sorted(os.environ), os.getcwd(), os.listdir('.')]))")
    finally:
        del os.environ["R1ZERO_RUNNER_SECRET"]
    env_keys, cwd, listing = json.loads(res.stdout)
    assert set(env_keys) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}
    assert listing == ["main.py"]
    assert not Path(cwd).exists()  # temp dir removed afterwards


def test_writes_inside_the_temp_dir_are_allowed():
    res = run_code("open('out.txt', 'w').write('hi'); print(open('out.txt').read())")
    assert (res.status, res.stdout) == ("ok", "hi\n")


def test_protections_are_reported():
    res = run_code("pass")
    prot = set(res.protections)
    for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE"):
        assert any(p.startswith(name + "=") for p in prot), prot
    assert "audit_hook" in prot
    if os.geteuid() == 0:  # as root the OS layers must all be active, not silently skipped
        assert "netns" in prot
        assert plan().drop_uid and any(p.startswith("uid=") for p in prot), (plan(), prot)


def test_stdlib_imports_work_under_the_sandbox():
    src = "import math, json, re, itertools, collections, functools, fractions, heapq\nprint(math.gcd(12, 18))"
    assert run_code(src).stdout == "6\n"


def test_concurrent_jobs_get_distinct_uids_and_right_outputs():
    results = {}

    def job(i):
        results[i] = run_code(f"import os, time\ntime.sleep(0.3)\nprint({i}, os.getuid())", timeout_s=5.0)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [results[i].stdout.split() for i in range(4)]
    assert [int(o[0]) for o in outs] == [0, 1, 2, 3]
    if plan().drop_uid:
        assert len({o[1] for o in outs}) == 4


def test_deterministic():
    src = "import random\nrandom.seed(7)\nprint([random.randint(0, 99) for _ in range(5)])"
    assert run_code(src).stdout == run_code(src).stdout


@pytest.mark.parametrize("kw", [{"timeout_s": 0}, {"timeout_s": -1}, {"memory_mb": 8}, {"memory_mb": 1.5}])
def test_bad_limits_are_user_errors(kw):
    with pytest.raises(UserError):
        run_code("pass", **kw)


def test_statuses_are_the_documented_set():
    assert STATUSES == ("ok", "error", "timeout", "memory", "killed")
    d = run_code("pass").to_json()
    assert list(d) == ["status", "returncode", "stdout", "stderr", "seconds"]


def test_escaped_grandchild_is_killed_by_the_uid_sweep():
    # With the audit hook off the program can fork; the grandchild leaves the process group with
    # setsid() and sleeps. Only the sweep of the job's uid can find it.
    if not plan().drop_uid:
        assert any(p.startswith("!uid") for p in run_code("pass").protections)
        return
    src = ("import os, sys, time\n"
           "pid = os.fork()\n"
           "if pid == 0:\n"
           "    os.setsid()\n"
           "    print(os.getpid(), os.getpgid(0), flush=True)\n"
           "    time.sleep(60)\n"
           "    os._exit(0)\n"
           "time.sleep(0.3)\n")
    res = run_code(src, timeout_s=2.0, audit_hook=False)
    assert res.status == "ok", res.stderr
    grandchild, pgid = map(int, res.stdout.split())
    assert pgid != res.pid  # it really left the sandbox's process group
    alive = psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
    assert not alive
