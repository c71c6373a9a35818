"""A torch dataset of windows that reads each Zarr chunk about once per epoch.

Per-window reads (xarray, xbatcher) decompress every chunk a window touches, again for every
window: hundreds of windows/s. Here windows are grouped by the chunk that holds their origin
("blocks"); a block's region (the chunk plus the halo its windows reach into) is assembled
from an LRU cache of decoded chunks, and windows are cut from it as numpy views.

Shuffling is block-level: ``shuffle_buffer_blocks`` consecutive time slabs of chunks form a
run, runs are visited in a random order (seeded by seed and epoch), and the windows of one run
are shuffled together. The chunk cache holds at least two time slabs, so each chunk is decoded
about once per epoch.

Reads at cloud latency: with ``prefetch_requests`` > 1, when a run starts the chunks it needs
and those of the next run are requested at once from a pool of that many threads (zarr turns
each into one GET), so a run is read in a few round trips instead of one per chunk, and the
next run arrives while this one is consumed. The chunks of the current and the next run are
held until their run ends (each fetched once for both runs that need it), then dropped. The
pool is created per iteration, in the process that iterates, and shut down (its requests in
flight awaited, queued ones cancelled) when the iteration ends, fails or is closed early.
``prefetch_requests`` of 0 or 1 reads chunk by chunk when a block needs them, as before.

Pairs: with a ``target`` variable (a store of several variables, e.g. translating one
satellite channel into another), every window is cut from both variables at the same place:
``x``/``mask`` from the input, ``target``/``target_mask`` from the target, each scaled by its
own transformation. Both arrays share one chunk layout, so a pair costs two chunk caches.

Memory is bounded by the cache, the chunks of two runs (current and next; none with
prefetching off) and the regions of one run, not by the store.

Sharding: the epoch's window sequence is cut into equal contiguous parts, one per Ray Train
rank, then one per DataLoader worker, so every rank sees the same number of windows (DDP
needs that) and each keeps chunk locality. The store is opened lazily in each process (no
handle crosses a fork or a pickle), so the dataset is safe with spawn/forkserver workers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cloudburst import storage
from cloudburst.config import DataConfig
from cloudburst.data.ingest import StoreStats, read_marker
from cloudburst.data.sources import PRECIP
from cloudburst.data.transforms import Transform, for_data
from cloudburst.data.windows import WindowIndex


def open_array(
    store: str,
    options: dict[str, Any] | None = None,
    requests: int = 1,
    variable: str = PRECIP,
) -> Any:
    """The zarr array of ``variable`` (``precip``) of a store, opened directly (no xarray, no
    dask), for a reader that keeps up to ``requests`` chunk reads in flight."""
    import zarr

    zstore = storage.zarr_store(store, options, read_only=True, requests=requests)
    group = zarr.open_group(zstore, mode="r", zarr_format=3)  # no probing for v2 metadata
    return group[variable]


def marker_variables(marker: dict[str, Any]) -> list[str]:
    """The variables a store's completion marker lists (``precip`` for a precipitation store)."""
    return list(marker.get("request", {}).get("variables") or [PRECIP])


def data_variables(data: DataConfig) -> list[str] | None:
    """The variables a data section reads: input (and target) when named, else None (the
    store's single variable)."""
    names = [n for n in (data.input, data.target) if n is not None]
    return names or None


def resolve_variable(available: list[str], name: str | None, role: str = "input") -> str:
    """``name``, or the store's single variable when None; an error names the choices."""
    if name is None:
        if len(available) == 1:
            return available[0]
        raise ValueError(
            f"the store holds several variables ({', '.join(available)}); name the {role} "
            "variable (data.input / data.target)"
        )
    if name not in available:
        raise ValueError(
            f"{role} variable {name!r} is not in the store; it has {', '.join(available)}"
        )
    return name


def ray_rank() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker, else (0, 1)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:  # noqa: BLE001 - outside a Ray Train session
        return 0, 1


Key = tuple[int, ...]
PREFETCH_THREAD_PREFIX = "cloudburst-prefetch"


