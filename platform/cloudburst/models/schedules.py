"""Noise schedules of continuous-time variance-preserving diffusion, apart from any network.

:class:`AlphaCosineSchedule`: the truncated alpha-cosine schedule of the diffusion study
(Herbert, "Diffusion Models for Time-Evolving Precipitation Fields", after Kingma et al.'s
variational diffusion models): alpha_t, sigma_t and the log signal-to-noise ratio lambda_t for
t in [0, 1], lambda in [lambda_min, lambda_max].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["AlphaCosineSchedule", "expand"]


class AlphaCosineSchedule:
    """t in [0, 1] -> psi = (pi / 2)(t0 + t (t1 - t0)); alpha = cos psi, sigma = sin psi,
    lambda = -2 log tan psi, so lambda(0) = lambda_max and lambda(1) = lambda_min."""

    def __init__(self, lambda_min: float = -30.0, lambda_max: float = 30.0) -> None:
        if not lambda_min < lambda_max:
            raise ValueError(f"lambda_min ({lambda_min}) must be below lambda_max ({lambda_max})")
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.t0 = 2.0 / math.pi * math.atan(math.exp(-self.lambda_max / 2.0))
        self.t1 = 2.0 / math.pi * math.atan(math.exp(-self.lambda_min / 2.0))

    def psi(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return math.pi / 2.0 * (self.t0 + t * (self.t1 - self.t0))

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        psi = self.psi(t)
        return torch.cos(psi), torch.sin(psi)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(alpha^2 / sigma^2) = -2 log tan psi (float64)."""
        return -2.0 * torch.log(torch.tan(self.psi(t)))


def expand(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient (n,) or scalar, shaped to broadcast over ``like``."""
    v = v.to(like.dtype).to(like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v
