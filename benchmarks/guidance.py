"""Reconstruction guidance: how the weight w_r shapes interpolations and forecasts.

A check of the diffusion study (Herbert, Diffusion Models for Time-Evolving Precipitation
Fields) on this platform.

    .venv/bin/python benchmarks/guidance.py [--model models:/NAME@ALIAS]
        [--data outputs/radolan/precip.zarr] [--weights 0 1 100 1e6]
        [--kinds interpolation forecast] [--windows 3] [--members 4] [--steps 25]

Picks the ``--windows`` wettest windows of the store (the model's window size, no missing
value), makes conditional ensembles of each through the ensemble engine itself (the scenario's
``condition`` is the window, the other frames are withheld) for every weight, and compares the
generated frames with the withheld truth:

- MAE and fair CRPS of the generated frames against the withheld ones (physical units);
- the mean of the generated frames over the withheld mean (1 is right);
- the seam jump: mean |x_t - x_(t-1)| across each boundary between a known and a generated
  step, over the same quantity in the observed window (1: no jump beyond the data's own
  hour-to-hour change).

Each row is also given as a ratio to w_r = 0 (imputation), and the MAE of a deterministic
baseline (linear interpolation between the known steps, or persistence of the last known step)
is printed beside (a deterministic forecast's CRPS is its MAE). The diffusion study found w_r =
1e6 needed for good interpolation on its trained network. Train a model first, e.g. ``python
benchmarks/diffusion_transforms.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import xarray as xr

from _common import ROOT  # before cloudburst: package path, quiet defaults
from cloudburst import tracking
from cloudburst.data.ingest import PRECIP, open_store
from cloudburst.ensembles.condition import known_steps
from cloudburst.ensembles.generate import generate, resolve
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.evaluation.conditional import baseline
from cloudburst.tuning.guidance import fair_crps, seam_jump


def wettest_windows(
    data: str, window: tuple[int, int, int], count: int
) -> list[tuple[int, int, int]]:
    """(time, y, x) starts of the ``count`` wettest complete windows on a stride of half a
    window, no two overlapping in time and space."""
    ds, _ = open_store(data)
    values = ds[PRECIP].values
    t, ny, nx = window
    found = []
    for i in range(0, values.shape[0] - t + 1, max(1, t // 2)):
        for y in range(0, values.shape[1] - ny + 1, max(1, ny // 2)):
            for x in range(0, values.shape[2] - nx + 1, max(1, nx // 2)):
                w = values[i : i + t, y : y + ny, x : x + nx]
                if np.isfinite(w).all():
                    found.append((float(w.mean()), i, y, x))
    found.sort(reverse=True)
    chosen: list[tuple[int, int, int]] = []
    for _, i, y, x in found:
        if all(abs(i - a) >= t or abs(y - b) >= ny or abs(x - c) >= nx for a, b, c in chosen):
            chosen.append((i, y, x))
        if len(chosen) == count:
            break
    return chosen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models:/cloudburst-diffusion-radolan-sqrt@candidate")
    p.add_argument("--data", default=str(ROOT / "outputs/radolan/precip.zarr"))
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 100.0, 1e6])
    p.add_argument("--kinds", nargs="+", default=["interpolation", "forecast"])
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default=None, choices=["ancestral", "ddim"])
    p.add_argument("--tracking-uri")
    args = p.parse_args()

    uri = tracking.tracking_uri(args.tracking_uri)
    model = resolve(args.model, uri)
    window = tuple(model.packaged.window)
    ds, _ = open_store(args.data)
    starts = wettest_windows(args.data, window, args.windows)
    print(f"{model.version_uri} on {args.data}: windows {window}, {len(starts)} wettest windows,")
    print(f"{args.members} members each, {args.steps} steps ({args.sampler or 'model default'})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            scenario_base = {"kind": kind} | (
                {"context": window[0] // 2} if kind == "forecast" else {}
            )
            for w in args.weights:
                scores: dict[str, list[float]] = {
                    k: [] for k in ("mae", "crps", "mean", "seam", "baseline")
                }
                t0 = time.perf_counter()
                for n, (i, y, x) in enumerate(starts):
                    time_iso = str(np.datetime_as_string(ds.time.values[i], unit="m"))
                    condition = {"data": args.data, "time": time_iso, "y": y, "x": x}
                    request = EnsembleRequest.model_validate(
                        {
                            "model": args.model,
                            "members": args.members,
                            "seed": n,
                            "batch_size": args.members,
                            "output": f"{tmp}/{kind}-{w:g}-{n}.zarr",
                            "steps": args.steps,
                            "sampler": args.sampler,
                            "scenario": {**scenario_base, "condition": condition, "guidance": w},
                        }
                    )
                    generate(request, model=model)
                    gen = xr.open_zarr(request.output, consolidated=False).precip.values
                    truth = ds[PRECIP].values[
                        i : i + window[0], y : y + window[1], x : x + window[2]
                    ]
                    known = known_steps(request.scenario, window[0])
                    hidden = ~known
                    scores["mae"].append(float(np.abs(gen[:, hidden] - truth[None, hidden]).mean()))
                    scores["crps"].append(fair_crps(gen[:, hidden], truth[hidden]))
                    scores["mean"].append(
                        float(gen[:, hidden].mean() / max(truth[hidden].mean(), 1e-9))
                    )
                    scores["seam"].append(
                        seam_jump(gen, known) / max(seam_jump(truth, known), 1e-9)
                    )
                    base = baseline(truth, known, kind)
                    scores["baseline"].append(float(np.abs(base[hidden] - truth[hidden]).mean()))
                row = {k: float(np.mean(v)) for k, v in scores.items()}
                row.update(kind=kind, w=w, seconds=time.perf_counter() - t0)
                rows.append(row)
                print(f"  {kind} w_r={w:g} done in {row['seconds']:.0f} s", flush=True)
    print()
    print(
        f"{'scenario':<14}{'w_r':>8}{'MAE':>9}{'x w0':>7}{'CRPS':>9}{'x w0':>7}"
        f"{'mean/obs':>10}{'seam/obs':>10}{'baseline MAE':>14}"
    )
    for row in rows:
        base = next(r for r in rows if r["kind"] == row["kind"] and r["w"] == args.weights[0])
        print(
            f"{row['kind']:<14}{row['w']:>8g}{row['mae']:>9.3f}{row['mae'] / base['mae']:>7.2f}"
            f"{row['crps']:>9.3f}{row['crps'] / base['crps']:>7.2f}"
            f"{row['mean']:>10.2f}{row['seam']:>10.2f}{row['baseline']:>14.3f}"
        )
    print("(ratios: to the first weight; mean/obs and seam/obs: 1 is the observed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
