"""Verification of conditional ensembles (interpolation, forecast, extension) against the
frames they withheld.

A conditional store names its condition (``condition_data``, ``condition_time``,
``condition_y`` / ``_x``) and which steps were given (``known_steps`` or ``context_steps``).
Each generated step that the condition store also observes is verified pixel by pixel: the
members against the observed value (CRPS, fair CRPS, twCRPS and Brier above the thresholds,
rank histogram, spread-skill through :class:`EnsembleVerifier`), per step and over all steps,
beside a deterministic baseline whose CRPS is its MAE: persistence of the last known frame for
forecasts and extensions, linear interpolation between the neighbouring known frames for
interpolations. ``crps_skill`` = 1 - CRPS / baseline MAE (> 0: the ensemble beats it).

A steered store (``proposal`` shift or tail: draws from a defensive mixture, members carrying
importance weights p/q) is verified with its weights, as an unconditional one is; ``source``
says ``weighted`` and Kish's effective number of members (sum w)^2 / sum w^2.

The conditional exceedance of the generated part: for each threshold, P(max over the generated
steps and pixels > t | condition) by :func:`cloudburst.ensembles.extremes.exceedance_probability`
(importance-weighted, over every draw the completion marker counts), as
``cond_exceedance_<name>`` and ``cond_exceedance_<name>_stderr``, beside the observed maximum
over the same steps (``source["observed_generated_max"]``). When a rejection threshold dropped
draws, thresholds below it cannot be estimated (the rejected draws' values are unknown): they
are skipped and ``source["exceedance_skipped"]`` says why. The exceedance needs no observation,
so a forecast past the end of its condition store still gets it.

Memory: one time step of all members at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from cloudburst.ensembles.condition import window_values
from cloudburst.ensembles.extremes import exceedance_probability
from cloudburst.ensembles.store import read_marker, zarr_store
from cloudburst.evaluation.verify import EnsembleVerifier


class ConditionalError(ValueError):
    """The store is not a complete conditional ensemble, or its condition cannot be read."""


def condition_of(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The condition a store's attributes record, or None for an unconditioned store."""
    if not attrs.get("condition_data"):
        return None
    return {
        "data": str(attrs["condition_data"]),
        "time": str(attrs["condition_time"]),
        "y": int(attrs.get("condition_y", 0)),
        "x": int(attrs.get("condition_x", 0)),
    }


