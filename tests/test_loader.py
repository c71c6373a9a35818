"""The window loader: every window once per epoch, right values, shuffling, sharding, workers."""

from __future__ import annotations

import math
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from cloudburst.config import WindowConfig
from cloudburst.data import loader
from cloudburst.data.ingest import MARKER, StoreError, ingest, open_store
from cloudburst.data.loader import WindowDataset, make_loader
from cloudburst.data.transforms import Chain, Scale, Sqrt
from cloudburst.data.windows import WindowIndex, build_index

NT, NY, NX = 100, 12, 14
WINDOWS = WindowConfig(length=4, size=6, stride=2, max_nan_fraction=1.0)


def source() -> xr.Dataset:
    rng = np.random.default_rng(42)
    values = (rng.gamma(0.7, 8.0, (NT, NY, NX)) * (rng.random((NT, NY, NX)) < 0.4)).astype(
        np.float32
    )
    values[rng.random((NT, NY, NX)) < 0.08] = np.nan
    values[:, :3, :2] = np.nan
    values[17] = np.nan
    return xr.Dataset(
        {"precip": (("time", "lat", "lon"), values, {"units": "mm/day"})},
        coords={
            "time": pd.date_range("2005-01-01", periods=NT, freq="1D"),
            "lat": 50.0 - 0.1 * np.arange(NY),
            "lon": 5.0 + 0.1 * np.arange(NX),
        },
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """name -> (store path, values as stored, index): time-chunked and tiled layouts."""
    root = tmp_path_factory.mktemp("loader")
    out = {}
    for name, chunks in {
        "time16": {"time": 16},
        "tiled": {"time": 9, "y": 5, "x": 4},
    }.items():
        path = str(root / f"{name}.zarr")
        ingest(source(), path, chunks=chunks, progress=False)
        ds, _ = open_store(path)
        out[name] = (path, ds["precip"].values, build_index(ds, WINDOWS))
    return out


def dataset(store, **kw) -> WindowDataset:
    path, _, index = store
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return WindowDataset(path, index, **kw)


def origins_of(items) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in item["origin"]) for item in items]


def expected(values: np.ndarray, origin, shape) -> tuple[np.ndarray, np.ndarray]:
    t, y, x = origin
    length, sy, sx = shape
    raw = values[t : t + length, y : y + sy, x : x + sx]
    return np.nan_to_num(raw, nan=0.0), ~np.isnan(raw)


def assert_items_match(items, values: np.ndarray, index: WindowIndex, fill: float = 0.0):
    for item in items:
        want, valid = expected(values, item["origin"].tolist(), index.shape)
        want = np.where(valid, want, np.float32(fill))
        assert item["x"].dtype == torch.float32 and item["mask"].dtype == torch.bool
        assert tuple(item["x"].shape) == (1, *index.shape)
        np.testing.assert_array_equal(item["x"][0].numpy(), want)
        np.testing.assert_array_equal(item["mask"][0].numpy(), valid)


def index_set(index: WindowIndex) -> Counter:
    return Counter(tuple(int(v) for v in o) for o in index.origins)


# ---------------------------------------------------------------------------- one epoch


