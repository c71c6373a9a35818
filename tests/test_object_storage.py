"""Ingest, references and failures against real object-store servers (moto S3, fake-gcs-server).

The servers run on free loopback ports (see servers.py / conftest.py); the data is the real
Fraser sample from ../shared/data, kept to a few years so the whole file runs in seconds.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import dask.array as dsa
import numpy as np
import pytest
import servers
import xarray as xr
from samples import needs_data
from servers import free_port

from cloudburst import storage
from cloudburst.data import ingest, references, sources

pytestmark = pytest.mark.integration

START, END = "1990-01-01", "1992-12-31"  # three years: 1,096 steps of 14 x 31 cells


@pytest.fixture(scope="module")
def fraser() -> str:
    return str(needs_data("fraser_daily_1986_2017.nc"))


@pytest.fixture(scope="module")
def local_fraser(fraser):
    """The selected years read locally: the reference every remote read must equal."""
    return sources.open_source(fraser, time_start=START, time_end=END).load()


@pytest.fixture(params=["s3", "gcs"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def equal_nan(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def run_ingest(src, target: str, options: dict | None = None, **kw) -> ingest.IngestResult:
    return ingest.ingest(
        src, target, time_start=START, time_end=END, target_options=options, progress=False, **kw
    )


def unreachable_options(protocol: str) -> dict:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    if protocol == "s3":
        return {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    return {"token": "anon", "project": "test", "endpoint_url": endpoint}


# ---------------------------------------------------------------------------- ingest


def test_ingest_same_store_on_s3_gcs_and_local(
    fraser, local_fraser, s3_server, gcs_server, tmp_path
):
    local = run_ingest(fraser, str(tmp_path / "x.zarr"))
    assert not local.skipped
    assert local.shape == (1096, 14, 31)
    ref_ds, ref_stats = ingest.open_store(str(tmp_path / "x.zarr"))
    assert equal_nan(ref_ds.precip.values, local_fraser.precip.values)
    assert ref_stats == local.stats

    for srv in (s3_server, gcs_server):
        url = f"{srv.make_bucket(unique('ingest'))}/x.zarr"
        first = run_ingest(fraser, url, srv.options)
        assert not first.skipped, srv.name
        ds, stats = ingest.open_store(url, srv.options)
        assert ds.precip.dims == ("time", "y", "x")
        assert equal_nan(ds.precip.values, ref_ds.precip.values), srv.name
        np.testing.assert_array_equal(ds.time.values, ref_ds.time.values)
        np.testing.assert_array_equal(ds.lat.values, ref_ds.lat.values)
        np.testing.assert_array_equal(ds.lon.values, ref_ds.lon.values)
        assert stats == ref_stats, srv.name
        assert stats.to_dict() == first.stats.to_dict()
        assert ds.precip.attrs["units"] == "mm/day"

        again = run_ingest(fraser, url, srv.options)
        assert again.skipped, f"re-ingest on {srv.name} should be a no-op"
        assert again.stats == stats


# ---------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def fraser_parts(fraser, tmp_path_factory):
    """Two NetCDF4 files of one year each, with their own time units, chunked and compressed."""
    folder = tmp_path_factory.mktemp("parts")
    paths = []
    with xr.open_dataset(fraser) as raw:
        for year in ("1990", "1991"):
            part = raw.sel(time=slice(f"{year}-01-01", f"{year}-12-31"))
            path = folder / f"fraser_{year}.nc"
            part.to_netcdf(
                path,
                engine="netcdf4",
                encoding={
                    "precip": {"chunksizes": (73, 14, 31), "zlib": True},
                    "time": {"units": f"days since {year}-01-01"},
                },
            )
            paths.append(path)
    return paths


def upload(srv, local: Path | str, url: str) -> None:
    fs, path = storage.filesystem(url, srv.options)
    fs.put_file(str(local), path)


def test_remote_netcdf_through_references(fraser, local_fraser, server):
    url = f"{server.make_bucket(unique('refs'))}/fraser.nc"
    upload(server, fraser, url)
    ds = sources.open_source(url, storage_options=server.options, time_start=START, time_end=END)
    assert ds.attrs["cloudburst_source"] == url
    assert equal_nan(ds.precip.values, local_fraser.precip.values)
    np.testing.assert_array_equal(ds.time.values, local_fraser.time.values)


def test_references_over_two_remote_files_combined_along_time(fraser, fraser_parts, server):
    bucket = server.make_bucket(unique("multi"))
    for path in fraser_parts:
        upload(server, path, f"{bucket}/nc/{path.name}")
    refs = references.build_references(f"{bucket}/nc/fraser_*.nc", server.options)
    json_url = f"{bucket}/refs/fraser.json"
    references.write_references(refs, json_url, server.options)

    ds = sources.open_source(json_url, storage_options=server.options)
    local = sources.open_source(fraser, time_start="1990-01-01", time_end="1991-12-31")
    assert ds.sizes["time"] == 730
    np.testing.assert_array_equal(ds.time.values, local.time.values)
    assert np.all(np.diff(ds.time.values) == np.timedelta64(1, "D"))
    assert equal_nan(ds.precip.values, local.precip.values)


def test_local_references_over_two_files_combined_along_time(fraser, fraser_parts, tmp_path):
    """The same combination from local files works: the failure above is remote-only."""
    refs = references.build_references([str(p) for p in fraser_parts])
    json_path = str(tmp_path / "fraser.json")
    references.write_references(refs, json_path)
    ds = sources.open_source(json_path)
    local = sources.open_source(fraser, time_start="1990-01-01", time_end="1991-12-31")
    np.testing.assert_array_equal(ds.time.values, local.time.values)
    assert equal_nan(ds.precip.values, local.precip.values)


def test_open_references_leaves_the_callers_options_alone(fraser, s3_server):
    url = f"{s3_server.make_bucket(unique('opts'))}/fraser.nc"
    upload(s3_server, fraser, url)
    opts = s3_server.options
    before = dict(opts)
    sources.open_source(url, storage_options=opts, time_start=START, time_end=END)
    assert opts == before


# ---------------------------------------------------------------------------- failures


def test_ingest_into_missing_bucket(fraser, server):
    bucket = unique("absent")
    url = f"{server.protocol}://{bucket}/x.zarr"
    with pytest.raises(storage.StorageError, match=f"bucket '{bucket}'.*does not exist"):
        run_ingest(fraser, url, server.options)
    fs, _ = storage.filesystem(url, server.options)
    fs.invalidate_cache()
    assert not fs.exists(bucket), "a failed ingest must not create the bucket"


def refused_at(endpoint: str, error: pytest.ExceptionInfo) -> None:
    """The error is the endpoint pre-check's: it names the endpoint and the TCP probe's answer
    (refused at once), not a client that gave up after its retries and read timeouts."""
    message = str(error.value)
    assert f"cannot reach the object-store endpoint {endpoint}" in message
    assert "refused" in message.lower()
    assert "CLOUDBURST_ENDPOINT_URL" in message  # and says what to check


@pytest.mark.parametrize("protocol", ["s3", "gs"])
def test_unreachable_endpoint_fails_fast(fraser, protocol):
    opts = unreachable_options(protocol)
    endpoint = opts["endpoint_url"]
    target = f"{protocol}://bucket/x.zarr"
    with pytest.raises(storage.StorageError) as e:
        run_ingest(fraser, target, opts)
    refused_at(endpoint, e)
    with pytest.raises(storage.StorageError) as e:
        ingest.open_store(target, opts)
    refused_at(endpoint, e)
    with pytest.raises(storage.StorageError) as e:
        sources.open_source(f"{protocol}://bucket/fraser.nc", storage_options=opts)
    refused_at(endpoint, e)


@pytest.mark.parametrize("path", ["refs/fraser.json", "nc/*.nc"])
def test_unreachable_endpoint_for_references_fails_fast(path):
    url = f"s3://bucket/{path}"
    endpoint = f"http://127.0.0.1:{free_port()}"
    opts = storage.storage_options(url, endpoint_url=endpoint)
    with pytest.raises(storage.StorageError) as e:
        sources.open_source(url, storage_options=opts)
    refused_at(endpoint, e)


def test_unreachable_endpoint_with_environment_options(fraser, monkeypatch):
    """The options the CLI builds (CLOUDBURST_ENDPOINT_URL) fail as fast."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("CLOUDBURST_ENDPOINT_URL", endpoint)
    for url in ("s3://bucket/x.zarr", "gs://bucket/x.zarr"):
        opts = storage.storage_options(url)
        assert opts["endpoint_url"] == endpoint
        with pytest.raises(storage.StorageError) as e:
            storage.check_writable(url, opts)
        refused_at(endpoint, e)


