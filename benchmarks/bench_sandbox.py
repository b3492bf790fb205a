"""Sandbox service under load vs the in-process sandbox on the same batch (issue 18).

N find_input programs (the verifier's harness around generated code items, each tagged with its
index) are sent by C concurrent clients, each with its own connection pool, in batches of B:

- ``service``: through ``r1zero sandbox serve`` (a child process, W workers, a bounded queue sized
  so that C clients x B programs fit: ``W + C*B``) with :class:`r1zero.sandbox.client.SandboxClient`;
- ``inprocess``: the same C client threads calling :func:`r1zero.sandbox.run_code` directly,
  gated to W at a time (the same number of sandboxes running at once as the service's workers).

Every verdict is checked: each index answers exactly once (no lost or duplicated verdicts), with
the right output. Prints JSON: verdicts/s per repeat, median and min-max, retries and 503s.

    nice -n 5 .venv/bin/python benchmarks/bench_sandbox.py --programs 1000 --clients 32 --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from r1zero.data import gen_code
from r1zero.sandbox.client import UNAVAILABLE, SandboxClient
from r1zero.sandbox.runner import run_code
from r1zero.sandbox.service import ServiceProcess
from r1zero.verify import RESULT_MARKER, SANDBOX_MEMORY_MB, _harness

TIMEOUT_S = 2.0


def make_programs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(program, expected stdout line) pairs; program i prints its index first, so a verdict that
    comes back for the wrong program or twice is caught."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        item = gen_code.generate(rng, 2)
        meta = item["meta"]
        i = len(out)
        prog = f"print('ID', {i})\n" + _harness(meta["source"], meta["func"], [meta["input"]], {})
        out.append((prog, f"ID {i}\n{RESULT_MARKER}{meta['output']!r}\n"))
    return out


def _shares(n: int, clients: int) -> list[list[int]]:
    return [list(range(c, n, clients)) for c in range(clients)]


def run_service(programs, clients: int, workers: int, batch: int) -> dict:
    queue = clients * batch  # every client's batch fits: the load measures throughput, not refusals
    with ServiceProcess(port=0, workers=workers, queue=queue) as svc:
        cl = [SandboxClient(svc.url, batch_size=batch, retries=8, backoff_s=0.2) for _ in range(clients)]
        for c in cl:
            c.health()
        return _drive(programs, clients, lambda c, srcs: cl[c].run_many(srcs, timeout_s=TIMEOUT_S),
                      extra=lambda: {"attempts": sum(c.attempts for c in cl)})


def run_inprocess(programs, clients: int, workers: int, batch: int) -> dict:
    gate = threading.BoundedSemaphore(workers)

    def one(src: str):
        with gate:
            return run_code(src, timeout_s=TIMEOUT_S, memory_mb=SANDBOX_MEMORY_MB)

    def client_batch(_c: int, srcs: list[str]):
        with ThreadPoolExecutor(max_workers=len(srcs)) as pool:  # a batch is sent at once, as to the service
            return list(pool.map(one, srcs))

    return _drive(programs, clients, client_batch, extra=lambda: {}, batch=batch)


def _drive(programs, clients: int, send, extra, batch: int | None = None) -> dict:
    got: dict[int, list[str]] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int, idx: list[int]):
        step = batch or len(idx)
        for s in range(0, len(idx), step):
            part = idx[s:s + step]
            for i, res in zip(part, send(c, [programs[i][0] for i in part])):
                with lock:
                    got.setdefault(i, []).append(res.stdout if res.status == "ok" else f"<{res.status}>")
                    if res.status == UNAVAILABLE:
                        errors.append(res.stderr[:200])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c, idx)) for c, idx in enumerate(_shares(len(programs), clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lost = [i for i in range(len(programs)) if i not in got]
    dup = [i for i, v in got.items() if len(v) > 1]
    wrong = [i for i, v in got.items() if v[0] != programs[i][1]]
    return {"wall_s": round(wall, 2), "verdicts_per_s": round(len(programs) / wall, 1), "lost": len(lost),
            "duplicated": len(dup), "wrong": len(wrong), "unavailable": len(errors),
            "first_wrong": [got[i][0][:120] for i in wrong[:2]], **extra()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    programs = make_programs(a.programs)
    runs: dict[str, list[dict]] = {"service": [], "inprocess": []}
    for _ in range(a.repeats):  # interleaved, so load drift on the shared machine hits both
        runs["service"].append(run_service(programs, a.clients, a.workers, a.batch))
        runs["inprocess"].append(run_inprocess(programs, a.clients, a.workers, a.batch))
    summary = {}
    for k, rs in runs.items():
        v = [r["verdicts_per_s"] for r in rs]
        summary[k] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
    ratio = [s["verdicts_per_s"] / i["verdicts_per_s"] for s, i in zip(runs["service"], runs["inprocess"])]
    print(json.dumps({"settings": vars(a), "runs": runs, "verdicts_per_s": summary,
                      "service_over_inprocess": {"median": round(statistics.median(ratio), 3),
                                                 "min": round(min(ratio), 3), "max": round(max(ratio), 3)}},
                     indent=1))


if __name__ == "__main__":
    main()
