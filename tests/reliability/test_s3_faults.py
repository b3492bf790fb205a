"""S3 failing mid-upload: retried with backoff, never a partial object visible, a clear error when
the retry budget is spent.

A real moto S3 server runs on loopback (``s3_server`` in tests/conftest.py); a fault proxy
(:mod:`faultproxy`) in front of it is the endpoint r1zero talks to, so the network can fail while
the storage keeps its state. A watcher lists the bucket *directly* (not through the proxy) every
few milliseconds during each upload and records any object whose size differs from the source
file's, and any ``_SUCCESS`` marker seen before every file is there.
(tests/test_store.py already covers a server that is down for a whole publish.)

    .venv/bin/python -m pytest tests/reliability/test_s3_faults.py -q
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faultproxy import FaultProxy  # noqa: E402
from relutil import TINY_DATA, cli_env, run_cli  # noqa: E402

from r1zero import store  # noqa: E402
from r1zero.errors import UserError  # noqa: E402

BIG = 3 << 20  # 3 MiB: one PUT, large enough to be cut part-way


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.port)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def via_proxy(proxy, monkeypatch):
    monkeypatch.setattr(store, "_settings", store.S3Settings(endpoint_url=proxy.endpoint, retries=5))
    return proxy


def _artifact(root: Path) -> dict[str, bytes]:
    rng = random.Random(0)
    files = {"a.txt": b"alpha\n" * 100, "big.bin": rng.randbytes(BIG), "sub/c.json": b'{"c": 3}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


class Watcher:
    """Lists ``bucket/prefix`` directly on the server until stopped; records any partial view."""

    def __init__(self, client, bucket: str, prefix: str, sizes: dict[str, int]):
        self.client, self.bucket, self.prefix, self.sizes = client, bucket, prefix, sizes
        self.problems: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                objs = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/").get("Contents", [])
            except Exception:  # noqa: BLE001 - the watcher must not stop on a transient error
                continue
            self.polls += 1
            seen = {o["Key"][len(self.prefix) + 1:]: o["Size"] for o in objs}
            for rel, size in seen.items():
                if rel in self.sizes and size != self.sizes[rel]:
                    self.problems.append(f"{rel}: {size} of {self.sizes[rel]} bytes visible")
            if store.SUCCESS_MARKER in seen and set(self.sizes) - set(seen):
                self.problems.append(f"_SUCCESS visible without {sorted(set(self.sizes) - set(seen))}")
            time.sleep(0.01)


def _check_complete(s3_server, bucket: str, prefix: str, files: dict[str, bytes], tmp_path: Path) -> None:
    got = store.materialize(f"s3://{bucket}/{prefix}", tmp_path / "dl")
    for rel, data in files.items():
        assert (got / rel).read_bytes() == data


def test_upload_cut_mid_body_is_retried_and_never_visible_partially(s3_server, s3_bucket, via_proxy, tmp_path):
    files = _artifact(tmp_path / "src")
    via_proxy.cut[b"big.bin"] = [BIG // 3, 2]  # the first two PUTs of big.bin die after 1 MiB of body
    sizes = {k: len(v) for k, v in files.items()}
    with Watcher(s3_server.client(), s3_bucket, "cut", sizes) as w:
        store.publish(tmp_path / "src", f"s3://{s3_bucket}/cut")
    assert via_proxy.cuts_done == 2
    assert sum(b"big.bin" in r for r in via_proxy.requests) >= 3  # two cut attempts + the good one
    assert w.polls > 5 and not w.problems, w.problems
    _check_complete(s3_server, s3_bucket, "cut", files, tmp_path)


def test_endpoint_down_mid_upload_then_back_completes(s3_server, s3_bucket, via_proxy, tmp_path):
    """The endpoint stops as big.bin's PUT starts and comes back 1.5 s later: publish completes."""
    files = _artifact(tmp_path / "src")
    outage = {"started": None, "ended": None}

    def on_request(line: bytes) -> None:
        if b"big.bin" in line and outage["started"] is None:
            outage["started"] = time.monotonic()
            via_proxy.stop()  # now, before this request's bytes go on: the PUT dies in flight

            def restart():
                time.sleep(1.5)
                via_proxy.start()
                outage["ended"] = time.monotonic()

            threading.Thread(target=restart, daemon=True).start()

    via_proxy.on_request = on_request
    sizes = {k: len(v) for k, v in files.items()}
    with Watcher(s3_server.client(), s3_bucket, "down", sizes) as w:
        t0 = time.monotonic()
        store.publish(tmp_path / "src", f"s3://{s3_bucket}/down")
        wall = time.monotonic() - t0
    assert outage["ended"] is not None and wall >= 1.5  # it really waited the outage out
    assert not w.problems, w.problems
    _check_complete(s3_server, s3_bucket, "down", files, tmp_path)