def test_storage_primitives(server):
    bucket = server.make_bucket(unique("prims"))
    opts = server.options
    storage.check_reachable(f"{bucket}/a/b", opts)
    storage.check_writable(f"{bucket}/out", opts)
    url = f"{bucket}/out/blob.bin"
    storage.write_bytes_atomic(url, b"first", opts)
    storage.write_bytes_atomic(url, b"second", opts)
    assert storage.read_bytes(url, opts) == b"second"
    assert storage.exists(url, opts)
    fs, path = storage.filesystem(f"{bucket}/out", opts)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == ["blob.bin"], "write probe left behind"
    storage.remove(f"{bucket}/out", opts)
    assert not storage.exists(url, opts)


def test_reading_missing_store_or_file(server):
    bucket = server.make_bucket(unique("empty"))
    with pytest.raises(ingest.StoreError, match="no store at"):
        ingest.open_store(f"{bucket}/nothing.zarr", server.options)
    with pytest.raises(sources.SourceError, match="no such file or store"):
        sources.open_source(f"{bucket}/nothing.nc", storage_options=server.options)
    with pytest.raises(references.ReferenceError, match="no such reference file"):
        sources.open_source(f"{bucket}/nothing.json", storage_options=server.options)
    absent = unique("nobucket")
    with pytest.raises(storage.StorageError, match=f"bucket '{absent}'.*does not exist"):
        ingest.open_store(f"{server.protocol}://{absent}/x.zarr", server.options)


