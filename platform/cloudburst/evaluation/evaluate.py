"""Evaluate registered models and ensemble stores against a data split (SPEC §2-3).

:func:`evaluate` reads the observed windows of one split of a Cloudburst store, then for every
model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, pinned to its version):

- reconstruction: quantized MSE per bin of the training histogram, QQ of reconstructions;
- generation (``samples`` unconditional windows, streamed in batches): intensity histograms,
  QQ at SPEC's levels, mean-normalised bias per cell, radially averaged spatial and temporal
  power spectra, the extremes check of paper 000 (windows with a pixel above the training 0.99
  quantile; QQ of the top ``top_n`` windows by total: generated, reconstructed, observed),
  return levels of window maxima (GEV, bootstrap intervals), a latent interpolation;
- conditional ensembles (``members`` posterior draws per observed window): fair CRPS, rank
  histogram, spread-skill, twCRPS, Brier and reliability above the training 0.95 / 0.99
  quantiles.

and for every ensemble store (a complete :mod:`cloudburst.ensembles.store`): the generation
scores and a climatological verification (each cell's members against every observed window),
read in tiles of at most ``chunk_mb`` so a 10,000-member store on object storage is never
loaded whole. Importance weights are honoured; the members of an extreme-scenario store are
verified against the observed windows that meet the same threshold. A conditional store
(interpolation, forecast, extension) is verified instead against the frames its condition
withheld, beside a persistence or linear-interpolation baseline
(:mod:`cloudburst.evaluation.conditional`).

Writes ``OUT/metrics.json`` (schema :data:`SCHEMA`, see ``docs`` in README) and PNG figures
under ``OUT/figures``, and logs both to an MLflow run linked to the models' runs.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict, Field

from cloudburst import storage, tracking
from cloudburst.config import SplitConfig, StorageConfig, WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.windows import build_index, parse_split, split_index
from cloudburst.ensembles.generate import EnsembleError, pin
from cloudburst.ensembles.store import _zarr_store, member_chunks, read_marker
from cloudburst.evaluation import figures
from cloudburst.evaluation.conditional import (
    ConditionalError,
    condition_of,
    store_attrs,
    verify_conditional,
)
from cloudburst.evaluation.report import qmse_metrics
from cloudburst.evaluation.return_levels import gev_return_levels
from cloudburst.evaluation.spectra import SpectrumAccumulator, radial_psd, temporal_psd
from cloudburst.evaluation.verify import EnsembleVerifier, HistogramAccumulator, TailQuantiles
from cloudburst.models.losses import quantized_mse

__all__ = ["SCHEMA", "EvaluationError", "EvaluationRequest", "EvaluationResult", "evaluate"]

SCHEMA = "cloudburst.evaluation/1"


class EvaluationError(ValueError):
    """The evaluation cannot run as asked; the message names the problem and the fix."""


class EvaluationRequest(BaseModel):
    """What to evaluate, against which data, and how much of it."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list, description="models:/NAME@ALIAS or /VERSION")
    ensembles: list[str] = Field(default_factory=list, description="complete ensemble stores")
    data: str = Field(description="the Cloudburst store of observations")
    split: str = Field("test", description="PART[@SCHEME]; no scheme: the training run's split")
    out: str = "outputs/evaluation"
    limit: int | None = Field(2000, ge=1, description="observed windows, evenly spread")
    samples: int = Field(2000, ge=10, description="generated windows per model")
    members: int = Field(16, ge=2, le=1000, description="conditional members per window")
    thresholds: tuple[float, ...] = Field((0.95, 0.99), description="training quantile levels")
    periods: tuple[float, ...] = (10, 100, 1000, 10000)
    top_n: int = Field(20, ge=2)
    low_threshold: float = Field(1.0, gt=0, description="upper end of the low-intensity panel")
    seed: int = 0
    chunk_mb: float = Field(64.0, gt=0, description="memory per verification tile")
    bootstrap: int = Field(100, ge=10)
    batch_size: int = Field(64, ge=1)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    experiment: str = "cloudburst-evaluation"
    run_name: str | None = None
    log_to_mlflow: bool = True


@dataclass
class EvaluationResult:
    metrics_path: Path
    figures: list[Path]
    run_id: str | None
    report: dict[str, Any]


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


