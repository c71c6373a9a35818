"""Power spectra and return levels on fields and samples whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from cloudburst.evaluation import return_levels, spectra


@pytest.mark.parametrize("k", [3, 7])
def test_spatial_psd_of_a_pure_sine_peaks_at_its_wavenumber(k):
    n = 32
    x = np.arange(n)
    field = np.sin(2 * np.pi * k * x / n)[None, :] * np.ones((n, 1))
    snaps = np.stack([field, np.roll(field, 5, axis=1)])  # phase does not matter
    wav, power = spectra.radial_psd(snaps)
    assert wav[np.argmax(power)] == k
    assert power[k - 1] > 1e6 * np.delete(power, k - 1).max()
    # power scales with the square of the amplitude, and a constant offset adds none
    _, doubled = spectra.radial_psd(2 * snaps + 10)
    assert doubled == pytest.approx(4 * power, rel=1e-9, abs=1e-12)


def test_temporal_psd_of_a_pure_sine_and_of_white_noise():
    n, period = 240, 24
    t = np.arange(n)
    series = np.sin(2 * np.pi * t / period)[:, None, None] * np.ones((1, 3, 4))
    freq, power = spectra.temporal_psd(series, axis=0)
    assert freq[np.argmax(power)] == pytest.approx(1 / period)
    noise = np.random.default_rng(0).standard_normal((n, 50, 50))
    _, flat = spectra.temporal_psd(noise, axis=0)
    assert flat.std() / flat.mean() < 0.1  # white: no frequency stands out


def test_spectrum_accumulator_averages_chunks_and_refuses_other_grids():
    acc = spectra.SpectrumAccumulator()
    f = np.array([1.0, 2.0])
    acc.update(f, np.array([2.0, 4.0]), weight=1)
    acc.update(f, np.array([4.0, 8.0]), weight=3)
    assert acc.compute()[1].tolist() == pytest.approx([3.5, 7.0])
    with pytest.raises(ValueError, match="frequency grids"):
        acc.update(np.array([1.0, 3.0]), np.array([1.0, 1.0]))


def test_gev_return_levels_recover_a_known_distribution():
    xi, loc, scale = 0.1, 30.0, 8.0
    sample = sps.genextreme.rvs(-xi, loc=loc, scale=scale, size=400, random_state=1)
    out = return_levels.gev_return_levels(sample, [10, 100], bootstrap=100)
    true = sps.genextreme.isf([0.1, 0.01], -xi, loc=loc, scale=scale)
    assert out.params["xi"] == pytest.approx(xi, abs=0.08)
    assert out.params["loc"] == pytest.approx(loc, abs=1.5)
    assert out.params["scale"] == pytest.approx(scale, abs=1.0)
    assert (out.lower <= true).all() and (true <= out.upper).all()
    assert (out.lower < out.levels).all() and (out.levels < out.upper).all()
    with pytest.raises(ValueError, match="at least 5"):
        return_levels.gev_return_levels(sample[:3])


def test_pot_return_levels_recover_a_known_tail():
    # 50 years of daily values with an exponential tail: P(X > x) = exp(-x / 5)
    years, per_year = 50, 365
    values = np.random.default_rng(2).exponential(5.0, years * per_year)
    out = return_levels.pot_return_levels(values, threshold=15.0, years=years, bootstrap=100)
    # level exceeded once in T years: exp(-x / 5) * 365 * T = 1
    true = 5.0 * np.log(per_year * out.periods)
    assert out.params["xi"] == pytest.approx(0.0, abs=0.1)
    assert np.abs(out.levels - true).max() < 0.1 * true.max()
    assert (out.lower <= true).all() and (true <= out.upper).all()
    with pytest.raises(ValueError, match="lower the threshold"):
        return_levels.pot_return_levels(values, threshold=1e3, years=years)


def test_spectra_leave_out_cells_and_snapshots_with_no_value():
    rng = np.random.default_rng(0)
    field = rng.random((3, 8, 16, 16))
    holed = field.copy()
    holed[:, :, :, :2] = np.nan  # two columns outside the radar at every step
    f, p = spectra.temporal_psd(holed, axis=1)
    _, p_inner = spectra.temporal_psd(field[:, :, :, 2:], axis=1)
    assert np.isfinite(p).all() and np.allclose(p, p_inner)
    blank = field.copy()
    blank[0, 0] = np.nan  # one snapshot entirely missing
    k, q = spectra.radial_psd(blank)
    assert np.isfinite(q).all()
    with pytest.raises(ValueError, match="entirely NaN"):
        spectra.temporal_psd(np.full((4, 3), np.nan))
