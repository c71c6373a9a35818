"""Reading and writing cloud Zarr at cloud latency: the window loader keeps chunk reads in
flight (prefetching the next run while one is consumed) and ingest writes chunks concurrently,
with the same results as serial, local reads. Concurrency is shown by the latency injector of
tests/faults.py, which counts the requests it holds at once (no timing is asserted)."""

from __future__ import annotations

import gc
import math
import pickle
import threading
import uuid
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from faults import FaultProxy

from cloudburst import storage
from cloudburst.config import WindowConfig
from cloudburst.data.ingest import ingest, open_store
from cloudburst.data.loader import PREFETCH_THREAD_PREFIX, WindowDataset
from cloudburst.data.windows import build_index

pytestmark = pytest.mark.integration

NT, NY, NX = 48, 12, 14
CHUNKS = {"time": 8, "y": 6, "x": 7}  # 6 time slabs of 2 x 2 tiles: 24 chunks
N_CHUNKS = math.ceil(NT / 8) * math.ceil(NY / 6) * math.ceil(NX / 7)
WINDOWS = WindowConfig(length=4, size=6, stride=2, time_stride=2, max_nan_fraction=1.0)
DELAY_S = 0.05
IN_FLIGHT = 4


def source() -> xr.Dataset:
    rng = np.random.default_rng(7)
    values = (rng.gamma(0.7, 8.0, (NT, NY, NX)) * (rng.random((NT, NY, NX)) < 0.4)).astype(
        np.float32
    )
    values[rng.random((NT, NY, NX)) < 0.08] = np.nan
    return xr.Dataset(
        {"precip": (("time", "lat", "lon"), values, {"units": "mm/day"})},
        coords={
            "time": pd.date_range("2001-01-01", periods=NT, freq="1D"),
            "lat": 50.0 - 0.1 * np.arange(NY),
            "lon": 5.0 + 0.1 * np.arange(NX),
        },
    )


def options(url: str, endpoint: str) -> dict:
    return storage.storage_options(
        url, endpoint_url=endpoint, extra={"key": "testing", "secret": "testing"}
    )


@pytest.fixture(scope="module")
def stores(s3_server, tmp_path_factory):
    """(local path, S3 URL, window index, source values): one source, written to both."""
    local = str(tmp_path_factory.mktemp("cloud-reads") / "local.zarr")
    ingest(source(), local, chunks=CHUNKS, progress=False)
    url = f"{s3_server.make_bucket(f'cloud-reads-{uuid.uuid4().hex[:8]}')}/store.zarr"
    opts = options(url, s3_server.endpoint)
    ingest(source(), url, chunks=CHUNKS, target_options=opts, progress=False)
    index = build_index(open_store(local)[0], WINDOWS)
    return local, url, index, source()["precip"].values


def dataset(store: str, index, opts=None, **kw) -> WindowDataset:
    kw.setdefault("shuffle_buffer_blocks", 2)  # 3 runs: the next run is prefetched twice
    return WindowDataset(store, index, storage_options=opts, seed=4, rank=0, world_size=1, **kw)


def read(ds: WindowDataset) -> list[dict]:
    items = []
    for item in ds:
        items.append({k: v.numpy() for k, v in item.items()})
    return items


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert set(a) == set(b) == {"x", "mask", "origin"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def prefetch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(PREFETCH_THREAD_PREFIX)]


# ---------------------------------------------------------------------------- reads


def test_prefetched_windows_through_latency_equal_serial_local_ones(s3_server, stores):
    local, url, index, values = stores
    reference = dataset(local, index, prefetch_requests=0)
    reference.set_epoch(1)
    want = read(reference)
    assert len(want) == len(index)
    length, sy, sx = index.shape
    for item in want:  # the reference itself: the stored values, NaN filled, with their mask
        t, y, x = item["origin"]
        raw = values[t : t + length, y : y + sy, x : x + sx]
        np.testing.assert_array_equal(item["x"][0], np.nan_to_num(raw, nan=0.0))
        np.testing.assert_array_equal(item["mask"][0], ~np.isnan(raw))

    direct = dataset(url, index, options(url, s3_server.endpoint), prefetch_requests=IN_FLIGHT)
    direct.set_epoch(1)
    assert_same(read(direct), want)

    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=DELAY_S) as proxy:
        ds = dataset(url, index, options(url, proxy.endpoint), prefetch_requests=IN_FLIGHT)
        ds.set_epoch(1)
        before = Counter(proxy.by_method)
        proxy.reset_max_in_flight()
        got = read(ds)
        seen = Counter(proxy.by_method) - before
    assert_same(got, want)
    # chunk reads overlapped in time, never more than asked for
    assert 1 < proxy.max_in_flight <= IN_FLIGHT
    # one GET per chunk read, beside the group's and the array's metadata; no HEAD first
    assert seen == Counter({"GET": ds.stats["decoded_chunks"] + 2})


