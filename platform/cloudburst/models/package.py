"""A packaged model: a trained network plus what maps its outputs to physical units.

:class:`PrecipitationModel` holds the network of a registered family, the family's config
section, the window shape (time, y, x), the data transformation (physical <-> model space,
its state stored) and the store statistics. On disk it is a folder with ``weights.pt`` (the
state_dict) and ``cloudburst-model.json`` (the rest); :mod:`cloudburst.tracking` puts that
folder into MLflow. Everything here works in physical units (the store's, e.g. mm/h), with
arrays (n, time, y, x) float32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from cloudburst.data import transforms as transforms_mod
from cloudburst.data.ingest import StoreStats
from cloudburst.data.transforms import Transform
from cloudburst.models import dry, registry
from cloudburst.models.roles import (
    Condition,
    ConditionalSampler,
    Generative,
    Reconstructor,
    Translator,
)

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "PrecipitationModel",
    "TargetField",
    "config_dict",
    "family_config",
]

log = logging.getLogger(__name__)

METADATA_FILE = "cloudburst-model.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1


def config_dict(config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """A config section as plain JSON-able values."""
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return json.loads(json.dumps(dict(config)))


def family_config(name: str, config: Mapping[str, Any]) -> BaseModel:
    """The config object of family ``name`` from its JSON form (``kind`` may be absent, as in
    packages written before the model section had one)."""
    entry = registry.family(name)
    return entry.config.model_validate({**dict(config), "kind": name})


@dataclass(frozen=True)
class TargetField:
    """The variable a translating model predicts: its name, its transformation (physical ->
    model space, as the input's) and its statistics (JSON form)."""

    variable: str
    transform: Transform
    stats: dict[str, Any] | None = None


class PrecipitationModel:
    """A trained network plus what maps its outputs to physical units.

    ``model``: the torch module (kept in eval mode); ``name``: its family
    (:func:`cloudburst.models.registry.family`); ``config``: the family's config section;
    ``window``: (time, y, x); ``transform``: physical -> model space (``state()`` is stored);
    ``stats``: the store's ``StoreStats`` (dict or object, may be None);
    ``dry_threshold``: physical values below it come out as exactly 0 (None: no threshold;
    see :mod:`cloudburst.models.dry`). It is part of the package: saved, loaded, tagged.

    A model trained on a pair of variables (``data.input`` -> ``data.target``, e.g. infrared
    to visible imagery) also has ``input_variable`` and ``target``: the target variable's
    name, its transformation (its model space -> its physical units) and its statistics;
    ``transform`` and ``stats`` are then the input variable's.

    ``uri``: where the package was loaded from (:func:`cloudburst.tracking.load_model` records
    it; None for a package made in this process). It is provenance only, never saved.

    The numpy methods (``sample``, ``reconstruct``, ``translate``) have labelled twins
    (``sample_array``, ``reconstruct_array``, ``translate_array``) giving
    :class:`xarray.DataArray` with dims, coordinates, CF units and the model's provenance;
    see :mod:`cloudburst.models.arrays`.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        config: BaseModel | Mapping[str, Any],
        window: tuple[int, int, int],
        transform: Transform,
        stats: StoreStats | Mapping[str, Any] | None = None,
        dry_threshold: float | None = None,
        *,
        input_variable: str | None = None,
        target: TargetField | None = None,
    ) -> None:
        self.model = model.eval()
        self.input_variable = input_variable
        self.target = target
        self.name = name
        self.family = registry.family(name)
        self.config = config_dict(config)
        self.window = tuple(int(n) for n in window)
        if len(self.window) != 3:
            raise ValueError(f"window must be (time, y, x), got {window!r}")
        self.transform = transform
        if isinstance(stats, StoreStats):
            stats = stats.to_dict()
        self.stats: dict[str, Any] | None = (
            json.loads(json.dumps(dict(stats))) if stats is not None else None
        )
        if dry_threshold is not None and not (float(dry_threshold) >= 0.0):
            raise ValueError(f"dry_threshold must be >= 0 or None, got {dry_threshold}")
        self.dry_threshold = None if dry_threshold is None else float(dry_threshold)
        self.uri: str | None = None

    # ------------------------------------------------------------------------- roles

    def plays(self, role: type) -> bool:
        """Whether the packaged network plays ``role`` (its family declares it)."""
        return self.family.plays(role)

    def network(self, role: type[registry.R]) -> registry.R:
        """The network as ``role``; :class:`~cloudburst.models.roles.RoleError` naming the
        role when the family does not play it."""
        return registry.require(self.model, self.name, role, what=f"a {self.name!r} model")

    # --------------------------------------------------------------- physical-unit interface

    @property
    def units(self) -> str:
        return str((self.stats or {}).get("units", ""))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` generated windows, float32 (n, time, y, x) in physical units (>= 0)."""
        if int(n) < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        net = self.network(Generative)
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            y = net.sample(int(n), generator=generator)
        return self.to_physical(y)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        """The reconstruction of physical windows (n, time, y, x), physical.

        NaN (missing values) are filled with 0 in physical units before the transformation,
        as the training loader does; a :class:`Reconstructor` fills them in with its
        deterministic reconstruction. A model that only generates conditionally (a
        :class:`ConditionalSampler`) instead fills the NaN by sampling conditioned on the
        rest (reconstruction guidance with the config's ``guidance``) and keeps the known
        values. A single window (time, y, x) gives a single window back.
        """
        arr = np.asarray(x, dtype=np.float32)
        single = arr.ndim == 3
        if single:
            arr = arr[None]
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.window:
            raise ValueError(
                f"expected windows of shape (n, {', '.join(map(str, self.window))}) "
                f"(n, time, y, x) in physical units, got {tuple(np.shape(x))}"
            )
        filled = np.where(np.isnan(arr), np.float32(0.0), arr)
        model_space = np.asarray(self.transform.forward(filled), dtype=np.float32)
        model_space = np.nan_to_num(model_space, nan=0.0)
        tensor = torch.from_numpy(np.ascontiguousarray(model_space))[:, None].to(self.device)
        if self.plays(Reconstructor):
            with torch.no_grad():
                out = self.to_physical(self.network(Reconstructor).reconstruct(tensor))
        else:
            out = self.complete(arr, tensor)
        return out[0] if single else out

    def translate(self, x: np.ndarray) -> np.ndarray:
        """The target variable for physical windows (n, time, y, x) of the input variable, in
        the target's physical units, float32 alike (a model trained on a pair only). NaN in
        the input are filled with its minimum before the transformation."""
        if self.target is None:
            raise ValueError(
                f"this {self.name!r} model was not trained on a pair of variables "
                "(data.input and data.target); it has nothing to translate to"
            )
        net = self.network(Translator)
        arr = np.asarray(x, dtype=np.float32)
        single = arr.ndim == 3
        if single:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"expected windows (n, time, y, x), got {tuple(np.shape(x))}")
        low = float((self.stats or {}).get("min") or 0.0)
        filled = np.where(np.isnan(arr), np.float32(low), arr)
        model_space = np.asarray(self.transform.forward(filled), dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(model_space))[:, None].to(self.device)
        with torch.no_grad():
            y = net.translate(tensor).detach().float().cpu().numpy()[:, 0]
        out = np.asarray(self.target.transform.inverse(y), dtype=np.float32)
        return out[0] if single else out

    # ------------------------------------------------------------ labelled (xarray) results

    def sample_array(self, n: int, seed: int = 0) -> xr.DataArray:
        """:meth:`sample` as an ``xarray.DataArray`` (sample, time, y, x) named ``precip``,
        with coordinates, CF units and provenance (the seed too)."""
        from cloudburst.models import arrays

        return arrays.sample_array(self, n, seed)

    def reconstruct_array(self, x: xr.DataArray | np.ndarray) -> xr.DataArray:
        """:meth:`reconstruct` of windows ((n,) time, y, x) as an ``xarray.DataArray``; a
        DataArray input keeps its dims and coordinates."""
        from cloudburst.models import arrays

        return arrays.reconstruct_array(self, x)

    def translate_array(self, x: xr.DataArray | np.ndarray) -> xr.DataArray:
        """:meth:`translate` as an ``xarray.DataArray`` named after the target variable, in
        its units; a DataArray input keeps its dims and coordinates."""
        from cloudburst.models import arrays

        return arrays.translate_array(self, x)

    def complete(self, arr: np.ndarray, known: torch.Tensor, seed: int = 0) -> np.ndarray:
        """Fill the NaN of physical windows ``arr`` by conditional sampling (reconstruction
        guidance); ``known``: ``arr`` in model space (n, 1, time, y, x). The known values come
        back as they were."""
        valid = np.isfinite(arr)
        if valid.all():
            return arr.copy()
        net = self.network(ConditionalSampler)
        mask = torch.from_numpy(valid)[:, None].to(self.device)
        guidance = float(self.config.get("guidance", 0.0))
        generator = torch.Generator().manual_seed(int(seed))
        y = net.sample(len(arr), generator=generator, condition=Condition(known, mask, guidance))
        out = self.to_physical(y)
        return np.where(valid, arr, out).astype(np.float32)

    def to_physical(self, y: torch.Tensor) -> np.ndarray:
        """Model-space windows (n, 1, time, y, x) -> physical float32 (n, time, y, x), >= 0,
        exactly 0 below the dry threshold."""
        arr = y.detach().float().cpu().numpy()[:, 0]
        phys = np.asarray(self.transform.inverse(arr), dtype=np.float32)
        return dry.apply(np.maximum(phys, np.float32(0.0)), self.dry_threshold)

    def to_model_space(self, x: np.ndarray) -> np.ndarray:
        """Physical windows (n, time, y, x) -> model space float32, NaN filled with 0 first."""
        filled = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
        return np.asarray(self.transform.forward(filled), dtype=np.float32)

    # ----------------------------------------------------------------------- registry

    def tags(self) -> dict[str, str]:
        """Registry version tags: model, window, transform and units, and the family's own
        (its loss and bins, or its transformation and sampler...), the family's winning."""
        tags = {
            "model": self.name,
            "window": "x".join(str(n) for n in self.window),
            "transform": str(self.transform.state().get("kind", "")),
        }
        if self.units:
            tags["units"] = self.units
        if self.target is not None:
            tags["input"] = str(self.input_variable)
            tags["target"] = self.target.variable
        tags["dry_threshold"] = "none" if self.dry_threshold is None else f"{self.dry_threshold:g}"
        scope = (self.stats or {}).get("scope")
        if scope:
            tags["stats_scope"] = str(scope)[:500]
        config = family_config(self.name, self.config)
        tags.update({str(k): str(v) for k, v in self.family.tags(config).items()})
        return tags

    # ----------------------------------------------------------------------- on disk

    def metadata(self) -> dict[str, Any]:
        from cloudburst import __version__

        return {
            "format": FORMAT_VERSION,
            "model": self.name,
            "config": self.config,
            "window": list(self.window),
            "transform": self.transform.state(),
            "stats": self.stats,
            "units": self.units,
            "dry_threshold": self.dry_threshold,
            **(
                {
                    "input_variable": self.input_variable,
                    "target": {
                        "variable": self.target.variable,
                        "transform": self.target.transform.state(),
                        "stats": self.target.stats,
                    },
                }
                if self.target is not None
                else {}
            ),
            "cloudburst": __version__,
            "torch": str(torch.__version__),
        }

    def save(self, path: str | Path) -> Path:
        """Write ``weights.pt`` and ``cloudburst-model.json`` into folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, folder / WEIGHTS_FILE)
        (folder / METADATA_FILE).write_text(json.dumps(self.metadata(), indent=2))
        return folder

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> PrecipitationModel:
        """Rebuild from a folder written by :meth:`save`."""
        folder = Path(path)
        meta_file = folder / METADATA_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{folder} holds no packaged model (no {METADATA_FILE})")
        meta = json.loads(meta_file.read_text())
        if int(meta.get("format", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{folder} was written by a newer cloudburst (format {meta['format']}); upgrade"
            )
        name = meta["model"]
        window = tuple(int(n) for n in meta["window"])
        network = registry.build(name, family_config(name, meta["config"]), window)
        state = torch.load(folder / WEIGHTS_FILE, map_location=map_location, weights_only=True)
        network.load_state_dict(state)
        network.to(map_location)
        return cls(
            network,
            name,
            meta["config"],
            window,  # type: ignore[arg-type]
            transforms_mod.from_state(meta["transform"]),
            meta.get("stats"),
            meta.get("dry_threshold"),
            input_variable=meta.get("input_variable"),
            target=TargetField(
                meta["target"]["variable"],
                transforms_mod.from_state(meta["target"]["transform"]),
                meta["target"].get("stats"),
            )
            if meta.get("target")
            else None,
        )
