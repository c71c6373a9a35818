"""Science check: the baselines a near-infrared -> visible translation model has to beat.

    .venv/bin/python benchmarks/translation_baselines.py [--params 20000] [--steps 300]
        [--patches 2000] [--patch 64] [--batch 16] [--lr 2e-3] [--seed 0] [--threads 1]
        [--test-frames 5] [--figure outputs/evaluation/translation_baselines.png]

Data: ``../shared/data/seviri_uk_20200401.nc`` (Meteosat SEVIRI raw counts, 25 frames at 5
minutes, read in place), skipped with a message when ``../shared/data`` is absent.

Method:

1. ``ir_016`` (1.6 micron, ~3 km) is regridded onto the ``hrv`` grid (~1 km) bicubically
   (``xarray`` ``interp``, method "cubic"); the rows and columns the interpolation leaves NaN
   (wholly outside the coarse grid: the first hrv column) are cropped off both channels.
   ``ir_016`` has missing tiles (count 0: a 42 x 256 block in every frame, more in frames 4,
   10 and 22): they are filled with the nearest valid count before the interpolation, and
   every hrv pixel within 3 coarse pixels of one is masked out of the fits, the patches and
   the scores (the same mask for every method).
2. The last ``--test-frames`` frames are held out. Each channel's counts are normalised by its
   valid training pixels' 0.1 and 99.9 percentiles to [0, 1] (clipped), so SSIM and PSNR use a
   data range of 1.
3. Methods, all scored on the held-out frames with ``image_scores`` (SSIM over 7 x 7 uniform
   windows, per frame then averaged; PSNR and MAE over all pixels): the normalised bicubic
   input as it is; ``LinearMapBaseline`` fitted on all valid training pixels; ``ConvRegression``
   sized to ``--params`` parameters, trained on ``--patches`` random ``--patch`` x ``--patch``
   patches of the training frames for ``--steps`` Adam steps at ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from _common import DATA  # before cloudburst: package path, quiet defaults
from cloudburst.evaluation.translation import (
    ConvRegression,
    LinearMapBaseline,
    image_scores,
    translation_figure,
    translation_table,
)

SEVIRI = DATA / "seviri_uk_20200401.nc"
MISSING = 0  # ir_016 count of missing tiles (no valid count below 36 in the file)
MARGIN = 3  # coarse pixels around a missing one whose fine pixels are masked


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ir_016 regridded bicubically onto the hrv grid, hrv, valid): float64 counts and where
    both channels have data. The rows and columns where the regridded input is all NaN
    (outside the coarse grid) are cropped off all three."""
    import xarray as xr
    from scipy import ndimage

    with xr.open_dataset(SEVIRI) as ds:
        ir = ds["ir_016"].astype("float64")
        counts = ir.values
        missing = counts == MISSING
        # continue the data into missing tiles (nearest valid pixel) so that the cubic
        # spline stays finite and smooth there; those pixels are masked below
        filled = counts.copy()
        for k in range(counts.shape[0]):
            if missing[k].any():
                near = ndimage.distance_transform_edt(
                    missing[k], return_distances=False, return_indices=True
                )
                filled[k] = counts[k][tuple(near)]
        # a fine pixel is invalid when a coarse pixel within MARGIN of it is missing
        grow = np.ones((1, 2 * MARGIN + 1, 2 * MARGIN + 1), dtype=bool)
        bad = ndimage.binary_dilation(missing, structure=grow)
        hy, hx = ds["y_hrv"].values, ds["x_hrv"].values
        up = ir.copy(data=filled).interp(y=hy, x=hx, method="cubic").values
        bad_up = (
            ir.copy(data=bad.astype("float64"))
            .interp(y=hy, x=hx, method="nearest", kwargs={"fill_value": 1.0})
            .values
        )
        hrv = ds["hrv"].astype("float64").values
    finite = np.isfinite(up).all(axis=0)
    rows, cols = np.flatnonzero(finite.any(axis=1)), np.flatnonzero(finite.any(axis=0))
    box = np.s_[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    up, hrv, valid = up[box], hrv[box], bad_up[box] == 0
    if not np.isfinite(up).all():
        raise RuntimeError("the regridded input has NaN inside the cropped box")
    return up, hrv, valid


def normalise(a: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``a`` mapped by the 0.1 and 99.9 percentiles of ``train`` (valid training pixels) to
    0 and 1, clipped to [0, 1]."""
    lo, hi = np.percentile(train, [0.1, 99.9])
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def patches(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray, n: int, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random ``size`` x ``size`` patches of (x, y) whose pixels are all valid."""
    rng = np.random.default_rng(seed)
    px, py = [], []
    while len(px) < n:
        k = rng.integers(0, x.shape[0])
        i = rng.integers(0, x.shape[1] - size + 1)
        j = rng.integers(0, x.shape[2] - size + 1)
        win = np.s_[k, i : i + size, j : j + size]
        if valid[win].all():
            px.append(x[win])
            py.append(y[win])
    return np.stack(px), np.stack(py)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=20000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--patches", type=int, default=2000)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test-frames", type=int, default=5)
    p.add_argument("--figure", default=None, help="write a PNG of the held-out frames here")
    args = p.parse_args()
    if not DATA.is_dir() or not SEVIRI.exists():
        print(f"skipped: {SEVIRI} (the real SEVIRI sample) is absent")
        return 0
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ir, hrv, valid = load()
    n_test = args.test_frames
    train, test = slice(0, ir.shape[0] - n_test), slice(ir.shape[0] - n_test, None)
    x = normalise(ir, ir[train][valid[train]])
    y = normalise(hrv, hrv[train][valid[train]])
    mask = valid[test]
    print(
        f"data: {ir.shape[0]} frames of {ir.shape[1]} x {ir.shape[2]} (hrv grid), "
        f"{ir.shape[0] - n_test} training, {n_test} held out; "
        f"{1 - valid.mean():.2%} of pixels masked (missing ir_016 tiles); "
        f"loaded and regridded in {time.perf_counter() - t0:.1f} s"
    )

    rows: dict[str, dict[str, float]] = {}
    rows["bicubic input (no mapping)"] = image_scores(x[test], y[test], data_range=1.0, mask=mask)

    linear = LinearMapBaseline().fit(x[train], y[train], mask=valid[train])
    lin = linear.predict(x[test])
    rows["linear map"] = {**image_scores(lin, y[test], data_range=1.0, mask=mask), "parameters": 2}
    print(f"linear map: gain {linear.gain:.4f}, offset {linear.offset:.4f}")

    net = ConvRegression.for_parameter_count(args.params)
    px, py = patches(x[train], y[train], valid[train], args.patches, args.patch, args.seed)
    t0 = time.perf_counter()
    net.fit(px, py, steps=args.steps, lr=args.lr, seed=args.seed, batch_size=args.batch)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    conv = net.predict(x[test])
    print(
        f"conv regression: width {net.width}, depth {net.depth}, {net.parameter_count} "
        f"parameters; {args.steps} steps of {args.batch} {args.patch}x{args.patch} patches "
        f"(from {args.patches}) in {fit_s:.1f} s at {args.threads} thread(s), "
        f"patch MSE {np.mean(net.losses[:20]):.5f} -> {np.mean(net.losses[-20:]):.5f}; "
        f"prediction {time.perf_counter() - t0:.1f} s"
    )
    rows["conv regression"] = {
        **image_scores(conv, y[test], data_range=1.0, mask=mask),
        "parameters": net.parameter_count,
    }
    print()
    print(translation_table(rows))
    if args.figure:
        # masked pixels show red; x runs east to west on this grid: flip it so that north is
        # up and east right
        def shown(a: np.ndarray) -> np.ndarray:
            return np.where(mask, a, np.nan)[:, :, ::-1]

        path = translation_figure(
            shown(x[test]),
            shown(y[test]),
            {"linear map": shown(lin), "conv regression": shown(conv)},
            args.figure,
            frames=[0, 2],
            title="SEVIRI 1.6 um -> HRV, held-out frames (normalised counts)",
        )
        print(f"figure: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