class ChunkCache:
    """Decoded chunks of one zarr array, least recently used evicted; counts decodes.

    With a ``pool``, :meth:`prefetch` reads chunks ahead in its threads and holds them (with
    cached chunks it pins) until :meth:`release`; without one, :meth:`get` reads on a miss.
    """

    def __init__(self, array: Any, capacity: int, pool: ThreadPoolExecutor | None = None) -> None:
        self.array = array
        self.capacity = max(1, capacity)
        self.chunk = tuple(int(c) for c in array.chunks)
        self.shape = tuple(int(s) for s in array.shape)
        self.pool = pool
        self._lru: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._held: dict[Key, Future[np.ndarray]] = {}
        self._count = threading.Lock()
        self.decoded = 0
        self.bytes_decoded = 0

    def read(self, key: Key) -> np.ndarray:
        """Chunk ``key`` read and decoded from the store (thread-safe; counted)."""
        sl = tuple(
            slice(k * c, min((k + 1) * c, n))
            for k, c, n in zip(key, self.chunk, self.shape, strict=True)
        )
        data = np.asarray(self.array[sl])
        with self._count:
            self.decoded += 1
            self.bytes_decoded += data.nbytes
        return data

    def get(self, key: Key) -> np.ndarray:
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            return hit
        held = self._held.get(key)
        data = held.result() if held is not None else self.read(key)
        self._lru[key] = data
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return data

    def prefetch(self, keys: Iterable[Key]) -> None:
        """Hold ``keys`` until :meth:`release`: cached chunks pinned, the others requested
        from the pool in this order (none without a pool)."""
        if self.pool is None:
            return
        for key in keys:
            if key in self._held:
                continue
            hit = self._lru.get(key)
            if hit is None:
                self._held[key] = self.pool.submit(self.read, key)
            else:
                pinned: Future[np.ndarray] = Future()
                pinned.set_result(hit)
                self._held[key] = pinned

    def release(self, keep: Iterable[Key] = ()) -> None:
        """Stop holding every chunk but ``keep``; reads not yet started are cancelled."""
        keep = set(keep)
        for key in [k for k in self._held if k not in keep]:
            self._held.pop(key).cancel()

    def keys(self, start: tuple[int, ...], stop: tuple[int, ...]) -> list[Key]:
        """The chunks ``array[start:stop]`` covers, in the order :meth:`region` reads them."""
        ranges = [
            range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, self.chunk, strict=True)
        ]
        return [(kt, ky, kx) for kt in ranges[0] for ky in ranges[1] for kx in ranges[2]]

    def region(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
        """``array[start:stop]`` assembled from cached chunks."""
        out = np.empty([b - a for a, b in zip(start, stop, strict=True)], dtype=np.float32)
        for key in self.keys(start, stop):
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

    ``variable``: the store's variable read as ``x`` (None: its single one). With ``target``,
    items also hold ``target`` (that variable, the same window, transformed by
    ``target_transform``) and ``target_mask``.

    ``prefetch_requests``: chunk reads kept in flight while a run is read and the next one
    fetched (see the module doc); 0 or 1 reads chunks one at a time, when a block needs them.
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
        prefetch_requests: int = 16,
        variable: str | None = None,
        target: str | None = None,
        target_transform: Transform | None = None,
    ) -> None:
        super().__init__()
        marker = read_marker(store, storage_options)
        if marker is None:
            raise FileNotFoundError(f"{store} is not a complete Cloudburst store; ingest it first")
        available = marker_variables(marker)
        self.variable = resolve_variable(available, variable, "input")
        self.target = None if target is None else resolve_variable(available, target, "target")
        self.target_transform = target_transform
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
        if prefetch_requests < 0:
            raise ValueError(f"prefetch_requests must be >= 0 (got {prefetch_requests})")
        self.prefetch_requests = int(prefetch_requests)
        self.epoch = 0
        self._array: Any = None
        self._target_array: Any = None
        self.stats = {"decoded_chunks": 0, "decoded_bytes": 0}
        chunks = open_array(store, storage_options, variable=self.variable).chunks
        self.chunks = tuple(int(c) for c in chunks)
        if self.target is not None:
            other = open_array(store, storage_options, variable=self.target)
            if tuple(int(c) for c in other.chunks) != self.chunks:
                raise ValueError(
                    f"{self.variable} and {self.target} are chunked differently in {store}; "
                    "re-ingest them into one store"
                )
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
        state["_array"] = state["_target_array"] = None  # reopened lazily in each process
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
            self._array = open_array(
                self.store, self.storage_options, self.prefetch_requests, self.variable
            )
        if self.target is not None and self._target_array is None:
            self._target_array = open_array(
                self.store, self.storage_options, self.prefetch_requests, self.target
            )
        arrays = [self._array] + ([self._target_array] if self.target is not None else [])
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
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        pool = None
        if self.prefetch_requests > 1 and spans:
            pool = ThreadPoolExecutor(
                max_workers=self.prefetch_requests, thread_name_prefix=PREFETCH_THREAD_PREFIX
            )
        caches = [ChunkCache(array, self.cache_chunks, pool=pool) for array in arrays]
        cache = caches[0]  # the arrays share one chunk layout: its keys serve all
        try:
            ahead = self._chunk_keys(cache, ids[spans[0][0] : spans[0][1]]) if pool else []
            for c in caches:
                c.prefetch(ahead)
            for i, (a, b) in enumerate(spans):
                if pool is not None and i + 1 < len(spans):  # the next run, behind this one
                    ahead = self._chunk_keys(cache, ids[spans[i + 1][0] : spans[i + 1][1]])
                    for c in caches:
                        c.prefetch(ahead)
                else:
                    ahead = []
                yield from self._run(caches, ids[a:b], rng)
                for c in caches:
                    c.release(keep=ahead)
        finally:
            for c in caches:
                c.release()
            if pool is not None:  # also when the consumer stops early: no thread outlives it
                pool.shutdown(wait=True, cancel_futures=True)
            for c in caches:
                self.stats["decoded_chunks"] += c.decoded
                self.stats["decoded_bytes"] += c.bytes_decoded

    def _blocks(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(origins, region start, region stop) of each block of windows ``ids``, in order."""
        shape = np.asarray(self.index.shape)
        origins = self.index.origins[ids]
        blocks = self._block[ids]
        for block in np.unique(blocks):
            o = origins[blocks == block]
            yield o, o.min(axis=0), o.max(axis=0) + shape

    def _chunk_keys(self, cache: ChunkCache, ids: np.ndarray) -> list[Key]:
        """The chunks the blocks of windows ``ids`` read, each once, in reading order."""
        keys: dict[Key, None] = {}
        for _, start, stop in self._blocks(ids):
            keys.update(dict.fromkeys(cache.keys(tuple(start), tuple(stop))))
        return list(keys)

    def _prepared(
        self, cache: ChunkCache, start: np.ndarray, stop: np.ndarray, transform: Transform | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A block's region of one array: NaN filled, transformed; and its validity."""
        raw = cache.region(tuple(start), tuple(stop))
        valid = ~np.isnan(raw)
        filled = np.where(valid, raw, np.float32(self.fill_value))
        if transform is not None:
            filled = np.asarray(transform.forward(filled), dtype=np.float32)
        return filled, valid if self.return_mask else None

    def _run(
        self, caches: list[ChunkCache], ids: np.ndarray, rng: np.random.Generator
    ) -> Iterator[dict[str, torch.Tensor]]:
        length, sy, sx = self.index.shape
        keys = [("x", "mask", self.transform), ("target", "target_mask", self.target_transform)]
        pieces: list[tuple[list[tuple[np.ndarray, np.ndarray | None]], np.ndarray, np.ndarray]] = []
        for o, start, stop in self._blocks(ids):
            arrays = [
                self._prepared(cache, start, stop, transform)
                for cache, (_, _, transform) in zip(caches, keys, strict=False)
            ]
            pieces.append((arrays, o - start, o))
        flat = [(p, k) for p, piece in enumerate(pieces) for k in range(len(piece[1]))]
        order = rng.permutation(len(flat)) if self.shuffle else np.arange(len(flat))
        for j in order:
            p, k = flat[j]
            arrays, rel, o = pieces[p]
            t, y, x = rel[k]
            sl = (slice(t, t + length), slice(y, y + sy), slice(x, x + sx))
            item = {}
            for (data, valid), (name, mask_name, _) in zip(arrays, keys, strict=False):
                item[name] = torch.from_numpy(np.ascontiguousarray(data[sl])[None])
                if name == "x":
                    item["origin"] = torch.from_numpy(o[k].copy())
                if valid is not None:
                    item[mask_name] = torch.from_numpy(np.ascontiguousarray(valid[sl])[None])
            yield item


def dataset_for(
    data: DataConfig,
    index: WindowIndex,
    stats: dict[str, StoreStats],
    *,
    storage_options: dict[str, Any] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> WindowDataset:
    """The dataset ``data`` describes over ``index``: its input (and target) variable, each
    scaled by its own statistics in ``stats`` (by variable name, e.g.
    :func:`cloudburst.data.ingest.variable_stats`, or the training split's)."""
    available = list(stats)
    name = resolve_variable(available, data.input, "input")
    target = None if data.target is None else resolve_variable(available, data.target, "target")
    return WindowDataset(
        data.store,
        index,
        storage_options=storage_options,
        transform=for_data(stats[name], data.scaling, data.transform),
        target_transform=None
        if target is None
        else for_data(stats[target], data.scaling, data.transform),
        shuffle=shuffle,
        seed=seed,
        cache_blocks=data.loader.cache_blocks,
        shuffle_buffer_blocks=data.loader.shuffle_buffer_blocks,
        prefetch_requests=data.loader.prefetch_requests,
        rank=rank,
        world_size=world_size,
        variable=name,
        target=target,
    )


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
