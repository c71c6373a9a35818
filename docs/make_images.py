"""Draw the documentation's pictures from the package's own code.

Run from the repository root: ``.venv/bin/python docs/make_images.py``. It writes

- ``docs/images/synthetic-windows.png``: windows of the synthetic precipitation generator behind
  ``make demo``, drawn by the evaluation's samples figure;
- from what ``make demo`` and its evaluation leave behind (run them first, see the quickstart),
  ``docs/images/demo-observed-generated.png`` (test windows of the demo's store beside members
  of the demo's ensemble), ``docs/images/demo-qq.png`` and ``docs/images/demo-rank-histogram.png``
  (the evaluation's own figures, copied).

The images are kept in the repository; the site build does not run this script.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import xarray as xr

from cloudburst import open_ensemble
from cloudburst.config import DatasetJobConfig, SyntheticConfig, load_config
from cloudburst.data.synthetic import generate
from cloudburst.data.windows import build_index, split_index
from cloudburst.evaluation import figures

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images"
DEMO_STORE = ROOT / "outputs" / "demo" / "precip.zarr"
DEMO_ENSEMBLE = ROOT / "outputs" / "ensembles" / "demo-v1.zarr"
DEMO_EVALUATION = ROOT / "outputs" / "evaluation" / "demo" / "figures"
FRAMES = 6  # time steps shown per window


def synthetic() -> None:
    cfg = SyntheticConfig(ny=48, nx=48, nt=120, freq="1h", seed=3)
    ds = generate(cfg)
    precip = ds["precip"].values.astype("float64")  # (time, y, x)
    units = str(ds["precip"].attrs.get("units", "mm/h"))
    # the wettest 3 windows of 6 steps, one row each
    starts = range(0, precip.shape[0] - 6, 6)
    wettest = sorted(starts, key=lambda s: -float(np.nansum(precip[s : s + 6])))[:3]
    windows = np.stack([precip[s : s + 6] for s in sorted(wettest)])
    fig = figures.samples_grid(windows, units)
    fig.suptitle("the three wettest 6-hour windows of make demo's synthetic generator")
    fig.set_size_inches(8, 4.2)
    fig.savefig(OUT / "synthetic-windows.png", dpi=72)


def observed_and_generated(n: int = 3) -> None:
    """``n`` test windows of the demo's store (the wettest of an even spread) above ``n``
    members of its ensemble, on one colour scale."""
    cfg = load_config(DatasetJobConfig, ROOT / "jobs" / "configs" / "demo.yaml")
    ds = xr.open_zarr(DEMO_STORE, consolidated=False)
    test = split_index(build_index(ds, cfg.data.windows), cfg.data.split, "test")
    length, sy, sx = test.shape
    precip = ds["precip"]
    spread = test.origins[np.linspace(0, len(test) - 1, 24).astype(int)]
    windows = [
        precip[t : t + length, y : y + sy, x : x + sx].values.astype("float64")
        for t, y, x in spread
    ]
    observed = sorted(windows, key=lambda w: -float(np.nansum(w)))[:n]
    ensemble = open_ensemble(str(DEMO_ENSEMBLE))
    generated = ensemble["precip"].isel(member=slice(0, n)).values.astype("float64")
    units = str(precip.attrs.get("units", ""))
    rows = [(f"observed {i + 1}", w) for i, w in enumerate(observed)]
    rows += [(f"member {i}", w) for i, w in enumerate(generated)]
    top = max(float(np.nanmax(w[:FRAMES])) for _, w in rows)
    fig = figures.figure(
        figsize=(1.15 * FRAMES + 1.0, 1.15 * len(rows) + 0.5), layout="constrained"
    )
    axes = fig.subplots(len(rows), FRAMES, squeeze=False)
    image = None
    for r, (name, w) in enumerate(rows):
        for c in range(FRAMES):
            ax = axes[r][c]
            image = ax.imshow(w[c], vmin=0.0, vmax=top, cmap="viridis", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label=units)
    fig.suptitle("make demo: test windows of the store (top) and members of its ensemble")
    fig.savefig(OUT / "demo-observed-generated.png", dpi=72)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    synthetic()
    missing = [p for p in (DEMO_STORE, DEMO_ENSEMBLE, DEMO_EVALUATION) if not p.exists()]
    if missing:
        print(f"not found: {', '.join(map(str, missing))}: run make demo and its evaluation")
        return 1
    observed_and_generated()
    shutil.copyfile(DEMO_EVALUATION / "qq_generation.png", OUT / "demo-qq.png")
    shutil.copyfile(DEMO_EVALUATION / "rank_histogram.png", OUT / "demo-rank-histogram.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
