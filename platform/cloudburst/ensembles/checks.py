"""What an ensemble request is checked against before anything is drawn: the model family's
scenarios, roles and sampler settings (:func:`check_kind`), and, from a registered version's
tags alone, a condition's store and window (:func:`check_request`, which the endpoint runs
before it loads the model). A refusal is an :class:`EnsembleError` naming the fix."""

from __future__ import annotations

import numpy as np

from cloudburst import storage
from cloudburst.ensembles.condition import ConditionError, read_condition
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.roles import ConditionalSampler, LatentModel, NoiseSteerable

__all__ = ["EnsembleError", "check_kind", "check_request", "steerable", "steered_size"]


class EnsembleError(ValueError):
    """The request cannot be served as asked (scenario unsupported, threshold unreachable...)."""


def check_kind(request: EnsembleRequest, kind: str, uri: str) -> None:
    """Refuse a scenario or setting that the model family ``kind`` cannot serve."""
    s = request.scenario
    try:
        entry = registry.family(kind)
    except ValueError:
        raise EnsembleError(
            f"{uri} is a {kind} model, a family this server does not know "
            f"(known: {', '.join(registry.names())})"
        ) from None
    if s.kind not in entry.scenarios:
        served = (
            ", ".join(k for k in registry.SCENARIOS if k in entry.scenarios)
            or "none (it does not sample)"
        )
        others = sorted(
            f.name for f in registry.families() if s.kind in f.scenarios and f.name != kind
        )
        hint = f"; {s.kind} is served by {', '.join(others)} models" if others else ""
        raise EnsembleError(f"{uri} is a {kind} model: its scenarios are {served}{hint}")
    if s.proposal == "fitted" and LatentModel not in entry.roles:
        if not steerable(entry.roles):
            raise EnsembleError(f"{uri} is a {kind} model: its draws cannot be steered")
        if s.conditional:
            raise EnsembleError(
                f"the fitted proposal of a {kind} model serves unconditional extremes; "
                f"steer a {s.kind} with proposal shift or tail"
            )
    if s.steered and s.conditional and not steerable(entry.roles):
        raise EnsembleError(
            f"{uri} is a {kind} model: it cannot steer a {s.kind}'s draws (proposal "
            f"{s.proposal}); use proposal prior"
        )
    if not entry.sampler_settings and (request.steps is not None or request.sampler is not None):
        raise EnsembleError(
            f"steps and sampler apply to models with an iterative sampler; {uri} is a "
            f"{kind} model (remove them from the request)"
        )


def steerable(roles: frozenset[type]) -> bool:
    """Whether a family with ``roles`` can steer a sampler's initial noise."""
    return NoiseSteerable in roles and ConditionalSampler in roles


def steered_size(packaged: PrecipitationModel) -> int | None:
    """How many numbers a shift direction has for this model: its latent size, or the
    initial noise of one window (time x y x x) of a steerable sampler; None if it cannot be
    steered."""
    if packaged.plays(LatentModel):
        return int(packaged.network(LatentModel).latent_size)
    if steerable(packaged.family.roles):
        return int(np.prod(packaged.window))
    return None


def check_request(request: EnsembleRequest, tags: dict[str, str], uri: str) -> None:
    """What can be checked before the model is loaded, from its version's tags (model kind,
    window, units): the scenario against the model, and a condition's store and window."""
    kind = tags.get("model")
    if not kind:
        return
    check_kind(request, kind, uri)
    s = request.scenario
    try:
        window = tuple(int(n) for n in tags.get("window", "").split("x"))
    except ValueError:
        return
    if s.conditional and len(window) == 3:
        options = storage.options_from(s.condition.data, request.storage) if s.condition else None
        try:
            read_condition(s, window, tags.get("units", ""), options)  # type: ignore[arg-type]
        except ConditionError as exc:
            raise EnsembleError(str(exc)) from None
