"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest
import servers

# ---------------------------------------------------------------------------- object storage

# Local emulators only: no real credentials, no cloud metadata probes, no region guessing.
os.environ.update(servers.TEST_ENV)


def _serve(start):
    try:
        with start() as server:
            yield server
    except servers.ServerNotFound as exc:
        pytest.skip(f"object-store server not available: {exc}")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free loopback port: ``.endpoint``, ``.options``, ``.make_bucket``."""
    yield from _serve(servers.moto_s3_server)


@pytest.fixture(scope="session")
def gcs_server():
    """A fake-gcs-server on a free loopback port: ``.endpoint``, ``.options``, ``.make_bucket``."""
    yield from _serve(servers.fake_gcs_server)
