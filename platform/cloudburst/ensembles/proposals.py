"""Where ensemble members are drawn from: per-member random streams and Gaussian proposals.

A member is a deterministic function of its random inputs. The one a proposal steers is a
standard-normal vector z: a VAE's latent code, or a diffusion sampler's initial noise z_1
(flattened). Drawing z from a proposal q instead of the prior p = N(0, I), and every other
random input (the ancestral sampler's step noise, a condition's forward noise) from its
prior, makes a member's importance weight exactly p(z) / q(z), whatever the model does next.

:class:`GaussianProposal` draws z for draw indices under a scenario, with each draw's weight:
the prior itself (every weight 1), or a defensive mixture of the prior with a shift along a
direction (``shift``) or with the prior's radius tail (``tail``). :func:`decoder_direction` is
the latent direction along which a VAE's decoded maxima grow fastest (a diffusion model gives
its own, :class:`~cloudburst.models.roles.NoiseSteerable`). :func:`fit_proposal` fits the
``fitted`` proposal's Gaussian by the cross-entropy method. Draw k's z comes from
:func:`member_rng` (seed, k) alone; the other random inputs of a steered draw come from
:func:`noise_seed` (seed, k), an independent stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats as sps

from cloudburst.ensembles.request import Scenario
from cloudburst.ensembles.union import UnionFit, fit_union
from cloudburst.models.roles import LatentModel

__all__ = [
    "MAX_FITTED",
    "Fit",
    "Fitted",
    "GaussianProposal",
    "ProposalError",
    "decoder_direction",
    "fit_proposal",
    "log_density_ratio",
    "member_rng",
    "noise_seed",
]

MAX_FITTED = 64  # numbers of z a fitted proposal's covariance may span
ELITE = 0.1  # share of pilot draws each level of a fit keeps
FIT_LEVELS = 8  # levels of a fit, at most
SHRINK = 0.1  # a fitted covariance is pulled this far towards the identity
UNION_SHARE = 0.03  # of the prior pilot draws a union is fitted to (their best)
UNION_ELITES = 20  # ... at least this many


class ProposalError(ValueError):
    """A proposal cannot be built as asked (the message says why and what to give instead)."""


def member_rng(seed: int, k: int) -> np.random.Generator:
    """The random stream of draw ``k`` of a request seeded ``seed``: it depends on (seed, k)
    alone, so any member can be drawn again by itself."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(k)]))


def noise_seed(seed: int, k: int) -> int:
    """The seed of every random input of steered draw ``k`` other than its z: a stream of
    (seed, k) alone, independent of :func:`member_rng` (a child of the same seed sequence)."""
    child = np.random.SeedSequence([int(seed), int(k)], spawn_key=(1,))
    return int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))


