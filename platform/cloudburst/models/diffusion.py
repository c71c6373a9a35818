"""Continuous-time v-prediction diffusion of the diffusion study (Herbert, "Diffusion Models
for Time-Evolving Precipitation Fields"): the model of a window shape, its training loss, its
config section and its registry entry.

The schedule (:mod:`cloudburst.models.schedules`) and the samplers with reconstruction guidance
(:mod:`cloudburst.models.samplers`) are apart from the network; :class:`DiffusionModel` binds a
3D U-Net, a schedule and an input transformation (none, sqrt or the learnt monotone one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from pydantic import Field, model_validator
from torch import Tensor

from cloudburst.models import samplers
from cloudburst.models.registry import EpochProbe, ModelFamily
from cloudburst.models.roles import (
    Condition,
    ConditionalSampler,
    Generative,
    NoiseSteerable,
    Trainable,
    TransformedInput,
)
from cloudburst.models.samplers import Network
from cloudburst.models.schedules import AlphaCosineSchedule, expand
from cloudburst.schema import Strict

__all__ = ["DiffusionConfig", "DiffusionModel", "v_loss"]

log = logging.getLogger(__name__)


class DiffusionConfig(Strict):
    """The v-prediction diffusion model: U-Net size, schedule, input transformation and
    sampler (``model.kind: diffusion``)."""

    kind: Literal["diffusion"] = Field(
        "diffusion", description="model family tag; `diffusion` selects this section"
    )
    widths: tuple[int, ...] = Field(
        (32, 64, 128),
        min_length=1,
        description="channels of the U-Net levels, finest first; each further level halves y "
        "and x (time stays whole)",
    )
    blocks: int = Field(1, ge=1, description="residual blocks per U-Net level")
    embedding: int = Field(64, ge=4, description="width of the lambda embedding")
    lambda_min: float = Field(
        -30.0, description="lowest log-SNR lambda of the truncated alpha-cosine schedule (at t = 1)"
    )
    lambda_max: float = Field(
        30.0, description="highest log-SNR lambda of the schedule (at t = 0); above lambda_min"
    )
    transform: Literal["none", "sqrt", "learnt"] = Field(
        "learnt",
        description="input transformation to [-1, 1]: `none` 2u - 1, `sqrt` 2 sqrt(u) - 1, "
        "`learnt` a monotone MLP trained jointly",
    )
    min_gradient: float = Field(0.1, gt=0, description="c of the learnt transformation")
    masking: tuple[float, float] = Field(
        (-0.99975, 1.0),
        description="masking set M (low, high) in [-1, 1]: only transformed values inside it "
        "enter the learnt transformation's log-Jacobian term",
    )
    steps: int = Field(100, ge=1, description="sampler steps")
    sampler: Literal["ancestral", "ddim"] = Field(
        "ancestral",
        description="sampler used unless a request names one: `ancestral` (stochastic steps) or "
        "`ddim` (deterministic steps)",
    )
    guidance: float = Field(
        1.0,
        ge=0,
        description="reconstruction-guidance weight w_r of conditional sampling. 1 by default: "
        "measured with benchmarks/guidance.py on RADOLAN with the shipped diffusion-radolan "
        "network (none / sqrt / learnt transformations, 300 and 1,200 training steps; w_r "
        "in 0, 1, 100, 1e6), w_r = 1 was best in 8 of 10 interpolation / forecast rows and "
        "within 2 % of best in a ninth, beat imputation (0) in 9 and linear interpolation / "
        "persistence in 8, while the study's 1e6 (for networks trained ~600x longer) gave a "
        "CRPS 1.6-9x the baselines' MAE in every row",
    )

    probe_samples: int = Field(
        4,
        ge=0,
        description="unconditional samples drawn after an epoch and scored in physical units "
        "against the fixed validation windows (val_q0.99_error, val_q0.999_error, "
        "val_mean_bias, val_wet_fraction, val_psd_spatial_error); 0 turns these metrics off",
    )
    probe_steps: int = Field(
        10, ge=1, description="sampler steps of the per-epoch probe samples (few: it is a check)"
    )
    probe_every: int = Field(
        1, ge=1, description="score probe samples on epochs that are multiples of this"
    )

    @model_validator(mode="after")
    def _ordered(self) -> DiffusionConfig:
        if not self.lambda_min < self.lambda_max:
            raise ValueError("lambda_min must be below lambda_max")
        if not self.masking[0] < self.masking[1]:
            raise ValueError("masking must be an interval (low, high) with low < high")
        if any(w < 1 for w in self.widths):
            raise ValueError("every width must be >= 1")
        return self


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
    a, s = expand(alpha, x), expand(sigma, x)
    z = a * x + s * eps
    v = a * eps - s * x
    lam = schedule.log_snr(t).to(x.dtype).to(x.device)
    err = (v - net(z, lam)) ** 2
    if weight is None:
        return err.flatten(1).mean(1)
    w = weight.to(err.dtype)
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)


# ------------------------------------------------------------------------------- the model

PROBE_SEED = 0  # the probe samples' noise: every epoch scores the same draws
DIRECTION_SEED = 0  # the noise draws an extreme direction is averaged over
SOFT_MAX_TEMPERATURE = 0.05  # of the soft maximum an extreme direction raises (in [-1, 1])


class DiffusionModel(torch.nn.Module):
    """The diffusion model of a window shape: U-Net, schedule and input transformation.

    Inputs are the loader's windows scaled to [0, 1] (``u``); the model maps them to [-1, 1]
    by the configured transformation (``none``: 2u - 1; ``sqrt``: 2 sqrt(u) - 1; ``learnt``:
    the monotone h, trained jointly) and samples back to [0, 1], inverting it.
    """

    def __init__(self, cfg: DiffusionConfig, window: tuple[int, int, int]) -> None:
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
        condition: Condition | None = None,
        *,
        generators: Sequence[torch.Generator] | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        initial: Tensor | None = None,
    ) -> Tensor:
        """``n`` windows (n, 1, time, y, x) in [0, 1]; ``condition`` gives known values in
        [0, 1]; ``generators``: one noise stream per window; ``initial``: the initial noise
        z_1 (see :func:`cloudburst.models.samplers.sample`)."""
        device = next(self.parameters()).device
        shape = (int(n), 1, *self.window)
        inner = self.inner_condition(condition)
        was = self.training
        self.eval()
        y = samplers.sample(
            self.net,
            shape,
            self.schedule,
            steps or self.cfg.steps,
            sampler=sampler or self.cfg.sampler,  # type: ignore[arg-type]
            condition=inner,
            generator=generator,
            generators=generators,
            device=device,
            initial=initial,
        )
        self.train(was)
        with torch.no_grad():
            return self.from_model_space(y)

    def inner_condition(self, condition: Condition | None) -> Condition | None:
        """``condition`` (known values in [0, 1]) in the network's [-1, 1] space."""
        if condition is None:
            return None
        device = next(self.parameters()).device
        with torch.no_grad():
            known = self.to_model_space(condition.known.to(device))
        return Condition(known, condition.mask.to(device), condition.guidance)

    def extreme_direction(
        self, condition: Condition | None = None, *, draws: int = 4, steps: int = 10
    ) -> Tensor:
        """Unit direction (1, time, y, x) in the initial noise along which the sample's
        extremes grow: the gradient of each sample's soft maximum (temperature
        :data:`SOFT_MAX_TEMPERATURE`, in the network's space, over the values ``condition``
        leaves unknown) with respect to its initial noise, through ``steps`` DDIM steps
        without clipping, averaged over ``draws`` fixed noise draws (seed
        :data:`DIRECTION_SEED`). Raises ValueError when the sample does not vary with its
        noise (an untrained network)."""
        if draws < 1 or steps < 1:
            raise ValueError(f"draws and steps must be >= 1 (got {draws}, {steps})")
        device = next(self.parameters()).device
        shape = (int(draws), 1, *self.window)
        generator = torch.Generator().manual_seed(DIRECTION_SEED)
        z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        z.requires_grad_(True)
        inner = self.inner_condition(condition.expand(draws) if condition is not None else None)
        was = self.training
        self.eval()
        try:
            y = samplers.sample(
                self.net,
                shape,
                self.schedule,
                steps,
                sampler="ddim",
                condition=inner,
                generator=generator,
                device=device,
                clip=None,
                initial=z,
                differentiable=True,
            )
            flat = y.flatten(1) / SOFT_MAX_TEMPERATURE
            if inner is not None:
                flat = flat.masked_fill(inner.mask.flatten(1), -torch.inf)
            soft_max = SOFT_MAX_TEMPERATURE * torch.logsumexp(flat, dim=1)
            (grad,) = torch.autograd.grad(soft_max.sum(), z)
        finally:
            self.train(was)
        mean = grad.detach().double().mean(dim=0, keepdim=True)
        norm = float(mean.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError("the samples' maxima do not vary with the initial noise")
        return (mean / norm).float().squeeze(0)


# ------------------------------------------------------------------------- registry entry


def _epoch_metrics(network: torch.nn.Module, probe: EpochProbe) -> dict[str, float]:
    """``probe_samples`` unconditional samples (``probe_steps`` steps, fixed noise) scored in
    physical units against the probe windows (``val_`` metrics, see
    :func:`cloudburst.models.scoring.sample_scores`); nothing on epochs that are not
    multiples of ``probe_every`` or when ``probe_samples`` is 0."""
    from cloudburst.models.scoring import sample_scores

    model = cast(DiffusionModel, network)
    cfg = model.cfg
    if cfg.probe_samples <= 0 or probe.epoch % cfg.probe_every != 0:
        return {}
    generator = torch.Generator().manual_seed(PROBE_SEED)
    samples = model.sample(cfg.probe_samples, generator=generator, steps=cfg.probe_steps)
    metrics = sample_scores(samples, probe.x, probe.mask, probe.transform, prefix="val_")
    if not all(math.isfinite(v) for v in metrics.values()):
        log.warning("epoch %d: probe sample metrics not all finite: %s", probe.epoch, metrics)
    return metrics


def _no_data_transform(data: Any) -> str | None:
    if data.scaling != "unit" or data.transform != "none":
        return (
            "the diffusion model takes windows scaled to [0, 1] and applies its own "
            "transformation: keep data.scaling=unit and data.transform=none, and choose "
            "model.transform (none, sqrt or learnt)"
        )
    return None


FAMILY = ModelFamily(
    name="diffusion",
    config=DiffusionConfig,
    build=DiffusionModel,
    roles=frozenset({Trainable, Generative, ConditionalSampler, NoiseSteerable, TransformedInput}),
    scenarios=frozenset({"unconditional", "extreme", "interpolation", "forecast", "extension"}),
    learning_rate=lambda _cfg: 1e-4,
    tags=lambda cfg: {"transform": cfg.transform, "sampler": cfg.sampler},
    epoch_metrics=_epoch_metrics,
    check_data=_no_data_transform,
    sampler_settings=True,
    small={"widths": (4, 8), "embedding": 8, "steps": 4},
    metrics=(
        "val_q0.99_error",
        "val_q0.999_error",
        "val_mean_bias",
        "val_wet_fraction",
        "val_psd_spatial_error",
    ),
    description=(
        "A continuous-time v-prediction diffusion model (3D U-Net) of precipitation windows "
        "(time, y, x) with an input transformation (none, sqrt or learnt) (Herbert, "
        '"Diffusion Models for Time-Evolving Precipitation Fields"). It samples new windows '
        "and, with reconstruction guidance, completes partly known ones: it serves the "
        "unconditional, extreme, interpolation, forecast and extension ensemble scenarios."
    ),
)
