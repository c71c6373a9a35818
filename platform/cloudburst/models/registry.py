"""Models by name: a config names a model, the registry builds it for a window shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_BUILDERS: dict[str, Callable[[Any, tuple[int, int, int]], nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register("vae")`` on a builder ``(config, window) -> model``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[name] = builder
        return builder

    return wrap


def names() -> list[str]:
    _load_builtin()
    return sorted(_BUILDERS)


def build(name: str, config: Any, window: tuple[int, int, int]) -> nn.Module:
    """The model ``name`` for windows of shape (time, y, x)."""
    _load_builtin()
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](config, window)


def _load_builtin() -> None:
    if "vae" not in _BUILDERS:
        from cloudburst.models.vae import VAE

        register("vae")(VAE)
    if "diffusion" not in _BUILDERS:
        from cloudburst.models.diffusion import DiffusionModel

        register("diffusion")(DiffusionModel)
