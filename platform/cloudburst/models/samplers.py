"""Samplers of v-prediction diffusion, apart from the network and the schedule (as schedulers
are apart from models in diffusers): a sampler takes any network ``net(z_t, lambda_t) -> v^``,
a schedule and an optional :class:`~cloudburst.models.roles.Condition`.

- :func:`ancestral_step`: z_s ~ q(z_s | z_t, x = x^) for s < t (the ancestral sampler);
- :func:`ddim_step`: the deterministic DDIM step in the v-parameterisation;
- :func:`guided_estimate`: the denoised estimate x^ with reconstruction guidance: the known
  part of z_t is replaced by a forward sample of the known values before the network call, and
  the unknown part of x^ is corrected by -(w_r alpha_t / 2) grad ||known - x^(z_t)||^2
  (w_r = 0: plain imputation; Ho et al.'s video diffusion, as the diffusion study uses it);
- :func:`sample`: T uniform steps from t = 1 to 0 with either step.

Every coefficient near lambda = +-30 is computed through lambda (expm1), where the plain ratios
of alphas and sigmas lose their precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from cloudburst.models.roles import Condition
from cloudburst.models.schedules import AlphaCosineSchedule, expand

__all__ = [
    "SAMPLERS",
    "Network",
    "ancestral_step",
    "ddim_step",
    "denoise",
    "guided_estimate",
    "sample",
]

Network = Callable[[Tensor, Tensor], Tensor]
SAMPLERS = ("ancestral", "ddim")


def denoise(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x^ = alpha z - sigma v^ (and eps^ = sigma z + alpha v^)."""
    return expand(alpha, z) * z - expand(sigma, z) * v


def ancestral_step(
    z_t: Tensor,
    x_hat: Tensor,
    t: float,
    s: float,
    schedule: AlphaCosineSchedule,
    noise: Tensor | None,
) -> Tensor:
    """z_s ~ q(z_s | z_t, x = x^) for s < t; no noise when ``noise`` is None (the mean)."""
    lam_t, lam_s = schedule.log_snr(torch.tensor(t)), schedule.log_snr(torch.tensor(s))
    alpha_t, _ = schedule.alpha_sigma(torch.tensor(t))
    alpha_s, sigma_s = schedule.alpha_sigma(torch.tensor(s))
    ratio = torch.exp(lam_t - lam_s)  # alpha_t^2 sigma_s^2 / (alpha_s^2 sigma_t^2), in (0, 1]
    c_z = ratio * alpha_s / alpha_t  # alpha_ts sigma_s^2 / sigma_t^2
    c_x = -torch.expm1(lam_t - lam_s) * alpha_s  # alpha_s sigma2_ts / sigma_t^2
    mean = c_z.to(z_t.dtype) * z_t + c_x.to(z_t.dtype) * x_hat
    if noise is None:
        return mean
    std = sigma_s * torch.sqrt(-torch.expm1(lam_t - lam_s))  # sqrt(sigma2_ts) sigma_s / sigma_t
    return mean + std.to(z_t.dtype) * noise


def ddim_step(
    z_t: Tensor, x_hat: Tensor, t: float, s: float, schedule: AlphaCosineSchedule
) -> Tensor:
    """Deterministic step: z_s = alpha_s x^ + sigma_s eps^, eps^ from z_t and x^."""
    alpha_t, sigma_t = schedule.alpha_sigma(torch.tensor(t))
    alpha_s, sigma_s = schedule.alpha_sigma(torch.tensor(s))
    eps = (z_t - alpha_t.to(z_t.dtype) * x_hat) / sigma_t.to(z_t.dtype)
    return alpha_s.to(z_t.dtype) * x_hat + sigma_s.to(z_t.dtype) * eps


