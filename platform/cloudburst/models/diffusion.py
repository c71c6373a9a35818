"""Continuous-time v-prediction diffusion (SPEC §3, paper 001), independent of the network.

- :class:`AlphaCosineSchedule`: the truncated alpha-cosine schedule; alpha_t, sigma_t and the
  log signal-to-noise ratio lambda_t for t in [0, 1], lambda in [lambda_min, lambda_max].
- :func:`v_loss`: the v-prediction training loss of any network ``net(z_t, lambda_t)``.
- :func:`sample`: the ancestral sampler over T uniform steps, or the deterministic DDIM sampler
  in the v-parameterisation (``sampler="ddim"``), with optional reconstruction guidance:
  known values (a boolean mask over the window) are kept by replacing the known part of z_t
  with a forward sample of them at every step, and the denoised estimate of the unknown part is
  corrected by - (w_r alpha_t / 2) grad ||known - x^(z_t)||^2 (w_r = 0: plain imputation).

Every coefficient near lambda = +-30 is computed through lambda (expm1), where the plain ratios
of alphas and sigmas lose their precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "AlphaCosineSchedule",
    "DiffusionModel",
    "ancestral_step",
    "ddim_step",
    "denoise",
    "sample",
    "v_loss",
]

Network = Callable[[Tensor, Tensor], Tensor]


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


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample coefficient (n,) or scalar, shaped to broadcast over ``like``."""
    v = v.to(like.dtype).to(like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def v_loss(
    net: Network,
    x: Tensor,
    schedule: AlphaCosineSchedule,
    *,
    weight: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample mean of (v - v^(z_t, lambda_t))^2 over the window, t ~ U(0, 1).

    ``x`` (n, 1, time, y, x) in [-1, 1]; ``weight`` (same shape, optional) weighs pixels
    (e.g. a mask of valid values). Returns (n,).
    """
    n = x.shape[0]
    t = torch.rand(n, generator=generator, dtype=torch.float64).to(x.device)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    alpha, sigma = schedule.alpha_sigma(t)
    a, s = _expand(alpha, x), _expand(sigma, x)
    z = a * x + s * eps
    v = a * eps - s * x
    lam = schedule.log_snr(t).to(x.dtype).to(x.device)
    err = (v - net(z, lam)) ** 2
    if weight is None:
        return err.flatten(1).mean(1)
    w = weight.to(err.dtype)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)


def denoise(z: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x^ = alpha z - sigma v^ (and eps^ = sigma z + alpha v^)."""
    return _expand(alpha, z) * z - _expand(sigma, z) * v


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


def sample(
    net: Network,
    shape: tuple[int, ...],
    schedule: AlphaCosineSchedule,
    steps: int = 100,
    *,
    sampler: Literal["ancestral", "ddim"] = "ancestral",
    known: Tensor | None = None,
    mask: Tensor | None = None,
    guidance: float = 0.0,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    clip: float | None = 1.0,
) -> Tensor:
    """Draw samples of ``shape`` (n, 1, time, y, x) in model space from t = 1 to 0.

    With ``known`` (values in model space) and ``mask`` (True where known), reconstruction
    guidance of weight ``guidance``: the known part of z_t is replaced by alpha_t known +
    sigma_t eps before each network call, and the denoised estimate is corrected by
    -(w_r alpha_t / 2) d/dz ||mask (known - x^(z))||^2. The result keeps the known values.
    ``generators`` (one per row) draw each row's noise from its own stream, so a row's result
    does not depend on the others (ensemble members regenerated alone give the same values).
    ``clip`` bounds the denoised estimate to [-clip, clip] (data live in [-1, 1]). The
    useful range of ``guidance`` depends on how strongly the network's x^ couples pixels:
    the correction is a gradient step, and too large a weight overshoots (then clipped).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    if (known is None) != (mask is None):
        raise ValueError("give known values and their mask together")
    guided = known is not None and guidance > 0
    if generators is not None and len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for {shape[0]} rows")

    def noise() -> Tensor:
        if generators is None:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(rows).to(device)

    z = noise()
    if known is not None:
        known = known.to(device=device, dtype=z.dtype)
        mask = mask.to(device=device, dtype=torch.bool)  # type: ignore[union-attr]
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for i in range(steps):
        t, s = float(grid[i]), float(grid[i + 1])
        alpha, sigma = schedule.alpha_sigma(torch.tensor(t))
        lam = schedule.log_snr(torch.tensor(t)).to(z.dtype)
        lam = lam.expand(shape[0]).to(device)
        if known is not None:
            forward = alpha.to(z.dtype) * known + sigma.to(z.dtype) * noise()
            z = torch.where(mask, forward, z)  # type: ignore[arg-type]
        if guided:
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                x_hat = denoise(zg, net(zg, lam), alpha, sigma)
                err = ((known - x_hat) * mask).pow(2).sum()  # type: ignore[operator]
                (grad,) = torch.autograd.grad(err, zg)
            x_hat = x_hat.detach() - guidance * float(alpha) / 2.0 * grad * (~mask)  # type: ignore[operator]
        else:
            with torch.no_grad():
                x_hat = denoise(z, net(z, lam), alpha, sigma)
        if clip is not None:
            x_hat = x_hat.clamp(-clip, clip)
        with torch.no_grad():
            if sampler == "ddim":
                z = ddim_step(z, x_hat, t, s, schedule)
            elif s > 0:
                z = ancestral_step(z, x_hat, t, s, schedule, noise())
            else:
                z = x_hat  # the last step: the denoised estimate
    if sampler == "ddim":
        z = x_hat
    if known is not None:
        z = torch.where(mask, known, z)  # type: ignore[arg-type]
    return z.detach()


# ------------------------------------------------------------------------------- the model


class DiffusionModel(torch.nn.Module):
    """The diffusion model of a window shape: U-Net, schedule and input transformation.

    Inputs are the loader's windows scaled to [0, 1] (``u``); the model maps them to [-1, 1]
    by the configured transformation (``none``: 2u - 1; ``sqrt``: 2 sqrt(u) - 1; ``learnt``:
    the monotone h, trained jointly) and samples back to [0, 1], inverting it.
    """

    def __init__(self, cfg: Any, window: tuple[int, int, int]) -> None:
        super().__init__()
        from cloudburst.models.monotone import MonotoneTransform
        from cloudburst.models.unet3d import UNet3D

        self.cfg = cfg
        self.window = tuple(int(n) for n in window)
        self.net = UNet3D(
            self.window,
            widths=tuple(cfg.widths),
            blocks=cfg.blocks,
            emb=cfg.embedding,
            lambda_scale=max(abs(cfg.lambda_min), abs(cfg.lambda_max)),
        )
        self.schedule = AlphaCosineSchedule(cfg.lambda_min, cfg.lambda_max)
        self.transform = MonotoneTransform(min_gradient=cfg.min_gradient)
        if cfg.transform != "learnt":
            self.transform.requires_grad_(False)

    def forward(self, z: Tensor, lam: Tensor) -> Tensor:
        return self.net(z, lam)

    # -------------------------------------------------------------- input transformation

    def to_model_space(self, u: Tensor) -> Tensor:
        kind = self.cfg.transform
        if kind == "learnt":
            return self.transform(u)
        if kind == "sqrt":
            return 2.0 * torch.sqrt(u.clamp_min(0.0)) - 1.0
        return 2.0 * u - 1.0

    def from_model_space(self, y: Tensor) -> Tensor:
        y = y.clamp(-1.0, 1.0)
        kind = self.cfg.transform
        if kind == "learnt":
            return self.transform.inverse(y)
        if kind == "sqrt":
            return ((y + 1.0) / 2.0) ** 2
        return (y + 1.0) / 2.0

    # ------------------------------------------------------------------------ training

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Mean v-loss over valid pixels, minus the mean masked log-Jacobian when learnt."""
        u = batch["x"]
        mask = batch.get("mask")
        y = self.to_model_space(u)
        diff = v_loss(self.net, y, self.schedule, weight=mask).mean()
        total = diff
        metrics = {"diffusion": float(diff.detach())}
        if self.cfg.transform == "learnt":
            values = u[mask] if mask is not None else u
            penalty = self.transform.penalty(values, tuple(self.cfg.masking))
            total = diff + penalty
            metrics["log_jacobian"] = float(-penalty.detach())
        metrics["loss"] = float(total.detach())
        return total, metrics

    # ------------------------------------------------------------------------ sampling

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        condition: Any = None,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """``n`` windows (n, 1, time, y, x) in [0, 1]; ``condition`` is ``(known, mask,
        guidance)`` with ``known`` in [0, 1]; ``generators``: one noise stream per window
        (see :func:`sample`)."""
        device = next(self.parameters()).device
        shape = (int(n), 1, *self.window)
        known = mask = None
        guidance = 0.0
        if condition is not None:
            known_u, mask, guidance = condition
            with torch.no_grad():
                known = self.to_model_space(known_u.to(device))
        was = self.training
        self.eval()
        y = sample(
            self.net,
            shape,
            self.schedule,
            steps or self.cfg.steps,
            sampler=sampler or self.cfg.sampler,  # type: ignore[arg-type]
            known=known,
            mask=mask,
            guidance=float(guidance),
            generator=generator,
            generators=generators,
            device=device,
        )
        self.train(was)
        with torch.no_grad():
            return self.from_model_space(y)