def failing_source(fraser: str, fail_from: int) -> xr.Dataset:
    """The selected years, lazily; reading any chunk at or past step ``fail_from`` raises."""
    ds = sources.open_source(fraser, time_start=START, time_end=END)
    data = ds.precip.data.rechunk((100, -1, -1))

    def read(block, block_info=None):
        if block_info[0]["array-location"][0][1] > fail_from:
            raise OSError("source read failed (simulated)")
        return block

    ds["precip"] = ds.precip.copy(data=dsa.map_blocks(read, data, dtype=data.dtype))
    return ds


def test_failed_ingest_removes_what_it_wrote(fraser, server):
    url = f"{server.make_bucket(unique('fail'))}/x.zarr"
    with pytest.raises(OSError, match="simulated"):
        run_ingest(failing_source(fraser, 500), url, server.options)
    assert not storage.exists(url, server.options), "a failed ingest must remove its store"
    with pytest.raises(ingest.StoreError, match="no store"):
        ingest.open_store(url, server.options)


def test_interrupted_ingest_is_refused_as_incomplete(fraser, local_fraser, server, monkeypatch):
    url = f"{server.make_bucket(unique('cut'))}/x.zarr"
    # a process killed mid-write never cleans up: simulate it by disabling the cleanup
    with monkeypatch.context() as m:
        m.setattr(storage, "remove", lambda *a, **k: None)
        with pytest.raises(OSError, match="simulated"):
            run_ingest(failing_source(fraser, 500), url, server.options)
    assert storage.exists(storage.join(url, "zarr.json"), server.options), "partial store kept"
    with pytest.raises(ingest.StoreError, match="incomplete"):
        ingest.open_store(url, server.options)

    # re-running the ingest over the partial store completes it
    done = run_ingest(fraser, url, server.options)
    assert not done.skipped
    ds, _ = ingest.open_store(url, server.options)
    assert equal_nan(ds.precip.values, local_fraser.precip.values)

    # a complete store whose marker is gone is incomplete too, and is rewritten, not skipped
    storage.remove(storage.join(url, ingest.MARKER), server.options, recursive=False)
    with pytest.raises(ingest.StoreError, match="incomplete"):
        ingest.open_store(url, server.options)
    assert not run_ingest(fraser, url, server.options).skipped
    assert run_ingest(fraser, url, server.options).skipped


# ---------------------------------------------------------------------------- test servers


def test_a_server_whose_port_was_taken_is_started_on_another(monkeypatch):
    with servers.first_pick_taken(monkeypatch) as taken:
        try:
            with servers.moto_s3_server() as server:
                assert server.endpoint != f"http://127.0.0.1:{taken.port}"
                bucket = server.make_bucket(unique("retried"))
                storage.check_writable(f"{bucket}/x", server.options)
        except servers.ServerNotFound as exc:
            pytest.skip(f"object-store server not available: {exc}")
        assert taken.tried()  # the taken port was tried first


def test_a_server_that_never_gets_ready_is_stopped(monkeypatch):
    monkeypatch.setattr(servers, "READY_TIMEOUT_S", 1.0)
    spawned = []
    real_spawn = servers._spawn

    def spawn(*args, **kwargs):
        proc = real_spawn(*args, **kwargs)
        spawned.append(proc)
        return proc

    monkeypatch.setattr(servers, "_spawn", spawn)
    silent = [sys.executable, "-c", "import time; time.sleep(600)"]  # never answers HTTP
    with (
        pytest.raises(servers.ServerError, match="silent did not answer"),
        servers._running(lambda _port: silent, None, "/", "silent"),
    ):
        pytest.fail("a server that never answered was handed out")
    (proc,) = spawned  # running but not ready: not retried, and stopped
    assert proc.returncode is not None
