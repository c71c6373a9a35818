"""A proposal for the maximum of a generated field: a union of local events.

A window's maximum exceeds a level when any one of its pixels does, and a diffusion sampler's
pixel grows with the initial noise around it: heavy rain at (t, y, x) comes from a positive
blob of noise there. One shift of the whole noise field cannot cover events that happen in
different places; a mixture with one component per place can (importance sampling of a union
of rare events). :class:`UnionFit` holds one small noise pattern, learnt from the pilot draws
whose maximum exceeded the level (their noise aligned on the pixel of their maximum and
averaged, weighted), and the probability of each place, learnt from where those maxima were.
Component j shifts the noise by the pattern centred on place j (cropped at the window's edge):

    q(z) = a p(z) + (1 - a) sum_j pi_j N(z; c_j, I),
    p(z) / q(z) = 1 / (a + (1 - a) sum_j pi_j exp(z . c_j - |c_j|^2 / 2)),

where z . c_j for every j at once is the cross-correlation of z with the pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["RADIUS", "UNIFORM_SHARE", "UnionFit", "fit_union"]

RADIUS = (1, 2, 2)  # half-widths (time, y, x) of the learnt noise pattern
UNIFORM_SHARE = 0.1  # of the place probabilities spread evenly, so that no place has none


@dataclass(frozen=True)
class UnionFit:
    """The pattern (2 RADIUS + 1 per axis) and the place probabilities (the window's shape)
    of a union proposal, and how the fit went (as :class:`~cloudburst.ensembles.proposals.
    Fitted`)."""

    pattern: np.ndarray
    probabilities: np.ndarray
    levels: list[float] = field(default_factory=list)
    level_probability: float = float("nan")
    pilot_draws: int = 0

    def __post_init__(self) -> None:
        p = self.probabilities
        if p.ndim != 3 or not np.isfinite(p).all() or (p < 0).any() or not p.sum() > 0:
            raise ValueError("place probabilities must be finite, non-negative, not all 0")
        if self.pattern.shape != tuple(2 * r + 1 for r in RADIUS):
            raise ValueError(f"the pattern must be {tuple(2 * r + 1 for r in RADIUS)}")
        if not np.isfinite(self.pattern).all():
            raise ValueError("the pattern holds NaN or infinite values")
        object.__setattr__(self, "probabilities", p / p.sum())
        cdf = np.cumsum(self.probabilities.ravel())
        object.__setattr__(self, "cdf", cdf / cdf[-1])
        energy = ndimage.correlate(np.ones(p.shape), self.pattern**2, mode="constant")
        object.__setattr__(self, "energy", energy.ravel())  # |c_j|^2 for every place

    @property
    def window(self) -> tuple[int, int, int]:
        return tuple(self.probabilities.shape)  # type: ignore[return-value]

    def vector(self) -> np.ndarray:
        """pattern then probabilities, flat: how the fit is pinned for other processes."""
        return np.concatenate([self.pattern.ravel(), self.probabilities.ravel()])

    @classmethod
    def from_vector(cls, values: np.ndarray, window: tuple[int, int, int]) -> UnionFit:
        v = np.asarray(values, dtype=np.float64).ravel()
        shape = tuple(2 * r + 1 for r in RADIUS)
        k = int(np.prod(shape))
        if v.size != k + int(np.prod(window)):
            raise ValueError(
                f"a pinned union fit has {v.size} numbers for a window of {window}: "
                f"{k + int(np.prod(window))} expected"
            )
        return cls(v[:k].reshape(shape).copy(), v[k:].reshape(window).copy())

    def component(self, place: int) -> np.ndarray:
        """c_j: the pattern centred on place j (flat index), cropped at the edges; flat."""
        out = np.zeros(self.window)
        centre = np.unravel_index(place, self.window)
        src, dst = [], []
        for c, r, n in zip(centre, RADIUS, self.window, strict=True):
            lo, hi = max(0, c - r), min(n, c + r + 1)
            dst.append(slice(lo, hi))
            src.append(slice(lo - (c - r), hi - (c - r)))
        out[tuple(dst)] = self.pattern[tuple(src)]
        return out.ravel()

    def place(self, uniform: float) -> int:
        """The place whose probability interval holds ``uniform`` in [0, 1)."""
        return int(min(np.searchsorted(self.cdf, uniform, side="right"), self.cdf.size - 1))

    def log_mixture(self, z: np.ndarray) -> float:
        """log sum_j pi_j exp(z . c_j - |c_j|^2 / 2) for one flat z."""
        dots = ndimage.correlate(z.reshape(self.window), self.pattern, mode="constant").ravel()
        terms = dots - 0.5 * self.energy
        top = float(terms.max())
        return top + float(np.log(np.sum(self.probabilities.ravel() * np.exp(terms - top))))


def fit_union(
    z: np.ndarray,
    weights: np.ndarray,
    places: np.ndarray,
    window: tuple[int, int, int],
) -> UnionFit:
    """The union proposal fitted to elite draws: ``z`` (n, time x y x x), their importance
    ``weights`` and the flat ``places`` of their maxima. The pattern is the weighted mean of
    the noise around each draw's place (only where it lies inside the window); the place
    probabilities the weighted frequency of the places, with :data:`UNIFORM_SHARE` spread
    evenly."""
    shape = tuple(2 * r + 1 for r in RADIUS)
    total = np.zeros(shape)
    mass = np.zeros(shape)
    hist = np.zeros(int(np.prod(window)))
    for row, w, j in zip(z, weights, places, strict=True):
        field_ = row.reshape(window)
        centre = np.unravel_index(int(j), window)
        src, dst = [], []
        for c, r, n in zip(centre, RADIUS, window, strict=True):
            lo, hi = max(0, c - r), min(n, c + r + 1)
            src.append(slice(lo, hi))
            dst.append(slice(lo - (c - r), hi - (c - r)))
        total[tuple(dst)] += w * field_[tuple(src)]
        mass[tuple(dst)] += w
        hist[int(j)] += w
    pattern = np.where(mass > 0, total / np.maximum(mass, 1e-300), 0.0)
    found = hist / hist.sum() if hist.sum() > 0 else np.full(hist.size, 1.0 / hist.size)
    probabilities = (1.0 - UNIFORM_SHARE) * found + UNIFORM_SHARE / hist.size
    return UnionFit(pattern, probabilities.reshape(window))
