"""Scoring of ensemble stores against the observed windows.

A complete :mod:`cloudburst.ensembles.store` gets the generation scores and a climatological
verification (each cell's members against every observed window), read in tiles of at most
``chunk_mb`` so a 10,000-member store on object storage is never loaded whole. Importance
weights are honoured; the members of an extreme-scenario store are verified against the
observed windows that meet the same threshold. A conditional store (interpolation, forecast,
extension) is verified instead against the frames its condition withheld, beside a
persistence or linear-interpolation baseline (:mod:`cloudburst.evaluation.conditional`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from cloudburst import storage
from cloudburst.ensembles.store import member_chunks, read_marker, zarr_store
from cloudburst.evaluation.conditional import (
    ConditionalError,
    condition_of,
    store_attrs,
    verify_conditional,
)
from cloudburst.evaluation.entries import Entry, generation_metrics, model_label, split_scores
from cloudburst.evaluation.observations import FieldSummary, Observed
from cloudburst.evaluation.request import EvaluationError, EvaluationRequest
from cloudburst.evaluation.verify import EnsembleVerifier

__all__ = [
    "evaluate_conditional",
    "evaluate_store",
    "is_conditional",
    "model_window",
    "store_window",
]


def _store_tiles(
    url: str, options: dict[str, Any] | None, budget_bytes: float
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """(time slice, row slice, members (M, t, rows, x)) float32 tiles of a store within
    ``budget_bytes``: several time steps, or rows of one step when members are many.

    A tile is filled one member chunk at a time, so only one decoded chunk is in flight
    beside it (a whole-tile read would decode every member chunk at once).
    """
    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
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


def store_window(url: str, request: EvaluationRequest) -> tuple[int, int, int]:
    options = storage.options_from(url, request.storage)
    if read_marker(url, options) is None:
        raise EvaluationError(
            f"{url} is not a complete ensemble store; finish it (re-run its request) or check "
            "the URL"
        )
    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
    t, y, x = (int(n) for n in group["precip"].shape[1:])
    return t, y, x


def is_conditional(url: str, request: EvaluationRequest) -> bool:
    return condition_of(store_attrs(url, storage.options_from(url, request.storage))) is not None


def model_window(url: str, request: EvaluationRequest) -> tuple[int, int, int]:
    """The window of the model that made a store (an extension's members are longer)."""
    attrs = store_attrs(url, storage.options_from(url, request.storage))
    if "model_window" in attrs:
        return tuple(int(n) for n in attrs["model_window"])  # type: ignore[return-value]
    return store_window(url, request)


def evaluate_conditional(
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
        label = f"{model_label(attrs['model_version_uri'])} {label}"
    entry = Entry(label, "conditional ensemble", source, metrics, curves)
    progress(
        f"{label}: {source['members']} members, {source['verified_steps']} generated steps "
        f"verified against {source.get('verified_against', '')}; {skill_line(attrs, metrics)}"
    )
    return entry


def skill_line(attrs: dict[str, Any], metrics: dict[str, float]) -> str:
    """CRPS beside the deterministic baseline's MAE and the skill, in words: a conditional
    ensemble worse than persistence (or linear interpolation) says so, and what to try."""
    kind = attrs.get("scenario", "")
    baseline = "linear interpolation" if kind == "interpolation" else "persistence"
    crps, mae = metrics.get("cond_crps"), metrics.get("cond_baseline_mae")
    if crps is None or mae is None:
        return "no skill score (nothing verified)"
    guidance = attrs.get("guidance")
    weight = f" at guidance {float(guidance):g}" if guidance is not None else ""
    skill = metrics.get("cond_crps_skill")
    if skill is None:
        return f"CRPS {crps:.4g}{weight}; {baseline} is exact here (MAE 0)"
    line = f"CRPS {crps:.4g}{weight} against {baseline} MAE {mae:.4g}: skill {skill:+.2f}"
    if skill < 0:
        line += (
            f" - WORSE than {baseline}; try another guidance weight (the request's "
            "scenario.guidance) or a model trained longer"
        )
    return line


def evaluate_store(
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
    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
    attrs = dict(group.attrs)
    window = tuple(int(n) for n in group["precip"].shape[1:])
    if window != obs.x.shape[1:]:
        raise EvaluationError(
            f"{url} holds {window} windows but the observed windows are {obs.x.shape[1:]}"
        )
    weights = np.asarray(group["weight"][:], dtype=np.float64)
    label = f"{attrs.get('model_version_uri', url)} ensemble"
    if str(label).startswith("models:/"):
        label = f"{model_label(attrs['model_version_uri'])} ensemble"
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
    summary = FieldSummary(
        obs_summary.edges,
        window,  # type: ignore[arg-type]
        request.top_n,
        obs_summary.extreme,
        wet_threshold=obs_summary.wet_threshold,  # wet as the observed are
    )
    # progress on a terminal only (disable=None: no bar in a log file)
    bar = tqdm(total=int(weights.size), desc=f"summarise {url}", unit="member", disable=None)
    for chunk in member_chunks(url, options):
        summary.update(chunk["precip"], chunk["weight"])
        bar.update(len(chunk["weight"]))
    bar.close()
    entry.summary = summary
    generation_metrics(
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
    weighted = not np.allclose(weights, weights.mean(), rtol=1e-9, atol=0.0)
    # half the budget for the float32 tile, half for the verifier (~160 B per element)
    budget = request.chunk_mb * 2**20
    verifier = EnsembleVerifier(thresholds, seed=request.seed, max_elements=int(budget / 2 / 160))
    bar = tqdm(desc=f"verify {url}", unit="tile", disable=None)
    for ts, ys, tile in _store_tiles(url, options, budget / 2):
        m = tile.shape[0]
        verifier.update(
            tile.reshape(m, -1),
            observed[:, ts, ys].reshape(len(observed), -1),
            weights if weighted else None,
        )
        bar.update(1)
    bar.close()
    split_scores(entry, verifier.compute(), prefix="clim_")
    progress(f"{entry.label}: {weights.size} members verified against {len(observed)} windows")
    return entry
