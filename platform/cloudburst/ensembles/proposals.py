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
its own, :class:`~cloudburst.models.roles.NoiseSteerable`). Draw k's z comes from
:func:`member_rng` (seed, k) alone; the other random inputs of a steered draw come from
:func:`noise_seed` (seed, k), an independent stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats as sps

from cloudburst.ensembles.request import Scenario
from cloudburst.models.roles import LatentModel

__all__ = ["GaussianProposal", "ProposalError", "decoder_direction", "member_rng", "noise_seed"]


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


class GaussianProposal:
    """Draws z (``size`` numbers, prior N(0, I)) for draw indices, with importance weights
    p(z) / q(z) under the scenario's proposal (see the module doc)."""

    def __init__(self, scenario: Scenario, size: int, direction: np.ndarray | None) -> None:
        if scenario.proposal == "shift":
            if direction is None or np.shape(direction) != (size,):
                raise ProposalError(
                    f"the shift proposal needs a direction of {size} numbers "
                    f"(got {None if direction is None else np.size(direction)})"
                )
            if not np.isfinite(direction).all():
                raise ProposalError("the shift direction holds NaN or infinite values")
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
        s, a = self.s, self.s.defensive
        rng = member_rng(seed, k)
        u = rng.standard_normal(self.d)
        if not s.steered:
            return u, 1.0
        from_prior = rng.random() < a
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