def store_attrs(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
    return dict(group.attrs)


def known_mask(attrs: Mapping[str, Any], steps: int) -> np.ndarray:
    """(steps,) bool: the steps the store's members were given."""
    known = np.zeros(steps, dtype=bool)
    if "known_steps" in attrs:
        known[[int(i) for i in attrs["known_steps"] if int(i) < steps]] = True
    else:
        known[: int(attrs.get("context_steps", 0))] = True
    return known


def baseline(truth: np.ndarray, known: np.ndarray, kind: str) -> np.ndarray:
    """(steps, y, x): persistence of the last known frame (forecast, extension) or linear
    interpolation between the neighbouring known frames (interpolation)."""
    steps = truth.shape[0]
    idx = np.flatnonzero(known)
    out = np.full(truth.shape, np.nan, dtype=np.float64)
    for t in range(steps):
        before = idx[idx <= t]
        after = idx[idx >= t]
        if not len(before):
            continue
        a = before[-1]
        if kind == "interpolation" and len(after) and after[0] != a:
            b = after[0]
            f = (t - a) / (b - a)
            out[t] = (1.0 - f) * truth[a] + f * truth[b]
        else:
            out[t] = truth[a]
    return out


def read_truth(
    condition: Mapping[str, Any], steps: int, shape: tuple[int, int], options: dict[str, Any] | None
) -> np.ndarray:
    """(steps, y, x) observed values of the condition window, NaN past the store's end."""
    from cloudburst.data.ingest import PRECIP, StoreError, open_store

    try:
        ds, _ = open_store(condition["data"], options)
    except (StoreError, OSError) as exc:
        raise ConditionalError(f"the condition store cannot be read: {exc}") from None
    from cloudburst.data import calendars

    times = ds["time"].values
    start = calendars.parse(condition["time"], calendars.calendar_of(times))
    found = np.flatnonzero(calendars.since(times, start) == np.timedelta64(0, "ns"))
    if not len(found):
        raise ConditionalError(
            f"{condition['data']} has no step at {condition['time']} any more; was it re-ingested?"
        )
    i = int(found[0])
    values = window_values(ds[PRECIP], i, steps, condition["y"], condition["x"], shape)
    truth = np.full((steps, *shape), np.nan, dtype=np.float32)
    truth[: len(values)] = values
    return truth


def verify_conditional(
    url: str,
    options: dict[str, Any] | None,
    thresholds: Mapping[str, float],
    *,
    seed: int = 0,
    condition_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """(source, metrics, curves) of the conditional ensemble at ``url``; see the module doc."""
    marker = read_marker(url, options)
    if marker is None:
        raise ConditionalError(f"{url} is not a complete ensemble store; finish it first")
    attrs = store_attrs(url, options)
    condition = condition_of(attrs)
    if condition is None:
        raise ConditionalError(f"{url} is not a conditional ensemble (no condition_data)")
    group = zarr.open_group(zarr_store(url, options, read_only=True), mode="r")
    precip = group["precip"]
    m, steps, ny, nx = (int(n) for n in precip.shape)
    kind = str(attrs.get("scenario", ""))
    known = known_mask(attrs, steps)
    truth = read_truth(condition, steps, (ny, nx), condition_options)
    base = baseline(truth, known, kind)
    step_hours = float(attrs.get("time_step_hours", 1.0))
    weights = np.asarray(group["weight"][:], dtype=np.float64).reshape(-1)
    if weights.shape != (m,):
        raise ConditionalError(f"{url} holds {weights.size} weights for {m} members")
    weighted = is_weighted(weights)
    member_weights = weights if weighted else None
    overall = EnsembleVerifier(thresholds, seed=seed)
    lead, crps, fair, base_mae, spread = [], [], [], [], []
    generated_max = np.full(m, -np.inf)  # each member's maximum over the generated steps
    for t in range(steps):
        if known[t]:
            continue
        ens_t = np.asarray(precip[:, t], dtype=np.float32).reshape(m, -1)
        generated_max = np.fmax(generated_max, np.fmax.reduce(ens_t, axis=1))
        obs_t = truth[t].reshape(-1)
        if not np.isfinite(obs_t).any():
            continue
        overall.update(ens_t, obs_t, member_weights)
        step = EnsembleVerifier(thresholds, seed=seed + t)
        step.update(ens_t, obs_t, member_weights)
        scores = step.compute()
        ok = np.isfinite(obs_t) & np.isfinite(base[t].reshape(-1))
        lead.append(t * step_hours)
        crps.append(float(scores["crps"]))
        fair.append(float(scores.get("crps_fair", np.nan)))
        spread.append(float(scores.get("spread_skill", np.nan)))
        base_mae.append(float(np.abs(base[t].reshape(-1)[ok] - obs_t[ok]).mean()))
    source = {
        "url": url,
        "members": m,
        "version_uri": attrs.get("model_version_uri"),
        "run_id": attrs.get("mlflow_run_id") or None,
        "scenario": kind,
        "condition": condition,
        "known_steps": [int(i) for i in np.flatnonzero(known)],
        "verified_steps": len(lead),
        "weighted": weighted,
        "effective_members": kish(weights),
        "draws": int(marker.get("draws", m)),
    }
    exceedance: dict[str, float] = {}
    if (~known).any():
        observed = truth[~known]
        observed = observed[np.isfinite(observed)]
        source["observed_generated_max"] = float(observed.max()) if observed.size else None
        exceedance = conditional_exceedance(
            generated_max, weights, thresholds, marker, attrs, source
        )
    if not lead:
        source["verified_against"] = "nothing: the condition store observes no generated step"
        return source, exceedance, {}
    scores = overall.compute()
    metrics = {f"cond_{k}": float(v) for k, v in scores.items() if not isinstance(v, dict | list)}
    metrics |= exceedance
    metrics["cond_baseline_mae"] = float(np.mean(base_mae))
    if metrics["cond_baseline_mae"] > 0:
        metrics["cond_crps_skill"] = 1.0 - metrics["cond_crps"] / metrics["cond_baseline_mae"]
    curves = {f"cond_{k}": v for k, v in scores.items() if isinstance(v, dict | list)} | {
        "cond_by_step": {
            "hours": lead,
            "crps": crps,
            "crps_fair": fair,
            "spread_skill": spread,
            "baseline_mae": base_mae,
            "baseline": "linear interpolation" if kind == "interpolation" else "persistence",
        }
    }
    source["verified_against"] = (
        f"the withheld steps of {condition['data']} at {condition['time']} "
        f"(y={condition['y']}, x={condition['x']})"
    )
    source["request"] = json.loads(str(attrs.get("request", "{}")))
    return source, metrics, curves


def is_weighted(weights: np.ndarray) -> bool:
    """Whether importance ``weights`` differ (relatively: weights of a strongly shifted
    proposal may all be tiny, so no absolute tolerance)."""
    return bool(weights.size) and not np.allclose(weights, weights.mean(), rtol=1e-9, atol=0.0)


def kish(weights: np.ndarray) -> float:
    """Kish's effective number of members, (sum w)^2 / sum w^2 (the members when equal)."""
    w2 = float((weights**2).sum())
    return float(weights.sum()) ** 2 / w2 if w2 > 0 else 0.0


def conditional_exceedance(
    generated_max: np.ndarray,
    weights: np.ndarray,
    thresholds: Mapping[str, float],
    marker: Mapping[str, Any],
    attrs: Mapping[str, Any],
    source: dict[str, Any],
) -> dict[str, float]:
    """``cond_exceedance_<name>`` (and ``_stderr``) of each threshold: P(the generated part's
    maximum > t | the condition), from the members' ``generated_max`` and importance
    ``weights`` over every draw the marker counts. Thresholds a rejection threshold makes
    inestimable are skipped and named in ``source["exceedance_skipped"]``."""
    m = int(generated_max.size)
    draws = int(marker.get("draws", m))
    cut = attrs.get("threshold", marker.get("threshold"))
    rejected = draws > m
    out: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, value in thresholds.items():
        t = float(value)
        if rejected and (cut is None or t < float(cut)):
            skipped[name] = (
                f"{t:g} is below the store's threshold {float(cut):g}: {draws - m} rejected "
                "draws were not stored, so the exceedance below it cannot be estimated"
                if cut is not None
                else f"the store rejected {draws - m} draws but records no threshold"
            )
            continue
        est = exceedance_probability(generated_max, t, weights, draws=draws)
        out[f"cond_exceedance_{name}"] = float(est.probability[0])
        out[f"cond_exceedance_{name}_stderr"] = float(est.stderr[0])
    if skipped:
        source["exceedance_skipped"] = skipped
    return out