@pytest.mark.parametrize("name", ["time16", "tiled"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_yields_every_window_once_with_its_values(stores, name, shuffle):
    _, values, index = stores[name]
    assert np.isnan(values).any()
    items = list(dataset(stores[name], shuffle=shuffle, cache_blocks=3))
    assert Counter(origins_of(items)) == index_set(index)
    assert len(items) == len(index)
    assert_items_match(items, values, index)


def test_fill_value_and_no_mask(stores):
    _, values, index = stores["tiled"]
    items = list(dataset(stores["tiled"], fill_value=-1.5))
    assert_items_match(items, values, index, fill=-1.5)
    bare = next(iter(dataset(stores["tiled"], return_mask=False)))
    assert set(bare) == {"x", "origin"}


def test_transform_is_applied_to_the_filled_window(stores):
    _, values, index = stores["time16"]
    high = float(np.nanmax(values))
    transform = Chain(Sqrt(), Scale(0.0, math.sqrt(high), "symmetric"))
    items = list(dataset(stores["time16"], transform=transform))
    assert len(items) == len(index)
    for item in items:
        filled, valid = expected(values, item["origin"].tolist(), index.shape)
        want = np.sqrt(filled) / math.sqrt(high) * 2.0 - 1.0
        np.testing.assert_allclose(item["x"][0].numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(item["mask"][0].numpy(), valid)
        assert item["x"].min() >= -1.0 - 1e-6 and item["x"].max() <= 1.0 + 1e-6


# ---------------------------------------------------------------------------- order


def test_shuffle_is_seeded_by_seed_and_epoch(stores):
    a = dataset(stores["time16"], seed=3)
    first = origins_of(a)
    assert first == origins_of(a)  # same epoch, same order
    assert first == origins_of(dataset(stores["time16"], seed=3))  # a fresh copy agrees
    a.set_epoch(1)
    second = origins_of(a)
    assert second != first and sorted(second) == sorted(first)
    a.set_epoch(0)
    assert origins_of(a) == first
    other = origins_of(dataset(stores["time16"], seed=4))
    assert other != first and sorted(other) == sorted(first)
    # the shuffle mixes windows of different chunks, not only within one
    t0 = np.array([o[0] for o in first[: len(first) // 4]])
    assert np.ptp(t0) > 16


def test_shuffle_is_block_level_and_the_block_order_changes_with_the_epoch(stores):
    n_blocks = math.ceil(NT / 16)
    ds = dataset(stores["time16"], seed=1, shuffle_buffer_blocks=1)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        blocks = [o[0] // 16 for o in origins_of(ds)]
        visited = [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]
        assert sorted(visited) == list(range(n_blocks))  # each block's windows together
        orders.append(visited)
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert orders[0] != list(range(n_blocks)) or orders[1] != list(range(n_blocks))
    # with a buffer of 3 blocks, windows of a run stay inside that run's 3 blocks
    ds = dataset(stores["time16"], seed=1, shuffle_buffer_blocks=3)
    blocks = np.array([o[0] // 16 for o in origins_of(ds)])
    runs = blocks // 3
    changes = np.count_nonzero(np.diff(runs))
    assert changes == len(np.unique(runs)) - 1


@pytest.mark.parametrize("name", ["time16", "tiled"])
def test_no_shuffle_is_sorted_by_chunk_then_origin(stores, name):
    path, _, index = stores[name]
    got = origins_of(dataset(stores[name], shuffle=False))
    chunks = open_store(path)[0]["precip"].encoding["chunks"]
    want = sorted(
        index_set(index),
        key=lambda o: (*(v // c for v, c in zip(o, chunks, strict=True)), *o),
    )
    assert got == want
    if name == "time16":
        assert got == sorted(got)  # whole grids per chunk: plain origin order


# ---------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_disjoint_equal_shares(stores, world):
    _, values, index = stores["time16"]
    n = len(index)
    shares = []
    for rank in range(world):
        ds = dataset(stores["time16"], seed=11, rank=rank, world_size=world)
        ds.set_epoch(2)
        assert len(ds) == n // world
        shares.append(origins_of(ds))
    assert all(len(s) == n // world for s in shares)
    union = Counter(o for s in shares for o in s)
    assert max(union.values()) == 1  # disjoint
    reference = dataset(stores["time16"], seed=11, rank=0, world_size=1)
    reference.set_epoch(2)
    ids, _ = reference.epoch_sequence()
    assert sorted(ids.tolist()) == list(range(n))  # the sequence is a permutation
    head = {tuple(int(v) for v in index.origins[i]) for i in ids[: world * (n // world)]}
    assert set(union) == head


def test_dataloader_with_spawned_workers_reads_every_window_once(stores):
    _, values, index = stores["time16"]
    ds = dataset(stores["time16"], seed=5)
    loader_ = make_loader(ds, batch_size=7, num_workers=2, context="spawn")
    assert loader_.multiprocessing_context.get_start_method() == "spawn"
    items = []
    for batch in loader_:
        assert batch["x"].shape[1:] == (1, *index.shape)
        items += [{k: batch[k][i] for k in batch} for i in range(batch["x"].shape[0])]
    assert Counter(origins_of(items)) == index_set(index)
    assert_items_match(items, values, index)
    # a rank's share split across workers: the same windows as that rank reads alone
    ranked = dataset(stores["time16"], seed=5, rank=1, world_size=3)
    alone = Counter(origins_of(ranked))
    items = [
        {"origin": origin}
        for batch in make_loader(ranked, batch_size=16, num_workers=2, context="spawn")
        for origin in batch["origin"]
    ]
    assert Counter(origins_of(items)) == alone
    assert len(alone) == len(index) // 3


# ---------------------------------------------------------------------------- chunk reads


class RecordingCache(loader.ChunkCache):
    biggest = 0

    def get(self, key):
        out = super().get(key)
        RecordingCache.biggest = max(RecordingCache.biggest, len(self._lru))
        return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("cache_blocks", [2, 4, 8])
def test_each_chunk_decoded_about_once_per_epoch(stores, monkeypatch, shuffle, cache_blocks):
    path, _, index = stores["time16"]
    n_chunks = math.ceil(NT / 16)
    assert n_chunks >= 5
    monkeypatch.setattr(loader, "ChunkCache", RecordingCache)
    RecordingCache.biggest = 0
    ds = dataset(stores["time16"], shuffle=shuffle, cache_blocks=cache_blocks)
    before = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert sum(1 for _ in ds) == len(index)
        decoded = ds.stats["decoded_chunks"] - before
        before = ds.stats["decoded_chunks"]
        assert n_chunks <= decoded <= 1.5 * n_chunks, (epoch, decoded)
    assert 0 < RecordingCache.biggest <= ds.cache_chunks == max(cache_blocks, 4)


@pytest.mark.parametrize("shuffle", [False, True])
def test_tiled_store_decodes_each_chunk_about_once(stores, monkeypatch, shuffle):
    path, values, index = stores["tiled"]
    monkeypatch.setattr(loader, "ChunkCache", RecordingCache)
    RecordingCache.biggest = 0
    ds = dataset(stores["tiled"], shuffle=shuffle, cache_blocks=2)
    items = list(ds)
    arr = loader.open_array(str(path))
    n_chunks = math.prod(math.ceil(n / c) for n, c in zip(arr.shape, arr.chunks, strict=True))
    tiles = math.prod(math.ceil(n / c) for n, c in zip(arr.shape[1:], arr.chunks[1:], strict=True))
    # the cache grows to two time slabs of tiles, never past it, whatever cache_blocks says
    assert ds.cache_chunks == 2 * tiles + 2
    assert 0 < RecordingCache.biggest <= ds.cache_chunks
    assert n_chunks <= ds.stats["decoded_chunks"] <= 1.5 * n_chunks
    assert_items_match(items, values, index)


# ---------------------------------------------------------------------------- processes


def test_pickles_before_and_after_iteration(stores):
    ds = dataset(stores["time16"], seed=9)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._array is None
    first = origins_of(ds)
    assert ds._array is not None  # opened lazily by the iteration
    assert origins_of(copy) == first
    again = pickle.loads(pickle.dumps(ds))  # an opened array is not pickled
    assert again._array is None
    assert origins_of(again) == first


def test_incomplete_store_is_refused(stores, tmp_path):
    path = tmp_path / "incomplete.zarr"
    shutil.copytree(stores["time16"][0], path)
    index = stores["time16"][2]
    WindowDataset(str(path), index, rank=0, world_size=1)  # complete: fine
    (Path(path) / MARKER).unlink()
    with pytest.raises(FileNotFoundError, match="not a complete Cloudburst store"):
        WindowDataset(str(path), index, rank=0, world_size=1)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(str(path))
