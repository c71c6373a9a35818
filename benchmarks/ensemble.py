"""Ensemble generation: in-process, through jobs/ensemble.py and through the HTTP endpoint,
beside a raw Zarr write of the same bytes; then peak memory against the member count.

    .venv/bin/python benchmarks/ensemble.py [--members N] [--memory 1000 10000 100000]

One untrained VAE of the vae-fraser size (widths 8/16/32, latent 16, 8x12x12 windows; weights
do not change the cost) is registered in a temporary MLflow store. The same request (N members,
batch 256, chunks of 1024) is then generated:

(a) in-process: ``cloudburst.ensembles.generate.generate`` (model loaded once, beforehand);
(b) the batch job: ``python jobs/ensemble.py`` in a subprocess (wall time, process start and
    model loading included);
(c) over HTTP: a Ray Serve app on loopback (``cloudburst.serving.app.build``), warmed by a small
    request (the replica loads the model once, as in-process), then POST and poll
    GET until done; the time is the job's own (from the state record) and the client's wall;
(d) a raw Zarr write of the same member array from memory with the same chunking: the I/O floor.

Figures: members/s and MB/s of each, and each side's ratio to in-process (target: endpoint
>= 0.9x). Memory: peak RSS of ``jobs/ensemble.py`` at each ``--memory`` count, as the ratio to
the smallest (target: 100k within 1.2x of 1k). Cost on 2 CPU cores: a few minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from _common import ROOT, submit_and_wait  # before cloudburst: package path, quiet defaults
from cloudburst import tracking
from cloudburst.config import VAEConfig
from cloudburst.data.transforms import Scale
from cloudburst.ensembles.generate import generate, resolve
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel

WINDOW = (8, 12, 12)
BATCH, CHUNK = 256, 1024


def register(workdir: Path, window: tuple[int, int, int] = WINDOW) -> str:
    """The tracking URI of a fresh store holding ``bench-vae`` (version 1, alias candidate):
    the vae-fraser-sized VAE (widths 8/16/32, latent 16), untrained, for ``window``."""
    uri = f"sqlite:///{workdir}/mlflow/mlflow.db"
    tracking.setup(uri, experiment="bench")
    torch.manual_seed(0)
    cfg = VAEConfig(widths=(8, 16, 32), latent=16)
    net = registry.build("vae", cfg, window)
    stats = {"units": "mm/day", "max": 60.0, "quantiles": {"0.99": 16.4}}
    packaged = PrecipitationModel(net, "vae", cfg, window, Scale(0.0, 60.0, "unit"), stats)
    tracking.log_and_register(packaged, name="bench-vae", tags={}, tracking_uri=uri)
    return uri


def ask(output: str, members: int) -> EnsembleRequest:
    return EnsembleRequest(
        model="models:/bench-vae@candidate",
        members=members,
        seed=1,
        output=output,
        batch_size=BATCH,
        chunk_members=CHUNK,
    )


def job(uri: str, output: str, members: int) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of jobs/ensemble.py in a child process."""
    args = [
        sys.executable, str(ROOT / "jobs" / "ensemble.py"),
        "--model", "models:/bench-vae@candidate", "--tracking-uri", uri,
        "--members", str(members), "--seed", "1", "--output", output,
        "--batch-size", str(BATCH), "--chunk-members", str(CHUNK),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = 0  # reaped by wait4
    if not Path(output).exists():
        raise RuntimeError(f"jobs/ensemble.py failed:\n{err[-2000:]}")
    return wall, int(usage.ru_maxrss) * 1024


def http(uri: str, output: str, members: int, workdir: Path) -> tuple[float, float]:
    """(job seconds from its state record, client wall seconds) through the Serve app."""
    import ray
    from ray import serve
    from servers import free_port

    from cloudburst.serving.app import build

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "tracking_uri": uri,
        "state_url": str(workdir / "state"),
        "allowed_prefixes": [str(workdir)],
        "min_replicas": 1,
        "max_replicas": 1,
        "cpus_per_replica": 2,
    }
    serve.run(build(settings), name="bench", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"

    def submit(out: str, n: int) -> tuple[dict, float]:
        t0 = time.perf_counter()
        state = submit_and_wait(base, ask(out, n))
        return state, time.perf_counter() - t0

    try:
        # warm-up, as in-process: the replica loads the model from the registry once
        submit(str(workdir / "http-warm.zarr"), 2 * CHUNK)
        state, wall = submit(output, members)
        return float(state["seconds"]), wall
    finally:
        serve.shutdown()
        ray.shutdown()


def raw_write(values: np.ndarray, output: str) -> float:
    t0 = time.perf_counter()
    group = zarr.open_group(output, mode="w", zarr_format=3)
    arr = group.create_array("precip", shape=values.shape, dtype="float32", chunks=(CHUNK, *WINDOW))
    for a in range(0, len(values), CHUNK):
        arr[a : a + CHUNK] = values[a : a + CHUNK]
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--memory", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    args = parser.parse_args()
    torch.set_num_threads(2)
    n = args.members
    mb = n * int(np.prod(WINDOW)) * 4 / 1e6
    with tempfile.TemporaryDirectory(prefix="cloudburst-bench-") as tmp:
        work = Path(tmp)
        uri = register(work)
        model = resolve("models:/bench-vae@candidate", uri)
        generate(ask(str(work / "warm.zarr"), 2 * CHUNK), model=model)  # warm-up

        result = generate(ask(str(work / "inproc.zarr"), n), model=model)
        t_in = result.seconds
        t_job, _ = job(uri, str(work / "job.zarr"), n)
        t_http, t_http_wall = http(uri, str(work / "http.zarr"), n, work)
        values = np.asarray(zarr.open_group(str(work / "inproc.zarr"), mode="r")["precip"][:])
        t_raw = raw_write(values, str(work / "raw.zarr"))

        print(f"\n{n} members of {WINDOW} float32 ({mb:.1f} MB), batch {BATCH}, chunk {CHUNK}")
        print(f"{'path':34}{'seconds':>9}{'members/s':>12}{'MB/s':>9}{'vs in-process':>15}")
        rows = [
            ("in-process generate()", t_in),
            ("jobs/ensemble.py (wall)", t_job),
            ("HTTP endpoint (job)", t_http),
            ("HTTP endpoint (client wall)", t_http_wall),
            ("raw Zarr write of the same bytes", t_raw),
        ]
        for name, t in rows:
            print(f"{name:34}{t:9.2f}{n / t:12,.0f}{mb / t:9.1f}{t_in / t:14.2f}x")
        print(
            f"target: endpoint >= 0.90x in-process: job {t_in / t_http:.2f}x, "
            f"client wall {t_in / t_http_wall:.2f}x"
        )

        print("\npeak RSS of jobs/ensemble.py against members")
        peaks = {}
        for members in args.memory:
            out = str(work / f"mem-{members}.zarr")
            wall, peak = job(uri, out, members)
            peaks[members] = peak
            base = peaks[args.memory[0]]
            print(
                f"{members:>9,} members {peak / 2**20:9.1f} MiB  x{peak / base:5.2f} "
                f"of {args.memory[0]:,}  ({members / wall:,.0f} members/s wall)"
            )
        last = args.memory[-1]
        print(
            f"target: {last:,} within 1.20x of {args.memory[0]:,}: "
            f"{peaks[last] / peaks[args.memory[0]]:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
