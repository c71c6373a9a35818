"""Streaming verification of ensembles against observations, for any number of members.

:class:`EnsembleVerifier` takes blocks of *cases*: ``ens`` (members, cells) and ``obs``
(observations, cells), every observation of a cell verified against that cell's ensemble.

- Paired verification (a conditional ensemble per observed window): ``obs`` has one row.
- Climatological verification (an unconditional ensemble read from a store, against every
  observed window of a split): the ensemble of a cell is shared by all observed windows.

Members are sorted once per cell, and every score then comes from cumulative sums and
binary searches (``torch.searchsorted``), so a block costs O((M + N) log M) per cell rather
than O(M N): 10,000 members against a thousand observed windows is cheap. Cells are processed
in sub-blocks of at most ``max_elements`` member values, so memory is bounded by that, never
by the ensemble. Member weights (importance weights of steered ensembles) are supported.

Scores (weights ``w``, normalised to sum 1):
- CRPS = E|X - y| - 1/2 E|X - X'|; the fair CRPS (Ferro 2014) scales the spread term by
  M / (M - 1) (equal weights only);
- threshold-weighted CRPS above ``t`` (CRPS of max(X, t) against max(y, t)) per threshold;
- Brier score and reliability of P(X > t) per threshold;
- rank histogram (equal weights: the observation's rank among the members, ties and position
  within the rank randomised so a calibrated ensemble gives a flat histogram for any number of
  bins; weighted: the randomised probability integral transform);
- spread-skill ratio sqrt(mean var * (M + 1) / M) / RMSE of the ensemble mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["EnsembleVerifier", "HistogramAccumulator", "TailQuantiles"]


class EnsembleVerifier:
    """Accumulates ensemble scores over blocks of cases; see the module docstring."""

    def __init__(
        self,
        thresholds: Mapping[str, float] | None = None,
        *,
        rank_bins: int = 20,
        reliability_bins: int = 10,
        seed: int = 0,
        max_elements: int = 4_000_000,
    ) -> None:
        self.thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
        self.rank_bins = int(rank_bins)
        self.reliability_edges = np.linspace(0.0, 1.0, int(reliability_bins) + 1)
        self.max_elements = int(max_elements)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.members: int | None = None
        self.weighted = False
        self.cases = 0
        self.crps_sum = 0.0
        self.crps_fair_sum = 0.0
        self.tw_sum = dict.fromkeys(self.thresholds, 0.0)
        self.brier_sum = dict.fromkeys(self.thresholds, 0.0)
        nb = len(self.reliability_edges) - 1
        self.rel = {
            k: {"n": np.zeros(nb), "p": np.zeros(nb), "o": np.zeros(nb)} for k in self.thresholds
        }
        self.rank_counts: np.ndarray | None = None
        self.var_sum = 0.0
        self.sq_err_sum = 0.0
        self.abs_err_sum = 0.0

    # ------------------------------------------------------------------ accumulation

    def update(self, ens: Any, obs: Any, weights: Any | None = None) -> None:
        """Add cases: ``ens`` (M, C) members, ``obs`` (N, C) or (C,); NaN observations skipped.

        Works through sub-blocks of cells of at most ``max_elements`` member values, converted
        to float64 one at a time: memory beyond the inputs is about 160 bytes per element.
        """
        x = np.asarray(ens)
        y = np.asarray(obs)
        if y.ndim == 1:
            y = y[None]
        if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
            raise ValueError(
                f"ensemble {tuple(x.shape)} and observations {tuple(y.shape)} must be "
                "(members, cells) and (observations, cells) with the same cells"
            )
        m = x.shape[0]
        if m < 2:
            raise ValueError("verification needs at least 2 members")
        if self.members is None:
            self.members = m
            bins = min(self.rank_bins, m + 1)
            self.rank_counts = np.zeros(bins, dtype=np.int64)
        elif self.members != m:
            raise ValueError(f"expected {self.members} members, got {m}")
        if weights is None:
            w = torch.full((m,), 1.0 / m, dtype=torch.float64)
        else:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).ravel()
            if w.shape != (m,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be {m} finite non-negative numbers, sum > 0")
            w = w / w.sum()
            self.weighted = True
        step = max(1, self.max_elements // max(m, y.shape[0]))
        for a in range(0, x.shape[1], step):
            xb = torch.from_numpy(np.ascontiguousarray(x[:, a : a + step].T, dtype=np.float64))
            if not torch.isfinite(xb).all():
                raise ValueError("ensemble members hold NaN or infinite values")
            yb = torch.from_numpy(np.ascontiguousarray(y[:, a : a + step].T, dtype=np.float64))
            self._block(xb, yb, w)

    def _block(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        """``x`` (C, M) members, ``y`` (C, N) observations, ``w`` (M,) normalised weights."""
        m = x.shape[1]
        xs, order = torch.sort(x, dim=1)
        ws = w[order]
        valid = torch.isfinite(y)
        y = torch.where(valid, y, torch.zeros_like(y))
        n_valid = int(valid.sum())
        if n_valid == 0:
            return
        equal = weights_equal(w)

        crps = self._crps(xs, ws, y)
        self.crps_sum += float(crps[0][valid].sum())
        if equal:
            fair = crps[1] * m / (m - 1)
            self.crps_fair_sum += float((crps[0] + crps[1] - fair)[valid].sum())
        for name, t in self.thresholds.items():
            tw = self._crps(xs.clamp_min(t), ws, y.clamp_min(t))[0]
            self.tw_sum[name] += float(tw[valid].sum())
            # P(X > t) per cell, against the event y > t of every observation
            above = (ws * (xs > t)).sum(dim=1, keepdim=True).expand_as(y)
            event = (y > t).to(torch.float64)
            self.brier_sum[name] += float(((above - event) ** 2)[valid].sum())
            p, o = above[valid].numpy(), event[valid].numpy()
            k = np.clip(np.searchsorted(self.reliability_edges, p, side="right") - 1, 0, None)
            k = np.minimum(k, len(self.reliability_edges) - 2)
            nb = len(self.reliability_edges) - 1
            self.rel[name]["n"] += np.bincount(k, minlength=nb)
            self.rel[name]["p"] += np.bincount(k, weights=p, minlength=nb)
            self.rel[name]["o"] += np.bincount(k, weights=o, minlength=nb)

        self._ranks(xs, ws, y, valid, equal)

        mean = (ws * xs).sum(dim=1, keepdim=True)
        if equal:
            var = ((xs - mean) ** 2).sum(dim=1, keepdim=True) / (m - 1)
        else:
            var = (ws * (xs - mean) ** 2).sum(dim=1, keepdim=True)
        err = mean - y
        self.var_sum += float(var.expand_as(y)[valid].sum())
        self.sq_err_sum += float((err**2)[valid].sum())
        self.abs_err_sum += float(err.abs()[valid].sum())
        self.cases += n_valid

    @staticmethod
    def _crps(xs: torch.Tensor, ws: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(CRPS (C, N), half the mean absolute member difference (C, 1)) from sorted members."""
        cum_w = torch.cumsum(ws, dim=1)
        cum_s = torch.cumsum(ws * xs, dim=1)
        zero = torch.zeros_like(cum_w[:, :1])
        pad_w, pad_s = torch.cat([zero, cum_w], 1), torch.cat([zero, cum_s], 1)
        below = torch.searchsorted(xs, y, side="left")
        w_below, s_below = pad_w.gather(1, below), pad_s.gather(1, below)
        total = cum_s[:, -1:]
        # E|X - y| = y (2 W(<y) - 1) + E[X] - 2 E[X; X < y]
        skill = y * (2.0 * w_below - 1.0) + total - 2.0 * s_below
        # 1/2 sum_ij w_i w_j |x_i - x_j| = sum_i w_i x_(i) (W_below_i - W_above_i)
        half = (ws * xs * ((cum_w - ws) - (1.0 - cum_w))).sum(dim=1, keepdim=True)
        return skill - half, half

    def _ranks(
        self,
        xs: torch.Tensor,
        ws: torch.Tensor,
        y: torch.Tensor,
        valid: torch.Tensor,
        equal: bool,
    ) -> None:
        assert self.rank_counts is not None
        m = xs.shape[1]
        lo = torch.searchsorted(xs, y, side="left")
        hi = torch.searchsorted(xs, y, side="right")
        u1 = torch.rand(y.shape, generator=self.generator, dtype=torch.float64)
        if equal:
            # the rank 0..M with ties broken at random, then a uniform position inside it:
            # uniform on [0, 1] exactly when the observation is exchangeable with the members
            rank = lo + torch.floor(u1 * (hi - lo + 1)).long()
            u2 = torch.rand(y.shape, generator=self.generator, dtype=torch.float64)
            pit = (rank.to(torch.float64) + u2) / (m + 1)
        else:
            pad = torch.cat([torch.zeros_like(ws[:, :1]), torch.cumsum(ws, dim=1)], 1)
            w_lo, w_hi = pad.gather(1, lo), pad.gather(1, hi)
            pit = w_lo + u1 * (w_hi - w_lo)
        k = len(self.rank_counts)
        b = torch.clamp((pit * k).long(), 0, k - 1)[valid].numpy()
        self.rank_counts += np.bincount(b, minlength=k)

    # ----------------------------------------------------------------------- results

    def compute(self) -> dict[str, Any]:
        """Scalars and curves: ``crps``, ``crps_fair`` (equal weights), ``twcrps_<name>``,
        ``brier_<name>``, ``spread_skill``, ``ensemble_mean_mae``/``_rmse``, ``cases``,
        ``members``; ``rank_histogram`` (relative frequencies) and ``reliability_<name>``
        (per probability bin: cases, mean forecast probability, observed frequency)."""
        n = self.cases
        if n == 0 or self.members is None or self.rank_counts is None:
            raise ValueError("no valid case was accumulated")
        m = self.members
        out: dict[str, Any] = {"cases": n, "members": m, "crps": self.crps_sum / n}
        if not self.weighted:
            out["crps_fair"] = self.crps_fair_sum / n
        for name in self.thresholds:
            out[f"twcrps_{name}"] = self.tw_sum[name] / n
            out[f"brier_{name}"] = self.brier_sum[name] / n
        rmse = float(np.sqrt(self.sq_err_sum / n))
        factor = (m + 1) / m if not self.weighted else 1.0
        spread = float(np.sqrt(self.var_sum / n * factor))
        out["spread_skill"] = spread / rmse if rmse > 0 else float("nan")
        out["ensemble_mean_rmse"] = rmse
        out["ensemble_mean_mae"] = self.abs_err_sum / n
        out["rank_histogram"] = (self.rank_counts / self.rank_counts.sum()).tolist()
        for name in self.thresholds:
            r = self.rel[name]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"reliability_{name}"] = {
                    "threshold": self.thresholds[name],
                    "cases": r["n"].astype(np.int64).tolist(),
                    "forecast": np.where(r["n"] > 0, r["p"] / r["n"], np.nan).tolist(),
                    "observed": np.where(r["n"] > 0, r["o"] / r["n"], np.nan).tolist(),
                }
        return out


