"""Fixtures for the data tests: buckets on the shared moto S3 server (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def moto_s3(s3_server):
    """The shared loopback S3 server (tests/conftest.py); yields its endpoint URL."""
    return s3_server.endpoint


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh bucket on the moto server; the store is configured to talk to it."""
    import uuid

    import boto3

    from r1zero import store
    from r1zero.config import StoreConfig

    store.configure(StoreConfig())
    name = f"r1zero-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1").create_bucket(Bucket=name)
    yield name
    store.configure(StoreConfig())
