"""A proposal for the maximum of a generated field: a union of local events.

A window's maximum exceeds a level when any one of its pixels does, and a diffusion sampler's
pixel grows with the initial noise around it: heavy rain at (t, y, x) comes from a positive
blob of noise there. One shift of the whole noise field cannot cover events that happen in
different places; a mixture with one component per place can (importance sampling of a union
of rare events). :class:`UnionFit` holds small noise patterns, learnt from the pilot draws
whose maximum exceeded the level (their noise aligned on the pixel of their maximum and
averaged, weighted), and the probability of each place, learnt from where those maxima were.

Near the window's edges the network sees zero padding, and the noise that makes an event there
differs from the noise that makes one inside (most maxima of a small window lie on its edges
and corners). So the places are grouped by how the window's edge crops the pattern around them
(their *edge class*: per axis, how many of the pattern's rows fall outside below and above),
and each class has a pattern of its own: the mean of its elites' aligned noise, shrunk towards
the pooled pattern of every elite by :data:`SHRINK_ELITES` elites' worth of weight (a class
with no elites keeps the pooled one, denoised as a mean of that many). Places of one class are
alike but for where they are, so they share their class's probability evenly.

A mean of n elites' noise carries noise of variance 1/n in each number, and every number of a
shift that is noise alone costs likelihood ratio at the events it should favour (it adds to
|c|^2 what z . c does not gain back). So each number of a pattern is shrunk towards 0 by the
positive-part James-Stein factor max(0, 1 - :data:`NOISE_FLOOR` / (n c^2)), and the patterns
are then scaled together by the cross-entropy optimum of a common factor along them (the
elites' weighted z . c over |c|^2), which also restores the length the shrinkage took.
Component j is centred on its class's pattern placed on place j (cropped at the window's
edge): c_j.

The events' noise is also wider than the prior's beyond the shift: along the pattern it is
narrower (the pixel is reached from a band of the pattern's length), around it (the rest of
the pattern's box) and beyond it (the rest of the window) it is wider, as if the sample's
maximum fed on the noise's energy as well as on its alignment. So each component has three
variances, learnt with the patterns by cross-entropy (the elites' weighted mean squares about
the component, per part, bounded to [:data:`SPREAD_MIN`, :data:`SPREAD_MAX`]): ``along`` u_j =
c_j / |c_j|, ``around`` on the rest of the box B_j of numbers the cropped pattern covers, and
``beyond`` outside it. Component j is N(c_j, S_j) with

    S_j = beyond I + (around - beyond) P_j + (along - around) u_j u_j^T

(P_j the projection on B_j), and for z with s = z . u_j, e = |z_B|^2 - s^2 (n_e = |B_j| - 1
numbers) and f = |z|^2 - |z_B|^2 (n_f = size - |B_j|):

    log N(z; c_j, S_j) / p(z) = -log(along) / 2 - (s - |c_j|)^2 / (2 along) + s^2 / 2
                                - n_e log(around) / 2 + e (1 - 1 / around) / 2
                                - n_f log(beyond) / 2 + f (1 - 1 / beyond) / 2

(a pattern that denoising left all 0 has no ``along`` part: n_e = |B_j|), and

    q(z) = a p(z) + (1 - a) sum_j pi_j N(z; c_j, S_j),
    p(z) / q(z) = 1 / (a + (1 - a) sum_j pi_j N(z; c_j, S_j) / p(z)).

With every variance 1 a component is the shift N(c_j, I).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "NOISE_FLOOR",
    "RADIUS",
    "SHRINK_ELITES",
    "SPREAD_MAX",
    "SPREAD_MIN",
    "UNIFORM_SHARE",
    "UnionFit",
    "edge_classes",
    "fit_union",
]

RADIUS = (2, 2, 2)  # half-widths (time, y, x) of the learnt noise patterns
UNIFORM_SHARE = 0.05  # of the place probabilities spread evenly, so that no place has none
SHRINK_ELITES = 10.0  # an edge class's pattern is pulled towards the pooled one by this weight
NOISE_FLOOR = 2.0  # a pattern number is kept in the measure its n c^2 exceeds this
SPREAD_MIN, SPREAD_MAX = 0.1, 4.0  # bounds of a component's variances
PATTERN = tuple(2 * r + 1 for r in RADIUS)


def _cuts(place: tuple[int, ...], window: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Per axis, the pattern rows outside the window below and above ``place``."""
    return tuple(
        (max(0, r - c), max(0, c + r + 1 - n))
        for c, r, n in zip(place, RADIUS, window, strict=True)
    )


