"""The synthetic generator: reproducible, and precipitation-like in the ways training relies on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cloudburst.config import SyntheticConfig
from cloudburst.data import synthetic
from cloudburst.data.ingest import open_store


def small(**kw: object) -> SyntheticConfig:
    """Two full years of daily 24 x 24 fields unless overridden: small but seasonal."""
    base = {"ny": 24, "nx": 24, "nt": 730}
    base.update(kw)
    return SyntheticConfig(**base)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def doy_of(ds) -> np.ndarray:  # noqa: ANN001
    return pd.DatetimeIndex(ds.time.values).day_of_year.to_numpy()


@pytest.fixture(scope="module")
def default_small():
    cfg = small()
    return cfg, synthetic.generate(cfg)


# ---------------------------------------------------------------------------- structure


def test_dataset_layout_and_cf_attributes(default_small):
    cfg, ds = default_small
    assert list(ds.data_vars) == ["precip"]
    da = ds["precip"]
    assert da.dims == ("time", "lat", "lon")
    assert da.shape == (cfg.nt, cfg.ny, cfg.nx)
    assert da.dtype == np.float32
    assert da.attrs["units"] == "mm/day"
    assert da.attrs["standard_name"] == "lwe_precipitation_rate"
    assert ds.lat.attrs["standard_name"] == "latitude"
    assert ds.lat.attrs["units"] == "degrees_north"
    assert ds.lon.attrs["standard_name"] == "longitude"
    assert ds.lon.attrs["units"] == "degrees_east"
    lat, lon = ds.lat.values, ds.lon.values
    np.testing.assert_allclose(np.abs(np.diff(lat)), cfg.resolution_deg)
    np.testing.assert_allclose(np.diff(lon), cfg.resolution_deg)
    assert lat.mean() == pytest.approx(cfg.center_lat)
    assert lon.mean() == pytest.approx(cfg.center_lon)
    times = pd.DatetimeIndex(ds.time.values)
    assert times[0] == pd.Timestamp(cfg.start)
    assert (np.diff(times.values) == np.timedelta64(1, "D")).all()
    assert ds.attrs["seed"] == cfg.seed
    assert "synthetic" in ds.attrs["source"]


def test_reproducible_for_a_seed_and_different_across_seeds():
    cfg = small(nt=60)
    a = synthetic.generate(cfg)
    b = synthetic.generate(cfg)
    np.testing.assert_array_equal(a.precip.values, b.precip.values)
    assert a.attrs == b.attrs
    c = synthetic.generate(small(nt=60, seed=cfg.seed + 1))
    assert not np.array_equal(a.precip.values, c.precip.values)
    assert c.attrs["seed"] == cfg.seed + 1
    # different wet masks, not just a relabelling of the same field
    assert ((a.precip.values > 0) != (c.precip.values > 0)).mean() > 0.1


def test_non_negative_finite_and_mostly_dry(default_small):
    _, ds = default_small
    p = ds.precip.values
    assert np.isfinite(p).all()
    assert (p >= 0).all()
    assert (p == 0).mean() > 0.5
    assert p.max() > 0


@pytest.mark.parametrize("wet_fraction", [0.3, 0.6])
def test_dry_fraction_matches_wet_fraction_on_average(wet_fraction):
    dry = [
        (synthetic.generate(small(seed=s, wet_fraction=wet_fraction)).precip.values == 0).mean()
        for s in range(3)
    ]
    assert np.mean(dry) == pytest.approx(1 - wet_fraction, abs=0.03)


def test_latent_field_is_standard_normal():
    z = synthetic.latent(small(nt=300, persistence=0.0))
    assert z.shape == (300, 24, 24)
    assert abs(z.mean()) < 0.1
    assert z.var() == pytest.approx(1.0, abs=0.1)


# ---------------------------------------------------------------------------- season


def test_wet_season_is_wetter(default_small):
    _, ds = default_small
    p = ds.precip.values
    doy = doy_of(ds)
    season = (doy >= 150) & (doy <= 300)
    inside, outside = (p[season] > 0).mean(), (p[~season] > 0).mean()
    assert inside > 1.5 * outside


def test_no_seasonality_without_amplitude():
    cfg = small(seasonal_amplitude=0.0)
    times = pd.date_range("2001-01-01", periods=365, freq="D")
    np.testing.assert_allclose(synthetic.wet_probability(times, cfg), cfg.wet_fraction)


@pytest.mark.parametrize("wet_fraction", [0.1, 0.3, 0.8])
@pytest.mark.parametrize("amplitude", [0.5, 1.0])
def test_wet_probability_bounded_and_averages_to_wet_fraction(wet_fraction, amplitude):
    cfg = small(wet_fraction=wet_fraction, seasonal_amplitude=amplitude)
    times = pd.date_range("2001-01-01", periods=4 * 365 * 24, freq="h")
    p = synthetic.wet_probability(times, cfg)
    assert ((p >= 0) & (p <= 1)).all()
    assert p.mean() == pytest.approx(wet_fraction, abs=2e-3)
    peak = pd.DatetimeIndex(times)[np.argmax(p)].day_of_year
    assert abs(peak - synthetic.PEAK_DAY) <= 2


# ---------------------------------------------------------------------------- amounts


def test_wet_body_follows_the_gamma():
    cfg = small()
    v = np.array([1e-9, 1e-4, 0.01, 0.2, 0.5, 0.8, 0.94])
    got = synthetic.wet_quantile(1 - v, cfg)
    want = stats.gamma.ppf(v, cfg.gamma_shape, scale=cfg.gamma_scale)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_tail_is_continuous_and_heavier_than_gamma():
    cfg = small(tail_shape=0.2)
    tq = cfg.tail_quantile
    below, above = synthetic.wet_quantile(np.array([1 - tq + 1e-9, 1 - tq - 1e-9]), cfg)
    assert above == pytest.approx(below, rel=1e-5)
    far = 1e-5
    gpd = synthetic.wet_quantile(np.array([far]), cfg)[0]
    gamma = stats.gamma.ppf(1 - far, cfg.gamma_shape, scale=cfg.gamma_scale)
    assert gpd > 1.5 * gamma
    # an exponential tail (shape 0) stays close to the gamma's own tail
    light = synthetic.wet_quantile(np.array([far]), small(tail_shape=0.0))[0]
    assert light < gpd
    assert light == pytest.approx(gamma, rel=0.25)


def test_generated_extremes_are_heavy_tailed():
    cfg = small(tail_shape=0.4)
    p = synthetic.generate(cfg).precip.values
    wet = p[p > 0]
    q999 = np.quantile(wet, 0.999)
    assert q999 > 1.25 * stats.gamma.ppf(0.999, cfg.gamma_shape, scale=cfg.gamma_scale)
    # same seed, same latent field: only the tail parameter differs, so the extremes grow with it
    light = synthetic.generate(small(tail_shape=0.0)).precip.values
    assert p.max() > light.max()
    np.testing.assert_array_equal(p > 0, light > 0)


# ---------------------------------------------------------------------------- space and time


def test_spatially_correlated_and_decaying(default_small):
    _, ds = default_small
    p = ds.precip.values
    lag = {d: corr(p[:, :, :-d], p[:, :, d:]) for d in (1, 4, 12)}
    lag_y = corr(p[:, :-1, :], p[:, 1:, :])
    assert lag[1] > 0.5 and lag_y > 0.5
    assert lag[1] > lag[4] > lag[12]
    # generated on a padded domain: opposite edges are not neighbours (no periodic wrap)
    assert corr(p[:, :, 0], p[:, :, -1]) < lag[1] - 0.4


def test_steeper_spectrum_gives_smoother_fields():
    rough = synthetic.latent(small(nt=100, spectral_slope=1.5))
    smooth = synthetic.latent(small(nt=100, spectral_slope=4.0))
    assert corr(smooth[:, :, :-3], smooth[:, :, 3:]) > corr(rough[:, :, :-3], rough[:, :, 3:])


def test_persistence_increases_temporal_autocorrelation():
    kw = {"nt": 300, "advection": (0.0, 0.0)}
    persistent = small(persistence=0.9, **kw)
    fresh = small(persistence=0.0, **kw)
    z9, z0 = synthetic.latent(persistent), synthetic.latent(fresh)
    assert corr(z9[1:], z9[:-1]) > 0.8
    assert abs(corr(z0[1:], z0[:-1])) < 0.1
    p9 = synthetic.generate(persistent).precip.values
    p0 = synthetic.generate(fresh).precip.values
    assert corr(p9[1:], p9[:-1]) > corr(p0[1:], p0[:-1]) + 0.4


def test_advection_moves_the_field():
    cfg = small(nt=300, persistence=0.9, advection=(0.0, 3.0))
    z = synthetic.latent(cfg)
    downwind = corr(z[1:, :, 3:], z[:-1, :, :-3])  # follow the flow: 3 pixels along x per step
    still = corr(z[1:], z[:-1])
    upwind = corr(z[1:, :, :-3], z[:-1, :, 3:])
    assert downwind == pytest.approx(cfg.persistence, abs=0.05)
    assert downwind > still > upwind


# ---------------------------------------------------------------------------- hourly


def test_hourly_data_are_rates_in_mm_per_hour():
    kw = {"nt": 96, "seasonal_amplitude": 0.0}
    hourly = synthetic.generate(small(freq="1h", **kw))
    daily = synthetic.generate(small(freq="1D", **kw))
    assert hourly.precip.attrs["units"] == "mm/h"
    assert (np.diff(hourly.time.values) == np.timedelta64(1, "h")).all()
    # same latent field and wet probability: hourly amounts are the daily ones over 24
    np.testing.assert_allclose(hourly.precip.values * 24, daily.precip.values, rtol=1e-5)


# ---------------------------------------------------------------------------- ingest


def test_write_synthetic_produces_a_store(tmp_path):
    cfg = small(nt=120, ny=16, nx=20)
    ds = synthetic.generate(cfg)
    target = str(tmp_path / "synthetic.zarr")
    result = synthetic.write_synthetic(cfg, target, bins=32, progress=False)
    assert not result.skipped
    assert result.shape == (cfg.nt, cfg.ny, cfg.nx)

    store, st = open_store(target)
    assert store.precip.shape == (cfg.nt, cfg.ny, cfg.nx)
    assert store.precip.attrs["units"] == "mm/day"
    np.testing.assert_array_equal(store.precip.values, ds.precip.values)
    np.testing.assert_allclose(store.lat.values, ds.lat.values)
    assert st.max == pytest.approx(float(ds.precip.max()))
    assert st.wet_fraction == pytest.approx(float((ds.precip > 0).mean()))
    assert st.nan_fraction == 0.0
    assert st.bins == 32

    again = synthetic.write_synthetic(cfg, target, bins=32, progress=False)
    assert again.skipped
    # another seed, same shape and dates: the store must be rewritten, not taken as current
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    rewritten = synthetic.write_synthetic(other, target, bins=32, progress=False)
    assert not rewritten.skipped
    store, st = open_store(target)
    assert st.max == pytest.approx(float(synthetic.generate(other).precip.max()))


def test_write_synthetic_hourly(tmp_path):
    cfg = small(nt=48, ny=8, nx=8, freq="1h")
    target = str(tmp_path / "hourly.zarr")
    synthetic.write_synthetic(cfg, target, progress=False)
    store, st = open_store(target)
    assert store.precip.attrs["units"] == "mm/h"
    assert st.max == pytest.approx(float(synthetic.generate(cfg).precip.max()))
