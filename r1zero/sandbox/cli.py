"""``r1zero sandbox run FILE.py [--timeout S] [--memory-mb M]``: run one program in the sandbox.

Prints the verdict as one JSON object ``{"status", "returncode", "stdout", "stderr", "seconds"}``
(output truncated to 64 KiB per stream) and exits 0 when the status is ``ok``, 1 otherwise, 2 on
bad input. ``--protections`` adds the list of protections that were active and ``truncated``.

    r1zero sandbox run prog.py --timeout 2 --memory-mb 256
    r1zero sandbox run prog.py --server http://127.0.0.1:8080   # through the sandbox service
    r1zero sandbox serve --port 8080 --workers 2 --queue 8       # the service (r1zero.sandbox.service)
    r1zero sandbox probe          # which protections this machine allows
"""

from __future__ import annotations

import json
from pathlib import Path

from r1zero.cli import add_group
from r1zero.errors import UserError


def _read_source(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sandbox run: file not found: {path}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"sandbox run: {path} is not UTF-8 text") from None


def _run(args) -> int:
    from r1zero.sandbox.runner import run_code

    source = _read_source(args.file)
    if args.stdin and not Path(args.stdin).is_file():
        raise UserError(f"sandbox run: --stdin file not found: {args.stdin}")
    stdin = Path(args.stdin).read_bytes() if args.stdin else None
    if args.server:
        return _run_remote(args, source, stdin)
    res = run_code(source, timeout_s=args.timeout, memory_mb=args.memory_mb, stdin=stdin)
    print(json.dumps(res.to_json(with_protections=args.protections)))
    return 0 if res.status == "ok" else 1


def _run_remote(args, source: str, stdin: bytes | None) -> int:
    from r1zero.sandbox.client import UNAVAILABLE, SandboxClient

    if args.protections:
        raise UserError("sandbox run: --protections is not available with --server (ask the service's /healthz)")
    if args.memory_mb > 1024:
        raise UserError(f"sandbox run: --memory-mb must be <= 1024 with --server (got {args.memory_mb})")
    if args.timeout > 30:
        raise UserError(f"sandbox run: --timeout must be <= 30 s with --server (got {args.timeout})")
    try:
        stdin_text = stdin.decode("utf-8") if stdin else None
    except UnicodeDecodeError:
        raise UserError(f"sandbox run: --stdin file {args.stdin} is not UTF-8 text (required with --server)") from None
    res = SandboxClient(args.server, retries=2, breaker_failures=10).run(source, args.timeout, args.memory_mb,
                                                                         stdin_text)
    if res.status == UNAVAILABLE:
        raise UserError(f"sandbox run: no verdict from {args.server}: {res.stderr.removeprefix('[sandbox service] ')}")
    print(json.dumps(res.to_json()))
    return 0 if res.status == "ok" else 1


def _serve(args) -> int:
    from r1zero.sandbox.service import serve

    serve(args.host, args.port, args.workers, args.queue)
    return 0


def _probe(args) -> int:
    from r1zero.sandbox.runner import plan, run_code

    p = plan()
    res = run_code("print('ok')", timeout_s=5.0, memory_mb=256)
    print(json.dumps({"python": p.python, "uid": p.note, "status": res.status,
                      "protections": list(res.protections)}, indent=2))
    return 0 if res.status == "ok" else 1


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"sandbox run: --timeout must be a number of seconds (got {text!r})") from None
    if not 0 < v <= 3600:
        raise UserError(f"sandbox run: --timeout must be in (0, 3600] seconds (got {text})")
    return v


def _memory(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UserError(f"sandbox run: --memory-mb must be an integer (got {text!r})") from None
    if not 64 <= v <= 65536:
        raise UserError(f"sandbox run: --memory-mb must be in [64, 65536] (got {v})")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UserError(f"sandbox serve: --port must be an integer (got {text!r})") from None
    if not 0 <= v <= 65535:
        raise UserError(f"sandbox serve: --port must be in [0, 65535] (got {v})")
    return v


def _count(flag: str, lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise UserError(f"sandbox serve: {flag} must be an integer (got {text!r})") from None
        if not lo <= v <= 1024:
            raise UserError(f"sandbox serve: {flag} must be in [{lo}, 1024] (got {v})")
        return v
    return parse


def register(sub) -> None:
    ssub = add_group(sub, "sandbox", "run untrusted Python in the sandbox")
    run = ssub.add_parser("run", help="run FILE.py sandboxed and print its verdict as JSON")
    run.add_argument("file", metavar="FILE.py")
    run.add_argument("--timeout", type=_positive_float, default=2.0, help="wall/CPU seconds (default 2)")
    run.add_argument("--memory-mb", type=_memory, default=256, help="address-space limit in MiB (default 256)")
    run.add_argument("--stdin", help="file fed to the program's stdin")
    run.add_argument("--protections", action="store_true", help="also print the active protections")
    run.add_argument("--server", metavar="URL", help="run it through the sandbox service at URL")
    run.set_defaults(func=_run)
    srv = ssub.add_parser("serve", help="serve the sandbox over HTTP (POST /run, GET /healthz, GET /metrics)")
    srv.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080; 0 = any free port)")
    srv.add_argument("--host", default="0.0.0.0", help="bind address (default all interfaces: the pod IP)")
    srv.add_argument("--workers", type=_count("--workers", 1), default=2,
                     help="programs run at once (default 2; one per core the pod gets)")
    srv.add_argument("--queue", type=_count("--queue", 0), default=8,
                     help="programs waiting beyond the running ones before requests get 'overloaded' (default 8)")
    srv.set_defaults(func=_serve)
    probe = ssub.add_parser("probe", help="show which protections are active on this machine")
    probe.set_defaults(func=_probe)
