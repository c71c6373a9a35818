"""Scale-out groundwork: the platform's reads of cloud Zarr at cloud latency.

    .venv/bin/python benchmarks/scale_out.py [loader] [--delay-ms 30] [--windows N] [--repeat 3]

Sections (all by default):

loader  A synthetic store written to a moto S3 server on loopback, read by the window loader
        (shuffled epoch, or its first ``--windows`` windows) straight from the server and
        through a latency injector (tests/faults.py) that holds every request for
        ``--delay-ms``, as a round trip to a distant region would. Both cases run in the same
        process, alternating, ``--repeat`` times each; the median windows/s of each is
        printed with its ratio to the direct read, beside the target ratio (>= 0.5 at 30 ms),
        with the requests that crossed the proxy and the delay injected into them.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from _common import ROOT  # noqa: F401 - before cloudburst: package path, quiet defaults
from cloudburst import storage
from cloudburst.config import SyntheticConfig, WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.synthetic import write_synthetic
from cloudburst.data.windows import WindowIndex, build_index

KB = 1024
TARGET_RATIO = 0.5  # windows/s through the latency injector over windows/s direct
# 48 chunks of 512 KB (12 time slabs of 2x2 tiles), about 100 windows cut per chunk read
STORE = SyntheticConfig(nt=384, ny=128, nx=128, seed=0)
CHUNKS = {"time": 32, "y": 64, "x": 64}
WINDOWS = WindowConfig(length=8, size=32, stride=16, time_stride=4)


def s3_options(url: str, endpoint: str) -> dict[str, Any]:
    """The platform's options for ``url`` at ``endpoint`` (its retry policy included)."""
    return storage.storage_options(
        url, endpoint_url=endpoint, extra={"key": "testing", "secret": "testing"}
    )


def loader_pass(
    url: str, index: WindowIndex, opts: dict[str, Any], limit: int, proxy: Any = None
) -> dict:
    """Windows/s of one shuffled epoch (its first ``limit`` windows when > 0); with ``proxy``
    (a FaultProxy), the requests it saw and the delay it injected while the windows were read."""
    warm = WindowDataset(url, index.subset(np.arange(1)), storage_options=opts, shuffle=False)
    next(iter(warm))  # an open client and connection pool, as a running epoch has
    ds = WindowDataset(url, index, storage_options=opts, shuffle=True, seed=0)
    windows = itertools.islice(ds, limit) if limit > 0 else iter(ds)
    seen = (Counter(proxy.by_method), proxy.delayed_s) if proxy is not None else None
    t0 = time.perf_counter()
    n = sum(1 for _ in windows)
    dt = time.perf_counter() - t0
    out = {"n": n, "s": dt, "chunks": ds.stats["decoded_chunks"]}
    if seen is not None:
        out["requests"] = Counter(proxy.by_method) - seen[0]
        out["delay"] = proxy.delayed_s - seen[1]
    return out


def bench_loader(args: argparse.Namespace) -> None:
    from faults import FaultProxy
    from servers import moto_s3_server

    delay_s = args.delay_ms / 1000.0
    with moto_s3_server() as s3:
        url = f"{s3.make_bucket('scale-out')}/synthetic.zarr"
        direct = s3_options(url, s3.endpoint)
        t0 = time.perf_counter()
        write_synthetic(STORE, url, chunks=CHUNKS, target_options=direct, progress=False)
        written_s = time.perf_counter() - t0
        ds, _ = open_store(url, direct)
        index = build_index(ds, WINDOWS)
        shape = tuple(int(ds["precip"].sizes[d]) for d in ("time", "y", "x"))
        grid = [-(-n // c) for n, c in zip(shape, CHUNKS.values(), strict=True)]
        chunk_kb = 4 * int(np.prod(list(CHUNKS.values()))) / KB
        runs: dict[str, list[dict]] = {"direct": [], "proxy": []}
        with FaultProxy(s3.endpoint, fraction=0.0, delay_s=delay_s) as proxy:
            latent = s3_options(url, proxy.endpoint)
            for _ in range(args.repeat):  # alternating, so drift on a shared machine hits both
                runs["direct"].append(loader_pass(url, index, direct, args.windows))
                runs["proxy"].append(loader_pass(url, index, latent, args.windows, proxy))

    rate = {k: statistics.median(r["n"] / r["s"] for r in v) for k, v in runs.items()}
    ratio = rate["proxy"] / rate["direct"]
    last = runs["proxy"][-1]
    print(
        f"\nloader: {last['n']} of {len(index)} windows of {WINDOWS.length}x{WINDOWS.size}x"
        f"{WINDOWS.size} per pass (stride {WINDOWS.stride}, time stride {WINDOWS.time_stride}), "
        f"shuffled; store {'x'.join(map(str, shape))} float32 on moto S3 (loopback) in "
        f"{int(np.prod(grid))} chunks of {'x'.join(map(str, CHUNKS.values()))} "
        f"({chunk_kb:.0f} KB), written in {written_s:.1f} s; median of {args.repeat} passes"
    )
    print(f"  {'case':30}{'windows/s':>11}{'ratio to direct':>17}{'target':>10}")
    print(f"  {'S3 direct':30}{rate['direct']:11,.0f}{1.0:16.2f}x")
    verdict = "met" if ratio >= TARGET_RATIO else "not met"
    print(
        f"  {f'S3 + {args.delay_ms:g} ms per request':30}{rate['proxy']:11,.0f}{ratio:16.2f}x"
        f"{f'>= {TARGET_RATIO:.2f}':>10}  ({verdict})"
    )
    total = sum(last["requests"].values())
    methods = ", ".join(f"{v} {k}" for k, v in sorted(last["requests"].items()))
    print(
        f"  through the proxy, last pass: {total} requests ({methods}) for "
        f"{last['chunks']} chunk reads, {total / max(1, last['chunks']):.1f} per chunk; "
        f"injected delay {last['delay']:.2f} s of the pass's {last['s']:.2f} s"
    )
    print(
        f"  today's figure: the loader fetches chunks one at a time, so every request's "
        f"latency adds to the pass ({last['n'] / max(1, last['chunks']):.0f} windows per chunk "
        f"read here)"
    )


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {"loader": bench_loader}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"among {', '.join(SECTIONS)}; default: all")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="latency per request")
    parser.add_argument("--windows", type=int, default=0, help="windows per pass (0: an epoch)")
    parser.add_argument("--repeat", type=int, default=3, help="passes per case")
    args = parser.parse_args()
    if args.delay_ms < 0 or args.repeat < 1 or args.windows < 0:
        parser.error("--delay-ms and --windows must be >= 0, --repeat >= 1")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    torch.set_num_threads(1)  # as in loader processes
    for name in args.sections or SECTIONS:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
