"""Verification scores of ensembles against observations, accumulated over chunks.

Every score is an accumulator with ``update(...)`` (one chunk of cases at a time) and
``compute()``, so a 10,000-member ensemble on object storage is verified chunk by chunk with
memory bounded by the chunk, not the ensemble. Ensembles are arrays ``(members, ...)``; the
observation has the trailing shape ``(...)``; every trailing element is one case. Member
weights (importance weights of steered ensembles) are supported where stated.

- CRPS (Gneiting and Raftery 2007), with the fair (unbiased for the ensemble's distribution)
  version of Ferro (2014), and weighted members;
- threshold-weighted CRPS above a threshold (chaining function max(x, t));
- rank histogram (ties broken at random, reproducibly);
- spread-skill ratio with the (m + 1) / m finite-ensemble correction;
- reliability of exceedance probabilities: forecast probability bins against observed frequency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_members(ens: np.ndarray, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ens = np.asarray(ens, dtype=np.float64)
    obs = np.asarray(obs, dtype=np.float64)
    if ens.shape[1:] != obs.shape:
        raise ValueError(f"ensemble {ens.shape} must be (members, *obs.shape) with obs {obs.shape}")
    m = ens.shape[0]
    return ens.reshape(m, -1), obs.reshape(-1)


def _weights(weights: np.ndarray | None, m: int) -> np.ndarray:
    if weights is None:
        return np.full(m, 1.0 / m)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (m,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {m} finite non-negative numbers with a positive sum")
    return w / w.sum()


def crps_cases(
    ens: np.ndarray, obs: np.ndarray, weights: np.ndarray | None = None, fair: bool = False
) -> np.ndarray:
    """CRPS of every case: E|X - y| - 1/2 E|X - X'| over the (weighted) members.

    ``fair``: Ferro's unbiased version, 1/(2 m (m - 1)) for the spread term (equal weights
    only). Uses sorted members: sum_ij |x_i - x_j| in O(m log m) per case.
    """
    x, y = _as_members(ens, obs)
    m = x.shape[0]
    if fair and weights is not None:
        raise ValueError("the fair CRPS is defined for equally weighted members")
    if fair and m < 2:
        raise ValueError("the fair CRPS needs at least 2 members")
    w = _weights(weights, m)
    x = x - y[None, :]  # CRPS is shift invariant: centring on y keeps large offsets exact
    skill = (w[:, None] * np.abs(x)).sum(axis=0)
    order = np.argsort(x, axis=0)
    xs = np.take_along_axis(x, order, axis=0)
    ws = w[order]
    # sum_ij w_i w_j |x_i - x_j| = 2 sum_i w_i x_(i) (W_below_i - W_above_i)
    cum = np.cumsum(ws, axis=0)
    below = cum - ws
    above = 1.0 - cum
    spread = 2.0 * (ws * xs * (below - above)).sum(axis=0)
    if fair:
        spread = spread * m / (m - 1)
    return skill - 0.5 * spread


def threshold_weighted_crps_cases(
    ens: np.ndarray,
    obs: np.ndarray,
    threshold: float,
    weights: np.ndarray | None = None,
    fair: bool = False,
) -> np.ndarray:
    """twCRPS with weight 1[z > threshold]: the CRPS of max(x, t) against max(y, t)."""
    return crps_cases(
        np.maximum(ens, threshold), np.maximum(obs, threshold), weights=weights, fair=fair
    )


@dataclass
class MeanScore:
    """A running mean of per-case scores (CRPS, twCRPS...)."""

    total: float = 0.0
    count: int = 0

    def update(self, cases: np.ndarray) -> None:
        cases = np.asarray(cases, dtype=np.float64)
        valid = np.isfinite(cases)
        self.total += float(cases[valid].sum())
        self.count += int(valid.sum())

    def compute(self) -> float:
        return self.total / self.count if self.count else float("nan")


class RankHistogram:
    """Counts of the observation's rank among m members (m + 1 bins)."""

    def __init__(self, members: int, seed: int = 0) -> None:
        self.members = int(members)
        self.counts = np.zeros(self.members + 1, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def update(self, ens: np.ndarray, obs: np.ndarray) -> None:
        x, y = _as_members(ens, obs)
        if x.shape[0] != self.members:
            raise ValueError(f"expected {self.members} members, got {x.shape[0]}")
        below = (x < y[None, :]).sum(axis=0)
        ties = (x == y[None, :]).sum(axis=0)
        rank = below + np.floor(self.rng.random(y.shape) * (ties + 1)).astype(np.int64)
        self.counts += np.bincount(rank, minlength=self.members + 1)

    def compute(self) -> np.ndarray:
        """Relative frequencies of the ranks (flat = 1 / (m + 1) each when calibrated)."""
        total = self.counts.sum()
        return self.counts / total if total else self.counts.astype(np.float64)


class SpreadSkill:
    """sqrt(mean ensemble variance * (m + 1) / m) / RMSE of the ensemble mean (1: calibrated)."""

    def __init__(self) -> None:
        self.var = 0.0
        self.sq_err = 0.0
        self.count = 0
        self.members: int | None = None

    def update(self, ens: np.ndarray, obs: np.ndarray) -> None:
        x, y = _as_members(ens, obs)
        self.members = x.shape[0]
        self.var += float(x.var(axis=0, ddof=1).sum())
        self.sq_err += float(((x.mean(axis=0) - y) ** 2).sum())
        self.count += y.size

    def compute(self) -> float:
        if not self.count or self.members is None or self.sq_err == 0:
            return float("nan")
        m = self.members
        spread = np.sqrt(self.var / self.count * (m + 1) / m)
        return float(spread / np.sqrt(self.sq_err / self.count))


class Reliability:
    """Forecast probability of ``value > threshold`` (weighted member share) in ``bins``
    equal bins against the observed frequency of the event."""

    def __init__(self, threshold: float, bins: int = 10) -> None:
        self.threshold = float(threshold)
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        self.n = np.zeros(bins, dtype=np.int64)
        self.prob_sum = np.zeros(bins)
        self.hits = np.zeros(bins)

    def update(self, ens: np.ndarray, obs: np.ndarray, weights: np.ndarray | None = None) -> None:
        x, y = _as_members(ens, obs)
        w = _weights(weights, x.shape[0])
        p = (w[:, None] * (x > self.threshold)).sum(axis=0)
        k = np.clip(np.searchsorted(self.edges, p, side="right") - 1, 0, len(self.n) - 1)
        self.n += np.bincount(k, minlength=len(self.n))
        self.prob_sum += np.bincount(k, weights=p, minlength=len(self.n))
        self.hits += np.bincount(k, weights=(y > self.threshold), minlength=len(self.n))

    def compute(self) -> dict[str, np.ndarray]:
        """Per bin: cases, mean forecast probability, observed frequency (NaN when empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "cases": self.n.copy(),
                "forecast": np.where(self.n > 0, self.prob_sum / self.n, np.nan),
                "observed": np.where(self.n > 0, self.hits / self.n, np.nan),
            }
