"""What an ensemble store records of how it was made: its attributes (:func:`provenance`:
the model and its version, the scenario, the seed rule, the proposal and its fit, the
sampler's settings, a condition's store and window), the arrays of what steered the proposal
(:func:`steering_arrays`: a shift's direction, a fitted Gaussian, a union's patterns and place
probabilities), and a conditioned ensemble's real coordinates (:func:`coordinates`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cloudburst.ensembles.condition import ObservedWindow, context_frames, known_steps
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.union import UnionFit

if TYPE_CHECKING:
    from cloudburst.ensembles.generate import Generator, ResolvedModel

__all__ = ["coordinates", "provenance", "steering_arrays"]


def provenance(request: EnsembleRequest, model: ResolvedModel, gen: Generator) -> dict[str, Any]:
    stats = model.packaged.stats or {}
    s = request.scenario
    out: dict[str, Any] = {
        "title": f"Cloudburst ensemble of {model.version_uri}",
        "model_uri": model.uri,
        "model_version_uri": model.version_uri,
        "mlflow_run_id": model.run_id or "",
        "model_kind": model.packaged.name,
        "scenario": request.scenario.kind,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "training_units": stats.get("units", ""),
        "model_window": [int(n) for n in model.packaged.window],
    }
    if gen.threshold is not None:
        out["threshold"] = gen.threshold
    if model.packaged.dry_threshold is not None:
        out["dry_threshold"] = model.packaged.dry_threshold
    if s.steered:
        out["proposal"] = s.proposal
        out["defensive"] = s.defensive
        out["steered_input"] = (
            "the latent code z"
            if not gen.streams
            else "the sampler's initial noise z_1 of the "
            + ("first window" if s.kind == "extension" else "window")
            + ", flattened from (1, time, y, x)"
        )
        if s.proposal == "shift":
            out["shift"] = s.shift
            out["direction_source"] = gen.direction_source
        else:
            out["tail_quantile"] = s.tail_quantile
        if gen.fitted is not None:
            out["fit_levels"] = [float(v) for v in gen.fitted.levels]
            out["fit_level_probability"] = gen.fitted.level_probability
            out["fit_pilot_draws"] = gen.fitted.pilot_draws
    for key in ("time_step_hours",):
        if key in stats:
            out[key] = stats[key]
    if gen.sampler_settings:
        out["steps"] = int(request.steps or model.packaged.config.get("steps", 0))
        out["sampler"] = str(request.sampler or model.packaged.config.get("sampler", ""))
    if s.conditional:
        frames = model.packaged.window[0]
        out["guidance"] = gen.guidance
        out["guidance_source"] = gen.guidance_source
        if s.kind == "interpolation":
            out["known_steps"] = [int(i) for i in np.flatnonzero(known_steps(s, frames))]
        else:
            out["context_steps"] = context_frames(s, frames)
    if gen.observed is not None:
        c = s.condition
        assert c is not None
        out.update(
            {
                "condition_data": c.data,
                "condition_time": c.time,
                "condition_y": c.y,
                "condition_x": c.x,
                "condition_store_fingerprint": gen.observed.store_fingerprint,
                "time_step_hours": gen.observed.step_hours,
            }
        )
    return out


def steering_arrays(gen: Generator) -> dict[str, tuple[np.ndarray, list[str], str]]:
    """The store's record of what steered the proposal: its direction, or its fit."""
    if gen.direction is not None:
        what = "unit direction of the shift proposal in the model's standard-normal input"
        return {"direction": (gen.direction, ["direction_component"], what)}
    if isinstance(gen.fitted, UnionFit):
        places = ["noise_time", "noise_y", "noise_x"]
        pattern = ["pattern_time", "pattern_y", "pattern_x"]
        return {
            "union_pattern": (gen.fitted.pattern, pattern, "noise pattern of the union proposal"),
            "union_edge_patterns": (
                gen.fitted.patterns,
                ["edge_class", *pattern],
                "the pattern of each edge class (how the window's edges crop it)",
            ),
            "union_place_class": (
                gen.fitted.classes.reshape(gen.fitted.probabilities.shape),
                places,
                "edge class of each place",
            ),
            "union_place_probability": (
                gen.fitted.probabilities,
                places,
                "probability of each place of the union proposal",
            ),
            "union_spread": (
                gen.fitted.spreads,
                ["spread_part"],
                "variances of the union's components: along the pattern, around it (the rest "
                "of its box), beyond it",
            ),
        }
    if gen.fitted is not None:
        dims = ["latent_component", "latent_component_2"]
        return {
            "fitted_mean": (gen.fitted.mean, dims[:1], "mean of the fitted proposal"),
            "fitted_covariance": (gen.fitted.covariance, dims, "its covariance"),
        }
    return {}


def coordinates(observed: ObservedWindow | None) -> dict[str, tuple[np.ndarray, dict]] | None:
    """Real times and grid coordinates for a conditioned ensemble (None: window indices)."""
    if observed is None:
        return None
    from cloudburst.data import calendars

    # CF time in the condition's calendar: ``hours since <first step>``, calendar standard or
    # the store's model calendar (e.g. 360_day), so xarray decodes it to the same times
    hours, time_attrs = calendars.cf_time(observed.times, "hours")
    return {
        "time": (hours, time_attrs),
        "y": (np.asarray(observed.y), observed.y_attrs),
        "x": (np.asarray(observed.x), observed.x_attrs),
    }
