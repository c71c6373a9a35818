"""The observed windows of a split, and what the scores accumulate of any set of windows.

- :func:`observed_windows`: the windows of one split of a Cloudburst store, physical units,
  NaN kept; the split and window settings are the training run's (:func:`run_params`) unless
  the request names a scheme;
- :class:`FieldSummary`: intensity histogram, tail quantiles, mean per cell, spatial and
  temporal spectra, window maxima and totals, the wettest extreme windows and the wet
  fraction and wet- and dry-spell lengths (:class:`SpellAccumulator`), accumulated chunk by
  chunk with optional importance weights;
- :func:`return_levels`: return levels of window maxima (GEV, or the importance-weighted
  estimator of :func:`importance_levels` for weighted or thresholded stores);
- :func:`quantile_thresholds`: the training quantiles the threshold scores use;
- :func:`top_windows`: the extremes check of the quantized-loss study (Szwarcman et al.,
  Quantizing reconstruction losses for improving weather data synthesis).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cloudburst import storage
from cloudburst.config import SplitConfig, WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.windows import build_index, parse_split, split_index
from cloudburst.evaluation.request import EvaluationError, EvaluationRequest
from cloudburst.evaluation.return_levels import gev_return_levels
from cloudburst.evaluation.spectra import SpectrumAccumulator, radial_psd, temporal_psd
from cloudburst.evaluation.verify import HistogramAccumulator, TailQuantiles

__all__ = [
    "FieldSummary",
    "Observed",
    "SpellAccumulator",
    "edges",
    "importance_levels",
    "observed_windows",
    "quantile_thresholds",
    "return_levels",
    "run_params",
    "split_from",
    "top_windows",
    "window_config",
]


# ------------------------------------------------------------------------ observations


@dataclass
class Observed:
    """Observed windows (n, time, y, x) in physical units (NaN where missing)."""

    x: np.ndarray
    part: str
    split: str
    units: str
    store: str
    stats: Any
    starts: np.ndarray


def run_params(run_id: str | None, tracking_uri: str | None) -> dict[str, str]:
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.params)
    except MlflowException:
        return {}


def split_from(spec: str, params: dict[str, str]) -> tuple[SplitConfig, str, str]:
    """(split, part, description): the training run's split when ``spec`` names no scheme."""
    if "@" in spec or "data.split.scheme" not in params:
        split, part = parse_split(spec)
        return split, part, spec
    tree: dict[str, Any] = {}
    for key in ("scheme", "train_years", "test_years", "every", "val_fraction", "seed"):
        raw = params.get(f"data.split.{key}")
        if raw is None or raw == "None":
            continue
        tree[key] = json.loads(raw) if raw[:1] in "[0123456789" or raw[:1] == "-" else raw
    split = SplitConfig.model_validate(tree)
    part = spec.strip() or "test"
    described = f"{part} (the training run's split: {split.model_dump(exclude_defaults=True)})"
    return split, part, described


def window_config(window: tuple[int, int, int], params: dict[str, str]) -> WindowConfig:
    """The training run's window settings (stride, filters) for windows of ``window``."""
    t, y, x = window
    if y != x:
        raise EvaluationError(f"windows must be square; the model's is {window}")
    tree: dict[str, Any] = {"length": t, "size": y, "stride": y}
    for key in ("stride", "time_stride", "doy", "max_nan_fraction"):
        raw = params.get(f"data.windows.{key}")
        if raw is not None and raw != "None":
            tree[key] = json.loads(raw)
    return WindowConfig.model_validate(tree)


def observed_windows(
    request: EvaluationRequest,
    window: tuple[int, int, int],
    params: dict[str, str],
) -> Observed:
    """The observed windows of the requested split, physical units, NaN kept."""
    opts = storage.options_from(request.data, request.storage)
    try:
        ds, stats = open_store(request.data, opts)
    except (FileNotFoundError, storage.StorageError) as exc:
        raise EvaluationError(f"cannot open the data store {request.data}: {exc}") from None
    wcfg = window_config(window, params)
    split, part, described = split_from(request.split, params)
    index = split_index(build_index(ds, wcfg), split, part)
    if len(index) == 0:
        raise EvaluationError(
            f"the {part} split of {request.data} ({described}) has no {window} window; "
            "choose another split (e.g. --split test@seasons:5)"
        )
    if request.limit is not None and len(index) > request.limit:
        keep = np.unique(np.linspace(0, len(index) - 1, request.limit).astype(int))
        index = index.subset(keep)
    dataset = WindowDataset(
        request.data,
        index,
        storage_options=opts,
        transform=None,
        shuffle=False,
        fill_value=float("nan"),
        rank=0,
        world_size=1,
        return_mask=False,
    )
    x = np.stack([item["x"][0].numpy() for item in dataset]).astype(np.float32)
    return Observed(x, part, described, stats.units, request.data, stats, index.start_times())


