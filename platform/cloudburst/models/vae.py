"""The 3D ResNet VAE of the quantized-loss study (Szwarcman et al., "Quantizing reconstruction
losses for improving weather data synthesis", Table 1), sized from the window, its config
section and its registry entry.

Encoder: conv(w0) -> res(w0) x2 -> [res stride 2 (w_k) -> res (w_k)] for each further width ->
flatten -> dense mu, log-variance. Decoder: dense -> reshape -> res(w_last) x3 -> up-units back
to the window shape -> conv 1 filter -> sigmoid. With widths (64, 128, 256), latent 30 and a
32x32x8 window this is the paper's network (flatten 256 x 8 x 8 x 2 = 32,768). Odd sizes are
handled by ceil-halving on the way down and a crop at the end on the way up, so any window
(16x16x8 CHIRPS, 12x12x8 Fraser) works.

Tensors are (batch, channel, time, y, x); data are scaled to [0, 1] (sigmoid output).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from cloudburst.models import losses
from cloudburst.models.registry import EpochProbe, ModelFamily
from cloudburst.models.roles import Generative, LatentModel, Reconstructor, Trainable
from cloudburst.schema import Strict

log = logging.getLogger(__name__)


class VAEConfig(Strict):
    """The quantized-loss VAE: network size, objective and regulariser (``model.kind: vae``)."""

    kind: Literal["vae"] = Field("vae", description="model family tag; `vae` selects this section")
    widths: tuple[int, ...] = Field(
        (64, 128, 256),
        min_length=2,
        description="channels of the encoder levels, finest first; each width after the "
        "first halves time, y and x once",
    )
    latent: int = Field(30, ge=1, description="dimension of the latent code z")
    loss: losses.LossChoice = "rec+wqt"
    bins: losses.HistogramBins = 100
    focal_lambda: losses.FocalLambda = 100.0
    focal_beta: losses.FocalBeta = 0.2
    focal_gamma: losses.FocalGamma = 1.0
    regulariser: Literal["mmd", "kl"] = Field(
        "mmd",
        description="latent regulariser: `mmd`, MMD between codes z and N(0, I) draws (InfoVAE); "
        "`kl`, KL divergence to N(0, I)",
    )
    reg_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the regulariser in rec_weight * L_rec + reg_weight * L_reg",
    )
    rec_weight: float = Field(1.0, gt=0, description="lambda of the fair control lambda * L_rec")

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 for w in v):
            raise ValueError("every width must be >= 1")
        return v


class ResUnit(nn.Module):
    """conv k3 (stride s) -> ReLU -> conv k3, plus identity or 1x1x1 skip, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = (
            nn.Identity() if c_in == c_out and stride == 1 else nn.Conv3d(c_in, c_out, 1, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.skip(x))


class ResUpUnit(nn.Module):
    """Residual unit with 2x nearest upsampling (then conv k3) on both paths."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.conv2(F.relu(self.conv1(up))) + self.skip(up))


def encoded_shape(window: tuple[int, int, int], levels: int) -> tuple[int, int, int]:
    """(time, y, x) after ``levels`` stride-2 units (ceil-halving each time)."""
    shape = window
    for _ in range(levels):
        shape = tuple(math.ceil(n / 2) for n in shape)  # type: ignore[assignment]
    return shape


class VAE(nn.Module):
    """A VAE over precipitation windows; ``loss``, ``sample`` and ``reconstruct`` as in DESIGN."""

    def __init__(self, cfg: VAEConfig, window: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = tuple(int(n) for n in window)
        w = list(cfg.widths)
        levels = len(w) - 1
        self.code_shape = encoded_shape(self.window, levels)
        enc: list[nn.Module] = [nn.Conv3d(1, w[0], 3, padding=1), nn.ReLU()]
        enc += [ResUnit(w[0], w[0]), ResUnit(w[0], w[0])]
        for k in range(1, len(w)):
            enc += [ResUnit(w[k - 1], w[k], stride=2), ResUnit(w[k], w[k])]
        self.encoder = nn.Sequential(*enc)
        flat = w[-1] * math.prod(self.code_shape)
        self.to_mu = nn.Linear(flat, cfg.latent)
        self.to_logvar = nn.Linear(flat, cfg.latent)
        self.from_z = nn.Linear(cfg.latent, flat)
        dec: list[nn.Module] = [ResUnit(w[-1], w[-1]) for _ in range(3)]
        cur = w[-1]
        for k in range(levels, 0, -1):
            dec.append(ResUpUnit(cur, w[k - 1]))
            cur = w[k - 1]
            if k - 1 > 0:
                dec.append(ResUnit(cur, w[k - 2]))
                cur = w[k - 2]
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv3d(cur, 1, 3, padding=1)

    @property
    def latent_size(self) -> int:
        return int(self.cfg.latent)

    # ------------------------------------------------------------------ the roles

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.to_mu(h), self.to_logvar(h).clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_z(z).view(z.shape[0], self.cfg.widths[-1], *self.code_shape)
        out = torch.sigmoid(self.head(self.decoder(h)))
        t, y, x = self.window
        return out[:, :, :t, :y, :x]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean: the deterministic reconstruction."""
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``n`` draws of z ~ N(0, I)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent, generator=generator, device="cpu").to(device)
        return self.decode(z)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted reconstruction objective + weighted regulariser, and metrics to log."""
        x = batch["x"]
        mask = batch.get("mask")
        x_hat, mu, logvar = self(x)
        cfg = self.cfg
        rec = losses.reconstruction_loss(
            cfg.loss,
            x,
            x_hat,
            bins=cfg.bins,
            lam=cfg.focal_lambda,
            beta=cfg.focal_beta,
            gamma=cfg.focal_gamma,
            mask=mask,
        ).mean()
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        if cfg.regulariser == "mmd":
            reg = losses.mmd(z, torch.randn_like(z))
        else:
            reg = losses.kl_normal(mu, logvar).mean()
        total = cfg.rec_weight * rec + cfg.reg_weight * reg
        metrics = {
            "loss": float(total.detach()),
            "reconstruction": float(rec.detach()),
            cfg.regulariser: float(reg.detach()),
            "mse": float(losses.l_rec(x, x_hat.detach(), mask, reduction="mean")),
        }
        return total, metrics


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------- registry entry


def _epoch_metrics(network: nn.Module, probe: EpochProbe) -> dict[str, float]:
    """Reconstruction scores in physical units on the probe windows (``val_`` metrics): the
    quantized MSE per bin of the store's histogram, the 0.99 / 0.999 quantiles and their
    relative errors, the mean bias, the wet fractions and the active latent units (see
    :func:`cloudburst.models.scoring.reconstruction_scores`)."""
    from cloudburst.models.scoring import reconstruction_scores

    scores = reconstruction_scores(
        network, probe.x, probe.mask, probe.transform, probe.edges, prefix="val_"
    )
    return scores.metrics


def _collapse_warning(cfg: VAEConfig, report: dict[str, float]) -> str | None:
    """Posterior collapse, said as soon as an epoch shows it (fewer than 10% units active)."""
    active = int(report.get("val_active_units", cfg.latent))
    if active >= max(1, cfg.latent // 10):
        return None
    reg = cfg.regulariser
    return (
        f"posterior collapse: {active} of {cfg.latent} latent units active; the code carries "
        "almost no information. Lower model.reg_weight or raise model.rec_weight "
        f"(regulariser {reg} = {report.get('val_' + reg, 0.0):.3g})."
    )


FAMILY = ModelFamily(
    name="vae",
    config=VAEConfig,
    build=VAE,
    roles=frozenset({Trainable, Generative, LatentModel, Reconstructor}),
    scenarios=frozenset({"unconditional", "extreme"}),
    learning_rate=lambda cfg: losses.LOSSES[cfg.loss].learning_rate,
    tags=lambda cfg: {
        "loss": cfg.loss,
        "bins": cfg.bins,
        "regulariser": cfg.regulariser,
        "latent": cfg.latent,
    },
    epoch_metrics=_epoch_metrics,
    epoch_warning=_collapse_warning,
    small={"widths": (4, 8), "latent": 4},
    metrics=(
        "val_qmse_top5",
        "val_qmse_top10",
        "val_q0.99_error",
        "val_q0.999_error",
        "val_mean_bias",
        "val_wet_fraction",
        "val_active_units",
    ),
    description=(
        "A 3D ResNet variational autoencoder of precipitation windows (time, y, x), trained "
        "with a quantized reconstruction loss that weighs the rare heavy-rain bins of the "
        "store's histogram (Szwarcman et al., \"Quantizing reconstruction losses for improving "
        'weather data synthesis"). It reconstructs windows, samples new ones from its '
        "Gaussian latent space and steers the latent code towards extremes: it serves the "
        "unconditional and extreme ensemble scenarios."
    ),
)
