"""Where ensemble members are drawn from: per-member random streams and latent proposals.

:class:`LatentProposal` draws latent codes z for draw indices under a scenario, with each
draw's importance weight p(z) / q(z): the prior itself (unconditional, every weight 1), or a
defensive mixture of the prior with a shift along a direction (``shift``) or with the prior's
radius tail (``tail``). :func:`decoder_direction` is the latent direction along which decoded
maxima grow fastest. Draw k's randomness comes from :func:`member_rng` (seed, k) alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats as sps

from cloudburst.ensembles.request import Scenario
from cloudburst.models.roles import LatentModel

__all__ = ["LatentProposal", "ProposalError", "decoder_direction", "member_rng"]


class ProposalError(ValueError):
    """A proposal cannot be built as asked (the message says why and what to give instead)."""


def member_rng(seed: int, k: int) -> np.random.Generator:
    """The random stream of draw ``k`` of a request seeded ``seed``: it depends on (seed, k)
    alone, so any member can be drawn again by itself."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(k)]))


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


class LatentProposal:
    """Draws z for draw indices, with importance weights p(z) / q(z) under the scenario."""

    def __init__(self, scenario: Scenario, latent: int, direction: np.ndarray | None) -> None:
        self.s = scenario
        self.d = latent
        self.direction = direction
        self.r_q = float(sps.chi.ppf(scenario.tail_quantile, latent))

    def draw(self, seed: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.empty((len(indices), self.d), dtype=np.float64)
        w = np.ones(len(indices), dtype=np.float64)
        s, a = self.s, self.s.defensive
        for i, k in enumerate(indices):
            rng = member_rng(seed, int(k))
            u = rng.standard_normal(self.d)
            if s.kind == "unconditional":
                z[i] = u
                continue
            from_prior = rng.random() < a
            if s.proposal == "tail":
                if from_prior:
                    z[i] = u
                else:
                    q = s.tail_quantile
                    r = sps.chi.ppf(q + (1.0 - q) * rng.random(), self.d)
                    z[i] = u / np.linalg.norm(u) * r
                in_tail = float(np.linalg.norm(z[i]) > self.r_q)
                w[i] = 1.0 / (a + (1.0 - a) * in_tail / (1.0 - s.tail_quantile))
            else:
                assert self.direction is not None
                shift = s.shift * self.direction
                z[i] = u if from_prior else u + shift
                log_ratio = float(z[i] @ shift) - 0.5 * float(shift @ shift)
                w[i] = 1.0 / (a + (1.0 - a) * math.exp(min(log_ratio, 700.0)))
        return z, w
