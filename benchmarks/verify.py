"""Verification of ensembles streamed from a Zarr store: throughput and peak memory.

    .venv/bin/python benchmarks/verify.py [--members 1000 10000] [--windows 500] [--chunk-mb 64]

An ensemble store of each size is generated (an untrained VAE of the vae-fraser size, 8x12x12
windows; weights do not change the cost) and verified climatologically against ``--windows``
observed windows: the Fraser test split when ../shared/data is ingested under outputs/fraser,
else gamma-distributed synthetic windows. Each verification runs in a fresh child process
(``cloudburst.evaluation.evaluate`` on the store alone: generation summaries, CRPS / fair CRPS /
twCRPS / Brier / reliability / rank histogram / spread-skill) and reports:

- throughput in members x observed pixels per second (every member of a cell compared with
  every observation of it), and the ratio of the large to the small store;
- peak RSS above the child's RSS before the verification started (imports and observations
  loaded), and its ratio between the sizes: bounded by ``--chunk-mb``, not the member count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT  # before cloudburst: package path, quiet defaults

WINDOW = (8, 12, 12)
FRASER = ROOT / "outputs" / "fraser" / "precip.zarr"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_store(workdir: Path, members: int) -> str:
    import torch

    from cloudburst import tracking
    from cloudburst.config import VAEConfig
    from cloudburst.data.transforms import Scale
    from cloudburst.ensembles.generate import ResolvedModel, generate
    from cloudburst.ensembles.request import EnsembleRequest
    from cloudburst.models import registry

    torch.manual_seed(0)
    cfg = VAEConfig(widths=(8, 16, 32), latent=16)
    net = registry.build("vae", cfg, WINDOW)
    stats = {"units": "mm/day", "max": 60.0, "quantiles": {"0.99": 16.4}}
    packaged = tracking.PrecipitationModel(net, "vae", cfg, WINDOW, Scale(0.0, 60.0, "unit"), stats)
    model = ResolvedModel(packaged, "models:/bench/1", "models:/bench/1", None)
    out = str(workdir / f"ens-{members}.zarr")
    request = EnsembleRequest(
        model="models:/bench/1",
        members=members,
        seed=1,
        output=out,
        batch_size=256,
        chunk_members=1024,
    )
    generate(request, model=model)
    return out


def synthetic_store(workdir: Path) -> str:
    from cloudburst.config import SyntheticConfig
    from cloudburst.data.synthetic import write_synthetic

    path = str(workdir / "observed.zarr")
    write_synthetic(SyntheticConfig(nt=730, ny=24, nx=24), path, progress=False)
    return path


def child(store: str, data: str, windows: int, chunk_mb: float, split: str) -> None:
    """Verify ``store`` against ``windows`` observed windows; print one JSON line."""
    from cloudburst.evaluation.evaluate import EvaluationRequest
    from cloudburst.evaluation.observations import (
        FieldSummary,
        edges,
        observed_windows,
        quantile_thresholds,
    )
    from cloudburst.evaluation.score_stores import evaluate_store

    request = EvaluationRequest(
        ensembles=[store],
        data=data,
        split=split,
        limit=windows,
        chunk_mb=chunk_mb,
        log_to_mlflow=False,
        out=tempfile.mkdtemp(),
    )
    obs = observed_windows(request, WINDOW, {})
    thresholds = quantile_thresholds(obs.stats, request.thresholds)
    summary = FieldSummary(edges(obs.stats, obs.x), WINDOW, request.top_n)
    summary.update(obs.x)
    before = rss_bytes()
    t0 = time.perf_counter()
    entry = evaluate_store(store, request, obs, summary, thresholds, lambda _m: None)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    members = entry.source["members"]
    pixels = int(np.isfinite(obs.x).sum())
    print(
        json.dumps(
            {
                "members": members,
                "observed_pixels": pixels,
                "seconds": seconds,
                "rate": members * pixels / seconds,
                "rss_before": before,
                "peak_above": max(peak - before, 0),
                "crps": entry.metrics.get("clim_crps"),
            }
        )
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--windows", type=int, default=500)
    p.add_argument("--chunk-mb", type=float, default=64.0)
    p.add_argument("--child", nargs=4, metavar=("STORE", "DATA", "WINDOWS", "SPLIT"))
    args = p.parse_args()
    if args.child:
        store, data, windows, split = args.child
        child(store, data, int(windows), args.chunk_mb, split)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if (FRASER / "_cloudburst" / "complete.json").exists():
            data, split, what = str(FRASER), "test@years:1986-2010/2011-2017", "Fraser test"
        else:
            data, split = synthetic_store(workdir), "test@seasons:2"
            what = "synthetic (ingest Fraser for real data)"
        rows = []
        for m in args.members:
            t0 = time.perf_counter()
            store = make_store(workdir, m)
            made = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "--chunk-mb", str(args.chunk_mb), "--child"]
            run = subprocess.run(
                [*cmd, store, data, str(args.windows), split],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row["made"] = made
            rows.append(row)
        print(f"verification of ensembles streamed from Zarr against {what} windows {WINDOW}")
        print(f"chunk budget {args.chunk_mb:g} MB; each size in a fresh process\n")
        head = f"{'members':>8} {'obs px':>9} {'seconds':>8} {'members*px/s':>13} "
        print(head + f"{'peak MB':>8} {'x smallest':>10} {'CRPS':>8}")
        base = rows[0]
        for r in rows:
            ratio = r["peak_above"] / max(base["peak_above"], 1)
            print(
                f"{r['members']:>8} {r['observed_pixels']:>9} {r['seconds']:>8.2f} "
                f"{r['rate']:>13.3g} {r['peak_above'] / 2**20:>8.1f} {ratio:>10.2f} "
                f"{r['crps']:>8.4f}"
            )
        last = rows[-1]
        print(
            f"\nthroughput ratio {last['members']} / {base['members']} members: "
            f"{last['rate'] / base['rate']:.2f}x; peak memory ratio: "
            f"{last['peak_above'] / max(base['peak_above'], 1):.2f}x "
            f"(bounded by the chunk, not the ensemble: "
            f"{last['members'] / base['members']:.0f}x the members)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
