"""The dry threshold of a packaged model: generated values below it become exactly 0.

Generative models of precipitation rarely produce exact zeros: their smallest outputs are
noise, so every generated pixel drizzles and wet-day frequencies, dry spells and every
threshold-based score downstream are wrong. A model's dry threshold t (physical units) is
chosen on windows of the training data, never the test years: by default (:func:`choose`)
the value at which the generated wet fraction P(x >= t) matches the observed wet fraction
(the share of valid observed values > 0). It is reported beside the data's detection limit,
the smallest positive value the windows hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["DryThreshold", "apply", "choose"]


@dataclass(frozen=True)
class DryThreshold:
    """``value``: the threshold (physical units); ``observed_wet_fraction``: share of valid
    observed values > 0; ``generated_wet_fraction``: share of generated values > 0 before
    the threshold; ``detection_limit``: the smallest positive observed value (NaN if none)."""

    value: float
    observed_wet_fraction: float
    generated_wet_fraction: float
    detection_limit: float

    def metrics(self) -> dict[str, float]:
        return {
            f"dry_threshold_{k}" if k != "value" else "dry_threshold": v
            for k, v in asdict(self).items()
        }


def choose(observed: np.ndarray, generated: np.ndarray) -> DryThreshold:
    """The threshold that makes the wet fraction of ``generated`` match that of ``observed``
    (both physical; NaN in ``observed`` are missing values and ignored)."""
    obs = np.asarray(observed, dtype=np.float64).ravel()
    obs = obs[np.isfinite(obs)]
    gen = np.asarray(generated, dtype=np.float64).ravel()
    gen = gen[np.isfinite(gen)]
    if obs.size == 0 or gen.size == 0:
        raise ValueError("the dry threshold needs observed and generated values (none given)")
    wet = float(np.mean(obs > 0))
    positive = obs[obs > 0]
    limit = float(positive.min()) if positive.size else math.nan
    generated_wet = float(np.mean(gen > 0))
    if wet >= generated_wet:
        value = 0.0  # the model is no wetter than the data: nothing to cut
    else:
        # the (1 - wet) quantile: the share of generated values >= it is the observed wet share
        value = float(np.quantile(gen, 1.0 - wet, method="higher"))
    return DryThreshold(max(value, 0.0), wet, generated_wet, limit)


def apply(x: np.ndarray, threshold: float | None) -> np.ndarray:
    """``x`` (physical) with values below ``threshold`` set to exactly 0 (in place when
    ``x`` is a writable float array; returned either way). None or 0 leaves ``x`` as it is."""
    if threshold is None or threshold <= 0:
        return x
    x[x < np.float32(threshold)] = 0.0
    return x