def decoder_direction(model: LatentModel, latent: int, draws: int = 64) -> np.ndarray:
    """Unit latent direction along which decoded maxima grow fastest on average.

    The gradient of the mean of each decoded window's top 1% pixels, averaged over ``draws``
    fixed prior draws: a property of the model alone, so it is the same on every replica.
    """
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    z = torch.from_numpy(member_rng(0, 0).standard_normal((draws, latent))).float().to(device)
    z.requires_grad_(True)
    with torch.enable_grad():
        out = model.decode(z).flatten(1)
        k = max(1, out.shape[1] // 100)
        out.topk(k, dim=1).values.mean().backward()
    grad = z.grad.detach().double().cpu().numpy().mean(axis=0)
    norm = float(np.linalg.norm(grad))
    if not math.isfinite(norm) or norm == 0.0:
        raise ProposalError("the decoder's maxima do not vary with z; give scenario.direction")
    return grad / norm


@dataclass(frozen=True)
class Fitted:
    """The Gaussian N(mean, covariance) of a ``fitted`` proposal, and how it was found:
    the window-maximum level of each cross-entropy step, the probability the last one was
    estimated to have under the prior, and the pilot draws it cost."""

    mean: np.ndarray
    covariance: np.ndarray
    levels: list[float] = field(default_factory=list)
    level_probability: float = float("nan")
    pilot_draws: int = 0

    def vector(self) -> np.ndarray:
        """mean then covariance, flat: how the fit is pinned for other processes."""
        return np.concatenate([self.mean, self.covariance.ravel()])

    @classmethod
    def from_vector(cls, values: np.ndarray, size: int) -> Fitted:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size != size + size * size or not np.isfinite(v).all():
            raise ProposalError(
                f"a pinned fit has {v.size} numbers (finite?) for an input of {size}: "
                f"{size + size * size} expected"
            )
        return cls(v[:size].copy(), v[size:].reshape(size, size).copy())


def log_density_ratio(z: np.ndarray, fit: Fitted) -> np.ndarray:
    """log N(z; mean, covariance) - log N(z; 0, I) for rows of ``z``."""
    chol = np.linalg.cholesky(fit.covariance)
    r = np.linalg.solve(chol, (z - fit.mean).T).T
    log_det = 2.0 * np.log(np.diag(chol)).sum()
    return -0.5 * (r * r).sum(axis=1) - 0.5 * log_det + 0.5 * (z * z).sum(axis=1)


Fit = Fitted | UnionFit


def fit_proposal(
    scenario: Scenario,
    size: int,
    seed: int,
    evaluate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    window: tuple[int, int, int] | None = None,
) -> Fit:
    """The ``fitted`` proposal by the multi-level cross-entropy method.

    ``evaluate(z)``: for rows of z (n, size), the window maximum of the member each makes
    and the flat index of the pixel where it is. Level by level, ``scenario.pilot_draws``
    pilot draws from the current mixture (the prior at first) are made; the best
    :data:`ELITE` share sets the next level (or the level whose prior probability, estimated
    from the weighted draws, is 1 - ``tail_quantile``, once the draws reach it: then the fit
    stops), and the draws above it, weighted by p / q of the mixture they came from, the next
    fit: a Gaussian (their weighted mean and covariance, shrunk :data:`SHRINK` towards the
    identity) for a latent code of at most :data:`MAX_FITTED` numbers. At most
    :data:`FIT_LEVELS` levels; a level that does not rise ends the fit too.

    Given the sampler's ``window``, the fit is a union of local events
    (:mod:`cloudburst.ensembles.union`) from one level of prior pilot draws: the best
    :data:`UNION_SHARE` of them (at least :data:`UNION_ELITES`). Iterating a mixture over
    places feeds on itself (the places it favours are where its next elites lie), and
    prior draws above a high level were measured to give the better pattern. Pilot draws come
    from streams of their own, so the fit depends on (model, request) alone."""
    if window is None and size > MAX_FITTED:
        raise ProposalError(
            f"a fitted Gaussian spans at most {MAX_FITTED} numbers of z; this model steers "
            f"{size}: use proposal shift"
        )
    target = 1.0 - scenario.tail_quantile
    n = scenario.pilot_draws
    fit: Fit | None = None
    levels: list[float] = []
    probability = 1.0
    for step in range(FIT_LEVELS):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed)], spawn_key=(2, step)))
        if fit is None:
            z, w = rng.standard_normal((n, size)), np.ones(n)
        else:
            z, w = GaussianProposal(scenario, size, None, fitted=fit).sample(rng, n)
        m, places = evaluate(z)
        m = np.asarray(m, dtype=np.float64)
        if not np.isfinite(m).all():
            raise ProposalError("the model's pilot draws gave non-finite window maxima")
        if window is not None:  # a union: one level, from prior draws alone (see the doc)
            best = np.argsort(-m)[: max(UNION_ELITES, int(round(UNION_SHARE * n)))]
            fit = fit_union(z[best], w[best], np.asarray(places)[best], window)
            levels, probability = [float(m[best[-1]])], len(best) / n
            break
        # the level of the aimed prior probability, from these draws and their weights
        order = np.argsort(-m)
        reach = np.cumsum(w[order]) / n
        aimed = float(m[order][min(int(np.searchsorted(reach, target)), n - 1)])
        level = min(float(np.quantile(m, 1.0 - ELITE)), aimed)
        probability = float(np.sum(w * (m >= level)) / n)
        elite = m >= level
        if window is not None:
            fit = fit_union(z[elite], w[elite], np.asarray(places)[elite], window)
        else:
            we, ze = w[elite], z[elite]
            mean = (we[:, None] * ze).sum(axis=0) / we.sum()
            spread = ze - mean
            cov = (we[:, None] * spread).T @ spread / we.sum()
            fit = Fitted(mean, (1.0 - SHRINK) * cov + SHRINK * np.eye(size))
        levels.append(level)
        if level >= aimed or (step > 0 and level <= levels[-2]):
            break
    assert fit is not None
    return dataclasses.replace(
        fit, levels=levels, level_probability=probability, pilot_draws=n * len(levels)
    )