def edge_classes(window: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """(the edge class of every place, flat; the number of classes): places whose pattern the
    window's edges crop alike share a class, numbered in the order of their crops."""
    cuts = [_cuts(p, window) for p in np.ndindex(*window)]
    keys = sorted(set(cuts))
    number = {k: i for i, k in enumerate(keys)}
    return np.array([number[c] for c in cuts], dtype=np.int64), len(keys)


def _slices(place: tuple[int, ...], window: tuple[int, ...]) -> tuple[tuple, tuple]:
    """(window slices, pattern slices) of the pattern centred on ``place``, cropped."""
    inside, pattern = [], []
    for c, r, n in zip(place, RADIUS, window, strict=True):
        lo, hi = max(0, c - r), min(n, c + r + 1)
        inside.append(slice(lo, hi))
        pattern.append(slice(lo - (c - r), hi - (c - r)))
    return tuple(inside), tuple(pattern)


@dataclass(frozen=True)
class UnionFit:
    """The pooled pattern (2 RADIUS + 1 per axis), the pattern of each edge class (classes
    first, zero where the edge crops it), the place probabilities (the window's shape) and
    the components' variances (along, around, beyond: see the module doc) of a union
    proposal, and how the fit went (as :class:`~cloudburst.ensembles.proposals.Fitted`)."""

    pattern: np.ndarray
    probabilities: np.ndarray
    patterns: np.ndarray
    spreads: np.ndarray = field(default_factory=lambda: np.ones(3))
    levels: list[float] = field(default_factory=list)
    level_probability: float = float("nan")
    pilot_draws: int = 0

    def __post_init__(self) -> None:
        p = self.probabilities
        if p.ndim != 3 or not np.isfinite(p).all() or (p < 0).any() or not p.sum() > 0:
            raise ValueError("place probabilities must be finite, non-negative, not all 0")
        window = tuple(p.shape)
        classes, n_classes = edge_classes(window)  # type: ignore[arg-type]
        if self.pattern.shape != PATTERN:
            raise ValueError(f"the pattern must be {PATTERN}")
        if self.patterns.shape != (n_classes, *PATTERN):
            raise ValueError(f"a window of {window} has {n_classes} edge patterns of {PATTERN}")
        if not (np.isfinite(self.pattern).all() and np.isfinite(self.patterns).all()):
            raise ValueError("a pattern holds NaN or infinite values")
        spreads = np.asarray(self.spreads, dtype=np.float64)
        if spreads.shape != (3,) or not (
            np.isfinite(spreads).all()
            and (spreads >= SPREAD_MIN).all()
            and (spreads <= SPREAD_MAX).all()
        ):
            raise ValueError(
                f"a union's variances are 3 numbers (along, around, beyond) in "
                f"[{SPREAD_MIN}, {SPREAD_MAX}] (got {self.spreads!r})"
            )
        object.__setattr__(self, "spreads", spreads)
        object.__setattr__(self, "probabilities", p / p.sum())
        cdf = np.cumsum(self.probabilities.ravel())
        object.__setattr__(self, "cdf", cdf / cdf[-1])
        object.__setattr__(self, "classes", classes)
        # every component as (flat indices into z, values): the cropped pattern of its class
        size = int(np.prod(PATTERN))
        # (box B_j: where index is valid; its size)
        index = np.zeros((classes.size, size), dtype=np.int64)
        values = np.zeros((classes.size, size))
        box = np.zeros((classes.size, size), dtype=bool)
        flat = np.arange(classes.size).reshape(window)
        for j, place in enumerate(np.ndindex(*window)):
            inside, part = _slices(place, window)
            where = flat[inside].ravel()
            index[j, : where.size] = where
            values[j, : where.size] = self.patterns[classes[j]][part].ravel()
            box[j, : where.size] = True
        length = np.sqrt((values * values).sum(axis=1))  # |c_j|
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "length", length)
        # u_j on the box (0 for a pattern denoised to nothing), and the numbers of each part
        units = np.divide(
            values, length[:, None], out=np.zeros_like(values), where=length[:, None] > 0
        )
        object.__setattr__(self, "units", units)
        along = (length > 0).astype(np.float64)
        object.__setattr__(
            self, "counts", (along, box.sum(axis=1) - along, classes.size - box.sum(axis=1))
        )

    @property
    def window(self) -> tuple[int, int, int]:
        return tuple(self.probabilities.shape)  # type: ignore[return-value]

    def vector(self) -> np.ndarray:
        """pooled pattern, edge patterns, probabilities, variances, flat: how the fit is
        pinned for other processes."""
        parts = [
            self.pattern.ravel(),
            self.patterns.ravel(),
            self.probabilities.ravel(),
            self.spreads,
        ]
        return np.concatenate(parts)

    @classmethod
    def from_vector(cls, values: np.ndarray, window: tuple[int, int, int]) -> UnionFit:
        v = np.asarray(values, dtype=np.float64).ravel()
        k = int(np.prod(PATTERN))
        n_classes = edge_classes(window)[1]
        places = int(np.prod(window))
        expected = k * (1 + n_classes) + places + 3
        if v.size != expected:
            raise ValueError(
                f"a pinned union fit has {v.size} numbers for a window of {window}: "
                f"{expected} expected"
            )
        edges = v[k : k * (1 + n_classes)].reshape(n_classes, *PATTERN)
        start = k * (1 + n_classes)
        return cls(
            v[:k].reshape(PATTERN).copy(),
            v[start : start + places].reshape(window).copy(),
            edges.copy(),
            v[start + places :].copy(),
        )

    def component(self, place: int) -> np.ndarray:
        """c_j: the pattern of place j's edge class centred on it (flat index), cropped;
        flat."""
        out = np.zeros(int(np.prod(self.window)))
        np.add.at(out, self.index[place], self.values[place])
        return out

    def place(self, uniform: float) -> int:
        """The place whose probability interval holds ``uniform`` in [0, 1)."""
        return int(min(np.searchsorted(self.cdf, uniform, side="right"), self.cdf.size - 1))

    def draw(self, place: int, noise: np.ndarray) -> np.ndarray:
        """A draw of component ``place`` from standard-normal ``noise`` (flat): c_j plus
        ``noise`` scaled by the square root of S_j (see the module doc); a new array."""
        along, around, beyond = np.sqrt(self.spreads)
        where, u = self.index[place][self.box[place]], self.units[place][self.box[place]]
        flat = np.asarray(noise, dtype=np.float64).ravel()
        z = beyond * flat
        inside = flat[where]
        s = float(inside @ u)
        z[where] = around * (inside - s * u) + (self.length[place] + along * s) * u
        return z

    def parts(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(s, e, f) of one flat z for every component j: z . u_j, the squares of the rest
        of z on B_j, the squares of z outside B_j (module doc)."""
        flat = np.asarray(z, dtype=np.float64).ravel()
        near = flat[self.index]
        s = (near * self.units).sum(axis=1)
        inner = np.where(self.box, near * near, 0.0).sum(axis=1)
        return s, inner - s * s, float(flat @ flat) - inner

    def log_components(self, z: np.ndarray) -> np.ndarray:
        """log N(z; c_j, S_j) / p(z) of every component j for one flat z (module doc)."""
        along, around, beyond = self.spreads
        n_along, n_around, n_beyond = self.counts
        s, e, f = self.parts(z)
        return (
            n_along * (-0.5 * np.log(along) - (s - self.length) ** 2 / (2 * along) + s * s / 2)
            - 0.5 * n_around * np.log(around)
            + 0.5 * e * (1.0 - 1.0 / around)
            - 0.5 * n_beyond * np.log(beyond)
            + 0.5 * f * (1.0 - 1.0 / beyond)
        )

    def log_mixture(self, z: np.ndarray) -> float:
        """log sum_j pi_j N(z; c_j, S_j) / p(z) for one flat z."""
        terms = self.log_components(z)
        top = float(terms.max())
        return top + float(np.log(np.sum(self.probabilities.ravel() * np.exp(terms - top))))


def fit_union(
    z: np.ndarray,
    weights: np.ndarray,
    places: np.ndarray,
    window: tuple[int, int, int],
) -> UnionFit:
    """The union proposal fitted to elite draws: ``z`` (n, time x y x x), their importance
    ``weights`` and the flat ``places`` of their maxima (see the module doc). The pooled
    pattern is the weighted mean of the noise around each draw's place (only where it lies
    inside the window); each edge class's pattern the same over the class's elites, with the
    pooled pattern weighing :data:`SHRINK_ELITES` (weights scaled to average 1); both denoised
    number by number and scaled along; the place probabilities the weighted frequency of each
    edge class spread evenly over its places, with :data:`UNIFORM_SHARE` spread evenly over
    all; the components' three variances the elites' weighted mean squares about them."""
    classes, n_classes = edge_classes(window)
    w_all = np.asarray(weights, dtype=np.float64)
    w_all = w_all * (len(w_all) / w_all.sum()) if w_all.sum() > 0 else np.ones(len(w_all))
    total = np.zeros((n_classes, *PATTERN))
    mass = np.zeros((n_classes, *PATTERN))
    hist = np.zeros(n_classes)
    aligned = []
    for row, w, j in zip(z, w_all, places, strict=True):
        centre = np.unravel_index(int(j), window)
        inside, part = _slices(centre, window)
        k = classes[int(j)]
        total[k][part] += w * row.reshape(window)[inside]
        mass[k][part] += w
        hist[k] += w
        aligned.append((k, part, row.reshape(window)[inside]))
    pooled_mass = mass.sum(axis=0)
    pattern = _denoised(total.sum(axis=0), pooled_mass)
    patterns = _denoised(total + SHRINK_ELITES * pattern, mass + SHRINK_ELITES)
    # the common factor s maximising sum_i w_i (s z_i . c_i - s^2 |c_i|^2 / 2)
    gain = cost = 0.0
    for w, (k, part, x) in zip(w_all, aligned, strict=True):
        gain += w * float((x * patterns[k][part]).sum())
        cost += w * float((patterns[k][part] ** 2).sum())
    scale = gain / cost if cost > 0 and gain > 0 else 1.0
    members = np.bincount(classes, minlength=n_classes)
    found = hist[classes] / members[classes]
    found = found / found.sum() if found.sum() > 0 else np.full(found.size, 1.0 / found.size)
    probabilities = (1.0 - UNIFORM_SHARE) * found + UNIFORM_SHARE / found.size
    shifts = UnionFit(scale * pattern, probabilities.reshape(window), scale * patterns)
    return UnionFit(
        shifts.pattern, shifts.probabilities, shifts.patterns, _spreads(shifts, z, w_all, places)
    )


def _spreads(fit: UnionFit, z: np.ndarray, weights: np.ndarray, places: np.ndarray) -> np.ndarray:
    """The cross-entropy variances (along, around, beyond) of ``fit``'s components about
    their centres: the elites' weighted mean squares per part, each elite's about its own
    place's component; 1 for a part no elite has numbers in; bounded (module doc)."""
    squares, numbers = np.zeros(3), np.zeros(3)
    n_along, n_around, n_beyond = fit.counts
    for row, w, j in zip(z, weights, places, strict=True):
        s, e, f = (part[int(j)] for part in fit.parts(row))
        squares += w * np.array([n_along[j] * (s - fit.length[j]) ** 2, e, f])
        numbers += w * np.array([n_along[j], n_around[j], n_beyond[j]])
    spreads = np.divide(squares, numbers, out=np.ones(3), where=numbers > 0)
    return np.clip(spreads, SPREAD_MIN, SPREAD_MAX)


def _denoised(total: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """The means c = total / mass, each shrunk towards 0 by max(0, 1 - NOISE_FLOOR /
    (mass c^2)): a mean of ``mass`` elites' noise has noise variance 1 / mass (0 where there is
    no mass)."""
    mean = np.where(mass > 0, total / np.maximum(mass, 1e-300), 0.0)
    signal = mass * mean * mean
    keep = np.where(signal > NOISE_FLOOR, 1.0 - NOISE_FLOOR / np.maximum(signal, 1e-300), 0.0)
    return mean * keep
