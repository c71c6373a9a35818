"""Scale-out: cloud Zarr read at cloud latency, ensembles over workers and replicas.

    .venv/bin/python benchmarks/scale_out.py [loader] [ensemble] [endpoint] [--delay-ms 30]
        [--windows N] [--repeat 3] [--members 1024] [--batch 32] [--chunk 64] [--runs 2]

Sections (all by default):

loader  A synthetic store written to a moto S3 server on loopback, read by the window loader
        (shuffled epoch, or its first ``--windows`` windows) straight from the server and
        through a latency injector (tests/faults.py) that holds every request for
        ``--delay-ms``, as a round trip to a distant region would. Three settings: chunk reads
        one at a time with a HEAD before every GET (the loader before chunk prefetching),
        one at a time with the GET alone (``prefetch_requests=0``), and the default
        (``prefetch_requests`` requests in flight). Every case runs in the same process,
        alternating, ``--repeat`` times; the median windows/s of each setting, direct and
        through the injector, is printed with their ratio beside the target (>= 0.5 at 30 ms),
        with the requests that crossed the injector, how many were in flight at most, and the
        delay injected into them.
ensemble  One ensemble request (``--members`` of the vae-fraser-sized VAE, ``--batch``,
          ``--chunk``) fanned out over 1 and over 2 Ray workers of one CPU each, alternating,
          ``--runs`` times; members/s and the ratio of 2 to 1 beside the target (>= 1.7x), and
          the in-process engine on one thread (benchmarks/fan_out.py).
endpoint  The same request through the Serve endpoint with 1 and with 2 generator replicas
          of one CPU each (>= 1.7x), job seconds from the state record.
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
from cloudburst.config import LoaderConfig, SyntheticConfig, WindowConfig
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
PREFETCH = LoaderConfig().prefetch_requests
# (label, prefetch_requests, extra s3fs options): s3fs's own default max_concurrency (10)
# makes it HEAD every whole-object read, as the platform's zarr stores did before
LOADER_CASES = (
    ("serial, HEAD + GET per chunk (before)", 0, {"max_concurrency": 10}),
    ("serial, GET per chunk (prefetch off)", 0, {}),
    (f"{PREFETCH} requests in flight (default)", PREFETCH, {}),
)


def s3_options(url: str, endpoint: str, **extra: Any) -> dict[str, Any]:
    """The platform's options for ``url`` at ``endpoint`` (its retry policy included)."""
    return storage.storage_options(
        url, endpoint_url=endpoint, extra={"key": "testing", "secret": "testing", **extra}
    )


def loader_pass(
    url: str,
    index: WindowIndex,
    opts: dict[str, Any],
    limit: int,
    prefetch: int,
    proxy: Any = None,
) -> dict:
    """Windows/s of one shuffled epoch (its first ``limit`` windows when > 0) read with
    ``prefetch`` requests in flight; with ``proxy`` (a FaultProxy), the requests it saw, the
    most in flight at once and the delay it injected while the windows were read."""
    kw = {"storage_options": opts, "prefetch_requests": prefetch}
    warm = WindowDataset(url, index.subset(np.arange(1)), shuffle=False, **kw)
    next(iter(warm))  # an open client and connection pool, as a running epoch has
    ds = WindowDataset(url, index, shuffle=True, seed=0, **kw)
    seen = (Counter(proxy.by_method), proxy.delayed_s) if proxy is not None else None
    if proxy is not None:
        proxy.reset_max_in_flight()
    t0 = time.perf_counter()
    windows = iter(ds)
    n = sum(1 for _ in (itertools.islice(windows, limit) if limit > 0 else windows))
    windows.close()  # a pass cut short stops its prefetching here, not at garbage collection
    dt = time.perf_counter() - t0
    out = {"n": n, "s": dt, "chunks": ds.stats["decoded_chunks"]}
    if seen is not None:
        out["requests"] = Counter(proxy.by_method) - seen[0]
        out["delay"] = proxy.delayed_s - seen[1]
        out["in_flight"] = proxy.max_in_flight
    return out


