"""Evaluate registered models and ensemble stores against a data split.

:func:`evaluate` reads the observed windows of one split of a Cloudburst store
(:mod:`~cloudburst.evaluation.observations`), then for every model (``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``, pinned to its version; :mod:`~cloudburst.evaluation.score_models`):

- reconstruction: quantized MSE per bin of the training histogram, QQ of reconstructions;
- generation (``samples`` unconditional windows, streamed in batches): intensity histograms,
  QQ at the levels {1 - 10^-n1 + n2 10^-(n1+1)} of the quantized-loss study (Szwarcman et
  al., Quantizing reconstruction losses for improving weather data synthesis),
  mean-normalised bias per cell, radially averaged spatial and temporal power spectra, that
  study's extremes check (windows with a pixel above the training 0.99 quantile; QQ of the
  top ``top_n`` windows by total: generated, reconstructed, observed), return levels of
  window maxima (GEV, bootstrap intervals), a latent interpolation;
- conditional ensembles (``members`` posterior draws per observed window): fair CRPS, rank
  histogram, spread-skill, twCRPS, Brier and reliability above the training 0.95 / 0.99
  quantiles.

and for every ensemble store (a complete :mod:`cloudburst.ensembles.store`;
:mod:`~cloudburst.evaluation.score_stores`): the generation scores and a climatological
verification (each cell's members against every observed window), read in tiles of at most
``chunk_mb`` so a 10,000-member store on object storage is never loaded whole. Importance
weights are honoured; the members of an extreme-scenario store are verified against the
observed windows that meet the same threshold. A conditional store (interpolation, forecast,
extension) is verified instead against the frames its condition withheld, beside a
persistence or linear-interpolation baseline (:mod:`cloudburst.evaluation.conditional`).

Writes ``OUT/metrics.json`` (schema :data:`SCHEMA`, see docs/how-to/evaluation.md) and PNG
figures under ``OUT/figures``, and logs both to an MLflow run linked to the models' runs
(:mod:`~cloudburst.evaluation.publish`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloudburst.evaluation.entries import Entry
from cloudburst.evaluation.observations import (
    FieldSummary,
    edges,
    observed_windows,
    quantile_thresholds,
    return_levels,
)
from cloudburst.evaluation.publish import (
    build_figures,
    conditional_figures,
    log_to_mlflow,
    nan_to_none,
    save_figures,
    write_metrics,
)
from cloudburst.evaluation.request import EvaluationError, EvaluationRequest
from cloudburst.evaluation.score_models import evaluate_model, model_entry
from cloudburst.evaluation.score_stores import (
    evaluate_conditional,
    evaluate_store,
    is_conditional,
    model_window,
    store_window,
)

__all__ = ["SCHEMA", "EvaluationError", "EvaluationRequest", "EvaluationResult", "evaluate"]

SCHEMA = "cloudburst.evaluation/1"


@dataclass
class EvaluationResult:
    metrics_path: Path
    figures: list[Path]
    run_id: str | None
    report: dict[str, Any]


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
    loaded = [model_entry(uri, request, tracking_uri) for uri in request.models]
    windows = {tuple(p.window) for _, p, _ in loaded}
    if len(windows) > 1:
        raise EvaluationError(
            "the models have different windows "
            f"({', '.join(f'{e.label}: {p.window}' for e, p, _ in loaded)}); "
            "evaluate them separately"
        )
    store_windows = {url: store_window(url, request) for url in request.ensembles}
    conditional = [url for url in store_windows if is_conditional(url, request)]
    for url in conditional:
        store_windows.pop(url)
    if windows:
        window = windows.pop()
    elif store_windows:
        window = next(iter(store_windows.values()))
    else:
        window = model_window(conditional[0], request)
    for url, shape in store_windows.items():
        if shape != window:
            raise EvaluationError(f"{url} holds {shape} windows, the models {window}")
    params = loaded[0][2] if loaded else {}
    obs = observed_windows(request, window, params)  # type: ignore[arg-type]
    say(f"observed: {len(obs.x)} windows of {obs.split} from {obs.store}")
    thresholds = quantile_thresholds(obs.stats, request.thresholds)
    q99 = thresholds.get("q0.99", obs.stats.quantile(0.99))
    obs_summary = FieldSummary(
        edges(obs.stats, obs.x),
        window,  # type: ignore[arg-type]
        request.top_n,
        q99,
        wet_threshold=request.wet_threshold,
    )
    obs_summary.update(obs.x)
    periods = np.asarray(request.periods, dtype=np.float64)

    entries: list[Entry] = []
    for entry, packaged, _ in loaded:
        evaluate_model(entry, packaged, obs, obs_summary, thresholds, request, say)
        entries.append(entry)
    for url in store_windows:
        entries.append(evaluate_store(url, request, obs, obs_summary, thresholds, say))
    climatological = list(entries)
    for url in conditional:
        entries.append(evaluate_conditional(url, request, thresholds, say))
    for e in climatological:
        assert e.summary is not None
        maxima, _, weights = e.summary.arrays()
        rl = return_levels(maxima, weights, periods, request, e.source.get("draws"))
        if rl is not None:
            e.curves["return_levels"] = rl
            for p, lev in zip(rl["periods"], rl["levels"], strict=True):
                e.metrics[f"return_level_{p:g}"] = float(lev)

    o_max, _, o_w = obs_summary.arrays()
    observed_levels = return_levels(o_max, o_w, periods, request)
    made = (
        build_figures(climatological, obs, obs_summary, thresholds, observed_levels, request)
        if climatological
        else {}
    )
    made |= conditional_figures(entries, obs.units)
    out = Path(request.out)
    paths = save_figures(made, out)
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
    report = nan_to_none(report)
    metrics_path = write_metrics(report, out)
    run_id = (
        log_to_mlflow(request, report, entries, paths, metrics_path)
        if request.log_to_mlflow
        else None
    )
    return EvaluationResult(metrics_path, paths, run_id, report)
