"""The latency injector of tests/faults.py: a proxy with ``delay_s`` in front of a moto S3 server
holds every request it forwards, counts it, and relays the server's answer unchanged."""

from __future__ import annotations

import uuid

import fsspec
import pytest
from faults import FaultProxy

pytestmark = pytest.mark.integration

DELAY_S = 0.05
READS = 10
PAYLOAD = b"cloudburst latency probe"


def s3(endpoint: str) -> fsspec.AbstractFileSystem:
    """A fresh s3fs filesystem at ``endpoint`` (no instance shared with other tests)."""
    return fsspec.filesystem(
        "s3", key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True
    )


@pytest.fixture(scope="module")
def probe(s3_server) -> str:
    bucket = s3_server.make_bucket(f"latency-{uuid.uuid4().hex[:8]}")
    path = f"{bucket.removeprefix('s3://')}/probe.bin"
    s3(s3_server.endpoint).pipe_file(path, PAYLOAD)
    return path


def test_every_forwarded_request_is_delayed(s3_server, probe):
    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=DELAY_S) as proxy:
        fs = s3(proxy.endpoint)
        # ranged reads: one GET each (a whole-object read also sends a HEAD for the size)
        assert fs.cat_file(probe, start=0, end=len(PAYLOAD)) == PAYLOAD  # warm the client
        before = (proxy.forwarded, proxy.delayed, proxy.by_method["GET"])
        reads = [fs.cat_file(probe, start=0, end=len(PAYLOAD)) for _ in range(READS)]
        after = (proxy.forwarded, proxy.delayed, proxy.by_method["GET"])
    assert reads == [PAYLOAD] * READS
    assert after[0] - before[0] == READS  # each read reached the server once
    assert after[1] - before[1] == READS  # and was held
    assert after[2] - before[2] == READS  # as a GET
    assert proxy.delayed == proxy.forwarded == sum(proxy.by_method.values())
    assert proxy.injected == 0
    assert proxy.delayed_s == pytest.approx(proxy.delayed * DELAY_S)


def test_no_delay_by_default(s3_server, probe):
    with FaultProxy(s3_server.endpoint, fraction=0.0) as proxy:
        assert s3(proxy.endpoint).cat_file(probe) == PAYLOAD
    assert proxy.forwarded >= 1
    assert (proxy.delayed, proxy.delayed_s) == (0, 0.0)


def test_faulted_requests_are_delayed_too(s3_server, probe):
    import http.client
    import urllib.parse

    with FaultProxy(s3_server.endpoint, fraction=1.0, kinds=("503",), delay_s=DELAY_S) as proxy:
        parsed = urllib.parse.urlsplit(proxy.endpoint)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        conn.request("GET", f"/{probe}")
        status = conn.getresponse().status
        conn.close()
    assert status == 503
    assert (proxy.injected, proxy.forwarded, proxy.delayed) == (1, 0, 1)


@pytest.mark.parametrize("delay_s", [-0.01, float("nan")])
def test_a_negative_or_nan_delay_is_refused(delay_s):
    with pytest.raises(ValueError, match="delay_s"):
        FaultProxy("http://127.0.0.1:1", fraction=0.0, delay_s=delay_s)


def test_requests_in_flight_are_counted(s3_server, probe):
    import http.client
    import urllib.parse

    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=0.3) as proxy:
        parsed = urllib.parse.urlsplit(proxy.endpoint)
        fs = s3(proxy.endpoint)
        for _ in range(3):  # one after the other: never two at once
            assert fs.cat_file(probe, start=0, end=len(PAYLOAD)) == PAYLOAD
        serial = proxy.max_in_flight
        proxy.reset_max_in_flight()
        conns = [
            http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10) for _ in "abc"
        ]
        for conn in conns:  # all sent before any answer is read: each held 0.3 s at once
            conn.request("GET", "/moto-api/")  # moto's own page: no signature needed
        statuses = []
        for conn in conns:
            statuses.append(conn.getresponse().status)
            conn.close()
        overlapped = proxy.max_in_flight
    assert serial == 1
    assert statuses == [200, 200, 200]
    assert overlapped >= 2
