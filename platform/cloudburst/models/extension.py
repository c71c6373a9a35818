"""Conditional generation from an unconditional diffusion model, through one masked sampler.

- :func:`forecast_mask`: the first ``k`` frames known;
- :func:`interpolation_mask`: every ``every``-th frame known (bi-hourly to hourly: 2);
- :func:`extend`: autoregressive extension to any length, each new window conditioned on the
  last ``overlap`` frames of what was generated so far.

A ``draw(n, condition)`` callable does the sampling (for a
:class:`~cloudburst.models.roles.ConditionalSampler`: ``lambda n, c: model.sample(n, generator,
condition=c)``), ``condition`` being a :class:`~cloudburst.models.roles.Condition` in the
model's [0, 1] input space, or None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cloudburst.models.roles import Condition

__all__ = ["extend", "forecast_mask", "interpolation_mask"]

Draw = Callable[[int, Condition | None], Tensor]


def forecast_mask(shape: tuple[int, ...], known_frames: int) -> Tensor:
    """True on the first ``known_frames`` time steps of (n, 1, time, y, x) windows."""
    if not 0 < known_frames < shape[2]:
        raise ValueError(f"known frames must be between 1 and {shape[2] - 1} (got {known_frames})")
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, :, :known_frames] = True
    return mask


def interpolation_mask(shape: tuple[int, ...], every: int = 2) -> Tensor:
    """True on every ``every``-th time step (0, every, 2 every, ...)."""
    if every < 2:
        raise ValueError(f"every must be >= 2 (got {every}): 1 would leave nothing to fill")
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, :, ::every] = True
    return mask


def extend(
    draw: Draw,
    n: int,
    window: tuple[int, int, int],
    length: int,
    *,
    overlap: int = 2,
    guidance: float = 0.0,
    start: Tensor | None = None,
) -> Tensor:
    """(n, 1, length, y, x): a first window (``start``, or an unconditional draw), then windows
    conditioned on the last ``overlap`` frames of the sequence so far, each adding
    ``time - overlap`` new frames, cropped to ``length``."""
    t, y, x = window
    if not 0 < overlap < t:
        raise ValueError(f"overlap must be between 1 and {t - 1} frames (got {overlap})")
    if length < 1:
        raise ValueError(f"length must be >= 1 (got {length})")
    first = start if start is not None else draw(n, None)
    if tuple(first.shape) != (n, 1, t, y, x):
        raise ValueError(f"start must be {(n, 1, t, y, x)}, got {tuple(first.shape)}")
    parts, total = [first], t
    mask = forecast_mask((n, 1, t, y, x), overlap)
    while total < length:
        known = torch.zeros((n, 1, t, y, x), dtype=first.dtype, device=first.device)
        known[:, :, :overlap] = torch.cat(parts, dim=2)[:, :, -overlap:]
        new = draw(n, Condition(known, mask.to(first.device), guidance))
        parts.append(new[:, :, overlap:])
        total += t - overlap
    return torch.cat(parts, dim=2)[:, :, :length]
