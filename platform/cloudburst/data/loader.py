"""A torch dataset of windows that reads each Zarr chunk about once per epoch.

Per-window reads (xarray, xbatcher) decompress every chunk a window touches, again for every
window: hundreds of windows/s. Here windows are grouped by the chunk that holds their origin
("blocks"); a block's region (the chunk plus the halo its windows reach into) is assembled
from an LRU cache of decoded chunks, and windows are cut from it as numpy views.

Shuffling is block-level: ``shuffle_buffer_blocks`` consecutive time slabs of chunks form a
run, runs are visited in a random order (seeded by seed and epoch), and the windows of one run
are shuffled together. The chunk cache holds at least two time slabs, so each chunk is decoded
about once per epoch. Memory is bounded by the cache and one run, not by the store.

Sharding: the epoch's window sequence is cut into equal contiguous parts, one per Ray Train
rank, then one per DataLoader worker, so every rank sees the same number of windows (DDP
needs that) and each keeps chunk locality. The store is opened lazily in each process (no
handle crosses a fork or a pickle), so the dataset is safe with spawn/forkserver workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cloudburst import storage
from cloudburst.data.ingest import read_marker
from cloudburst.data.sources import PRECIP
from cloudburst.data.transforms import Transform
from cloudburst.data.windows import WindowIndex


def open_array(store: str, options: dict[str, Any] | None = None) -> Any:
    """The ``precip`` zarr array of a store, opened directly (no xarray, no dask)."""
    import zarr

    group = zarr.open_group(storage.zarr_store(store, options, read_only=True), mode="r")
    return group[PRECIP]


def ray_rank() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker, else (0, 1)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:  # noqa: BLE001 - outside a Ray Train session
        return 0, 1


class ChunkCache:
    """Decoded chunks of one zarr array, least recently used evicted; counts decodes."""

    def __init__(self, array: Any, capacity: int) -> None:
        self.array = array
        self.capacity = max(1, capacity)
        self.chunk = tuple(int(c) for c in array.chunks)
        self.shape = tuple(int(s) for s in array.shape)
        self._lru: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.decoded = 0
        self.bytes_decoded = 0

    def get(self, key: tuple[int, ...]) -> np.ndarray:
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit
        sl = tuple(
            slice(k * c, min((k + 1) * c, n))
            for k, c, n in zip(key, self.chunk, self.shape, strict=True)
        )
        data = np.asarray(self.array[sl])
        self.decoded += 1
        self.bytes_decoded += data.nbytes
        self._lru[key] = data
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return data

    def region(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
        """``array[start:stop]`` assembled from cached chunks."""
        out = np.empty([b - a for a, b in zip(start, stop, strict=True)], dtype=np.float32)
        ranges = [
            range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, self.chunk, strict=True)
        ]
        for kt in ranges[0]:
            for ky in ranges[1]:
                for kx in ranges[2]:
                    key = (kt, ky, kx)
                    data = self.get(key)
                    src, dst = [], []
                    for d, k in enumerate(key):
                        c0 = k * self.chunk[d]
                        lo, hi = max(start[d], c0), min(stop[d], c0 + data.shape[d])
                        src.append(slice(lo - c0, hi - c0))
                        dst.append(slice(lo - start[d], hi - start[d]))
                    out[tuple(dst)] = data[tuple(src)]
        return out


class WindowDataset(IterableDataset):
    """Windows of ``index`` from ``store`` as dicts of tensors.

    Each item: ``x`` float32 (1, length, y, x) with NaN filled by ``fill_value`` (then
    transformed), ``mask`` bool (1, length, y, x) true where data are valid, ``origin`` int64
    (t0, y0, x0).
    """

    def __init__(
        self,
        store: str,
        index: WindowIndex,
        *,
        storage_options: dict[str, Any] | None = None,
        transform: Transform | None = None,
        shuffle: bool = True,
        seed: int = 0,
        cache_blocks: int = 8,
        shuffle_buffer_blocks: int = 4,
        fill_value: float = 0.0,
        rank: int | None = None,
        world_size: int | None = None,
        return_mask: bool = True,
    ) -> None:
        super().__init__()
        if read_marker(store, storage_options) is None:
            raise FileNotFoundError(f"{store} is not a complete Cloudburst store; ingest it first")
        self.store = store
        self.storage_options = storage_options
        self.index = index
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.cache_blocks = max(2, cache_blocks)
        self.buffer_blocks = max(1, shuffle_buffer_blocks)
        self.fill_value = float(fill_value)
        self.rank, self.world_size = rank, world_size
        self.return_mask = return_mask
        self.epoch = 0
        self._array: Any = None
        self.stats = {"decoded_chunks": 0, "decoded_bytes": 0}
        chunks = open_array(store, storage_options).chunks
        self.chunks = tuple(int(c) for c in chunks)
        # block of every window: the chunk holding its origin, as one sortable int
        grid = [-(-n // c) for n, c in zip(index.grid, self.chunks, strict=True)]
        key = index.origins // np.asarray(self.chunks)
        self._block = (key[:, 0] * grid[1] + key[:, 1]) * grid[2] + key[:, 2]
        self._order = np.argsort(self._block, kind="stable")
        # blocks run time-major; a block's halo reaches the next tile row/column and the next
        # time slab, so the cache holds at least two time slabs of tiles (one decode each)
        self.cache_chunks = max(self.cache_blocks, 2 * grid[1] * grid[2] + 2)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None  # reopened lazily in each process
        return state

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same on every rank and worker)."""
        self.epoch = int(epoch)

    def _world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        return ray_rank()

    def __len__(self) -> int:
        return len(self.index) // self._world()[1]

    def epoch_sequence(self) -> tuple[np.ndarray, np.ndarray]:
        """(window ids, run id of each) in this epoch's global order.

        A run is ``shuffle_buffer_blocks`` consecutive time slabs of chunks (all spatial tiles of
        a slab belong to one run, so a shuffled order never revisits a slab).
        """
        order = self._order
        slab = self.index.origins[order, 0] // self.chunks[0]
        _, slab_rank = np.unique(slab, return_inverse=True)
        runs = slab_rank.ravel() // self.buffer_blocks
        n_runs = int(runs.max()) + 1 if len(runs) else 0
        if not self.shuffle or n_runs == 0:
            return order, runs
        rng = np.random.default_rng([self.seed, self.epoch])
        run_rank = np.empty(n_runs, dtype=np.int64)
        run_rank[rng.permutation(n_runs)] = np.arange(n_runs)
        perm = np.argsort(run_rank[runs], kind="stable")
        return order[perm], runs[perm]

    def my_share(self) -> tuple[np.ndarray, np.ndarray]:
        """The part of the epoch sequence this rank and DataLoader worker reads."""
        ids, runs = self.epoch_sequence()
        rank, world = self._world()
        per_rank = len(ids) // world
        ids = ids[rank * per_rank : (rank + 1) * per_rank]
        runs = runs[rank * per_rank : (rank + 1) * per_rank]
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            parts = np.array_split(np.arange(len(ids)), info.num_workers)[info.id]
            ids, runs = ids[parts], runs[parts]
        return ids, runs

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # small per-window ops are far faster single-threaded
        if self._array is None:
            self._array = open_array(self.store, self.storage_options)
        cache = ChunkCache(self._array, self.cache_chunks)
        ids, runs = self.my_share()
        rng = np.random.default_rng(
            [
                self.seed,
                self.epoch,
                1 + self._world()[0],
                get_worker_info().id if get_worker_info() else 0,
            ]
        )
        bounds = np.r_[0, np.nonzero(np.diff(runs))[0] + 1, len(ids)]
        try:
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                yield from self._run(cache, ids[a:b], rng)
        finally:
            self.stats["decoded_chunks"] += cache.decoded
            self.stats["decoded_bytes"] += cache.bytes_decoded

    def _run(
        self, cache: ChunkCache, ids: np.ndarray, rng: np.random.Generator
    ) -> Iterator[dict[str, torch.Tensor]]:
        length, sy, sx = self.index.shape
        shape = np.asarray([length, sy, sx])
        origins = self.index.origins[ids]
        blocks = self._block[ids]
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]] = []
        for block in np.unique(blocks):
            sel = blocks == block
            o = origins[sel]
            start = o.min(axis=0)
            stop = o.max(axis=0) + shape
            raw = cache.region(tuple(start), tuple(stop))
            valid = ~np.isnan(raw)
            filled = np.where(valid, raw, np.float32(self.fill_value))
            if self.transform is not None:
                filled = np.asarray(self.transform.forward(filled), dtype=np.float32)
            pieces.append((filled, o - start, valid if self.return_mask else None, o))
        flat = [(p, k) for p, piece in enumerate(pieces) for k in range(len(piece[1]))]
        order = rng.permutation(len(flat)) if self.shuffle else np.arange(len(flat))
        for j in order:
            p, k = flat[j]
            data, rel, valid, o = pieces[p]
            t, y, x = rel[k]
            sl = (slice(t, t + length), slice(y, y + sy), slice(x, x + sx))
            item = {
                "x": torch.from_numpy(np.ascontiguousarray(data[sl])[None]),
                "origin": torch.from_numpy(o[k].copy()),
            }
            if valid is not None:
                item["mask"] = torch.from_numpy(np.ascontiguousarray(valid[sl])[None])
            yield item


def make_loader(
    dataset: WindowDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    context: str = "forkserver",
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with process-safe workers."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {
            "multiprocessing_context": context,
            "persistent_workers": False,
            "prefetch_factor": 4,
        }
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, **kwargs
    )
