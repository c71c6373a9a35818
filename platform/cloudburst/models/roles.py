"""The roles a model plays, as small runtime-checkable Protocols, and the typed condition.

A model family declares its roles in its registry entry (:mod:`cloudburst.models.registry`);
code that needs a role asks for it with :func:`require` (or :func:`plays`), never by probing
for attribute names. A declared role is also checked structurally (``isinstance`` against the
Protocol), so a family cannot claim a role its networks do not implement; a role that is
implemented but not declared is not played: a VQ-VAE encodes and decodes (a
:class:`DiscreteCoder`) but is not a :class:`LatentModel` (its code is discrete, it has no
prior over codes, so it does not sample either).

Conventions shared by every role: tensors are (batch, channel, time, y, x) with one channel;
"model space" is what the training loader yields for the store: precipitation mapped to
[0, 1] (``data.scaling: unit``) or [-1, 1] (``symmetric``) by the data transformation that
the packaged model carries; physical units exist only in :mod:`cloudburst.models.package`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "ROLES",
    "Condition",
    "ConditionalSampler",
    "DiscreteCoder",
    "Generative",
    "LatentModel",
    "NoiseSteerable",
    "Reconstructor",
    "RoleError",
    "Trainable",
    "TransformedInput",
    "Translator",
    "role_name",
]


class RoleError(TypeError):
    """A model was asked for a role its family does not play; the message names the role."""


@dataclass(frozen=True)
class Condition:
    """Observed values a conditional sampler keeps (reconstruction guidance).

    ``known``: (n, 1, time, y, x) float, model space, any value where ``mask`` is False;
    ``mask``: bool of the same shape, True where the value is known; ``guidance``: the
    reconstruction-guidance weight w_r >= 0 (0 is plain imputation).
    """

    known: Tensor
    mask: Tensor
    guidance: float = 0.0

    def __post_init__(self) -> None:
        if tuple(self.known.shape) != tuple(self.mask.shape):
            raise ValueError(
                f"condition: known {tuple(self.known.shape)} and mask {tuple(self.mask.shape)} "
                "must have the same shape (n, 1, time, y, x)"
            )
        if self.known.ndim != 5:
            raise ValueError(
                f"condition: known values must be (n, 1, time, y, x), got {self.known.ndim} dims"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"condition: mask must be bool, got {self.mask.dtype}")
        if not (math.isfinite(float(self.guidance)) and float(self.guidance) >= 0.0):
            raise ValueError(f"condition: guidance must be finite and >= 0, got {self.guidance}")

    def to(self, device: torch.device | str) -> Condition:
        """The same condition with its tensors on ``device``."""
        return Condition(self.known.to(device), self.mask.to(device), self.guidance)

    def expand(self, n: int) -> Condition:
        """A condition of one window (batch 1) repeated for ``n`` rows (no copy)."""
        shape = (int(n), *self.known.shape[1:])
        return Condition(self.known.expand(shape), self.mask.expand(shape), self.guidance)


@runtime_checkable
class Trainable(Protocol):
    """A network trained by minimising its own loss.

    ``loss(batch)``: ``batch["x"]`` (n, 1, time, y, x) float in model space and
    ``batch["mask"]`` bool alike (True = valid value) -> (scalar loss tensor with gradients,
    dict of float metrics for logging, ``"loss"`` among them).

    A batch of paired windows (translation) also holds ``batch["target"]`` (n, 1, time, y, x)
    float in the target variable's model space and, optionally, ``batch["target_mask"]`` bool
    alike (absent: ``batch["mask"]`` applies to the target too); a family that translates
    learns to map ``x`` to ``target``, the others ignore both keys.
    """

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]: ...


@runtime_checkable
class Generative(Protocol):
    """Draws windows unconditionally.

    ``sample(n, generator)`` -> (n, 1, time, y, x) float in model space, every random number
    drawn from ``generator`` (a CPU ``torch.Generator``; None: torch's global stream), on the
    device of the model's parameters.
    """

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


@runtime_checkable
class LatentModel(Protocol):
    """A Gaussian latent-variable model: prior z ~ N(0, I) of ``latent_size`` dimensions.

    ``encode(x)``: (n, 1, time, y, x) model space -> (mean, log-variance), each
    (n, latent_size), of the Gaussian posterior q(z | x); ``decode(z)``: (n, latent_size)
    -> (n, 1, time, y, x) model space (the decoder mean). Latent proposals of extreme
    scenarios, posterior ensembles and latent interpolation rely on this.
    """

    @property
    def latent_size(self) -> int: ...

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class Reconstructor(Protocol):
    """A deterministic reconstruction: ``reconstruct(x)`` (n, 1, time, y, x) model space ->
    the same shape, model space."""

    def reconstruct(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Translator(Protocol):
    """Maps windows of one variable to windows of another (e.g. infrared to visible).

    ``translate(x)``: (n, 1, time, y, x) in the model space of the input variable -> (n, 1,
    time, y, x) in the model space of the target variable, deterministic, the same shape.
    """

    def translate(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class DiscreteCoder(Protocol):
    """Compresses windows to integer codes of a finite codebook and back.

    ``encode_codes(x)``: (n, 1, time, y, x) model space -> int64 (n, time', y', x'), each
    in [0, codebook_size); ``decode_codes(indices)``: int64 (n, time', y', x') -> (n, 1,
    time'', y'', x'') model space (the network's downsampling undone, so a window whose sizes
    its factors divide comes back at its own shape); ``codebook_size``: the number of codes;
    ``codebook_vectors()``: float32 (codebook_size, code_dim), code k's vector in row k (what
    a codes store keeps beside the codes).
    """

    @property
    def codebook_size(self) -> int: ...

    def codebook_vectors(self) -> Tensor: ...

    def encode_codes(self, x: Tensor) -> Tensor: ...

    def decode_codes(self, indices: Tensor) -> Tensor: ...


@runtime_checkable
class ConditionalSampler(Protocol):
    """Draws windows that keep given values (interpolation, forecast, extension).

    ``sample(n, generator, condition, *, generators, steps, sampler, initial)`` -> (n, 1,
    time, y, x) model space. ``condition`` (a :class:`Condition` of n rows, or None:
    unconditional) gives known values that the result keeps; ``generators`` (one CPU
    generator per row) draw each row's noise from its own stream, so a row does not depend on
    the others; ``steps`` and ``sampler`` override the model's sampler settings (None: its
    own); ``initial`` (n, 1, time, y, x) float is the sampler's initial noise z_1 ~ N(0, I)
    when given (then the generators draw only the other noise).
    """

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        condition: Condition | None = None,
        *,
        generators: list[torch.Generator] | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        initial: Tensor | None = None,
    ) -> Tensor: ...


@runtime_checkable
class NoiseSteerable(Protocol):
    """A sampler whose initial noise z_1 ~ N(0, I) can be steered towards extremes.

    ``extreme_direction(condition, *, draws, steps)`` -> (1, time, y, x) float tensor of unit
    norm: the direction in z_1 along which the sample's extremes grow on average (the gradient
    of a smooth tail statistic of the sample, over the values ``condition`` leaves unknown,
    averaged over ``draws`` fixed draws, through ``steps`` deterministic sampler steps). A
    model property: the same on every process for the same condition.
    """

    def extreme_direction(
        self, condition: Condition | None = None, *, draws: int = 4, steps: int = 10
    ) -> Tensor: ...


@runtime_checkable
class TransformedInput(Protocol):
    """A network that maps the loader's [0, 1] windows through its own (possibly learnt)
    transformation: ``to_model_space(u)`` -> its internal space (same shape)."""

    def to_model_space(self, u: Tensor) -> Tensor: ...


ROLES: tuple[type, ...] = (
    Trainable,
    Generative,
    LatentModel,
    Reconstructor,
    ConditionalSampler,
    NoiseSteerable,
    TransformedInput,
    Translator,
    DiscreteCoder,
)

R = TypeVar("R")


def role_name(role: type) -> str:
    """The role's name and the first line of its docstring, for messages."""
    doc = (role.__doc__ or "").strip().splitlines()
    return f"{role.__name__} ({doc[0].rstrip('.')})" if doc else role.__name__


def implements(obj: Any, role: type) -> bool:
    """Whether ``obj`` has the members of ``role`` (structural check only)."""
    return isinstance(obj, role)
