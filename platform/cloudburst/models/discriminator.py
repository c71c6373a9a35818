"""A patch discriminator and the adversarial terms of the VQ-VAE (the VQGAN recipe: Esser et
al., "Taming transformers for high-resolution image synthesis"), trained by the single
optimizer of the training loop.

The training loop makes one optimizer over all of a network's parameters and minimises the one
scalar that ``Trainable.loss(batch)`` returns. A GAN has two players with opposite goals, so
the scalar is the SUM of two terms that each reach only their own side:

- the discriminator's loss is computed on DETACHED reconstructions (:func:`discriminator_loss`
  of ``discriminator(real)`` and ``discriminator(fake.detach())``): its gradient reaches the
  discriminator's parameters and nothing of the generator;
- the generator's adversarial term is computed through the discriminator with its parameters
  DETACHED (:meth:`PatchDiscriminator.frozen`, a ``torch.func.functional_call`` with detached
  parameters): its gradient flows through the discriminator into the reconstruction, and from
  there to the decoder, quantiser and encoder, and leaves the discriminator's parameters alone.

One backward pass of the sum then gives each side the gradient of its own objective, and one
optimizer step moves both, as alternating GAN updates would (with the same learning rate).

The generator's term is weighted adaptively (:func:`adaptive_weight`): the ratio of the norms
of the gradients of the reconstruction loss and of the adversarial loss at the decoder's last
layer, clamped and detached, so neither term swamps the other whatever their scales; times the
configured weight (0.2 in the satellite VQ-VAE). Tensors are (n, C, time, y, x); 3D convolutions
with kernel 3 and padding 1 in time keep a single time step (images, t = 1) working.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

__all__ = [
    "AdversarialKind",
    "PatchDiscriminator",
    "adaptive_weight",
    "discriminator_loss",
    "generator_loss",
]

log = logging.getLogger(__name__)

AdversarialKind = Literal["hinge", "non_saturating"]


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class PatchDiscriminator(nn.Module):
    """Real-or-fake logits for overlapping patches of (n, channels, time, y, x) windows.

    conv k3 (width) -> LeakyReLU -> [conv k3 stride (1, 2, 2) (width * 2^k) -> GroupNorm ->
    LeakyReLU] x ``layers`` -> conv k3 -> 1 logit per patch, (n, 1, time, y', x'), with
    y' = ceil(y / 2^layers). Time is never strided. GroupNorm, not BatchNorm: running
    statistics would be updated by the generator's pass too.
    """

    def __init__(self, channels: int = 1, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        if channels < 1 or width < 1 or layers < 0:
            raise ValueError(
                f"discriminator needs channels >= 1, width >= 1, layers >= 0; got "
                f"{channels}, {width}, {layers}"
            )
        blocks: list[nn.Module] = [nn.Conv3d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        cur = width
        for k in range(layers):
            out = width * 2 ** min(k + 1, 3)
            blocks += [
                nn.Conv3d(cur, out, 3, stride=(1, 2, 2), padding=1),
                nn.GroupNorm(_groups(out), out),
                nn.LeakyReLU(0.2),
            ]
            cur = out
        blocks.append(nn.Conv3d(cur, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def frozen(self, x: Tensor) -> Tensor:
        """The logits of ``x`` with the parameters detached: the gradient reaches ``x`` only
        (the generator's view of the discriminator)."""
        params = {name: p.detach() for name, p in self.named_parameters()}
        buffers = dict(self.named_buffers())
        return functional_call(self, {**params, **buffers}, (x,))


def discriminator_loss(real: Tensor, fake: Tensor, kind: AdversarialKind = "hinge") -> Tensor:
    """The discriminator's loss from its logits on real and on (detached) generated windows.

    hinge: (mean relu(1 - real) + mean relu(1 + fake)) / 2; non_saturating: (mean
    softplus(-real) + mean softplus(fake)) / 2, the binary cross-entropy with labels real 1,
    fake 0. float32.
    """
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"unknown adversarial loss {kind!r}; allowed: hinge, non_saturating")


def generator_loss(fake: Tensor, kind: AdversarialKind = "hinge") -> Tensor:
    """The generator's adversarial loss from the (frozen) discriminator's logits on its
    windows: hinge -mean(fake); non_saturating mean softplus(-fake). float32."""
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown adversarial loss {kind!r}; allowed: hinge, non_saturating")


def adaptive_weight(
    reconstruction: Tensor, adversarial: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """||grad_L reconstruction|| / (||grad_L adversarial|| + 1e-4) at the decoder's last-layer
    weight ``last_layer``, clamped to [0, ``max_weight``] and detached (a float32 scalar).

    Where no gradient can be taken (evaluation under ``torch.no_grad``, or a loss that does
    not reach ``last_layer``) the weight is 0: validation losses then leave the adversarial
    term out, as they cannot weigh it.
    """
    zero = torch.zeros((), device=last_layer.device)
    if not (torch.is_grad_enabled() and reconstruction.requires_grad and adversarial.requires_grad):
        return zero
    g_rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True, allow_unused=True)[0]
    g_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True, allow_unused=True)[0]
    if g_rec is None or g_adv is None:
        return zero
    weight = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    return weight.clamp(0.0, float(max_weight)).detach()