def test_prefetch_off_reads_one_chunk_at_a_time(s3_server, stores):
    local, url, index, _ = stores
    want = read(dataset(local, index, prefetch_requests=0))
    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=DELAY_S) as proxy:
        ds = dataset(url, index, options(url, proxy.endpoint), prefetch_requests=0)
        before = proxy.by_method["HEAD"]
        proxy.reset_max_in_flight()
        got = read(ds)
        heads = proxy.by_method["HEAD"] - before
    assert_same(got, want)
    assert proxy.max_in_flight == 1
    assert heads == 0


@pytest.mark.parametrize("shuffle", [True, False])
def test_prefetch_decodes_each_chunk_about_once_per_epoch(stores, shuffle):
    local, _, index, _ = stores
    serial = dataset(local, index, shuffle=shuffle, prefetch_requests=0)
    ahead = dataset(local, index, shuffle=shuffle, prefetch_requests=IN_FLIGHT)
    for epoch in range(3):
        counts = []
        for ds in (serial, ahead):
            ds.set_epoch(epoch)
            before = ds.stats["decoded_chunks"]
            assert sum(1 for _ in ds) == len(index)
            counts.append(ds.stats["decoded_chunks"] - before)
        # never more decodes than reading chunk by chunk, and each chunk at least once
        assert N_CHUNKS <= counts[1] <= counts[0] <= 1.5 * N_CHUNKS, (epoch, counts)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_an_abandoned_iteration_leaves_no_prefetch_thread(s3_server, stores, how):
    _, url, index, _ = stores
    assert prefetch_threads() == []
    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=DELAY_S) as proxy:
        ds = dataset(url, index, options(url, proxy.endpoint), prefetch_requests=IN_FLIGHT)
        windows = iter(ds)
        for _ in range(3):
            next(windows)
        assert prefetch_threads() != []  # the next run is being read meanwhile
        if how == "close":
            windows.close()
        else:
            del windows
            gc.collect()
        assert prefetch_threads() == []
    assert ds.stats["decoded_chunks"] > 0


def test_a_dataset_pickles_while_it_is_being_read(s3_server, stores):
    _, url, index, _ = stores
    ds = dataset(url, index, options(url, s3_server.endpoint), prefetch_requests=IN_FLIGHT)
    windows = iter(ds)
    first = next(windows)
    copy = pickle.loads(pickle.dumps(ds))  # no pool, thread or store handle in the state
    windows.close()
    assert copy._array is None
    again = read(copy)
    assert len(again) == len(index)
    np.testing.assert_array_equal(again[0]["origin"], first["origin"].numpy())
    np.testing.assert_array_equal(again[0]["x"], first["x"].numpy())


def test_prefetch_requests_must_not_be_negative(stores):
    local, _, index, _ = stores
    with pytest.raises(ValueError, match="prefetch_requests"):
        dataset(local, index, prefetch_requests=-1)


# ---------------------------------------------------------------------------- writes


def test_ingest_writes_chunks_concurrently_through_latency(s3_server):
    url = f"{s3_server.make_bucket(f'cloud-writes-{uuid.uuid4().hex[:8]}')}/store.zarr"
    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=DELAY_S) as proxy:
        opts = options(url, proxy.endpoint)
        ingest(source(), url, chunks=CHUNKS, target_options=opts, progress=False)
        puts = proxy.by_method["PUT"]
    assert proxy.max_in_flight > 1  # chunk PUTs overlapped in time
    assert puts >= N_CHUNKS
    stored, _ = open_store(url, options(url, s3_server.endpoint))
    np.testing.assert_array_equal(stored["precip"].values, source()["precip"].values)


def test_an_ensemble_chunk_writes_its_objects_concurrently_through_latency(s3_server):
    from cloudburst.ensembles.store import EnsembleStore, Layout

    url = f"{s3_server.make_bucket(f'ensemble-writes-{uuid.uuid4().hex[:8]}')}/ens.zarr"
    layout = Layout(members=40, window=(2, 3, 3), chunk_members=20)
    rng = np.random.default_rng(0)
    precip = rng.random((20, 2, 3, 3), dtype=np.float32)
    with FaultProxy(s3_server.endpoint, fraction=0.0, delay_s=DELAY_S) as proxy:
        opts = options(url, proxy.endpoint)
        store = EnsembleStore.open(
            url, opts, layout=layout, identity={"test": 1}, attrs={}, units="mm/day"
        )
        proxy.reset_max_in_flight()
        puts = proxy.by_method["PUT"]
        store.write_chunk(1, precip, np.ones(20), np.arange(20, 40), {"draws": [20, 40]})
        puts = proxy.by_method["PUT"] - puts
    assert proxy.max_in_flight > 1  # the chunk's precip, weight and candidate PUTs overlapped
    assert puts >= 4  # three objects, then the progress record
    written = xr.open_zarr(
        url, consolidated=False, storage_options=options(url, s3_server.endpoint)
    )
    assert written.precip.values[20:].tobytes() == precip.tobytes()
    assert np.isnan(written.precip.values[:20]).all()
    assert list(EnsembleStore(url, options(url, s3_server.endpoint), layout).done()) == [1]