def weights_equal(w: torch.Tensor) -> bool:
    return bool(torch.allclose(w, torch.full_like(w, 1.0 / w.numel()), rtol=1e-9, atol=0.0))


def _member_weights(values: np.ndarray, weights: Any | None) -> np.ndarray:
    """Per-value weights from per-member ``weights`` (members,) (ones when None)."""
    if weights is None:
        return np.ones_like(values)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != values.shape[:1]:
        raise ValueError(f"{w.size} weights for {values.shape[0]} members")
    return np.broadcast_to(w.reshape(-1, *([1] * (values.ndim - 1))), values.shape)


class HistogramAccumulator:
    """Weighted counts of values in fixed ``edges``; values beyond the ends go to the end
    bins, NaN are skipped."""

    def __init__(self, edges: Any) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size < 2 or (np.diff(self.edges) <= 0).any():
            raise ValueError("histogram edges must be at least 2 increasing values")
        self.counts = np.zeros(self.edges.size - 1)

    def update(self, values: Any, weights: Any | None = None) -> None:
        """``values`` (members, ...) with optional per-member ``weights`` (members,)."""
        v = np.asarray(values, dtype=np.float64)
        w = _member_weights(v, weights)
        ok = np.isfinite(v)
        self.add(v[ok], w[ok])

    def add(self, v: np.ndarray, w: np.ndarray) -> None:
        """Finite values ``v`` with per-value weights ``w``."""
        k = np.searchsorted(self.edges, v, side="right") - 1
        k = np.clip(k, 0, self.counts.size - 1)
        self.counts += np.bincount(k, weights=w, minlength=self.counts.size)


