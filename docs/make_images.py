"""Draw the documentation's pictures from the package's own code, on synthetic data.

Run from the repository root: ``.venv/bin/python docs/make_images.py``; it writes
``docs/images/synthetic-windows.png`` (windows of the synthetic precipitation generator, drawn
by the evaluation's samples figure) and ``docs/images/intensity-histogram.png`` (their
intensity distribution, drawn by the evaluation's histogram figure). The images are kept in
the repository; the site build does not run this script.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cloudburst.config import SyntheticConfig
from cloudburst.data.synthetic import generate
from cloudburst.evaluation import figures

OUT = Path(__file__).resolve().parent / "images"


def main() -> None:
    OUT.mkdir(exist_ok=True)
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

    wet = precip[np.isfinite(precip) & (precip >= 0.01)]
    edges = np.geomspace(0.01, float(wet.max()) * 1.001, 31)
    counts, _ = np.histogram(wet, bins=edges)
    title = "intensity distribution of the wet values (>= 0.01 mm/h)"
    fig = figures.intensity_histograms(edges, {"synthetic": counts}, units, title)
    fig.set_size_inches(8, 3.4)
    fig.savefig(OUT / "intensity-histogram.png", dpi=72)


if __name__ == "__main__":
    main()
