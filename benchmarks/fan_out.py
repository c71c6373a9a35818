"""The ``ensemble`` and ``endpoint`` sections of benchmarks/scale_out.py: members/s with 2
workers (or replicas) against 1, one CPU each, on a local Ray cluster.

ensemble  ``generate_on_cluster`` of one request (the vae-fraser-sized VAE of
          benchmarks/ensemble.py for windows of 24 x 64 x 64, registered in a temporary
          MLflow store) with 1 and with 2
          Ray workers, alternating, ``--runs`` times each; the in-process engine with one
          thread beside them. Each worker loads the model once per request (included).
endpoint  The Serve app with 1 and with 2 generator replicas (min = max, one CPU each),
          warmed by a small job; one large request POSTed and polled to done; its job
          seconds from the state record.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _common import submit_and_wait, wait_healthy
from cloudburst.ensembles.generate import generate, resolve
from cloudburst.ensembles.request import EnsembleRequest
from ensemble import register

TARGET = 1.7  # 2 workers (replicas) over 1
# the capacity table's window: 24 steps of 64 x 64 (time, y, x)
WINDOW = (24, 64, 64)
MB_PER_MEMBER = int(np.prod(WINDOW)) * 4 / 1e6


def ask(output: str, members: int, batch: int, chunk: int) -> EnsembleRequest:
    return EnsembleRequest(
        model="models:/bench-vae@candidate",
        members=members,
        seed=1,
        output=output,
        batch_size=batch,
        chunk_members=chunk,
    )


def row(name: str, members: int, seconds: float, base: float | None, target: bool) -> str:
    rate = members / seconds
    ratio = "" if base is None else f"{rate / base:14.2f}x"
    goal = ""
    if target and base is not None:
        goal = f"  (>= {TARGET}x: {'met' if rate / base >= TARGET else 'not met'})"
    return f"  {name:38}{seconds:9.2f}{rate:12,.1f}{ratio}{goal}"


def steady_rate(marks: list[tuple[float, int]], workers: int = 1) -> float:
    """Members/s once every worker has written its first chunk (workers up, model loaded):
    from the ``workers``-th chunk written to the last."""
    (t_a, m_a), (t_b, m_b) = marks[min(workers, len(marks)) - 1], marks[-1]
    return (m_b - m_a) / (t_b - t_a) if t_b > t_a else float("nan")


def bench_ensemble(args: argparse.Namespace, work: Path, uri: str) -> dict[str, float]:
    import ray

    from cloudburst.ensembles.fanout import generate_on_cluster

    n, batch, chunk = args.members, args.batch, args.chunk
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    walls: dict[int, list[float]] = {1: [], 2: []}
    steady: dict[int, list[float]] = {1: [], 2: []}
    try:
        for r in range(args.runs):
            for workers in (1, 2):
                out = str(work / f"fan-{workers}-{r}.zarr")
                marks: list[tuple[float, int]] = []
                t0 = time.perf_counter()
                generate_on_cluster(
                    ask(out, n, batch, chunk),
                    workers=workers,
                    tracking_uri=uri,
                    on_chunk=lambda done, _, seen=marks: seen.append((time.perf_counter(), done)),
                )
                walls[workers].append(time.perf_counter() - t0)
                steady[workers].append(steady_rate(marks, workers))
    finally:
        ray.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = resolve("models:/bench-vae@candidate", uri)
        marks = []
        t0 = time.perf_counter()
        generate(
            ask(str(work / "inproc-1.zarr"), n, batch, chunk),
            model=model,
            on_chunk=lambda done, _: marks.append((time.perf_counter(), done)),
        )
        t_in, r_in = time.perf_counter() - t0, steady_rate(marks)
    finally:
        torch.set_num_threads(threads)
    t1, t2 = statistics.median(walls[1]), statistics.median(walls[2])
    r1, r2 = statistics.median(steady[1]), statistics.median(steady[2])
    print(
        f"\nensemble: {n:,} members of {'x'.join(map(str, WINDOW))} "
        f"({n * MB_PER_MEMBER:.1f} MB), batch {batch}, chunks of {chunk}; median of {args.runs}"
    )
    print("  wall: the whole request (workers started, model loaded once per worker)")
    print(f"  {'case':38}{'seconds':>9}{'members/s':>12}{'ratio to 1':>15}")
    print(row("in-process, 1 thread", n, t_in, None, False))
    print(row("Ray fan-out, 1 worker (1 CPU)", n, t1, n / t1, False))
    print(row("Ray fan-out, 2 workers (1 CPU each)", n, t2, n / t1, True))
    print("  steady: members/s once every worker has written a chunk, to the last chunk")
    print(f"  {'case':38}{'members/s':>21}{'ratio to 1':>15}")
    print(f"  {'in-process, 1 thread':38}{r_in:21,.1f}")
    print(f"  {'Ray fan-out, 1 worker (1 CPU)':38}{r1:21,.1f}{1.0:14.2f}x")
    verdict = "met" if r2 / r1 >= TARGET else "not met"
    print(
        f"  {'Ray fan-out, 2 workers (1 CPU each)':38}{r2:21,.1f}{r2 / r1:14.2f}x"
        f"  (>= {TARGET}x: {verdict})"
    )
    million = 1_000_000
    print(
        f"  capacity, from the steady per-worker rate ({r1:,.1f} members/s per CPU worker) "
        f"and the 2-worker efficiency ({r2 / r1 / 2:.0%}): 10^6 members = "
        f"{million * MB_PER_MEMBER / 1e3:,.0f} GB float32"
    )
    for workers in (1, 2, 16, 64):
        hours = million / (r1 * workers * min(1.0, r2 / r1 / 2)) / 3600
        kind = "measured rate" if workers <= 2 else "projected at that efficiency"
        print(f"    {workers:>3} CPU workers: {hours:8.1f} h  ({kind})")
    return {"per_worker_members_s": r1, "two_workers_members_s": r2}


def bench_endpoint(args: argparse.Namespace, work: Path, uri: str) -> None:
    import ray
    from ray import serve
    from servers import free_port

    from cloudburst.serving.app import build

    n, batch, chunk = args.members, args.batch, args.chunk
    seconds: dict[int, float] = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for replicas in (1, 2):
            settings = {
                "tracking_uri": uri,
                "state_url": str(work / f"state-{replicas}"),
                "allowed_prefixes": [str(work)],
                "min_replicas": replicas,
                "max_replicas": replicas,
                "cpus_per_replica": 1,
            }
            serve.run(build(settings), name=f"bench{replicas}", route_prefix="/", blocking=False)
            wait_healthy(base)
            # warm-up: every replica loads the model once (two chunks per replica)
            submit_and_wait(
                base, ask(str(work / f"warm-{replicas}.zarr"), 2 * chunk * replicas, batch, chunk)
            )
            state = submit_and_wait(base, ask(str(work / f"http-{replicas}.zarr"), n, batch, chunk))
            seconds[replicas] = float(state["seconds"])
            serve.delete(f"bench{replicas}")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        f"\nendpoint: one request of {n:,} members (batch {batch}, chunks of {chunk}), job seconds"
    )
    print(f"  {'case':38}{'seconds':>9}{'members/s':>12}{'ratio to 1':>15}")
    print(row("1 generator replica (1 CPU)", n, seconds[1], None, False))
    print(row("2 generator replicas (1 CPU each)", n, seconds[2], n / seconds[1], True))


def run(args: argparse.Namespace, sections: list[str], work: Path) -> None:
    """The sections of ``sections`` among ensemble / endpoint, in ``work``."""
    uri = register(work, WINDOW)
    if "ensemble" in sections:
        bench_ensemble(args, work, uri)
    if "endpoint" in sections:
        bench_endpoint(args, work, uri)
