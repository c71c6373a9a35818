"""A sweep's search space: one domain per dotted key of the training config.

A domain is a mapping told apart by ``type`` (a discriminated union, checked before any trial
starts):

- ``{type: choice, values: [...]}``: one of the values, drawn at random (or by the search
  algorithm);
- ``{type: grid, values: [...]}``: every value, each in its own trial (times ``samples``);
- ``{type: uniform, low: A, high: B}`` and ``{type: loguniform, low: A, high: B}`` (0 < A);
- ``{type: randint, low: A, high: B}``: an integer in [A, B).

Keys are dotted paths into the training config (``model.bins``, ``train.lr``,
``model.masking``): :func:`check_keys` walks the base config along each and names the first
part that does not exist, with the fields that do.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from cloudburst.schema import Strict

__all__ = [
    "Choice",
    "Domain",
    "Grid",
    "LogUniform",
    "RandInt",
    "SpaceError",
    "Uniform",
    "check_keys",
    "points",
    "to_tune",
]


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the key and the fix."""


class Choice(Strict):
    type: Literal["choice"] = Field(
        description="`choice`: one of `values` per trial, drawn at random (or by the search "
        "algorithm)"
    )
    values: list[Any] = Field(min_length=1, description="the values to choose from, at least one")


class Grid(Strict):
    type: Literal["grid"] = Field(
        description="`grid`: every value, each in its own trial (times `samples`)"
    )
    values: list[Any] = Field(min_length=1, description="the values of the grid, at least one")


class Uniform(Strict):
    type: Literal["uniform"] = Field(
        description="`uniform`: a float drawn uniformly in [low, high]"
    )
    low: float = Field(description="lower end of the range (finite, below `high`)")
    high: float = Field(description="upper end of the range (finite)")

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError("uniform needs finite low < high")
        return self


class LogUniform(Strict):
    type: Literal["loguniform"] = Field(
        description="`loguniform`: a float in [low, high] whose logarithm is uniform"
    )
    low: float = Field(description="lower end of the range (above 0, below `high`)")
    high: float = Field(description="upper end of the range (finite)")

    @model_validator(mode="after")
    def _ordered(self) -> LogUniform:
        if not (0 < self.low < self.high and math.isfinite(self.high)):
            raise ValueError("loguniform needs 0 < low < high (finite)")
        return self


class RandInt(Strict):
    type: Literal["randint"] = Field(description="`randint`: an integer in [low, high)")
    low: int = Field(description="smallest value drawn (included)")
    high: int = Field(description="end of the range (excluded), above `low`")

    @model_validator(mode="after")
    def _ordered(self) -> RandInt:
        if not self.low < self.high:
            raise ValueError("randint needs low < high (high excluded)")
        return self


Domain = Annotated[Choice | Grid | Uniform | LogUniform | RandInt, Field(discriminator="type")]


def to_tune(domain: Choice | Grid | Uniform | LogUniform | RandInt) -> Any:
    """The Ray Tune search-space object of ``domain``."""
    from ray import tune

    if isinstance(domain, Grid):
        return tune.grid_search(list(domain.values))
    if isinstance(domain, Choice):
        return tune.choice(list(domain.values))
    if isinstance(domain, Uniform):
        return tune.uniform(domain.low, domain.high)
    if isinstance(domain, LogUniform):
        return tune.loguniform(domain.low, domain.high)
    return tune.randint(domain.low, domain.high)


def check_keys(base: BaseModel, space: dict[str, Any]) -> None:
    """Raise :class:`SpaceError` for the first key of ``space`` that is not a field path of
    ``base`` (a validated config): the error names the key, the missing part and what the
    section holds."""
    for key in space:
        node: Any = base
        walked: list[str] = []
        for part in key.split("."):
            if isinstance(node, BaseModel):
                fields = type(node).model_fields
                if part not in fields:
                    where = ".".join(walked) or "the config"
                    raise SpaceError(
                        f"search space key {key!r}: {where} has no field {part!r}; its fields: "
                        f"{', '.join(sorted(fields))}"
                    )
                node = getattr(node, part)
            elif isinstance(node, dict):
                node = node.get(part)
            else:
                raise SpaceError(
                    f"search space key {key!r}: {'.'.join(walked)} is a value "
                    f"({type(node).__name__}), not a section"
                )
            walked.append(part)


def points(
    space: dict[str, Choice | Grid | Uniform | LogUniform | RandInt], count: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Points of ``space`` to check before a sweep: every combination of the grid and choice
    values (up to ``count``), continuous domains at their ends and a random draw."""
    rng = random.Random(seed)
    options: dict[str, list[Any]] = {}
    for key, domain in space.items():
        if isinstance(domain, Choice | Grid):
            options[key] = list(domain.values)
        elif isinstance(domain, RandInt):
            options[key] = sorted(
                {domain.low, domain.high - 1, rng.randrange(domain.low, domain.high)}
            )
        else:
            draw = (
                math.exp(rng.uniform(math.log(domain.low), math.log(domain.high)))
                if isinstance(domain, LogUniform)
                else rng.uniform(domain.low, domain.high)
            )
            options[key] = [domain.low, draw, domain.high]
    keys = list(options)
    out = []
    for combo in itertools.islice(itertools.product(*(options[k] for k in keys)), count):
        out.append(dict(zip(keys, combo, strict=True)))
    return out