# ------------------------------------------------------------------------ accumulators


def edges(stats: Any, observed: np.ndarray) -> np.ndarray:
    """Intensity histogram edges: 0, then log-spaced from 0.01 to twice the record maximum."""
    top = max(float(np.nanmax(observed)) if observed.size else 0.0, float(stats.max), 1.0)
    return np.concatenate([[0.0], np.geomspace(0.01, 2.0 * top, 120)])


@dataclass
class SpellAccumulator:
    """Wet fraction and wet- and dry-spell length distributions, accumulated chunk by chunk.

    Definitions (``T`` = the window length in time steps):

    - a pixel is *wet* when its value is strictly greater than ``wet_threshold`` (physical
      units; the default 0 makes every strictly positive value wet, so a field that drizzles
      everywhere, with no exact zeros, shows a wet fraction near 1), *dry* when it is finite
      and not wet; NaN pixels are neither;
    - *wet fraction*: the share of valid (finite) pixels that are wet, each window weighted by
      its importance weight;
    - a *wet spell* (*dry spell*): a maximal run of consecutive wet (dry) time steps of one
      grid cell within one window; a run cut by the window's first or last step counts with
      the length it has in the window, and a NaN step ends a run (it belongs to neither);
    - the *spell-length distribution*: the histogram of run lengths 1..T over every cell and
      window, each run counted with its window's weight, normalised to probabilities (the
      share of spells with each length); the *mean spell length* is its mean.

    Memory is bounded: only the (T + 1,) weighted run counts are kept between calls.
    """

    length: int
    wet_threshold: float = 0.0
    wet_weight: float = 0.0
    valid_weight: float = 0.0
    wet: np.ndarray = field(init=False)  # weighted number of wet runs by length (index 0 unused)
    dry: np.ndarray = field(init=False)
    BLOCK: ClassVar[int] = 4_000_000  # pixels per block of :meth:`update`

    def __post_init__(self) -> None:
        self.wet = np.zeros(self.length + 1)
        self.dry = np.zeros(self.length + 1)

    def update(self, w: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Windows ``w`` (n, time, y, x) with optional importance weights (n,).

        Vectorised over windows and cells; read in blocks of about ``BLOCK`` pixels so the
        temporaries stay bounded however many windows one call brings.
        """
        w = np.asarray(w)
        n, t = w.shape[:2]
        if t != self.length:
            raise ValueError(f"windows of {t} steps given to a {self.length}-step accumulator")
        wts = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        per_window = max(1, int(np.prod(w.shape[1:])))
        step = max(1, self.BLOCK // per_window)
        for a in range(0, n, step):
            self._update(w[a : a + step], wts[a : a + step])

    def _update(self, w: np.ndarray, wts: np.ndarray) -> None:
        n, t = w.shape[:2]
        valid = np.isfinite(w)
        with np.errstate(invalid="ignore"):
            wet = valid & (w > self.wet_threshold)
        self.wet_weight += float((wet.reshape(n, -1).sum(axis=1) * wts).sum())
        self.valid_weight += float((valid.reshape(n, -1).sum(axis=1) * wts).sum())
        # one row per cell series: 1 wet, 0 dry, 2 missing; a trailing 2 ends every row, so
        # the runs of the flattened rows never join two cells
        state = np.where(valid, wet.astype(np.int8), np.int8(2)).astype(np.int8)
        rows = np.moveaxis(state, 1, -1).reshape(-1, t)
        if rows.size == 0:
            return
        cells = rows.shape[0] // n
        flat = np.concatenate([rows, np.full((rows.shape[0], 1), 2, dtype=np.int8)], axis=1)
        flat = flat.ravel()
        starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
        lengths = np.diff(np.append(starts, flat.size))
        kinds = flat[starts]
        run_weight = wts[starts // ((t + 1) * cells)]  # the run's window
        for kind, counts in ((1, self.wet), (0, self.dry)):
            pick = kinds == kind
            counts += np.bincount(lengths[pick], run_weight[pick], minlength=t + 1)[: t + 1]

    def wet_fraction(self) -> float:
        return self.wet_weight / self.valid_weight if self.valid_weight > 0 else float("nan")

    def distribution(self, kind: str) -> np.ndarray:
        """(T,) probabilities of spell lengths 1..T, ``kind`` "wet" or "dry" (NaN: no spell)."""
        counts = (self.wet if kind == "wet" else self.dry)[1:]
        total = counts.sum()
        return counts / total if total > 0 else np.full(self.length, np.nan)

    def mean_spell(self, kind: str) -> float:
        """The mean length of the ``kind`` ("wet" or "dry") spells, in time steps."""
        p = self.distribution(kind)
        return float(np.sum(p * np.arange(1, self.length + 1)))

    def curves(self) -> dict[str, Any]:
        return {
            "wet_fraction": self.wet_fraction(),
            "length": np.arange(1, self.length + 1),
            "wet": self.distribution("wet"),
            "dry": self.distribution("dry"),
        }


@dataclass
class FieldSummary:
    """What the generation scores need of a set of windows, accumulated chunk by chunk.

    ``wet_threshold``: a pixel above it is wet (see :class:`SpellAccumulator`, ``spells``).
    """

    edges: np.ndarray
    window: tuple[int, int, int]
    top_n: int = 20
    extreme: float = -np.inf  # the top windows are chosen among those with a pixel above it
    wet_threshold: float = 0.0
    spells: SpellAccumulator = field(init=False)
    hist: HistogramAccumulator = field(init=False)
    quantiles: TailQuantiles = field(init=False)
    spatial: SpectrumAccumulator = field(default_factory=SpectrumAccumulator)
    temporal: SpectrumAccumulator = field(default_factory=SpectrumAccumulator)
    cell_sum: np.ndarray = field(init=False)
    cell_weight: np.ndarray = field(init=False)
    maxima: list[np.ndarray] = field(default_factory=list)
    totals: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    top: np.ndarray | None = None  # the top_n extreme windows by total so far

    def __post_init__(self) -> None:
        self.hist = HistogramAccumulator(self.edges)
        # exact above the top 250,000 values; a 20,000-bin histogram below (bounded memory)
        self.quantiles = TailQuantiles(np.linspace(0.0, float(self.edges[-1]), 20001), 250_000)
        _, y, x = self.window
        self.cell_sum = np.zeros((y, x))
        self.cell_weight = np.zeros((y, x))
        self.spells = SpellAccumulator(self.window[0], self.wet_threshold)

    def update(self, w: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Windows ``w`` (n, time, y, x) with optional importance weights (n,)."""
        wts = np.ones(len(w)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.hist.update(w, wts)
        self.quantiles.update(w, wts)
        valid = np.isfinite(w)
        per_cell = np.where(valid, w, 0.0) * wts[:, None, None, None]
        self.cell_sum += per_cell.sum(axis=(0, 1))
        self.cell_weight += (valid * wts[:, None, None, None]).sum(axis=(0, 1))
        self.spells.update(w, wts)
        # spectra are shape statistics: unweighted, over every snapshot and cell series
        k, p = radial_psd(w)
        self.spatial.update(k, p, weight=len(w) * w.shape[1])
        f, pt = temporal_psd(np.moveaxis(w, 1, -1), axis=-1)
        self.temporal.update(f, pt, weight=len(w))
        flat = w.reshape(len(w), -1)
        self.maxima.append(np.nanmax(np.where(np.isfinite(flat), flat, -np.inf), axis=1))
        self.totals.append(np.nansum(flat, axis=1))
        self.weights.append(wts)
        extreme = w[self.maxima[-1] > self.extreme]
        pool = extreme if self.top is None else np.concatenate([self.top, extreme])
        order = np.argsort(np.nansum(pool.reshape(len(pool), int(np.prod(self.window))), axis=1))[
            ::-1
        ]
        self.top = pool[order[: self.top_n]].astype(np.float32)

    def cell_mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.cell_sum / self.cell_weight

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.concatenate(self.maxima),
            np.concatenate(self.totals),
            np.concatenate(self.weights),
        )


def importance_levels(
    values: np.ndarray,
    weights: np.ndarray,
    draws: int,
    periods: np.ndarray,
    rng: np.random.Generator,
    n_boot: int,
) -> dict[str, Any]:
    """Return levels of window maxima from an importance-weighted ensemble store.

    P(max > L) = sum_i w_i 1[max_i > L] / draws (unbiased under the model's prior, rejected
    draws included in ``draws``: see :mod:`cloudburst.ensembles.extremes`); the level for T
    windows is the largest member maximum exceeded with probability >= 1 / T. Levels the
    members cannot resolve (below a rejection threshold, or beyond half the top member's
    mass) are NaN. Intervals: a bootstrap over members.
    """

    def levels_of(v: np.ndarray, w: np.ndarray) -> np.ndarray:
        order = np.argsort(v)[::-1]
        exceed = np.cumsum(w[order]) / draws  # P(max >= v_(k)), descending values
        target = 1.0 / periods
        k = np.searchsorted(exceed, target, side="left")
        out = v[order][np.minimum(k, v.size - 1)]
        unresolved = (k >= v.size) | (target < 0.5 * w[order][0] / draws)
        return np.where(unresolved, np.nan, out)

    levels = levels_of(values, weights)
    boot = np.empty((n_boot, periods.size))
    for b in range(n_boot):
        pick = rng.integers(0, values.size, values.size)
        boot[b] = levels_of(values[pick], weights[pick])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column stays NaN
        lower, upper = np.nanquantile(boot, [0.05, 0.95], axis=0)
    return {
        "method": "importance-weighted-empirical",
        "periods": periods.tolist(),
        "levels": levels.tolist(),
        "lower": lower.tolist(),
        "upper": upper.tolist(),
        "params": {"draws": int(draws), "members": int(values.size)},
    }


def return_levels(
    maxima: np.ndarray,
    weights: np.ndarray,
    periods: np.ndarray,
    request: EvaluationRequest,
    draws: int | None = None,
) -> dict[str, Any] | None:
    """GEV fit (bootstrap intervals) to plain maxima; the importance estimator for stores
    whose members are weighted or were kept by a threshold (``draws`` > members)."""
    ok = np.isfinite(maxima)
    maxima, weights = maxima[ok], weights[ok]
    if maxima.size < 20:
        return None
    rng = np.random.default_rng(request.seed)
    weighted = not np.allclose(weights, weights.mean())
    if weighted or (draws is not None and draws > maxima.size):
        n = draws if draws is not None else maxima.size
        return importance_levels(maxima, weights, n, periods, rng, request.bootstrap)
    try:
        fit = gev_return_levels(
            maxima, periods, bootstrap=request.bootstrap, seed=request.seed, confidence=0.9
        )
    except (ValueError, RuntimeError):
        return None
    return fit.to_dict()


def quantile_thresholds(stats: Any, levels: tuple[float, ...]) -> dict[str, float]:
    """``{"q0.95": value, ...}``: the store's training quantiles at ``levels``."""
    quantiles = dict(stats.quantiles)
    out = {}
    for q in levels:
        key = f"{q:g}"
        if key not in quantiles:
            raise EvaluationError(
                f"the data store's statistics have no {key} quantile (they have "
                f"{sorted(quantiles)}); choose thresholds among them"
            )
        out[f"q{key}"] = float(quantiles[key])
    return out


def top_windows(x: np.ndarray, n: int, extreme: float) -> np.ndarray:
    """Indices of the ``n`` windows with the largest totals among those with a pixel above
    ``extreme`` (the extremes check of the quantized-loss study)."""
    flat = x.reshape(len(x), int(np.prod(x.shape[1:])))
    maxima = np.nanmax(np.where(np.isfinite(flat), flat, -np.inf), axis=1)
    candidates = np.flatnonzero(maxima > extreme)
    totals = np.nansum(flat[candidates], axis=1)
    return candidates[np.argsort(totals)[::-1][:n]]