def test_retry_budget_spent_gives_one_clear_error_and_no_object(s3_server, s3_bucket, proxy, monkeypatch, tmp_path):
    """Every connection reset: attempts with growing pauses, then one UserError; nothing visible."""
    monkeypatch.setattr(store, "_settings", store.S3Settings(endpoint_url=proxy.endpoint, retries=3))
    proxy.mode = "reset"
    _artifact(tmp_path / "src")
    pauses: list[float] = []
    real_sleep = time.sleep

    def sleep(s: float) -> None:  # record r1zero's own backoff pauses (not boto's internal ones)
        if sys._getframe(1).f_globals.get("__name__") == "r1zero.store":
            pauses.append(s)
        real_sleep(s)

    monkeypatch.setattr(store.time, "sleep", sleep)
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"S3 upload s3://.*/a\.txt: failed after 4 attempts") as err:
        store.publish(tmp_path / "src", f"s3://{s3_bucket}/never")
    wall = time.monotonic() - t0
    assert "\n" not in str(err.value)
    assert pauses == [0.2, 0.4, 0.8]  # exponential backoff between the 4 attempts
    assert wall >= sum(pauses)
    assert len(proxy.attempts) >= 4  # every attempt really went out (boto retries inside each, too)
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="never/")


def test_cli_reports_s3_outage_as_one_line_exit_2(s3_server, s3_bucket, proxy, tmp_path):
    proxy.mode = "reset"
    env = cli_env(R1ZERO_S3_ENDPOINT=proxy.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
    res = run_cli("data", "mix", "--config", "configs/tiny.yaml", *TINY_DATA, "--set", "store.retries=1",
                  "--out", f"s3://{s3_bucket}/mix", env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and "failed after 2 attempts" in lines[0] and "S3 upload" in lines[0], lines
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="mix/")


def test_checkpoint_upload_dying_before_its_manifest_is_never_used(s3_server, s3_bucket, proxy, monkeypatch, tmp_path):
    """A checkpoint save on S3 loses the endpoint right when its MANIFEST (written last) goes up: the
    save fails with one clear error, and the next load takes the previous, complete checkpoint."""
    from r1zero.train.checkpoint import Checkpointer

    monkeypatch.setattr(store, "_settings", store.S3Settings(endpoint_url=proxy.endpoint, retries=1))

    def write(payload: bytes):
        def w(d: Path) -> None:
            (d / "engine").mkdir(parents=True, exist_ok=True)
            (d / "engine" / "rank-00000.pt").write_bytes(payload)
        return w

    ck = Checkpointer(f"s3://{s3_bucket}/run/ck", keep_last=3, staging_root=tmp_path / "staging")
    ck.save(1, write(b"one" * 1000), {"data_position": 1})

    def on_request(line: bytes) -> None:
        if b"step-00000002/MANIFEST.json" in line and line.startswith(b"PUT"):
            proxy.stop()

    proxy.on_request = on_request
    with pytest.raises(UserError, match=r"step-00000002/MANIFEST\.json: failed after 2 attempts"):
        ck.save(2, write(b"two" * 1000), {"data_position": 2})
    proxy.on_request = None
    proxy.start()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="run/ck/")["Contents"]]
    assert any("step-00000002/engine" in k for k in keys)  # the shards made it ...
    assert not any(k.endswith("step-00000002/MANIFEST.json") for k in keys)  # ... the manifest did not
    with pytest.warns(UserWarning, match=r"step-00000002 .*unusable"):
        got = ck.load_latest()
    assert got.step == 1 and (got.path / "engine" / "rank-00000.pt").read_bytes() == b"one" * 1000
