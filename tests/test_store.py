"""Artifact store: atomic local writes, S3 round trip against a real loopback S3 server."""

from __future__ import annotations

import json

import pytest

from r1zero import store
from r1zero.errors import UserError


def _make_artifact(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    return root


def test_local_publish_is_atomic_and_replaces(tmp_path):
    src = _make_artifact(tmp_path / "src")
    dest = tmp_path / "out" / "art"
    store.publish(src, str(dest))
    assert (dest / "a.txt").read_text() == "alpha"
    (src / "a.txt").write_text("beta")
    store.publish(src, str(dest))
    assert (dest / "a.txt").read_text() == "beta"
    # no temp leftovers beside the destination
    assert sorted(p.name for p in dest.parent.iterdir()) == ["art"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.json"
    store.atomic_write_text(p, "old")

    with pytest.raises(TypeError):
        store.atomic_write_bytes(p, object())  # type: ignore[arg-type]
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_materialize_missing_local_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        store.materialize(str(tmp_path / "missing"))


def test_s3_round_trip_with_checksums(s3_server, s3_bucket, tmp_path):
    src = _make_artifact(tmp_path / "src")
    uri = f"s3://{s3_bucket}/runs/x/data"
    store.publish(src, uri)
    client = s3_server.client()
    marker = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/x/data/_SUCCESS")["Body"].read())
    assert set(marker["files"]) == {"a.txt", "sub/b.bin"}
    head = client.head_object(Bucket=s3_bucket, Key="runs/x/data/a.txt", ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256")
    got = store.materialize(uri, tmp_path / "dl")
    assert (got / "a.txt").read_text() == "alpha"
    assert (got / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()


def test_s3_incomplete_artifact_is_refused(s3_server, s3_bucket, tmp_path):
    s3_server.client().put_object(Bucket=s3_bucket, Key="half/a.txt", Body=b"x")
    with pytest.raises(UserError, match="_SUCCESS"):
        store.materialize(f"s3://{s3_bucket}/half", tmp_path / "dl")


def test_upload_checksum_mismatch_is_detected():
    import base64
    import hashlib

    good = hashlib.sha256(b"data").hexdigest()
    store.verify_put({"ChecksumSHA256": base64.b64encode(bytes.fromhex(good)).decode()}, good, None, "x")
    bad = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(UserError, match="checksum mismatch"):
        store.verify_put({"ChecksumSHA256": bad}, good, None, "x")
    with pytest.raises(UserError, match="checksum mismatch"):
        store.verify_put({"ETag": '"abc"'}, good, "def", "x")


def test_s3_write_read_bytes(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/one/file.json"
    store.write_bytes(uri, b'{"a": 1}')
    assert store.exists(uri)
    assert store.read_bytes(uri) == b'{"a": 1}'


def test_s3_outage_retries_then_clear_error(s3_server, s3_bucket, tmp_path):
    """Server down: retried with backoff, then one clear error; after restart it works again."""
    src = _make_artifact(tmp_path / "src")
    s3_server.stop()
    try:
        with pytest.raises(UserError, match="failed after"):
            store.publish(src, f"s3://{s3_bucket}/down")
    finally:
        s3_server.start()
    s3_server.client().create_bucket(Bucket=s3_bucket)  # moto keeps state in memory only
    store.publish(src, f"s3://{s3_bucket}/down")
    assert store.exists(f"s3://{s3_bucket}/down/_SUCCESS")