class GaussianProposal:
    """Draws z (``size`` numbers, prior N(0, I)) for draw indices, with importance weights
    p(z) / q(z) under the scenario's proposal (see the module doc)."""

    def __init__(
        self,
        scenario: Scenario,
        size: int,
        direction: np.ndarray | None,
        fitted: Fitted | UnionFit | None = None,
    ) -> None:
        if scenario.proposal == "shift":
            if direction is None or np.shape(direction) != (size,):
                raise ProposalError(
                    f"the shift proposal needs a direction of {size} numbers "
                    f"(got {None if direction is None else np.size(direction)})"
                )
            if not np.isfinite(direction).all():
                raise ProposalError("the shift direction holds NaN or infinite values")
        self.fitted = fitted
        self.chol: np.ndarray | None = None
        if isinstance(fitted, UnionFit):
            if int(np.prod(fitted.window)) != size:
                raise ProposalError(f"a union fit's window is not of {size} numbers")
        elif fitted is not None:
            if fitted.mean.shape != (size,) or fitted.covariance.shape != (size, size):
                raise ProposalError(f"a fitted Gaussian must be of {size} numbers")
            try:
                self.chol = np.linalg.cholesky(fitted.covariance)
            except np.linalg.LinAlgError:
                raise ProposalError("a fitted covariance is not positive definite") from None
        elif scenario.proposal == "fitted":
            raise ProposalError("the fitted proposal needs its fit (fit_proposal)")
        self.s = scenario
        self.d = int(size)
        self.direction = direction
        self.r_q = float(sps.chi.ppf(scenario.tail_quantile, self.d))

    def draw(self, seed: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z, weights): z (len(indices), size) float64, weights (len(indices),)."""
        z = np.empty((len(indices), self.d), dtype=np.float64)
        w = np.ones(len(indices), dtype=np.float64)
        for i, k in enumerate(indices):
            z[i], w[i] = self.one(seed, int(k))
        return z, w

    def weights(self, seed: int, indices: np.ndarray) -> np.ndarray:
        """The weights of :meth:`draw` alone, one z in memory at a time."""
        return np.array([self.one(seed, int(k))[1] for k in indices], dtype=np.float64)

    def one(self, seed: int, k: int) -> tuple[np.ndarray, float]:
        """Draw k's z and weight."""
        return self.from_stream(member_rng(seed, k))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` draws from one stream (pilot draws of a fit)."""
        rows = [self.from_stream(rng) for _ in range(n)]
        return np.stack([z for z, _ in rows]), np.array([w for _, w in rows])

    def from_stream(self, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        s, a = self.s, self.s.defensive
        u = rng.standard_normal(self.d)
        if not s.steered:
            return u, 1.0
        from_prior = rng.random() < a
        if isinstance(self.fitted, UnionFit):
            union = self.fitted
            place = union.place(rng.random())
            z = u if from_prior else union.draw(place, u)
            log_mix = union.log_mixture(z)
            return z, 1.0 / (a + (1.0 - a) * math.exp(min(log_mix, 700.0)))
        if s.proposal == "fitted":
            assert isinstance(self.fitted, Fitted) and self.chol is not None
            z = u if from_prior else self.fitted.mean + self.chol @ u
            log_ratio = float(log_density_ratio(z[None], self.fitted)[0])
            return z, 1.0 / (a + (1.0 - a) * math.exp(min(log_ratio, 700.0)))
        if s.proposal == "tail":
            if from_prior:
                z = u
            else:
                q = s.tail_quantile
                r = sps.chi.ppf(q + (1.0 - q) * rng.random(), self.d)
                z = u / np.linalg.norm(u) * r
            in_tail = float(np.linalg.norm(z) > self.r_q)
            return z, 1.0 / (a + (1.0 - a) * in_tail / (1.0 - s.tail_quantile))
        assert self.direction is not None
        shift = s.shift * self.direction
        z = u if from_prior else u + shift
        log_ratio = float(z @ shift) - 0.5 * float(shift @ shift)
        return z, 1.0 / (a + (1.0 - a) * math.exp(min(log_ratio, 700.0)))
