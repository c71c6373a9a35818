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

Memory: one time step of all members at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from cloudburst.ensembles.condition import window_values
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
    overall = EnsembleVerifier(thresholds, seed=seed)
    lead, crps, fair, base_mae, spread = [], [], [], [], []
    for t in range(steps):
        obs_t = truth[t].reshape(-1)
        if known[t] or not np.isfinite(obs_t).any():
            continue
        ens_t = np.asarray(precip[:, t], dtype=np.float32).reshape(m, -1)
        overall.update(ens_t, obs_t)
        step = EnsembleVerifier(thresholds, seed=seed + t)
        step.update(ens_t, obs_t)
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
    }
    if not lead:
        source["verified_against"] = "nothing: the condition store observes no generated step"
        return source, {}, {}
    scores = overall.compute()
    metrics = {f"cond_{k}": float(v) for k, v in scores.items() if not isinstance(v, dict | list)}
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
