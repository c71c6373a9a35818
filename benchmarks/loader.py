"""Window loading: the cloudburst loader beside xbatcher, an ideal reference and raw reads.

    .venv/bin/python benchmarks/loader.py [--quick] [--no-s3]

For RADOLAN coarsened 4x (about 4 km, 64x64x10 windows) and Fraser daily (12x12x8 windows), on
local disk and on a moto S3 server on loopback, in shuffled order as training draws them:

(a) the cloudburst loader (one epoch, block-level shuffle: runs of ``shuffle_buffer_blocks``
    chunks in random order, windows shuffled within a run);
(b) xbatcher over the same store opened with chunks=None, indexed in random order with Python
    ints (a sample of windows, extrapolated);
(c) an ideal reference: every chunk read once into memory, windows cut as numpy views and made
    into the same tensors the loader yields;
(d) the raw read of the whole store (zarr ``[:]``), and the loader's bytes decompressed per
    epoch over the store's decompressed size.

Then peak traced memory of one loader epoch on a synthetic store and on one 10x longer.
Every loader-side figure is printed beside its peer as a ratio. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
import warnings

import numpy as np
import torch

from _common import DATA  # before cloudburst: package path, quiet defaults
from cloudburst.config import SyntheticConfig, WindowConfig
from cloudburst.data.ingest import ingest, open_store
from cloudburst.data.loader import WindowDataset, open_array
from cloudburst.data.synthetic import write_synthetic
from cloudburst.data.windows import build_index

MB = 1e6
warnings.filterwarnings("ignore", message=".*not recognized as a component")  # our marker


def loader_epoch(store: str, index, opts) -> dict:
    ds = WindowDataset(store, index, storage_options=opts, shuffle=True, seed=0)
    next(iter(WindowDataset(store, index.subset(np.arange(1)), storage_options=opts)))  # warm
    t0 = time.perf_counter()
    n = sum(1 for _ in ds)
    dt = time.perf_counter() - t0
    return {
        "n": n,
        "s": dt,
        "decoded": ds.stats["decoded_bytes"],
        "chunks": ds.stats["decoded_chunks"],
    }


def ideal_epoch(store: str, index, opts) -> dict:
    """Every chunk read once into memory, windows cut as views into the same tensors."""
    t0 = time.perf_counter()
    arr = open_array(store, opts)
    data = np.empty(arr.shape, np.float32)
    ct = arr.chunks[0]
    for a in range(0, arr.shape[0], ct):  # chunk by chunk (spatially whole in these stores)
        data[a : a + ct] = arr[a : a + ct]
    valid = ~np.isnan(data)
    filled = np.where(valid, data, np.float32(0))
    length, sy, sx = index.shape
    order = np.random.default_rng(0).permutation(len(index))
    n = 0
    for t, y, x in index.origins[order]:
        sl = (slice(t, t + length), slice(y, y + sy), slice(x, x + sx))
        item = {
            "x": torch.from_numpy(np.ascontiguousarray(filled[sl])[None]),
            "mask": torch.from_numpy(np.ascontiguousarray(valid[sl])[None]),
            "origin": torch.from_numpy(np.array([t, y, x])),
        }
        n += item["x"].shape[0]
    return {"n": n, "s": time.perf_counter() - t0}


def xbatcher_sample(store: str, index, wc: WindowConfig, opts, budget_s: float) -> dict:
    import xarray as xr
    import xbatcher

    target = store if store.startswith("s3://") else store
    ds = xr.open_zarr(
        target,
        chunks=None,
        consolidated=False,
        storage_options=opts if store.startswith("s3://") else None,
    )
    gen = xbatcher.BatchGenerator(
        ds["precip"],
        input_dims={"time": wc.length, "y": wc.size, "x": wc.size},
        input_overlap={"time": wc.length - 1, "y": wc.size - wc.stride, "x": wc.size - wc.stride},
    )
    total = len(gen)
    order = np.random.default_rng(0).permutation(total)
    t0 = time.perf_counter()
    n = 0
    for i in order:
        w = gen[int(i)]
        torch.from_numpy(np.nan_to_num(w.values, nan=0.0))
        n += 1
        if time.perf_counter() - t0 > budget_s:
            break
    return {"n": n, "s": time.perf_counter() - t0, "total": total}


def raw_read(store: str, opts) -> dict:
    arr = open_array(store, opts)
    t0 = time.perf_counter()
    data = arr[:]
    return {"bytes": data.nbytes, "s": time.perf_counter() - t0}


def bench_store(label: str, store: str, wc: WindowConfig, opts, budget_s: float) -> None:
    ds, _ = open_store(store, opts)
    index = build_index(ds, wc)
    wbytes = 4 * wc.length * wc.size * wc.size
    raw = raw_read(store, opts)
    ideal = ideal_epoch(store, index, opts)
    ours = loader_epoch(store, index, opts)
    xb = xbatcher_sample(store, index, wc, opts, budget_s)
    rate = {k: v["n"] / v["s"] for k, v in (("ours", ours), ("ideal", ideal), ("xb", xb))}
    print(
        f"\n{label}: {len(index)} windows of {wc.length}x{wc.size}x{wc.size}, store "
        f"{raw['bytes'] / MB:.1f} MB decompressed"
    )
    print(f"  {'':28}{'windows/s':>12}{'payload MB/s':>14}{'loader / this':>15}")
    for key, name in (
        ("ours", "(a) cloudburst loader"),
        ("xb", "(b) xbatcher, chunks=None"),
        ("ideal", "(c) ideal in-memory ref."),
    ):
        extra = f" ({xb['n']} of {xb['total']} sampled)" if key == "xb" else ""
        print(
            f"  {name:28}{rate[key]:12,.0f}{rate[key] * wbytes / MB:14,.1f}"
            f"{rate['ours'] / rate[key]:15.2f}x{extra}"
        )
    print(
        f"  (d) raw read zarr [:]        {raw['bytes'] / raw['s'] / MB:12,.1f} MB/s; loader "
        f"decompressed {ours['decoded'] / raw['bytes']:.2f}x the store per epoch "
        f"({ours['chunks']} chunk decodes)"
    )


def memory_flat(tmp: str) -> None:
    wc = WindowConfig(length=8, size=32, stride=8)
    peaks = {}
    for factor in (1, 10):
        store = os.path.join(tmp, f"synthetic-{factor}x.zarr")
        write_synthetic(
            SyntheticConfig(nt=1460 * factor, ny=48, nx=48),
            store,
            chunks={"time": 365},
            progress=False,
        )
        ds, _ = open_store(store)
        index = build_index(ds, wc)
        loader = WindowDataset(store, index, cache_blocks=4, shuffle_buffer_blocks=2)
        tracemalloc.start()
        n = sum(1 for _ in loader)
        peaks[factor] = (tracemalloc.get_traced_memory()[1], n, ds["precip"].nbytes)
        tracemalloc.stop()
    (p1, n1, s1), (p10, n10, s10) = peaks[1], peaks[10]
    per_window = (p10 - p1) / (n10 - n1)
    print("\nmemory: loader peak (tracemalloc) over one epoch, cache 4 chunks of 365 steps")
    print(f"  store {s1 / MB:7.1f} MB, {n1:7d} windows: peak {p1 / MB:6.1f} MB")
    print(
        f"  store {s10 / MB:7.1f} MB, {n10:7d} windows: peak {p10 / MB:6.1f} MB  "
        f"(store x{s10 / s1:.0f}, peak x{p10 / p1:.2f})"
    )
    print(
        f"  growth {per_window:.0f} B per window (the epoch's shuffled window order); "
        f"data part {(p1 - per_window * n1) / MB:.1f} MB, independent of the store"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller xbatcher samples")
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} (the real samples) is absent")
        return 0
    torch.set_num_threads(1)  # as in loader processes; small per-window ops are faster so
    budget = 3.0 if args.quick else 10.0
    cases = [
        (
            "RADOLAN 4 km",
            "radolan_germany_hourly_20221018.nc",
            4,
            WindowConfig(length=10, size=64, stride=8, max_nan_fraction=1.0),
        ),
        ("Fraser daily", "fraser_daily_1986_2017.nc", 1, WindowConfig(length=8, size=12, stride=2)),
    ]
    with tempfile.TemporaryDirectory(prefix="cloudburst-bench-") as tmp:
        stores = []
        for label, name, k, wc in cases:
            local = os.path.join(tmp, name.replace(".nc", ".zarr"))
            ingest(str(DATA / name), local, coarsen_by=k, progress=False)
            stores.append((label, name, k, wc, local))
        for label, _, _, wc, local in stores:
            bench_store(f"{label}, local disk", local, wc, None, budget)
        if not args.no_s3:
            from servers import moto_s3_server

            with moto_s3_server() as s3:
                bucket = s3.make_bucket("bench")
                for label, name, k, wc, _ in stores:
                    url = f"{bucket}/{name.replace('.nc', '.zarr')}"
                    ingest(
                        str(DATA / name),
                        url,
                        coarsen_by=k,
                        target_options=s3.options,
                        progress=False,
                    )
                    bench_store(f"{label}, S3 (moto on loopback)", url, wc, s3.options, budget / 2)
        memory_flat(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
