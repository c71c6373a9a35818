"""Model families by name: one entry each holds everything the platform needs to know.

A family is registered once (:func:`register`) with a :class:`ModelFamily`: its config
section (a pydantic model with ``kind: Literal[NAME]``, which becomes one member of the
training job's ``model`` union), its builder, the roles its networks play
(:mod:`cloudburst.models.roles`), the ensemble scenarios it serves, its registry tags, its
default learning rate and the extra metrics it reports each epoch. Training, packaging,
evaluation, ensembles and the endpoint read the entry; none of them names a family.

Adding a family is one module with its network and one ``register(ModelFamily(...))`` call
(see docs/how-to/add-model.md). The built-in families (``vae``, ``diffusion``, ``vqvae``) are
registered on first use, and so are the families of other packages: modules named in the
environment variable ``CLOUDBURST_MODEL_FAMILIES`` (comma-separated; ``module`` registers on
import, ``module:ATTR`` names a :class:`ModelFamily`) and entry points of the group
``cloudburst.models``. Training workers import the same modules as their driver.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from torch import nn

from cloudburst.models.roles import (
    ConditionalSampler,
    Generative,
    LatentModel,
    NoiseSteerable,
    RoleError,
    Trainable,
    implements,
    role_name,
)

__all__ = [
    "SCENARIOS",
    "EpochProbe",
    "ModelFamily",
    "build",
    "family",
    "families",
    "load_plugins",
    "names",
    "plugin_modules",
    "plays",
    "register",
    "require",
    "unregister",
]

log = logging.getLogger(__name__)

SCENARIOS = ("unconditional", "extreme", "interpolation", "forecast", "extension")
# the roles a scenario needs from the network (one of them), beside the family declaring it:
# extremes steer a latent model's code or a sampler's initial noise
SCENARIO_ROLES: dict[str, tuple[type, ...]] = {
    "unconditional": (Generative,),
    "extreme": (LatentModel, NoiseSteerable),
    "interpolation": (ConditionalSampler,),
    "forecast": (ConditionalSampler,),
    "extension": (ConditionalSampler,),
}

R = TypeVar("R")


@dataclass(frozen=True)
class EpochProbe:
    """What a family's per-epoch metrics see: fixed validation windows of one rank.

    ``x``: (n, 1, time, y, x) model space, ``mask``: bool alike, ``transform``: the data
    transformation (model space <-> physical units), ``edges``: the store's histogram edges
    in physical units, ``epoch``: the epoch being scored (from 0; training sets it each
    epoch, so a family may score only every k-th epoch); ``target``: for a model trained on
    a pair of variables, the target windows (n, 1, time, y, x) in the target's model space,
    else None.
    """

    x: Any
    mask: Any
    transform: Any
    edges: Any
    epoch: int = 0
    target: Any = None


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    - ``name``: what ``model.kind`` says in a job config and ``model`` in a package;
    - ``config``: its config section, a pydantic model whose ``kind`` field is
      ``Literal[name]`` with that default;
    - ``build(config, window)``: the network for windows (time, y, x);
    - ``roles``: the role Protocols its networks play (:mod:`cloudburst.models.roles`);
    - ``scenarios``: ensemble scenario kinds it serves (each needs its role, see
      ``SCENARIO_ROLES``); empty for a family that does not sample (a VQ-VAE);
    - ``learning_rate(config)``: the default when ``train.lr`` is not given;
    - ``tags(config)``: registry version tags beside model, window, transform and units;
    - ``epoch_metrics(network, probe)``: extra validation metrics each epoch (names
      prefixed ``val_``), in physical units so that trials of a sweep rank on one scale
      (:mod:`cloudburst.models.scoring`), or None; ``probe.epoch`` says which epoch it is;
    - ``epoch_warning(config, report)``: a warning to log after an epoch's report, or None;
    - ``check_data(data)``: a reason the family cannot train on a ``DataConfig``, or None;
    - ``sampler_settings``: whether requests may set ``steps`` and ``sampler``;
    - ``metrics``: the names of the per-epoch validation metrics ``epoch_metrics`` reports
      (beside the losses): what a sweep may rank trials on;
    - ``small``: overrides of its config that make a network small enough for CPU tests
      and smoke runs;
    - ``description``: what the family is and what its models are for, a few sentences of
      Markdown: the description of its registered models in MLflow
      (:mod:`cloudburst.registry_notes`), or None.
    """

    name: str
    config: type[BaseModel]
    build: Callable[[Any, tuple[int, int, int]], nn.Module]
    roles: frozenset[type]
    scenarios: frozenset[str] = frozenset({"unconditional"})
    learning_rate: Callable[[Any], float] = field(default=lambda _cfg: 1e-4)
    tags: Callable[[Any], Mapping[str, Any]] = field(default=lambda _cfg: {})
    epoch_metrics: Callable[[nn.Module, EpochProbe], dict[str, float]] | None = None
    epoch_warning: Callable[[Any, dict[str, float]], str | None] | None = None
    check_data: Callable[[Any], str | None] | None = None
    sampler_settings: bool = False
    small: Mapping[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    description: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a model family name is a plain word, got {self.name!r}")
        kind = self.config.model_fields.get("kind")
        if kind is None or kind.default != self.name:
            raise ValueError(
                f"the config of family {self.name!r} needs a field "
                f'kind: Literal["{self.name}"] = "{self.name}"'
            )
        if Trainable not in self.roles:
            raise ValueError(f"family {self.name!r} must play Trainable (every model trains)")
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            raise ValueError(
                f"family {self.name!r}: unknown scenarios {sorted(unknown)}; "
                f"known: {', '.join(SCENARIOS)}"
            )
        for scenario in self.scenarios:
            needed = SCENARIO_ROLES[scenario]
            if not self.roles & set(needed):
                raise ValueError(
                    f"family {self.name!r} serves {scenario!r} but does not play "
                    f"{' or '.join(r.__name__ for r in needed)}, which that scenario needs"
                )

    def plays(self, role: type) -> bool:
        return role in self.roles

    def default_learning_rate(self, config: Any) -> float:
        lr = float(self.learning_rate(config))
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"family {self.name!r} gave a learning rate of {lr}")
        return lr