def bench_loader(args: argparse.Namespace) -> None:
    from faults import FaultProxy
    from servers import moto_s3_server

    delay_s = args.delay_ms / 1000.0
    with moto_s3_server() as s3:
        url = f"{s3.make_bucket('scale-out')}/synthetic.zarr"
        t0 = time.perf_counter()
        write_synthetic(
            STORE, url, chunks=CHUNKS, target_options=s3_options(url, s3.endpoint), progress=False
        )
        written_s = time.perf_counter() - t0
        ds, _ = open_store(url, s3_options(url, s3.endpoint))
        index = build_index(ds, WINDOWS)
        shape = tuple(int(ds["precip"].sizes[d]) for d in ("time", "y", "x"))
        grid = [-(-n // c) for n, c in zip(shape, CHUNKS.values(), strict=True)]
        chunk_kb = 4 * int(np.prod(list(CHUNKS.values()))) / KB
        runs: dict[tuple[str, str], list[dict]] = {}
        with FaultProxy(s3.endpoint, fraction=0.0, delay_s=delay_s) as proxy:
            for _ in range(args.repeat):  # alternating, so drift on a shared machine hits all
                for label, prefetch, extra in LOADER_CASES:
                    for where, endpoint, seen in (
                        ("direct", s3.endpoint, None),
                        ("proxy", proxy.endpoint, proxy),
                    ):
                        opts = s3_options(url, endpoint, **extra)
                        one = loader_pass(url, index, opts, args.windows, prefetch, seen)
                        runs.setdefault((label, where), []).append(one)

    rate = {k: statistics.median(r["n"] / r["s"] for r in v) for k, v in runs.items()}
    n = runs[(LOADER_CASES[-1][0], "proxy")][-1]["n"]
    print(
        f"\nloader: {n} of {len(index)} windows of {WINDOWS.length}x{WINDOWS.size}x"
        f"{WINDOWS.size} per pass (stride {WINDOWS.stride}, time stride {WINDOWS.time_stride}), "
        f"shuffled; store {'x'.join(map(str, shape))} float32 on moto S3 (loopback) in "
        f"{int(np.prod(grid))} chunks of {'x'.join(map(str, CHUNKS.values()))} "
        f"({chunk_kb:.0f} KB), written in {written_s:.1f} s; median of {args.repeat} passes"
    )
    latent = f"+{args.delay_ms:g} ms"
    print(
        f"  {'chunk reads':40}{'direct':>9}{latent:>9}{'ratio':>8}{'target':>10}"
        f"   (windows/s; ratio = {latent} / direct)"
    )
    for label, *_ in LOADER_CASES:
        direct, latent_rate = rate[(label, "direct")], rate[(label, "proxy")]
        ratio = latent_rate / direct
        line = f"  {label:40}{direct:9,.0f}{latent_rate:9,.0f}{ratio:7.2f}x"
        if label == LOADER_CASES[-1][0]:
            verdict = "met" if ratio >= TARGET_RATIO else "not met"
            line += f"{f'>= {TARGET_RATIO:.2f}':>10}  ({verdict})"
        print(line)
    print(f"  through the injector, last pass of each ({latent} per request):")
    for label, *_ in LOADER_CASES:
        last = runs[(label, "proxy")][-1]
        total = sum(last["requests"].values())
        methods = ", ".join(f"{v} {k}" for k, v in sorted(last["requests"].items()))
        print(
            f"    {label:40}{total:5} requests ({methods}) for {last['chunks']} chunk reads, "
            f"{total / max(1, last['chunks']):.1f} per chunk, at most {last['in_flight']} in "
            f"flight; delay {last['delay']:.2f} s injected in a {last['s']:.2f} s pass"
        )


def bench_ensembles(sections: list[str]) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        import tempfile
        from pathlib import Path

        import fan_out

        with tempfile.TemporaryDirectory(prefix="cloudburst-scale-out-") as tmp:
            fan_out.run(args, sections, Path(tmp))

    return run


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "loader": bench_loader,
    "ensemble": bench_ensembles(["ensemble"]),
    "endpoint": bench_ensembles(["endpoint"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"among {', '.join(SECTIONS)}; default: all")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="latency per request")
    parser.add_argument("--windows", type=int, default=0, help="windows per pass (0: an epoch)")
    parser.add_argument("--repeat", type=int, default=3, help="loader passes per case")
    parser.add_argument("--members", type=int, default=1024, help="ensemble members")
    parser.add_argument("--batch", type=int, default=32, help="ensemble batch size")
    parser.add_argument("--chunk", type=int, default=64, help="ensemble chunk members")
    parser.add_argument("--runs", type=int, default=2, help="ensemble runs per case")
    args = parser.parse_args()
    if args.delay_ms < 0 or args.repeat < 1 or args.windows < 0 or args.runs < 1:
        parser.error("--delay-ms and --windows must be >= 0, --repeat and --runs >= 1")
    if min(args.members, args.batch, args.chunk) < 1:
        parser.error("--members, --batch and --chunk must be >= 1")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose among {', '.join(SECTIONS)}")
    torch.set_num_threads(1)  # as in loader processes
    for name in args.sections or SECTIONS:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