def guided_estimate(
    net: Network,
    z: Tensor,
    lam: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    condition: Condition | None,
    *,
    differentiable: bool = False,
) -> Tensor:
    """The denoised estimate x^ = alpha z - sigma v^(z, lambda), corrected on the unknown part
    by -(w_r alpha / 2) d/dz ||mask (known - x^(z))||^2 when ``condition`` has w_r > 0.

    ``differentiable``: keep the graph from ``z`` to x^ (the correction included), so that a
    whole trajectory can be differentiated with respect to its initial noise."""
    if condition is None or condition.guidance <= 0:
        with torch.set_grad_enabled(differentiable):
            return denoise(z, net(z, lam), alpha, sigma)
    known, mask = condition.known, condition.mask
    with torch.enable_grad():
        zg = z if differentiable and z.requires_grad else z.detach().requires_grad_(True)
        x_hat = denoise(zg, net(zg, lam), alpha, sigma)
        err = ((known - x_hat) * mask).pow(2).sum()
        (grad,) = torch.autograd.grad(err, zg, create_graph=differentiable)
    if not differentiable:
        x_hat, grad = x_hat.detach(), grad.detach()
    return x_hat - condition.guidance * float(alpha) / 2.0 * grad * (~mask)


def sample(
    net: Network,
    shape: tuple[int, ...],
    schedule: AlphaCosineSchedule,
    steps: int = 100,
    *,
    sampler: Literal["ancestral", "ddim"] = "ancestral",
    condition: Condition | None = None,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    clip: float | None = 1.0,
    initial: Tensor | None = None,
    differentiable: bool = False,
) -> Tensor:
    """Draw samples of ``shape`` (n, 1, time, y, x) in the network's space from t = 1 to 0.

    With ``condition`` (known values in the network's space, their mask and w_r): the known
    part of z_t is replaced by alpha_t known + sigma_t eps before each network call, and the
    denoised estimate is corrected by :func:`guided_estimate`. The result keeps the known
    values. ``generators`` (one per row) draw each row's noise from its own stream, so a row's
    result does not depend on the others (ensemble members regenerated alone give the same
    values). ``clip`` bounds the denoised estimate to [-clip, clip] (data live in [-1, 1]).
    The useful range of w_r depends on how strongly the network's x^ couples pixels: the
    correction is a gradient step, and too large a weight overshoots (then clipped).

    ``initial``: the initial noise z_1 (``shape``), instead of a first draw from the
    generators (which then draw only the step noise and the condition's forward noise).
    ``differentiable``: the result keeps its graph back to ``initial`` (which then requires
    gradients), for the gradient of a statistic of the sample with respect to its noise.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if generators is not None and len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for {shape[0]} rows")
    if condition is not None and tuple(condition.known.shape) != tuple(shape):
        raise ValueError(
            f"the condition is {tuple(condition.known.shape)}, the samples {tuple(shape)}"
        )
    if initial is not None and tuple(initial.shape) != tuple(shape):
        raise ValueError(f"the initial noise is {tuple(initial.shape)}, the samples {tuple(shape)}")
    if initial is not None and not bool(torch.isfinite(initial).all()):
        raise ValueError("the initial noise holds NaN or infinite values")

    def noise() -> Tensor:
        if generators is None:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(rows).to(device)

    z = noise() if initial is None else initial.to(device=device, dtype=torch.float32)
    if condition is not None:
        condition = Condition(
            condition.known.to(device=device, dtype=z.dtype),
            condition.mask.to(device=device),
            condition.guidance,
        )
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x_hat = z
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        alpha, sigma = schedule.alpha_sigma(torch.tensor(t))
        lam = schedule.log_snr(torch.tensor(t)).to(z.dtype)
        lam = lam.expand(shape[0]).to(device)
        if condition is not None:
            forward = alpha.to(z.dtype) * condition.known + sigma.to(z.dtype) * noise()
            z = torch.where(condition.mask, forward, z)
        x_hat = guided_estimate(net, z, lam, alpha, sigma, condition, differentiable=differentiable)
        if clip is not None:
            x_hat = x_hat.clamp(-clip, clip)
        with torch.set_grad_enabled(differentiable):
            if sampler == "ddim":
                z = ddim_step(z, x_hat, t, s, schedule)
            elif s > 0:
                z = ancestral_step(z, x_hat, t, s, schedule, noise())
            else:
                z = x_hat  # the last step: the denoised estimate
    if sampler == "ddim":
        z = x_hat
    if condition is not None:
        z = torch.where(condition.mask, condition.known, z)
    return z if differentiable else z.detach()