PLUGINS_ENV = "CLOUDBURST_MODEL_FAMILIES"
BUILTIN = ("vae", "diffusion", "vqvae")
ENTRY_POINT_GROUP = "cloudburst.models"

_FAMILIES: dict[str, ModelFamily] = {}
_LISTENERS: list[Callable[[], None]] = []
_PLUGIN_MODULES: list[str] = []
_plugins_loaded = False


def register(entry: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Make ``entry`` known (a job config may then say ``model: {kind: NAME, ...}``)."""
    _load_builtin()
    if entry.name in _FAMILIES and not replace and _FAMILIES[entry.name] is not entry:
        raise ValueError(f"a model family {entry.name!r} is already registered")
    _FAMILIES[entry.name] = entry
    _changed()
    return entry


def unregister(name: str) -> None:
    """Forget family ``name`` (built-in families cannot be removed)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in family")
    if _FAMILIES.pop(name, None) is not None:
        _changed()


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever the set of families changes (the job config's union)."""
    _LISTENERS.append(listener)


def _changed() -> None:
    for listener in _LISTENERS:
        listener()


def names(plugins: bool = True) -> list[str]:
    """Names of the registered families (with ``plugins``, after :func:`load_plugins`)."""
    return [f.name for f in families(plugins)]


def families(plugins: bool = True) -> list[ModelFamily]:
    """The registered families, by name (with ``plugins``, after :func:`load_plugins`)."""
    if plugins:
        load_plugins()
    _load_builtin()
    return [_FAMILIES[n] for n in sorted(_FAMILIES)]


def family(name: str) -> ModelFamily:
    """The entry of family ``name``; unknown names fail listing the known ones."""
    _load_builtin()
    if name not in _FAMILIES:
        load_plugins()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def build(name: str, config: Any, window: tuple[int, int, int]) -> nn.Module:
    """The network of family ``name`` for windows of shape (time, y, x)."""
    entry = family(name)
    if isinstance(config, Mapping):
        config = entry.config.model_validate({"kind": name, **dict(config)})
    return entry.build(config, tuple(int(n) for n in window))


def plays(name: str, role: type) -> bool:
    """Whether family ``name`` plays ``role``."""
    return family(name).plays(role)


def require(network: Any, name: str, role: type[R], *, what: str | None = None) -> R:
    """``network`` (of family ``name``) as ``role``; :class:`RoleError` naming the role when
    the family does not play it (or, a bug, its network lacks the role's members)."""
    entry = family(name)
    label = what or f"a {name!r} model"
    if not entry.plays(role):
        played = ", ".join(sorted(r.__name__ for r in entry.roles))
        raise RoleError(f"{label} does not play the role {role_name(role)}; it plays: {played}")
    if not implements(network, role):
        raise RoleError(
            f"{label} declares the role {role.__name__} but its network "
            f"{type(network).__name__} does not implement it"
        )
    return network  # type: ignore[return-value]


def load_plugins(modules: Iterable[str] = ()) -> list[str]:
    """Import the modules that register families: ``modules``, then (once per process) those
    of ``CLOUDBURST_MODEL_FAMILIES`` and the ``cloudburst.models`` entry points. Each is
    ``module`` (it registers itself on import) or ``module:ATTR`` (a :class:`ModelFamily`).
    Returns every plugin module imported so far in this process."""
    global _plugins_loaded
    _load_builtin()
    wanted = [m.strip() for m in modules if m and m.strip()]
    if not _plugins_loaded:
        _plugins_loaded = True
        wanted += [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        from importlib.metadata import entry_points

        wanted += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for spec in wanted:
        if spec in _PLUGIN_MODULES:
            continue
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(
                f"cannot import model family module {module_name!r} ({exc}); check "
                f"{PLUGINS_ENV} or the package that declares it"
            ) from None
        if attr:
            entry = getattr(module, attr, None)
            if not isinstance(entry, ModelFamily):
                raise ValueError(f"{spec} is not a ModelFamily")
            if _FAMILIES.get(entry.name) is not entry:
                register(entry)
        _PLUGIN_MODULES.append(spec)
    return list(_PLUGIN_MODULES)


def plugin_modules() -> list[str]:
    """The plugin modules imported in this process (for workers to import them too)."""
    return list(_PLUGIN_MODULES)


def _load_builtin() -> None:
    if "vae" not in _FAMILIES:
        from cloudburst.models.vae import FAMILY as vae_family

        _FAMILIES["vae"] = vae_family
    if "diffusion" not in _FAMILIES:
        from cloudburst.models.diffusion import FAMILY as diffusion_family

        _FAMILIES["diffusion"] = diffusion_family
    if "vqvae" not in _FAMILIES:
        from cloudburst.models.vqvae import FAMILY as vqvae_family

        _FAMILIES["vqvae"] = vqvae_family