def _run_params(run_id: str | None, tracking_uri: str | None) -> dict[str, str]:
    if not run_id:
        return {}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.params)
    except MlflowException:
        return {}


def _split_from(spec: str, params: dict[str, str]) -> tuple[SplitConfig, str, str]:
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


def _window_config(window: tuple[int, int, int], params: dict[str, str]) -> WindowConfig:
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
    wcfg = _window_config(window, params)
    split, part, described = _split_from(request.split, params)
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


def _edges(stats: Any, observed: np.ndarray) -> np.ndarray:
    """Intensity histogram edges: 0, then log-spaced from 0.01 to twice the record maximum."""
    top = max(float(np.nanmax(observed)) if observed.size else 0.0, float(stats.max), 1.0)
    return np.concatenate([[0.0], np.geomspace(0.01, 2.0 * top, 120)])


@dataclass
class FieldSummary:
    """What the generation scores need of a set of windows, accumulated chunk by chunk."""

    edges: np.ndarray
    window: tuple[int, int, int]
    top_n: int = 20
    extreme: float = -np.inf  # the top windows are chosen among those with a pixel above it
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

    def update(self, w: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Windows ``w`` (n, time, y, x) with optional importance weights (n,)."""
        wts = np.ones(len(w)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.hist.update(w, wts)
        self.quantiles.update(w, wts)
        valid = np.isfinite(w)
        per_cell = np.where(valid, w, 0.0) * wts[:, None, None, None]
        self.cell_sum += per_cell.sum(axis=(0, 1))
        self.cell_weight += (valid * wts[:, None, None, None]).sum(axis=(0, 1))
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


def _importance_levels(
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


def _return_levels(
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
        return _importance_levels(maxima, weights, n, periods, rng, request.bootstrap)
    try:
        fit = gev_return_levels(
            maxima, periods, bootstrap=request.bootstrap, seed=request.seed, confidence=0.9
        )
    except (ValueError, RuntimeError):
        return None
    return fit.to_dict()


def _nan_to_none(tree: Any) -> Any:
    """JSON has no NaN: NaN and infinities become null."""
    if isinstance(tree, dict):
        return {k: _nan_to_none(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_nan_to_none(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return _nan_to_none(tree.tolist())
    if isinstance(tree, np.generic):
        tree = tree.item()
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


# ----------------------------------------------------------------------------- entries


@dataclass
class Entry:
    """One evaluated source (a model or an ensemble store): scalars and curves."""

    label: str
    kind: str  # "model" | "ensemble"
    source: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    summary: FieldSummary | None = None
    recon_top: np.ndarray | None = None
    interpolation: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            **self.source,
            "metrics": self.metrics,
            "curves": self.curves,
        }


def _label(version_uri: str) -> str:
    name, _, version = version_uri[len("models:/") :].rpartition("/")
    return f"{name} v{version}"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-.]+", "-", label).strip("-")


def _thresholds(stats: Any, levels: tuple[float, ...]) -> dict[str, float]:
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


def _generation_metrics(
    entry: Entry, obs: FieldSummary, q99: float, low_threshold: float = 1.0
) -> None:
    s = entry.summary
    assert s is not None
    mean_obs, mean_gen = obs.cell_mean(), s.cell_mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        bias = np.where(mean_obs > 0, (mean_gen - mean_obs) / mean_obs, np.nan)
    maxima, totals, weights = s.arrays()
    o_max, _, _ = obs.arrays()
    w = weights / weights.sum()
    entry.metrics.update(
        {
            "mean_bias": float(np.nanmean(bias)),
            "mean_abs_bias": float(np.nanmean(np.abs(bias))),
            "mean": float((s.cell_sum.sum()) / max(s.cell_weight.sum(), 1e-12)),
            "extreme_window_fraction": float(w[maxima > q99].sum()),
            "observed_extreme_window_fraction": float(np.mean(o_max[np.isfinite(o_max)] > q99)),
        }
    )
    entry.curves["bias_map"] = bias
    k, p = s.spatial.compute()
    f, pt = s.temporal.compute()
    # spectra against the observed: mean |log10 ratio| over frequencies (0: identical)
    for name, mine, theirs in (
        ("psd_spatial_log_error", p, obs.spatial.compute()[1]),
        ("psd_temporal_log_error", pt, obs.temporal.compute()[1]),
    ):
        ok = (mine > 0) & (theirs > 0)
        if ok.any():
            entry.metrics[name] = float(np.mean(np.abs(np.log10(mine[ok] / theirs[ok]))))
    # the low end, where sampling noise shows: share of pixels in (0, low_threshold]
    edges = s.edges
    low = edges[1:] <= low_threshold
    low[0] = False  # the first bin [0, 0.01) holds the dry pixels
    for prefix, hist in (("", s.hist.counts), ("observed_", obs.hist.counts)):
        total = hist.sum()
        entry.metrics[f"{prefix}low_end_fraction"] = (
            float(hist[low].sum() / total) if total else 0.0
        )
    entry.curves["psd_spatial"] = {"wavenumber": k, "power": p}
    entry.curves["psd_temporal"] = {"frequency": f, "power": pt}
    entry.curves["histogram"] = {"edges": s.edges, "counts": s.hist.counts}


# ------------------------------------------------------------------------------ models


def _model_entry(
    uri: str, request: EvaluationRequest, tracking_uri: str | None
) -> tuple[Entry, Any, dict[str, str]]:
    try:
        version_uri, run_id = pin(uri, tracking_uri)
    except EnsembleError as exc:
        raise EvaluationError(str(exc)) from None
    packaged = tracking.load_model(version_uri, tracking_uri=tracking_uri)
    entry = Entry(
        _label(version_uri),
        "model",
        {"uri": uri, "version_uri": version_uri, "run_id": run_id, "model": packaged.name},
    )
    return entry, packaged, _run_params(run_id, tracking_uri)


@torch.no_grad()
def _evaluate_model(
    entry: Entry,
    packaged: Any,
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    request: EvaluationRequest,
    progress: Callable[[str], None],
) -> Any:
    model, transform = packaged.model.cpu().eval(), packaged.transform
    stats = packaged.stats or {}
    bs = request.batch_size
    x = obs.x
    if not (hasattr(model, "encode") and hasattr(model, "decode")):
        _generate_and_summarise(entry, packaged, obs, obs_summary, thresholds, request, progress)
        return None
    # reconstruction
    recon = np.concatenate([packaged.reconstruct(x[a : a + bs]) for a in range(0, len(x), bs)])
    edges = torch.as_tensor(stats.get("histogram_edges") or obs.stats.histogram_edges)
    valid = torch.from_numpy(np.isfinite(x))
    mse, counts = quantized_mse(
        torch.from_numpy(np.nan_to_num(x)).double(), torch.from_numpy(recon).double(), edges, valid
    )
    entry.metrics.update(qmse_metrics(mse, counts, prefix=""))
    entry.curves["qmse_per_bin"] = {
        "edges": edges.tolist(),
        "mse": mse.tolist(),
        "counts": counts.tolist(),
    }
    levels = figures.qq_levels(int(np.isfinite(x).sum()))
    finite = x[np.isfinite(x)]
    entry.curves["qq_reconstruction"] = {
        "levels": levels,
        "observed": np.quantile(finite, levels),
        "model": np.quantile(recon[np.isfinite(x)], levels),
    }
    for q in (0.99, 0.999):
        entry.metrics[f"q{q}_recon"] = float(np.quantile(recon[np.isfinite(x)], q))
    progress(f"{entry.label}: reconstruction scored on {len(x)} windows")

    _generate_and_summarise(entry, packaged, obs, obs_summary, thresholds, request, progress)

    # conditional ensembles: posterior draws for every observed window
    verifier = EnsembleVerifier(thresholds, seed=request.seed)
    rng = torch.Generator().manual_seed(request.seed + 1)
    filled = np.nan_to_num(x)
    for a in range(0, len(x), bs):
        chunk = filled[a : a + bs]
        model_space = np.asarray(transform.forward(chunk), dtype=np.float32)
        mu, logvar = model.encode(torch.from_numpy(np.nan_to_num(model_space))[:, None])
        std = torch.exp(0.5 * logvar)
        members = []
        for _ in range(request.members):
            z = mu + std * torch.randn(mu.shape, generator=rng)
            members.append(packaged._to_physical(model.decode(z)))
        ens = np.stack(members).reshape(request.members, -1)
        verifier.update(ens, x[a : a + bs].reshape(1, -1))
    scores = verifier.compute()
    _split_scores(entry, scores, prefix="cond_")
    progress(f"{entry.label}: conditional ensembles of {request.members} members verified")

    # the extremes check: the wettest observed windows, their reconstructions
    entry.recon_top = recon[_top_windows(x, request.top_n, obs_summary.extreme)]
    z = torch.randn(2, int(model.cfg.latent), generator=torch.Generator().manual_seed(request.seed))
    frames = packaged._to_physical(model.decode(figures.latent_line(z[0], z[1], 5)))
    entry.interpolation = frames
    return recon


@torch.no_grad()
def _generate_and_summarise(
    entry: Entry,
    packaged: Any,
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    request: EvaluationRequest,
    progress: Callable[[str], None],
) -> None:
    """``request.samples`` unconditional windows, generated and summarised batch by batch."""
    summary = FieldSummary(obs_summary.edges, packaged.window, request.top_n, obs_summary.extreme)
    generator = torch.Generator().manual_seed(request.seed)
    done = 0
    while done < request.samples:
        n = min(request.batch_size, request.samples - done)
        y = packaged.model.sample(n, generator=generator)
        summary.update(packaged._to_physical(y))
        done += n
    entry.summary = summary
    _generation_metrics(
        entry,
        obs_summary,
        thresholds.get("q0.99", obs.stats.quantile(0.99)),
        request.low_threshold,
    )
    progress(f"{entry.label}: {request.samples} windows generated and summarised")


def _split_scores(entry: Entry, scores: dict[str, Any], prefix: str) -> None:
    for key, value in scores.items():
        if isinstance(value, dict | list):
            entry.curves[f"{prefix}{key}"] = value
        else:
            entry.metrics[f"{prefix}{key}"] = float(value)


# ------------------------------------------------------------------------------ stores


def _store_tiles(
    url: str, options: dict[str, Any] | None, budget_bytes: float
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """(time slice, row slice, members (M, t, rows, x)) float32 tiles of a store within
    ``budget_bytes``: several time steps, or rows of one step when members are many.

    A tile is filled one member chunk at a time, so only one decoded chunk is in flight
    beside it (a whole-tile read would decode every member chunk at once).
    """
    group = zarr.open_group(_zarr_store(url, options, read_only=True), mode="r")
    precip = group["precip"]
    m, t, y, x = precip.shape
    c = int(precip.chunks[0])
    cells = max(1, int(budget_bytes // max(m * 4, 1)))
    if cells >= y * x:
        step = min(t, cells // (y * x))
        spans = [(slice(a, min(t, a + step)), slice(0, y)) for a in range(0, t, step)]
    else:
        rows = max(1, cells // x)
        spans = [
            (slice(a, a + 1), slice(b, min(y, b + rows)))
            for a in range(t)
            for b in range(0, y, rows)
        ]
    for ts, ys in spans:
        tile = np.empty((m, ts.stop - ts.start, ys.stop - ys.start, x), dtype=np.float32)
        for a in range(0, m, c):
            tile[a : a + c] = precip[a : a + c, ts, ys]
        yield ts, ys, tile


def _store_window(url: str, request: EvaluationRequest) -> tuple[int, int, int]:
    options = storage.options_from(url, request.storage)
    if read_marker(url, options) is None:
        raise EvaluationError(
            f"{url} is not a complete ensemble store; finish it (re-run its request) or check "
            "the URL"
        )
    group = zarr.open_group(_zarr_store(url, options, read_only=True), mode="r")
    t, y, x = (int(n) for n in group["precip"].shape[1:])
    return t, y, x


def _is_conditional(url: str, request: EvaluationRequest) -> bool:
    return condition_of(store_attrs(url, storage.options_from(url, request.storage))) is not None


def _model_window(url: str, request: EvaluationRequest) -> tuple[int, int, int]:
    """The window of the model that made a store (an extension's members are longer)."""
    attrs = store_attrs(url, storage.options_from(url, request.storage))
    if "model_window" in attrs:
        return tuple(int(n) for n in attrs["model_window"])  # type: ignore[return-value]
    return _store_window(url, request)


def _evaluate_conditional(
    url: str,
    request: EvaluationRequest,
    thresholds: dict[str, float],
    progress: Callable[[str], None],
) -> Entry:
    options = storage.options_from(url, request.storage)
    attrs = store_attrs(url, options)
    condition = condition_of(attrs) or {}
    try:
        source, metrics, curves = verify_conditional(
            url,
            options,
            thresholds,
            seed=request.seed,
            condition_options=storage.options_from(condition.get("data", url), request.storage),
        )
    except ConditionalError as exc:
        raise EvaluationError(str(exc)) from None
    label = f"{attrs.get('scenario', 'conditional')} ensemble"
    if str(attrs.get("model_version_uri", "")).startswith("models:/"):
        label = f"{_label(attrs['model_version_uri'])} {label}"
    entry = Entry(label, "conditional ensemble", source, metrics, curves)
    progress(
        f"{label}: {source['members']} members, {source['verified_steps']} generated steps "
        f"verified against {source.get('verified_against', '')}"
    )
    return entry


def _conditional_figures(entries: list[Entry], units: str) -> dict[str, Any]:
    by_step = {e.label: e.curves["cond_by_step"] for e in entries if "cond_by_step" in e.curves}
    if not by_step:
        return {}
    names = ", ".join(by_step)
    made = {
        "conditional_crps": figures.conditional_skill(
            by_step, units, f"CRPS on the withheld steps by hour: {names}"
        ),
        "conditional_rank_histograms": figures.rank_histograms(
            {
                e.label: e.curves["cond_rank_histogram"]
                for e in entries
                if "cond_by_step" in e.curves
            },
            f"rank of the withheld observation among the members: {names}",
        ),
    }
    return made


def _evaluate_store(
    url: str,
    request: EvaluationRequest,
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    progress: Callable[[str], None],
) -> Entry:
    options = storage.options_from(url, request.storage)
    marker = read_marker(url, options)
    if marker is None:
        raise EvaluationError(
            f"{url} is not a complete ensemble store; finish it (re-run its request) first"
        )
    group = zarr.open_group(_zarr_store(url, options, read_only=True), mode="r")
    attrs = dict(group.attrs)
    window = tuple(int(n) for n in group["precip"].shape[1:])
    if window != obs.x.shape[1:]:
        raise EvaluationError(
            f"{url} holds {window} windows but the observed windows are {obs.x.shape[1:]}"
        )
    weights = np.asarray(group["weight"][:], dtype=np.float64)
    label = f"{attrs.get('model_version_uri', url)} ensemble"
    if str(label).startswith("models:/"):
        label = f"{_label(attrs['model_version_uri'])} ensemble"
    entry = Entry(
        label,
        "ensemble",
        {
            "url": url,
            "members": int(weights.size),
            "version_uri": attrs.get("model_version_uri"),
            "run_id": attrs.get("mlflow_run_id") or None,
            "scenario": attrs.get("scenario"),
            "draws": int(marker.get("draws", weights.size)),
        },
    )
    summary = FieldSummary(obs_summary.edges, window, request.top_n, obs_summary.extreme)  # type: ignore[arg-type]
    for chunk in member_chunks(url, options):
        summary.update(chunk["precip"], chunk["weight"])
    entry.summary = summary
    _generation_metrics(
        entry,
        obs_summary,
        thresholds.get("q0.99", obs.stats.quantile(0.99)),
        request.low_threshold,
    )

    # an extreme scenario's members are verified against observed windows of the same kind
    observed = obs.x
    threshold = attrs.get("threshold")
    if threshold is not None:
        maxima = np.nanmax(observed.reshape(len(observed), -1), axis=1)
        observed = observed[maxima >= float(threshold)]
        entry.source["verified_against"] = f"observed windows with a pixel >= {threshold:g}"
        if len(observed) == 0:
            entry.source["verified_against"] += " (none: not verified)"
            return entry
    weighted = not np.allclose(weights, weights.mean())
    # half the budget for the float32 tile, half for the verifier (~160 B per element)
    budget = request.chunk_mb * 2**20
    verifier = EnsembleVerifier(thresholds, seed=request.seed, max_elements=int(budget / 2 / 160))
    for ts, ys, tile in _store_tiles(url, options, budget / 2):
        m = tile.shape[0]
        verifier.update(
            tile.reshape(m, -1),
            observed[:, ts, ys].reshape(len(observed), -1),
            weights if weighted else None,
        )
    _split_scores(entry, verifier.compute(), prefix="clim_")
    progress(f"{entry.label}: {weights.size} members verified against {len(observed)} windows")
    return entry


# ----------------------------------------------------------------------------- figures


def _figures(
    entries: list[Entry],
    obs: Observed,
    obs_summary: FieldSummary,
    thresholds: dict[str, float],
    observed_levels: dict[str, Any] | None,
    request: EvaluationRequest,
) -> dict[str, Any]:
    units = obs.units
    data = f"{Path(obs.store.rstrip('/')).name} {obs.part}"
    made: dict[str, Any] = {}
    models = [e for e in entries if "qmse_per_bin" in e.curves]  # the ones that reconstruct
    names = ", ".join(e.label for e in entries)
    if models:
        rec = models[0].curves["qmse_per_bin"]
        made["quantized_mse"] = figures.quantized_mse_per_bin(
            rec["edges"],
            {e.label: e.curves["qmse_per_bin"]["mse"] for e in models},
            {e.label: e.curves["qmse_per_bin"]["counts"] for e in models},
            units=units,
        )
        figures.wrapped_title(made["quantized_mse"], f"quantized MSE per bin: {names} on {data}")
        qq = models[0].curves["qq_reconstruction"]
        made["qq_reconstruction"] = figures.qq_compare(
            qq["levels"],
            qq["observed"],
            {e.label: e.curves["qq_reconstruction"]["model"] for e in models},
            units,
            f"reconstruction QQ: {names} on {data}",
        )
    hist = {"observed": obs_summary.hist.counts} | {e.label: e.summary.hist.counts for e in entries}  # type: ignore[union-attr]
    made["intensity_histograms"] = figures.intensity_histograms(
        obs_summary.edges, hist, units, f"intensities: {names} on {data}", request.low_threshold
    )
    n_obs = int(np.isfinite(obs.x).sum())
    levels = figures.qq_levels(n_obs)
    others = {e.label: e.summary.quantiles.quantiles(levels) for e in entries}  # type: ignore[union-attr]
    observed_q = obs_summary.quantiles.quantiles(levels)
    made["qq_generation"] = figures.qq_compare(
        levels, observed_q, others, units, f"generated QQ: {names} on {data}"
    )
    for e in entries:
        e.curves["qq_generation"] = {
            "levels": levels,
            "observed": observed_q,
            "model": others[e.label],
        }
    made["bias_maps"] = figures.bias_maps(
        {e.label: e.curves["bias_map"] for e in entries}, f"mean-normalised bias on {data}"
    )
    for name, axis, accumulator, xlabel, what in (
        ("psd_spatial", "wavenumber", obs_summary.spatial, "wavenumber (cycles per window side)",
         "radially averaged spatial PSD"),
        ("psd_temporal", "frequency", obs_summary.temporal, "frequency (cycles per time step)",
         "temporal PSD of cell series"),
    ):  # fmt: skip
        curves = {"observed": accumulator.compute()} | {
            e.label: (e.curves[name][axis], e.curves[name]["power"]) for e in entries
        }
        made[name] = figures.spectra(
            curves, xlabel, f"{what}: {names} on {data}", ylabel=f"power (({units})²)"
        )
    # the extremes check: QQ of the top-N windows by total
    top_obs = obs.x[_top_windows(obs.x, request.top_n, obs_summary.extreme)]
    tl = figures.qq_levels(int(np.isfinite(top_obs).sum()))
    top_curves: dict[str, Any] = {}
    for e in models:
        if e.recon_top is not None and e.recon_top.size:
            top_curves[f"{e.label} reconstructed"] = np.quantile(_finite(e.recon_top), tl)
    for e in entries:
        if e.summary is not None and e.summary.top is not None and e.summary.top.size:
            top_curves[f"{e.label} generated"] = np.quantile(_finite(e.summary.top), tl)
    if tl.size and top_curves:  # no observed window above q0.99: nothing to compare
        made["extremes_qq"] = figures.qq_compare(
            tl,
            np.quantile(_finite(top_obs), tl),
            top_curves,
            units,
            f"top {request.top_n} windows by total with a pixel > q0.99 "
            f"({obs_summary.extreme:.3g} {units}): {names} on {data}",
        )
    rank = {
        e.label: e.curves.get("cond_rank_histogram") or e.curves.get("clim_rank_histogram")
        for e in entries
    }
    rank = {k2: v for k2, v in rank.items() if v is not None}
    if rank:
        made["rank_histogram"] = figures.rank_histograms(rank, f"rank histograms on {data}")
    for name in thresholds:
        rel = {}
        for e in entries:
            r = e.curves.get(f"cond_reliability_{name}") or e.curves.get(f"clim_reliability_{name}")
            if r is not None:
                rel[e.label] = r
        if rel:
            made[f"reliability_{name}"] = figures.reliability_diagram(
                rel, f"reliability of P(> {thresholds[name]:.3g} {units}) on {data}"
            )
    rl = {e.label: e.curves["return_levels"] for e in entries if e.curves.get("return_levels")}
    if observed_levels is not None:
        rl = {"observed": observed_levels} | rl
    if rl:
        made["return_levels"] = figures.return_levels(
            rl,
            units,
            f"return levels of window maxima: {names} on {data}",
            period_label=f"return period (windows of {obs.x.shape[1]} steps)",
        )
    for e in models:
        if e.interpolation is not None:
            fig = figures.latent_interpolation(e.interpolation, units)
            figures.wrapped_title(fig, f"latent interpolation: {e.label}")
            made[f"latent_interpolation_{_slug(e.label)}"] = fig
    return made


def _top_windows(x: np.ndarray, n: int, extreme: float) -> np.ndarray:
    """Indices of the ``n`` windows with the largest totals among those with a pixel above
    ``extreme`` (paper 000's extremes check)."""
    flat = x.reshape(len(x), int(np.prod(x.shape[1:])))
    maxima = np.nanmax(np.where(np.isfinite(flat), flat, -np.inf), axis=1)
    candidates = np.flatnonzero(maxima > extreme)
    totals = np.nansum(flat[candidates], axis=1)
    return candidates[np.argsort(totals)[::-1][:n]]


def _finite(a: Any) -> np.ndarray:
    flat = np.asarray(a, dtype=np.float64).ravel()
    return flat[np.isfinite(flat)]


# ------------------------------------------------------------------------------- entry


def evaluate(
    request: EvaluationRequest,
    *,
    tracking_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Run the evaluation; see the module docstring. Nothing is written before the inputs
    are checked: an unknown model or store fails with what is registered."""
    say = progress or (lambda _msg: None)
    if not request.models and not request.ensembles:
        raise EvaluationError("nothing to evaluate: give at least one --model or --ensemble")
    started = time.time()
    loaded = [_model_entry(uri, request, tracking_uri) for uri in request.models]
    windows = {tuple(p.window) for _, p, _ in loaded}
    if len(windows) > 1:
        raise EvaluationError(
            "the models have different windows "
            f"({', '.join(f'{e.label}: {p.window}' for e, p, _ in loaded)}); "
            "evaluate them separately"
        )
    store_windows = {url: _store_window(url, request) for url in request.ensembles}
    conditional = [url for url in store_windows if _is_conditional(url, request)]
    for url in conditional:
        store_windows.pop(url)
    if windows:
        window = windows.pop()
    elif store_windows:
        window = next(iter(store_windows.values()))
    else:
        window = _model_window(conditional[0], request)
    for url, shape in store_windows.items():
        if shape != window:
            raise EvaluationError(f"{url} holds {shape} windows, the models {window}")
    params = loaded[0][2] if loaded else {}
    obs = observed_windows(request, window, params)  # type: ignore[arg-type]
    say(f"observed: {len(obs.x)} windows of {obs.split} from {obs.store}")
    thresholds = _thresholds(obs.stats, request.thresholds)
    q99 = thresholds.get("q0.99", obs.stats.quantile(0.99))
    obs_summary = FieldSummary(_edges(obs.stats, obs.x), window, request.top_n, q99)  # type: ignore[arg-type]
    obs_summary.update(obs.x)
    periods = np.asarray(request.periods, dtype=np.float64)

    entries: list[Entry] = []
    for entry, packaged, _ in loaded:
        _evaluate_model(entry, packaged, obs, obs_summary, thresholds, request, say)
        entries.append(entry)
    for url in store_windows:
        entries.append(_evaluate_store(url, request, obs, obs_summary, thresholds, say))
    climatological = list(entries)
    for url in conditional:
        entries.append(_evaluate_conditional(url, request, thresholds, say))
    for e in climatological:
        assert e.summary is not None
        maxima, _, weights = e.summary.arrays()
        rl = _return_levels(maxima, weights, periods, request, e.source.get("draws"))
        if rl is not None:
            e.curves["return_levels"] = rl
            for p, lev in zip(rl["periods"], rl["levels"], strict=True):
                e.metrics[f"return_level_{p:g}"] = float(lev)

    o_max, _, o_w = obs_summary.arrays()
    observed_levels = _return_levels(o_max, o_w, periods, request)
    made = (
        _figures(climatological, obs, obs_summary, thresholds, observed_levels, request)
        if climatological
        else {}
    )
    made |= _conditional_figures(entries, obs.units)
    out = Path(request.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in made.items():
        if hasattr(fig, "savefig"):
            path = out / "figures" / f"{name}.png"
            fig.savefig(path, dpi=100)
            paths.append(path)
    report = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "data": {
            "store": obs.store,
            "split": obs.split,
            "windows": int(len(obs.x)),
            "window": list(window),
            "units": obs.units,
            "thresholds": thresholds,
        },
        "settings": request.model_dump(mode="json", exclude={"storage"}),
        "observed": {
            "metrics": {
                "mean": float(np.nanmean(obs.x)),
                "extreme_window_fraction": float(
                    np.mean(
                        np.nanmax(obs.x.reshape(len(obs.x), -1), axis=1)
                        > thresholds.get("q0.99", np.inf)
                    )
                ),
            },
            "curves": {
                "histogram": {"edges": obs_summary.edges, "counts": obs_summary.hist.counts},
                "psd_spatial": dict(
                    zip(("wavenumber", "power"), obs_summary.spatial.compute(), strict=True)
                ),
                "return_levels": observed_levels,
                "psd_temporal": dict(
                    zip(("frequency", "power"), obs_summary.temporal.compute(), strict=True)
                ),
            },
        },
        "models": [e.to_json() for e in entries],
        "figures": [str(p.relative_to(out)) for p in paths],
    }
    report = _nan_to_none(report)
    metrics_path = out / "metrics.json"
    tmp = metrics_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, metrics_path)
    run_id = (
        _log_to_mlflow(request, report, entries, paths, metrics_path)
        if request.log_to_mlflow
        else None
    )
    return EvaluationResult(metrics_path, paths, run_id, report)


def _log_to_mlflow(
    request: EvaluationRequest,
    report: dict[str, Any],
    entries: list[Entry],
    paths: list[Path],
    metrics_path: Path,
) -> str:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tracking.use_experiment(request.experiment)
    name = request.run_name or "evaluate " + ", ".join(e.label for e in entries)
    with mlflow.start_run(run_name=name[:250]) as run:
        rid = run.info.run_id
        client = MlflowClient()
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{_slug(e.label)}.{k}", float(v), now, 0)
            for e in entries
            for k, v in e.metrics.items()
            if v is not None and np.isfinite(v)
        ]
        for a in range(0, len(metrics), 900):
            client.log_batch(rid, metrics=metrics[a : a + 900])
        mlflow.log_params(
            {
                "data": request.data,
                "split": report["data"]["split"][:500],
                "windows": report["data"]["windows"],
                "samples": request.samples,
                "members": request.members,
                "seed": request.seed,
            }
        )
        links = {e.label: e.source.get("run_id") for e in entries}
        mlflow.set_tags(
            {
                "evaluated": json.dumps(
                    [e.source.get("version_uri") or e.source.get("url") for e in entries]
                )[:5000],
                "evaluated_runs": json.dumps(links)[:5000],
                "mlflow.note.content": "Evaluation of "
                + ", ".join(e.label for e in entries)
                + f" on {request.data} ({report['data']['split']}).",
            }
        )
        mlflow.log_artifact(str(metrics_path))
        for p in paths:
            mlflow.log_artifact(str(p), artifact_path="figures")
        for e in entries:
            if e.source.get("run_id"):
                client.set_tag(e.source["run_id"], "last_evaluation_run", rid)
    return rid
