"""Disk full while writing: one clear error, the previous checkpoint/artifact/file intact.

The real thing: a tiny tmpfs is mounted for each test (this needs root / CAP_SYS_ADMIN, which the
dev machine and CI have). Where mounting is refused, the same assertions run with ENOSPC injected
at the write call instead, and a warning says so (``tmpfs`` fixture).

    .venv/bin/python -m pytest tests/reliability/test_disk_full.py -q
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from relutil import TINY_TRAIN, cli_env, run_cli  # noqa: E402

from r1zero import store  # noqa: E402
from r1zero.errors import UserError  # noqa: E402
from r1zero.train.checkpoint import Checkpointer, step_name  # noqa: E402


class TinyFS:
    """A size-limited filesystem at ``path``: a real tmpfs, or (``real`` False) a plain dir."""

    def __init__(self, path: Path, size_k: int):
        self.path, self.size_k = path, size_k
        path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k,mode=0755", "tmpfs", str(path)],
                             capture_output=True, text=True)
        self.real = res.returncode == 0
        if not self.real:
            warnings.warn(f"tmpfs not mountable here ({res.stderr.strip()}): disk full is simulated by "
                          "injecting ENOSPC at the write", stacklevel=2)

    def grow(self, size_k: int) -> None:
        """The operator frees space: a bigger filesystem, same contents."""
        if self.real:
            subprocess.run(["mount", "-o", f"remount,size={size_k}k", str(self.path)], check=True)

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    made: list[TinyFS] = []

    def make(size_k: int, name: str = "fs") -> TinyFS:
        fs = TinyFS(tmp_path / name, size_k)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _writer(nbytes: int, fill: bytes):
    def write(d: Path) -> None:
        (d / "engine").mkdir(parents=True, exist_ok=True)
        with open(d / "engine" / "rank-00000.pt", "wb") as f:
            for _ in range(nbytes // 4096):
                f.write(fill * 4096)
    return write


def test_checkpoint_save_on_full_disk_keeps_previous(tmpfs, monkeypatch):
    fs = tmpfs(512)
    ck = Checkpointer(str(fs.path / "ck"), keep_last=2)
    ck.save(1, _writer(200 << 10, b"A"), {"data_position": 1})
    big = _writer(400 << 10, b"B")  # 200 KiB + 400 KiB > 512 KiB
    if not fs.real:
        big = _enospc
    with pytest.raises(UserError, match=r"checkpoint step-00000002 not saved .*no space left on device") as err:
        ck.save(2, big, {"data_position": 2})
    assert "\n" not in str(err.value)
    got = ck.load_latest()  # verifies every checksum
    assert got.step == 1 and (got.path / "engine" / "rank-00000.pt").read_bytes() == b"A" * (200 << 10)
    assert sorted(p.name for p in (fs.path / "ck").iterdir()) == [step_name(1)]  # staging removed
    fs.grow(2048)
    if fs.real:  # with room again the next save works and keep-last still holds both
        ck.save(2, _writer(400 << 10, b"B"), {"data_position": 2})
        assert ck.load_latest().step == 2


def test_publish_on_full_disk_keeps_previous_artifact(tmpfs, tmp_path, monkeypatch):
    fs = tmpfs(256)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("version 1")
    store.publish(src, str(fs.path / "art"))
    (src / "a.txt").write_text("version 2")
    (src / "big.bin").write_bytes(os.urandom(400 << 10))
    if not fs.real:
        monkeypatch.setattr(shutil, "copytree", _enospc)
    with pytest.raises(UserError, match=r"publishing art: no space left on device"):
        store.publish(src, str(fs.path / "art"))
    assert (fs.path / "art" / "a.txt").read_text() == "version 1"
    assert sorted(p.name for p in fs.path.iterdir()) == ["art"]  # no temp dir left behind


def test_atomic_write_on_full_disk_keeps_old_file(tmpfs, monkeypatch):
    fs = tmpfs(64)
    target = fs.path / "metrics.jsonl"
    store.atomic_write_text(target, "old\n")
    if not fs.real:
        monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(UserError, match=r"writing metrics\.jsonl: no space left on device"):
        store.atomic_write_bytes(target, b"x" * (128 << 10))
    assert target.read_text() == "old\n"
    assert [p.name for p in fs.path.iterdir()] == ["metrics.jsonl"]


# In the fallback the pretraining subprocess gets ENOSPC from torch.save for checkpoints after step 2.
_FALLBACK = """
import errno, os, sys, torch
real = torch.save
def save(obj, f, *a, **k):
    if "step-00000002" not in str(f) and "/ck/" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return real(obj, f, *a, **k)
torch.save = save
from r1zero.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_pretrain_disk_full_is_one_line_then_resumes_from_previous(tmpfs, tiny_data, tmp_path):
    """``r1zero pretrain`` with checkpoints on a 2600 KiB filesystem (one ~1.7 MB DCP checkpoint of
    fp32 weights + Adam states fits, two do not): exit 2 and one line at the step-4 save; step-2
    intact; after the disk grows the rerun resumes from step 2 and finishes."""
    fs = tmpfs(2600)
    args = ["pretrain", "--config", "configs/tiny.yaml", *TINY_TRAIN, "--set", "pretrain.steps=6",
            "--set", "pretrain.checkpoint_every=2", "--set", f"pretrain.checkpoint_uri={fs.path / 'ck'}",
            "--data", str(tiny_data), "--out", str(tmp_path / "out")]
    if fs.real:
        res = run_cli(*args)
    else:
        res = subprocess.run([sys.executable, "-c", _FALLBACK, *args], cwd=Path(__file__).resolve().parents[2],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and "checkpoint step-00000004 not saved" in lines[0], lines
    assert "no space left on device" in lines[0]
    got = Checkpointer(str(fs.path / "ck")).load_latest()
    assert got.step == 2
    fs.grow(8192)
    if fs.real:
        res = run_cli(*args)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["start_step"] == 2 and summary["steps"] == 6
