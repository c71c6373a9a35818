"""Power spectra of precipitation fields: radially averaged spatial PSD per snapshot and
temporal PSD per cell series, averaged over what is accumulated.

Both are mean power per frequency bin (``np.fft``, mean removed, no window), so a pure sine of
k cycles across the domain peaks in bin k. Frequencies are in cycles per grid length (spatial)
and cycles per time step (temporal); divide by the spacing for physical units.
"""

from __future__ import annotations

import numpy as np


def radial_psd(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(wavenumbers 1..K, mean power) of 2-D snapshots ``(..., y, x)``, averaged over snapshots.

    Wavenumber bins are integer radii |k| (cycles per domain) up to min(ny, nx) // 2; NaN pixels
    are set to the snapshot's mean first; entirely NaN snapshots are left out.
    """
    arr = np.asarray(field, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"need (..., y, x) snapshots, got shape {arr.shape}")
    ny, nx = arr.shape[-2:]
    snaps = arr.reshape(-1, ny, nx)
    snaps = snaps[~np.isnan(snaps).all(axis=(1, 2))]  # a snapshot with no value says nothing
    if len(snaps) == 0:
        raise ValueError("every snapshot is entirely NaN")
    means = np.nanmean(snaps, axis=(1, 2), keepdims=True)
    snaps = np.where(np.isnan(snaps), means, snaps) - means
    power = np.abs(np.fft.fft2(snaps)) ** 2 / (ny * nx) ** 2
    ky = np.fft.fftfreq(ny) * ny
    kx = np.fft.fftfreq(nx) * nx
    radius = np.rint(np.hypot(ky[:, None], kx[None, :])).astype(int)
    kmax = min(ny, nx) // 2
    mean_power = power.mean(axis=0)
    sums = np.bincount(radius.ravel(), weights=mean_power.ravel(), minlength=kmax + 1)
    counts = np.bincount(radius.ravel(), minlength=kmax + 1)
    k = np.arange(1, kmax + 1)
    return k, sums[1 : kmax + 1] / np.maximum(counts[1 : kmax + 1], 1)


def temporal_psd(series: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies in cycles per step, mean power) of series along ``axis``, averaged over
    every other axis (cells, members); mean removed per series, NaN set to the series mean,
    series with no value at all left out."""
    arr = np.moveaxis(np.asarray(series, dtype=np.float64), axis, -1)
    n = arr.shape[-1]
    if n < 2:
        raise ValueError("a temporal spectrum needs at least 2 steps")
    flat = arr.reshape(-1, n)
    flat = flat[~np.isnan(flat).all(axis=1)]  # cells outside the data (radar edges)
    if len(flat) == 0:
        raise ValueError("every series is entirely NaN")
    means = np.nanmean(flat, axis=1, keepdims=True)
    flat = np.where(np.isnan(flat), means, flat) - means
    power = np.abs(np.fft.rfft(flat, axis=1)) ** 2 / n**2
    freq = np.fft.rfftfreq(n)
    return freq[1:], power.mean(axis=0)[1:]


class SpectrumAccumulator:
    """Mean spectrum over chunks: ``update(power)`` for spectra on one frequency grid."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0
        self.freq: np.ndarray | None = None

    def update(self, freq: np.ndarray, power: np.ndarray, weight: int = 1) -> None:
        if self.freq is None:
            self.freq, self.total = np.asarray(freq), np.zeros_like(power, dtype=np.float64)
        elif not np.array_equal(self.freq, freq):
            raise ValueError("spectra on different frequency grids cannot be averaged")
        assert self.total is not None
        self.total += np.asarray(power, dtype=np.float64) * weight
        self.count += weight

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        if self.freq is None or self.total is None:
            raise ValueError("no spectrum accumulated")
        return self.freq, self.total / self.count
