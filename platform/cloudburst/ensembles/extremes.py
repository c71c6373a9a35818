"""Exceedance probabilities and return periods from (importance-weighted) ensembles.

With draws z_1..z_N from a proposal q and weights w_i = p(z_i) / q(z_i), the estimate

    P(S > t) = (1 / N) sum_i w_i 1[S(x_i) > t]

is unbiased for the probability under the model's prior p, whatever q. When a threshold
rejected draws, only accepted members are stored and N counts every draw (the rejected ones
add 0), which is exact for t at or above the rejection threshold: the event implies acceptance.
Plain Monte Carlo is the case w = 1, N = members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudburst.ensembles.store import member_chunks

STATISTICS = ("max", "mean", "sum")


@dataclass
class Exceedance:
    thresholds: np.ndarray
    probability: np.ndarray
    stderr: np.ndarray  # standard error of the estimate
    draws: int  # N
    effective_members: float  # Kish's (sum w)^2 / sum w^2 over the stored members

    def return_period(self, events_per_year: float) -> np.ndarray:
        """Years between exceedances, for ``events_per_year`` independent windows a year."""
        return return_period(self.probability, events_per_year)


def window_statistic(precip: np.ndarray, statistic: str = "max") -> np.ndarray:
    """One number per member of (member, ...) windows: max, mean or sum over valid pixels."""
    flat = precip.reshape(len(precip), -1)
    if statistic == "max":
        return np.nanmax(flat, axis=1)
    if statistic == "mean":
        return np.nanmean(flat, axis=1)
    if statistic == "sum":
        return np.nansum(flat, axis=1)
    raise ValueError(f"unknown statistic {statistic!r}; allowed: {', '.join(STATISTICS)}")


def exceedance_probability(
    values: np.ndarray,
    thresholds: np.ndarray | list[float] | float,
    weights: np.ndarray | None = None,
    draws: int | None = None,
) -> Exceedance:
    """P(value > t) for each threshold from member ``values`` and importance ``weights``.

    ``draws``: how many draws the members came from (default: as many as members).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != v.shape:
        raise ValueError(f"{v.size} values but {w.size} weights")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    n = int(draws if draws is not None else v.size)
    if n < max(1, v.size):
        raise ValueError(f"draws ({n}) cannot be fewer than members ({v.size})")
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    acc = _Accumulator(t)
    acc.add(v, w)
    return acc.result(n)


class _Accumulator:
    """Sums of w 1[v > t] and (w 1[v > t])^2 per threshold, streamed over chunks."""

    def __init__(self, thresholds: np.ndarray) -> None:
        self.t = np.sort(np.asarray(thresholds, dtype=np.float64))
        self.s1 = np.zeros_like(self.t)
        self.s2 = np.zeros_like(self.t)
        self.w1 = 0.0
        self.w2 = 0.0

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        over = values[None, :] > self.t[:, None]
        self.s1 += (over * weights[None, :]).sum(axis=1)
        self.s2 += (over * weights[None, :] ** 2).sum(axis=1)
        self.w1 += float(weights.sum())
        self.w2 += float((weights**2).sum())

    def result(self, draws: int) -> Exceedance:
        p = self.s1 / draws
        var = np.maximum(self.s2 / draws - p**2, 0.0) / max(draws - 1, 1)
        ess = self.w1**2 / self.w2 if self.w2 > 0 else 0.0
        return Exceedance(self.t, p, np.sqrt(var), draws, ess)


def ensemble_exceedance(
    url: str,
    thresholds: np.ndarray | list[float],
    *,
    statistic: str = "max",
    options: dict[str, Any] | None = None,
) -> Exceedance:
    """:func:`exceedance_probability` of a complete ensemble store, streamed chunk by chunk.

    Thresholds below the store's rejection threshold (if any) are refused: rejected draws are
    not stored, so their values are unknown.
    """
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    acc = _Accumulator(t)
    draws = None
    for part in member_chunks(url, options):
        marker = part["marker"]
        draws = int(marker.get("draws", marker["members"]))
        cut = marker.get("threshold")
        if cut is not None and statistic != "max":
            raise ValueError(
                f"{url} kept members by their window maximum; only statistic='max' exceedance "
                "is unbiased from it"
            )
        if cut is not None and (t < float(cut)).any():
            raise ValueError(
                f"{url} kept only members with a pixel >= {cut:g}; exceedance below that "
                "threshold cannot be estimated from it"
            )
        acc.add(window_statistic(part["precip"], statistic), part["weight"])
    if draws is None:
        raise ValueError(f"{url} holds no members")
    return acc.result(draws)


def return_period(probability: np.ndarray, events_per_year: float) -> np.ndarray:
    """1 / (p * events per year) in years; infinite where p is 0."""
    if events_per_year <= 0:
        raise ValueError("events_per_year must be positive")
    p = np.asarray(probability, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(p > 0, 1.0 / (p * events_per_year), np.inf)
