"""Transformations between physical units and model space.

A transformation maps precipitation (mm/day or mm/h, >= 0) to what a model sees and back.
Every transformation has ``forward``, ``inverse`` and a JSON-able ``state()``; ``from_state``
rebuilds it, so a registered model carries the exact transformation it was trained with. The
learnt monotone transformation of the diffusion model implements the same interface.

Operations work on numpy arrays and torch tensors alike (elementwise arithmetic only).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from cloudburst.data.ingest import StoreStats


@runtime_checkable
class Transform(Protocol):
    """forward: physical -> model space; inverse: model space -> physical."""

    def forward(self, x: Any) -> Any: ...

    def inverse(self, y: Any) -> Any: ...

    def state(self) -> dict[str, Any]: ...


def _clip_low(x: Any, low: float) -> Any:
    if hasattr(x, "clamp"):  # a torch tensor (numpy arrays have no clamp)
        return x.clamp(min=low)
    return np.maximum(x, low)


class Identity:
    def forward(self, x: Any) -> Any:
        return x

    def inverse(self, y: Any) -> Any:
        return y

    def state(self) -> dict[str, Any]:
        return {"kind": "identity"}


class Sqrt:
    """Square root: compresses the heavy tail (the diffusion study's fixed transformation)."""

    def forward(self, x: Any) -> Any:
        return _clip_low(x, 0.0) ** 0.5

    def inverse(self, y: Any) -> Any:
        return _clip_low(y, 0.0) ** 2

    def state(self) -> dict[str, Any]:
        return {"kind": "sqrt"}


class Scale:
    """Affine map of [low, high] onto [0, 1] (``unit``) or [-1, 1] (``symmetric``)."""

    def __init__(self, low: float, high: float, target: str = "unit") -> None:
        if not high > low:
            raise ValueError(f"scale needs high > low (got low={low}, high={high})")
        if target not in ("unit", "symmetric"):
            raise ValueError(f"target must be 'unit' or 'symmetric' (got {target!r})")
        self.low, self.high, self.target = float(low), float(high), target

    def forward(self, x: Any) -> Any:
        u = (x - self.low) / (self.high - self.low)
        return u if self.target == "unit" else 2.0 * u - 1.0

    def inverse(self, y: Any) -> Any:
        u = y if self.target == "unit" else (y + 1.0) / 2.0
        return u * (self.high - self.low) + self.low

    def state(self) -> dict[str, Any]:
        return {"kind": "scale", "low": self.low, "high": self.high, "target": self.target}


class Chain:
    """Transformations applied in order (forward) and undone in reverse order (inverse)."""

    def __init__(self, *steps: Transform) -> None:
        self.steps = list(steps)

    def forward(self, x: Any) -> Any:
        for step in self.steps:
            x = step.forward(x)
        return x

    def inverse(self, y: Any) -> Any:
        for step in reversed(self.steps):
            y = step.inverse(y)
        return y

    def state(self) -> dict[str, Any]:
        return {"kind": "chain", "steps": [s.state() for s in self.steps]}


_KINDS: dict[str, Any] = {
    "identity": lambda s: Identity(),
    "sqrt": lambda s: Sqrt(),
    "scale": lambda s: Scale(s["low"], s["high"], s.get("target", "unit")),
    "chain": lambda s: Chain(*(from_state(x) for x in s["steps"])),
}


def register(kind: str, factory: Any) -> None:
    """Make ``from_state`` understand another kind (e.g. a learnt transformation)."""
    _KINDS[kind] = factory


def from_state(state: dict[str, Any]) -> Transform:
    kind = state.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown transformation kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind](state)


def for_data(
    stats: StoreStats, scaling: str = "unit", transform: str = "none", upper: float | None = None
) -> Transform:
    """Optional fixed transformation, then scaling of [0, max] (or [0, ``upper``]).

    A variable of a several-variable store (its statistics carry a minimum: counts,
    radiances) is scaled from its own [min, max] instead, without a transformation.
    """
    high = float(upper if upper is not None else stats.max) or 1.0
    if transform == "sqrt":
        return Chain(Sqrt(), Scale(0.0, high**0.5, scaling))
    if transform != "none":
        raise ValueError(f"unknown transformation {transform!r}; use 'none' or 'sqrt'")
    if stats.min is not None:
        low = float(stats.min)
        high = float(upper if upper is not None else stats.max)
        return Scale(low, high if high > low else low + 1.0, scaling)
    return Scale(0.0, high, scaling)
