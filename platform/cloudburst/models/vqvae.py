"""The VQ-VAE of the satellite translation study ("Discrete variational autoencoders for
synthetic nighttime visible satellite imagery"): encoder -> nearest-neighbour quantisation
against a codebook -> decoder, trained on reconstruction + codebook + commitment + adversarial
losses; its config section and its registry entry (``model.kind: vqvae``).

It serves two uses: translation of one variable into another (batches with a ``target``, e.g.
infrared bands to visible, learnt on daytime pairs and applied at night), and discrete
compression of precipitation windows (batches without one: it reconstructs its input). The
reconstruction objective is any of :data:`cloudburst.models.losses.LOSSES`, so a VQ-VAE
trained with the quantized histogram objective (``loss: rec+wqt``) is one configuration.

Network on (n, 1, time, y, x), fully convolutional, time never downsampled (so t = 1, images,
works as well as t > 1):

- encoder: conv k3 (w_0) -> [residual block (w_k) -> conv k3 stride (1, 2, 2) (w_k+1)] per
  level -> ``residual_blocks`` residual blocks -> ReLU -> conv 1x1x1 to ``code_dim``;
- :class:`~cloudburst.models.quantise.VectorQuantiser` (``codebook_size`` codes);
- decoder: conv k3 -> ``residual_blocks`` residual blocks -> [nearest 2x upsampling in space
  -> conv k3 -> residual block] per level -> ReLU -> conv k3 to 1 channel -> output activation;
- residual block: x + conv 1x1x1(ReLU(conv k3(ReLU(x)))), as in van den Oord et al.

There are log2(``downsample``) levels; sizes that the factor does not divide are ceil-halved on
the way down and cropped at the end. The adversarial terms (a patch discriminator, weight 0.2,
adaptive, from step ``adversarial_start``) are those of :mod:`cloudburst.models.discriminator`.

The family has no prior over codes, so it does not sample and serves no ensemble scenario.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.nn import functional as F

from cloudburst.models import losses
from cloudburst.models.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from cloudburst.models.quantise import VectorQuantiser, code_statistics
from cloudburst.models.registry import EpochProbe, ModelFamily
from cloudburst.models.roles import DiscreteCoder, Reconstructor, Trainable, Translator
from cloudburst.schema import Strict

__all__ = ["FAMILY", "LEARNING_RATE", "ResidualBlock", "VQVAE", "VQVAEConfig"]

log = logging.getLogger(__name__)


# the study's learning rate (the default when train.lr is not given)
LEARNING_RATE = 4.5e-6
# an epoch's probe whose codes use fewer than this share of the codebook, or whose code
# perplexity is below COLLAPSE_PERPLEXITY, has a collapsed codebook
COLLAPSE_USAGE = 0.03
COLLAPSE_PERPLEXITY = 2.0


class VQVAEConfig(Strict):
    """The VQ-VAE: codebook, network size, objective and adversarial terms
    (``model.kind: vqvae``)."""

    kind: Literal["vqvae"] = Field(
        "vqvae", description="model family tag; `vqvae` selects this section"
    )
    codebook_size: int = Field(2048, ge=2, le=65536, description="K codes (2048 or 4096)")
    code_dim: int = Field(256, ge=1, description="dimension of each code")
    widths: tuple[int, ...] = Field(
        (128, 256),
        min_length=1,
        description="channels of each resolution level, finest first; the last repeats",
    )
    residual_blocks: int = Field(
        3,
        ge=0,
        le=64,
        description="residual blocks at the coarsest level, in encoder and decoder each",
    )
    downsample: int = Field(4, ge=1, le=64, description="spatial factor (power of 2)")
    beta: float = Field(0.25, ge=0, description="weight of the commitment loss")
    ema: bool = Field(False, description="learn the codebook by moving averages")
    ema_decay: float = Field(
        0.99,
        ge=0,
        lt=1,
        description="decay of the codebook's moving averages (used when `ema` is on)",
    )
    ema_epsilon: float = Field(1e-5, ge=0, description="Laplace smoothing of the EMA counts")
    dead_code_steps: int = Field(
        100, ge=0, description="restart codes unused for this many steps (0: never)"
    )
    dead_code_threshold: float = Field(
        1.0, gt=0, description="fewest vectors per step for a code to count as used"
    )
    loss: losses.LossChoice = "rec"
    bins: losses.HistogramBins = 100
    focal_lambda: losses.FocalLambda = 100.0
    focal_beta: losses.FocalBeta = 0.2
    focal_gamma: losses.FocalGamma = 1.0
    output: Literal["sigmoid", "tanh", "linear"] = Field(
        "sigmoid", description="sigmoid for data.scaling unit, tanh for symmetric"
    )
    adversarial_weight: float = Field(0.2, ge=0, description="0: no discriminator")
    adversarial_start: int = Field(10_000, ge=0, description="training step it starts at")
    adversarial_loss: Literal["hinge", "non_saturating"] = Field(
        "hinge",
        description="GAN objective of discriminator and generator: `hinge` or `non_saturating` "
        "(binary cross-entropy)",
    )
    discriminator_width: int = Field(
        64,
        ge=1,
        description="channels of the patch discriminator's first layer; each stride-2 layer "
        "doubles them, up to 8x",
    )
    discriminator_layers: int = Field(
        3,
        ge=0,
        le=8,
        description="stride-2 layers of the patch discriminator (each halves y and x)",
    )

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 for w in v):
            raise ValueError(f"every width must be >= 1, got {list(v)}")
        return v

    @field_validator("downsample")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"downsample must be a power of 2 (1, 2, 4, 8, ...), got {v}")
        return v

    @property
    def levels(self) -> int:
        """Stride-2 levels: log2(downsample)."""
        return int(math.log2(self.downsample))

    def level_widths(self) -> list[int]:
        """Channels at levels 0 (the window's resolution) to ``levels``."""
        return [self.widths[min(k, len(self.widths) - 1)] for k in range(self.levels + 1)]


class ResidualBlock(nn.Module):
    """x + conv 1x1x1(ReLU(conv k3(ReLU(x)))), channels kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VQVAE(nn.Module):
    """A VQ-VAE over (n, 1, time, y, x) windows in model space; ``loss``, ``reconstruct``,
    ``translate``, ``encode_codes`` and ``decode_codes`` as the roles say."""

    def __init__(self, cfg: VQVAEConfig, window: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = tuple(int(n) for n in window)
        w = cfg.level_widths()
        levels = cfg.levels
        enc: list[nn.Module] = [nn.Conv3d(1, w[0], 3, padding=1)]
        for k in range(levels):
            enc += [ResidualBlock(w[k]), nn.Conv3d(w[k], w[k + 1], 3, stride=(1, 2, 2), padding=1)]
        enc += [ResidualBlock(w[-1]) for _ in range(cfg.residual_blocks)]
        enc += [nn.ReLU(), nn.Conv3d(w[-1], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantiser = VectorQuantiser(
            cfg.codebook_size,
            cfg.code_dim,
            ema=cfg.ema,
            decay=cfg.ema_decay,
            epsilon=cfg.ema_epsilon,
            dead_code_steps=cfg.dead_code_steps,
            dead_code_threshold=cfg.dead_code_threshold,
        )
        dec: list[nn.Module] = [nn.Conv3d(cfg.code_dim, w[-1], 3, padding=1)]
        dec += [ResidualBlock(w[-1]) for _ in range(cfg.residual_blocks)]
        for k in range(levels, 0, -1):
            dec += [
                nn.Upsample(scale_factor=(1, 2, 2), mode="nearest"),
                nn.Conv3d(w[k], w[k - 1], 3, padding=1),
                ResidualBlock(w[k - 1]),
            ]
        dec.append(nn.ReLU())
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv3d(w[0], 1, 3, padding=1)
        self.discriminator: PatchDiscriminator | None = None
        if cfg.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(
                1, cfg.discriminator_width, cfg.discriminator_layers
            )
        # training steps taken (loss calls in training mode): when the adversarial terms start
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @property
    def codebook_size(self) -> int:
        return int(self.cfg.codebook_size)

    # ------------------------------------------------------------------ the network

    def check_input(self, x: Tensor, what: str = "x") -> None:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"{what} must be (n, 1, time, y, x), got {tuple(x.shape)}")

    def output(self, h: Tensor) -> Tensor:
        """The head's logits through the configured output activation."""
        out = self.head(h)
        if self.cfg.output == "sigmoid":
            return torch.sigmoid(out)
        if self.cfg.output == "tanh":
            return torch.tanh(out)
        return out

    def decode(self, quantised: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """(n, code_dim, t, y', x') codes -> (n, 1, t, y, x), cropped to ``shape``'s last three
        sizes when given."""
        out = self.output(self.decoder(quantised))
        if shape is not None:
            t, y, x = shape[-3:]
            out = out[:, :, :t, :y, :x]
        return out

    def nearest_codes(self, x: Tensor) -> Tensor:
        """The quantised code vectors of ``x`` (no codebook update, whatever the mode)."""
        return self.quantiser.lookup(self.quantiser.nearest(self.encoder(x)))

    # ------------------------------------------------------------------ the roles

    def reconstruct(self, x: Tensor) -> Tensor:
        """Encode, quantise to the nearest codes and decode: (n, 1, time, y, x) model space ->
        the same shape. Deterministic; it changes nothing in the codebook."""
        self.check_input(x)
        return self.decode(self.nearest_codes(x), x.shape)

    def translate(self, x: Tensor) -> Tensor:
        """(n, 1, time, y, x) in the input variable's model space -> the same shape in the
        target variable's (the network trained on pairs maps one to the other)."""
        self.check_input(x)
        return self.decode(self.nearest_codes(x), x.shape)

    def codebook_vectors(self) -> Tensor:
        """float32 (codebook_size, code_dim): code k's vector in row k."""
        return self.quantiser.codebook.detach().float().clone()

    def encode_codes(self, x: Tensor) -> Tensor:
        """(n, 1, time, y, x) -> int64 codes (n, time, ceil(y / f), ceil(x / f)), f the
        spatial downsampling factor."""
        self.check_input(x)
        return self.quantiser.nearest(self.encoder(x))

    def decode_codes(self, indices: Tensor) -> Tensor:
        """int64 codes (n, time', y', x') -> (n, 1, time', y' f, x' f) model space."""
        if indices.ndim != 4:
            raise ValueError(
                f"codes must be (n, time, y, x) integers, got shape {tuple(indices.shape)}"
            )
        return self.decode(self.quantiser.lookup(indices))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction + codebook + beta commitment (+ adversarial terms), and metrics.

        Reconstructs ``batch["x"]``, or maps it to ``batch["target"]`` when the batch has one
        (valid where ``batch["target_mask"]``, else ``batch["mask"]``). The adversarial terms
        (from training step ``adversarial_start`` on) are the discriminator's loss on detached
        reconstructions plus the adaptively weighted generator term through the discriminator
        with detached parameters, so that the single optimizer over all parameters moves each
        side by its own objective (see :mod:`cloudburst.models.discriminator`). Out of
        training mode (validation) the returned loss leaves the adversarial terms out; they
        are still logged.
        """
        cfg = self.cfg
        x = batch["x"]
        self.check_input(x)
        target = batch.get("target")
        if target is None:
            target, mask = x, batch.get("mask")
        else:
            self.check_input(target, "target")
            if tuple(target.shape) != tuple(x.shape):
                raise ValueError(
                    f"target {tuple(target.shape)} and x {tuple(x.shape)} must have one shape"
                )
            mask = batch.get("target_mask", batch.get("mask"))
        q = self.quantiser(self.encoder(x))
        x_hat = self.decode(q.quantised, target.shape)
        rec = losses.reconstruction_loss(
            cfg.loss,
            target,
            x_hat,
            bins=cfg.bins,
            lam=cfg.focal_lambda,
            beta=cfg.focal_beta,
            gamma=cfg.focal_gamma,
            mask=mask,
        ).mean()
        total = rec + q.codebook_loss + cfg.beta * q.commitment_loss
        metrics = {
            "rec": float(rec.detach()),
            "codebook": float(q.codebook_loss.detach()),
            "commitment": float(q.commitment_loss.detach()),
            "perplexity": float(q.perplexity),
            "codebook_usage": float(q.usage),
            "mse": float(losses.l_rec(target, x_hat.detach(), mask, reduction="mean")),
        }
        if self.discriminator is not None:
            total = total + self.adversarial(target, x_hat, mask, rec, metrics)
        if self.training:
            self.step += 1
        metrics["loss"] = float(total.detach())
        return total, metrics

    def adversarial(
        self,
        real: Tensor,
        fake: Tensor,
        mask: Tensor | None,
        rec: Tensor,
        metrics: dict[str, float],
    ) -> Tensor:
        """The adversarial part of the loss (0 before ``adversarial_start``); fills
        ``metrics``. Invalid pixels of the fake take the real values, so the discriminator
        judges only what the reconstruction loss does."""
        cfg = self.cfg
        disc = self.discriminator
        assert disc is not None
        started = int(self.step) >= cfg.adversarial_start
        metrics["adversarial_active"] = float(started and self.training)
        if not started:
            metrics.update(discriminator=0.0, generator_adversarial=0.0, adaptive_weight=0.0)
            # every parameter takes part in every step (DistributedDataParallel needs it)
            return 0.0 * torch.stack([p.sum() for p in disc.parameters()]).sum()
        if mask is not None:
            fake = torch.where(mask.expand_as(fake), fake, real.to(fake.dtype))
        d_loss = discriminator_loss(disc(real), disc(fake.detach()), cfg.adversarial_loss)
        g_loss = generator_loss(disc.frozen(fake), cfg.adversarial_loss)
        weight = torch.zeros((), device=rec.device)
        if self.training:
            weight = cfg.adversarial_weight * adaptive_weight(rec, g_loss, self.head.weight)
        metrics.update(
            discriminator=float(d_loss.detach()),
            generator_adversarial=float(g_loss.detach()),
            adaptive_weight=float(weight),
        )
        if not self.training:
            return torch.zeros((), device=rec.device)
        return d_loss + weight * g_loss


# ------------------------------------------------------------------------- registry entry


@torch.no_grad()
def codebook_scores(network: nn.Module, x: Tensor, batch_size: int = 64) -> dict[str, float]:
    """``val_codebook_usage`` (share of the codes that the windows ``x`` use) and
    ``val_perplexity`` (of their code frequencies) of a :class:`VQVAE`."""
    coder: Any = network
    device = next(network.parameters()).device
    codes = [coder.encode_codes(chunk.to(device)).cpu() for chunk in x.split(batch_size)]
    perplexity, usage = code_statistics(torch.cat(codes), int(coder.codebook_size))
    return {"val_codebook_usage": float(usage), "val_perplexity": float(perplexity)}


def _epoch_metrics(network: nn.Module, probe: EpochProbe) -> dict[str, float]:
    """Codebook usage and perplexity over the probe windows, and the output's scores: for a
    pair of variables the translation's SSIM, PSNR and MAE against the targets (model space,
    data range 1); otherwise the reconstruction scores of the VAE family in physical units
    (quantized MSE per bin and its top bins, tail quantiles), so that both compressors of a
    field rank on one scale."""
    from cloudburst.models.scoring import reconstructor_scores

    metrics = codebook_scores(network, probe.x)
    model: Any = network
    if probe.target is None:
        scores = reconstructor_scores(
            model, probe.x, probe.mask, probe.transform, probe.edges, prefix="val_"
        )
        metrics.update(scores.metrics)
        return metrics
    from cloudburst.evaluation.translation import image_scores

    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    with torch.no_grad():
        out = torch.cat([model.translate(c.to(device)).float().cpu() for c in probe.x.split(64)])
    network.train(was_training)
    scores = image_scores(out[:, 0], probe.target[:, 0], data_range=1.0)
    metrics.update({f"val_{k}": float(scores[k]) for k in ("ssim", "psnr", "mae")})
    return metrics


def _collapse_warning(cfg: VQVAEConfig, report: dict[str, float]) -> str | None:
    """Codebook collapse, said as soon as an epoch shows it."""
    usage = report.get("val_codebook_usage")
    perplexity = report.get("val_perplexity")
    if usage is None or perplexity is None:
        return None
    if usage >= COLLAPSE_USAGE and perplexity >= COLLAPSE_PERPLEXITY:
        return None
    used = round(usage * cfg.codebook_size)
    return (
        f"codebook collapse: {used} of {cfg.codebook_size} codes in use ({usage:.1%}), code "
        f"perplexity {perplexity:.2f}; the code carries little information. Set model.ema: "
        "true, lower model.dead_code_steps (unused codes restart sooner) or lower "
        "model.code_dim."
    )


FAMILY = ModelFamily(
    name="vqvae",
    config=VQVAEConfig,
    build=VQVAE,
    roles=frozenset({Trainable, Reconstructor, Translator, DiscreteCoder}),
    scenarios=frozenset(),
    learning_rate=lambda _cfg: LEARNING_RATE,
    tags=lambda cfg: {
        "loss": cfg.loss,
        "codebook_size": cfg.codebook_size,
        "code_dim": cfg.code_dim,
        "downsample": cfg.downsample,
        "ema": cfg.ema,
        "adversarial_weight": cfg.adversarial_weight,
    },
    epoch_metrics=_epoch_metrics,
    epoch_warning=_collapse_warning,
    small={
        "codebook_size": 64,
        "code_dim": 16,
        "widths": (8, 16),
        "downsample": 2,
        "residual_blocks": 1,
        "discriminator_width": 8,
        "discriminator_layers": 2,
    },
    metrics=(
        "val_codebook_usage",
        "val_perplexity",
        "val_qmse_top5",
        "val_qmse_top10",
        "val_q0.99_error",
        "val_q0.999_error",
        "val_ssim",
        "val_psnr",
        "val_mae",
    ),
    description=(
        "A vector-quantised autoencoder (VQ-VAE): windows are encoded to codes of a learnt "
        "codebook and decoded back. Trained on a pair of variables it translates one into the "
        "other (e.g. infrared bands to nighttime visible satellite imagery); trained on one "
        "variable it compresses the field to discrete codes. It has no prior over codes, so "
        "it does not sample and serves no ensemble scenario."
    ),
)
