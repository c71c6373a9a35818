"""Synthetic precipitation: the embedded default dataset, generated instead of downloaded.

The demo, the tests and the benchmarks need precipitation that behaves like the real thing
(mostly dry, heavy-tailed, spatially coherent, persistent and moving, with a wet season) without
a download. The generator is a transformed Gaussian field ("meta-Gaussian" model):

1. a latent Gaussian field per step, spatially correlated with a power-law spectrum (amplitude
   ``k ** (-spectral_slope / 2)``) and unit variance, evolving as an advected AR(1) process:
   ``z[t] = persistence * shift(z[t-1], advection) + sqrt(1 - persistence**2) * noise[t]``;
   the shift is a Fourier phase shift (sub-pixel, exact on the padded periodic domain), so the
   field stays stationary with unit variance at every step;
2. ``u = Phi(z)`` (the normal CDF) is uniform; a pixel is dry where ``u < 1 - p_wet(t)``, with
   ``p_wet`` following ``wet_fraction`` and a seasonal cycle peaking near day ``PEAK_DAY``;
3. wet pixels get the conditional quantile of the wet-amount distribution: a gamma body with a
   generalised Pareto tail above its ``tail_quantile``, continuous in value and density.

The field is generated on a padded periodic domain and cropped, so opposite edges of the output
are not correlated. Everything is drawn from ``numpy.random.default_rng(cfg.seed)``: one config
gives one dataset, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import xarray as xr
from scipy import fft, special, stats

from cloudburst.config import SyntheticConfig
from cloudburst.data.ingest import IngestResult, ingest

PEAK_DAY = 200.0  # day of year of the wettest time: doy 150-300 selects the wet season
YEAR_DAYS = 365.25
BLOCK_VALUES = 2**21  # latent values per time block: bounds the float64 temporaries
_LOGIT_MIN = np.log(1e-12)  # the gamma table starts at v ~ 1e-12; below it, the exact ppf


# ---------------------------------------------------------------------------- latent field


def _padded(n: int) -> int:
    """A fast FFT length about 1.5 n: the margin decorrelates opposite edges of the crop."""
    return int(fft.next_fast_len(n + max(4, n // 2), real=True))


def _spectral_amplitude(py: int, px: int, slope: float) -> np.ndarray:
    """``k ** (-slope / 2)`` on the rfft2 grid, normalised so the field has unit variance.

    The mean (k = 0) gets the amplitude of the lowest resolved wavenumber, so the whole domain
    can be wetter or drier on some steps; Nyquist rows/columns are zeroed so that a sub-pixel
    phase shift keeps the spectrum Hermitian (the field stays real, its variance unchanged).
    """
    ky = fft.fftfreq(py)[:, None]
    kx = fft.rfftfreq(px)[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = 1.0 / max(py, px)
    amp = k ** (-slope / 2.0)
    if py % 2 == 0:
        amp[py // 2, :] = 0.0
    if px % 2 == 0:
        amp[:, -1] = 0.0
    # variance of irfft2(amp * rfft2(white)) is sum over the full (Hermitian) grid of amp^2 / N:
    # columns other than kx = 0 (and Nyquist, zeroed) stand for two full-grid columns
    weight = np.full(amp.shape[1], 2.0)
    weight[0] = 1.0
    if px % 2 == 0:
        weight[-1] = 1.0
    var = float((amp**2 * weight).sum()) / (py * px)
    return amp / np.sqrt(var)


def latent(cfg: SyntheticConfig) -> np.ndarray:
    """The latent Gaussian field, shape (nt, ny, nx), float64, unit variance at every pixel.

    Exposed so that its space-time structure (correlation length, persistence, advection) can
    be checked and reused apart from the precipitation transform.
    """
    return np.concatenate(list(_latent_blocks(cfg, np.random.default_rng(cfg.seed))), axis=0)


def _latent_blocks(cfg: SyntheticConfig, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield the latent field in time blocks (memory bounded by a block, not the record)."""
    py, px = _padded(cfg.ny), _padded(cfg.nx)
    amp = _spectral_amplitude(py, px, cfg.spectral_slope)
    ky = fft.fftfreq(py)[:, None]
    kx = fft.rfftfreq(px)[None, :]
    dy, dx = cfg.advection
    # advected, damped carry-over of the previous step, one complex factor per wavenumber
    carry = cfg.persistence * np.exp(-2j * np.pi * (ky * dy + kx * dx))
    innovation = np.sqrt(1.0 - cfg.persistence**2) * amp
    block = max(1, BLOCK_VALUES // (py * px))
    state: np.ndarray | None = None
    for a in range(0, cfg.nt, block):
        n = min(block, cfg.nt - a)
        spec = fft.rfft2(rng.standard_normal((n, py, px)), axes=(-2, -1))
        for i in range(n):
            if state is None:  # stationary start: the first step is a plain correlated field
                state = amp * spec[i]
            else:
                state = carry * state + innovation * spec[i]
            spec[i] = state
        field = fft.irfft2(spec, s=(py, px), axes=(-2, -1))
        yield field[:, : cfg.ny, : cfg.nx]


# ---------------------------------------------------------------------------- marginals


def wet_probability(time: np.ndarray | pd.DatetimeIndex, cfg: SyntheticConfig) -> np.ndarray:
    """Probability that a pixel is wet at each time: ``wet_fraction`` with a seasonal cycle.

    ``p = w + a * min(w, 1 - w) * cos(2 pi (doy - PEAK_DAY) / 365.25)`` stays inside [0, 1] for
    every amplitude ``a`` in [0, 1] and averages to ``w`` over a year, so the long-run dry
    fraction is ``1 - wet_fraction`` whatever the seasonality.
    """
    t = pd.DatetimeIndex(time)
    doy = (
        t.day_of_year.to_numpy(float)
        + (t.hour.to_numpy(float) + t.minute.to_numpy(float) / 60) / 24
    )
    w = cfg.wet_fraction
    cycle = np.cos(2.0 * np.pi * (doy - PEAK_DAY) / YEAR_DAYS)
    return np.clip(w + cfg.seasonal_amplitude * min(w, 1.0 - w) * cycle, 0.0, 1.0)


def _gamma_table(shape: float, tq: float, n: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    """log gamma quantiles on a grid uniform in logit(v): the exact ppf is ~30x slower.

    log x is smooth in logit v at both ends (a power law of v near 0, linear in -log(1 - v)
    near 1), so linear interpolation on this grid is accurate to ~1e-6 relative.
    """
    logit = np.linspace(_LOGIT_MIN, np.log(tq) - np.log1p(-tq), n)
    return logit, np.log(special.gammaincinv(shape, special.expit(logit)))


def _tail_sigma(cfg: SyntheticConfig) -> tuple[float, float]:
    """Threshold and GPD scale (unit gamma scale) making the wet density continuous there."""
    threshold = float(special.gammaincinv(cfg.gamma_shape, cfg.tail_quantile))
    density = float(stats.gamma.pdf(threshold, cfg.gamma_shape))
    return threshold, (1.0 - cfg.tail_quantile) / density


def wet_quantile(
    exceedance: np.ndarray, cfg: SyntheticConfig, scale: float | None = None
) -> np.ndarray:
    """Wet amount with the given exceedance probability ``1 - v`` of the wet distribution.

    Body: gamma(gamma_shape, scale) below its ``tail_quantile``; above it, the threshold plus a
    generalised Pareto excess (shape ``tail_shape``) whose scale makes the density continuous,
    so the tail is heavier than the gamma's for ``tail_shape > 0`` without a kink. Taking the
    exceedance (not ``v``) keeps precision in the far tail. ``scale`` defaults to gamma_scale.
    """
    s = np.asarray(exceedance, dtype=np.float64)
    scale = cfg.gamma_scale if scale is None else scale
    a, tq, xi = cfg.gamma_shape, cfg.tail_quantile, cfg.tail_shape
    threshold, sigma = _tail_sigma(cfg)
    out = np.empty_like(s)

    tail = s < 1.0 - tq
    e = s[tail] / (1.0 - tq)  # exceedance within the tail, in (0, 1]
    excess = -sigma * np.log(e) if xi == 0 else sigma / xi * (e ** (-xi) - 1.0)
    out[tail] = threshold + excess

    body = ~tail
    sb = s[body]
    with np.errstate(divide="ignore"):
        logit = np.log1p(-sb) - np.log(sb)
    grid, log_x = _gamma_table(a, tq)
    vals = np.exp(np.interp(logit, grid, log_x))
    low = logit < grid[0]  # off the table (about 1e-12 of wet values): the exact ppf
    vals[low] = special.gammaincinv(a, 1.0 - sb[low])
    out[body] = vals
    return out * scale


# ---------------------------------------------------------------------------- dataset


def _coords(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, pd.DatetimeIndex]:
    r = cfg.resolution_deg
    lat = cfg.center_lat + r * ((cfg.ny - 1) / 2.0 - np.arange(cfg.ny))  # north to south
    lon = cfg.center_lon + r * (np.arange(cfg.nx) - (cfg.nx - 1) / 2.0)
    time = pd.date_range(pd.Timestamp(cfg.start), periods=cfg.nt, freq=cfg.freq).as_unit("ns")
    return lat, lon, time


def generate(cfg: SyntheticConfig) -> xr.Dataset:
    """The synthetic precipitation Dataset for ``cfg``: ``precip`` (time, lat, lon) float32.

    Daily data are in mm/day, hourly in mm/h (the gamma/GPD amounts are divided by 24), the
    units the CF-normalised sources use, so the result ingests like any real archive.
    """
    lat, lon, time = _coords(cfg)
    hourly = cfg.freq == "1h"
    scale = cfg.gamma_scale / 24.0 if hourly else cfg.gamma_scale
    p_wet = wet_probability(time, cfg)
    out = np.empty((cfg.nt, cfg.ny, cfg.nx), dtype=np.float32)
    t0 = 0
    for z in _latent_blocks(cfg, np.random.default_rng(cfg.seed)):
        n = z.shape[0]
        p = p_wet[t0 : t0 + n, None, None]
        surv = special.ndtr(-z)  # 1 - u, precise where u is near 1 (the heaviest rain)
        wet = surv < p
        block = np.zeros(z.shape, dtype=np.float32)
        # exceedance within the wet distribution: (1 - u) / p_wet, in (0, 1)
        exceed = surv[wet] / np.broadcast_to(p, z.shape)[wet]
        block[wet] = wet_quantile(exceed, cfg, scale).astype(np.float32)
        out[t0 : t0 + n] = block
        t0 += n

    units = "mm/h" if hourly else "mm/day"
    precip = xr.DataArray(
        out,
        dims=("time", "lat", "lon"),
        attrs={
            "units": units,
            "standard_name": "lwe_precipitation_rate",
            "long_name": "synthetic precipitation rate",
        },
    )
    ds = xr.Dataset(
        {"precip": precip},
        coords={
            "time": ("time", time),
            "lat": (
                "lat",
                lat,
                {"standard_name": "latitude", "units": "degrees_north", "axis": "Y"},
            ),
            "lon": (
                "lon",
                lon,
                {"standard_name": "longitude", "units": "degrees_east", "axis": "X"},
            ),
        },
    )
    ds.attrs = {
        "title": "Cloudburst synthetic precipitation",
        "source": "cloudburst.data.synthetic",
        "generator": (
            "meta-Gaussian: advected AR(1) power-law Gaussian field -> normal CDF -> "
            "seasonal wet probability, gamma body with generalised Pareto tail"
        ),
        "seed": int(cfg.seed),
        "synthetic_config": cfg.model_dump_json(),
        # ingest fingerprints the source: every parameter must be in it, or a store written
        # with another seed would be taken as up to date
        "cloudburst_source": f"synthetic:{cfg.model_dump_json()}",
        "Conventions": "CF-1.8",
    }
    return ds


def write_synthetic(
    cfg: SyntheticConfig,
    target: str,
    *,
    bins: int = 100,
    chunks: dict[str, int] | None = None,
    target_options: dict | None = None,
    progress: bool = True,
) -> IngestResult:
    """Generate and ingest into ``target`` through the same path as real data.

    Going through :func:`cloudburst.data.ingest.ingest` gives the same store layout, statistics,
    completion marker and idempotence; a changed config changes the fingerprint.
    """
    return ingest(
        generate(cfg),
        target,
        bins=bins,
        chunks=chunks,
        target_options=target_options,
        progress=progress,
    )
