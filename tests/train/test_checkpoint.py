"""Checkpoints: atomic, checksummed, keep-last-N, corrupt -> previous, local and S3."""

from __future__ import annotations

import json
import random

import pytest
import torch

from r1zero.train.checkpoint import MANIFEST, Checkpointer, step_name


def _writer(payload: bytes):
    def write(d):
        (d / "engine").mkdir(parents=True, exist_ok=True)
        (d / "engine" / "rank-00000.pt").write_bytes(payload)
    return write


def test_save_load_roundtrip_with_rng(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep_last=2)
    torch.manual_seed(7)
    random.seed(7)
    ck.save(5, _writer(b"weights-5"), {"data_position": 5})
    expect = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    got = ck.load_latest()
    assert got.step == 5 and got.state["data_position"] == 5
    assert (got.path / "engine" / "rank-00000.pt").read_bytes() == b"weights-5"
    ck.restore_rng(got)
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1]
    manifest = json.loads((got.path / MANIFEST).read_text())
    assert set(manifest["files"]) >= {"engine/rank-00000.pt", "trainer_state.json", "rng-rank00000.pt"}
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "ck").iterdir())


def test_keep_last_n(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep_last=2)
    for s in (1, 2, 3, 4):
        ck.save(s, _writer(f"w{s}".encode()), {})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [step_name(3), step_name(4)]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    ck = Checkpointer(str(tmp_path / "ck"), keep_last=3)
    ck.save(1, _writer(b"A" * 1000), {})
    ck.save(2, _writer(b"B" * 1000), {})
    f = tmp_path / "ck" / step_name(2) / "engine" / "rank-00000.pt"
    if damage == "truncate":
        f.write_bytes(b"B" * 10)
    elif damage == "flip":
        f.write_bytes(b"B" * 999 + b"C")
    else:
        (tmp_path / "ck" / step_name(2) / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="step-00000002.*unusable"):
        got = ck.load_latest()
    assert got.step == 1 and (got.path / "engine" / "rank-00000.pt").read_bytes() == b"A" * 1000


def test_interrupted_save_leaves_no_checkpoint(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep_last=2)
    ck.save(1, _writer(b"ok"), {})

    def boom(d):
        (d / "engine").mkdir(parents=True)
        (d / "engine" / "half.pt").write_bytes(b"par")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        ck.save(2, boom, {})
    assert ck.load_latest().step == 1


def test_s3_roundtrip_keep_last_and_corruption(s3_bucket, s3_server):
    root = f"s3://{s3_bucket}/run/checkpoints"
    ck = Checkpointer(root, keep_last=2)
    for s in (1, 2, 3):
        ck.save(s, _writer(f"w{s}".encode() * 100), {"data_position": s})
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="run/")["Contents"]]
    assert not any(step_name(1) in k for k in keys)
    got = ck.load_latest()
    assert got.step == 3 and (got.path / "engine" / "rank-00000.pt").read_bytes() == b"w3" * 100
    # corrupt the newest object in place: the previous checkpoint is used
    client.put_object(Bucket=s3_bucket, Key=f"run/checkpoints/{step_name(3)}/engine/rank-00000.pt", Body=b"bad")
    with pytest.warns(UserWarning, match="unusable"):
        got = ck.load_latest()
    assert got.step == 2 and got.state["data_position"] == 2