class TailQuantiles:
    """Quantiles streamed over chunks, exact at high levels: keeps the largest ``keep`` values.

    Level q is the smallest kept value with at most (1 - q) of the total mass above it; it is
    exact when that mass fits in what is kept (always, for n <= ``keep``). Lower levels come
    from a histogram on ``edges``, interpolated within a bin. With per-member ``weights``
    (importance weights) the quantiles are those of the weighted distribution.
    """

    def __init__(self, edges: Any, keep: int = 2_000_000) -> None:
        self.hist = HistogramAccumulator(edges)
        self.keep = int(keep)
        self.values = np.zeros(0)
        self.weights = np.zeros(0)
        self.total = 0.0

    def update(self, values: Any, weights: Any | None = None) -> None:
        v = np.asarray(values, dtype=np.float64)
        w = _member_weights(v, weights)
        ok = np.isfinite(v)
        v, w = v[ok], w[ok]
        self.hist.add(v, w)
        self.total += float(w.sum())
        vals = np.concatenate([self.values, v])
        wts = np.concatenate([self.weights, w])
        if vals.size > self.keep:
            top = np.argpartition(vals, vals.size - self.keep)[vals.size - self.keep :]
            vals, wts = vals[top], wts[top]
        self.values, self.weights = vals, wts

    def quantiles(self, levels: Any) -> np.ndarray:
        q = np.asarray(levels, dtype=np.float64)
        if self.total <= 0:
            raise ValueError("no value accumulated")
        order = np.argsort(self.values)
        v, w = self.values[order], self.weights[order]
        kept = float(w.sum())
        above = kept - np.cumsum(w)  # mass strictly above each kept value (non-increasing)
        cum_hist = np.concatenate([[0.0], np.cumsum(self.hist.counts)])
        out = np.empty_like(q)
        for i, level in enumerate(q):
            tail = (1.0 - level) * self.total + 1e-9 * self.total  # (1 - q) n in floating point
            if v.size and tail < kept:
                j = int(np.searchsorted(-above, -tail, side="left"))
                out[i] = v[min(j, v.size - 1)]
                continue
            target = level * cum_hist[-1]
            k = int(np.searchsorted(cum_hist, target, side="right")) - 1
            k = min(max(k, 0), self.hist.counts.size - 1)
            inside = self.hist.counts[k]
            frac = (target - cum_hist[k]) / inside if inside > 0 else 0.0
            lo, hi = self.hist.edges[k], self.hist.edges[k + 1]
            out[i] = lo + float(np.clip(frac, 0.0, 1.0)) * (hi - lo)
        return out
