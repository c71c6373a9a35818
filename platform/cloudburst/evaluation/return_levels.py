"""Return levels of generated against observed extremes, with confidence intervals.

- Block maxima: a GEV fitted by maximum likelihood (``scipy.stats.genextreme``; note scipy's
  shape c is minus the climatological xi) to one maximum per block (a year, a season).
- Peaks over threshold: a generalised Pareto fitted to the excesses over a high threshold,
  with the exceedance rate per year.

Confidence intervals come from a parametric bootstrap (refits on samples drawn from the fitted
distribution), which needs no asymptotic approximation and works for short records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass
class ReturnLevels:
    periods: np.ndarray  # years
    levels: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    params: dict[str, float]
    method: str

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "periods": self.periods.tolist(),
            "levels": self.levels.tolist(),
            "lower": self.lower.tolist(),
            "upper": self.upper.tolist(),
            "params": self.params,
        }


def _gev_levels(c: float, loc: float, scale: float, periods: np.ndarray) -> np.ndarray:
    return sps.genextreme.isf(1.0 / periods, c, loc=loc, scale=scale)


def gev_return_levels(
    block_maxima: np.ndarray,
    periods: np.ndarray | list[float] = (2, 5, 10, 20, 50, 100),
    *,
    confidence: float = 0.9,
    bootstrap: int = 200,
    seed: int = 0,
) -> ReturnLevels:
    """Return levels for ``periods`` (in blocks, e.g. years) from one maximum per block."""
    x = np.asarray(block_maxima, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 5:
        raise ValueError(f"a GEV fit needs at least 5 block maxima, got {x.size}")
    t = np.asarray(periods, dtype=np.float64)
    if (t <= 1).any():
        raise ValueError("return periods must exceed 1 block")
    c, loc, scale = sps.genextreme.fit(x)
    levels = _gev_levels(c, loc, scale, t)
    rng = np.random.default_rng(seed)
    boot = np.empty((bootstrap, t.size))
    for b in range(bootstrap):
        sample = sps.genextreme.rvs(c, loc=loc, scale=scale, size=x.size, random_state=rng)
        boot[b] = _gev_levels(*sps.genextreme.fit(sample), t)
    a = (1.0 - confidence) / 2.0
    lower, upper = np.nanquantile(boot, [a, 1.0 - a], axis=0)
    params = {"xi": float(-c), "loc": float(loc), "scale": float(scale)}
    return ReturnLevels(t, levels, lower, upper, params, "gev-block-maxima")


def pot_return_levels(
    values: np.ndarray,
    threshold: float,
    years: float,
    periods: np.ndarray | list[float] = (2, 5, 10, 20, 50, 100),
    *,
    confidence: float = 0.9,
    bootstrap: int = 200,
    seed: int = 0,
) -> ReturnLevels:
    """Return levels from a GPD fitted to excesses over ``threshold`` in ``years`` of data.

    The level exceeded on average once in T years: u + GPD.isf(1 / (rate * T)), rate the
    mean number of exceedances per year. Values should be declustered (e.g. daily maxima of
    independent events); this function does not decluster.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    excess = v[v > threshold] - threshold
    if excess.size < 10:
        raise ValueError(f"only {excess.size} values exceed {threshold}; lower the threshold")
    if years <= 0:
        raise ValueError("years must be positive")
    t = np.asarray(periods, dtype=np.float64)
    rate = excess.size / years
    if (rate * t <= 1).any():
        raise ValueError("a return period is shorter than the mean time between exceedances")

    def levels_of(shape: float, scale: float) -> np.ndarray:
        return threshold + sps.genpareto.isf(1.0 / (rate * t), shape, loc=0.0, scale=scale)

    shape, _, scale = sps.genpareto.fit(excess, floc=0.0)
    levels = levels_of(shape, scale)
    rng = np.random.default_rng(seed)
    boot = np.empty((bootstrap, t.size))
    for b in range(bootstrap):
        sample = sps.genpareto.rvs(shape, scale=scale, size=excess.size, random_state=rng)
        bs, _, bscale = sps.genpareto.fit(sample, floc=0.0)
        boot[b] = levels_of(bs, bscale)
    a = (1.0 - confidence) / 2.0
    lower, upper = np.nanquantile(boot, [a, 1.0 - a], axis=0)
    params = {"xi": float(shape), "scale": float(scale), "threshold": float(threshold)}
    params["rate_per_year"] = float(rate)
    return ReturnLevels(t, levels, lower, upper, params, "gpd-peaks-over-threshold")
