"""A packaged model's results as labelled arrays (:class:`xarray.DataArray`), for notebooks.

:meth:`PrecipitationModel.sample_array`, :meth:`~PrecipitationModel.reconstruct_array` and
:meth:`~PrecipitationModel.translate_array` call the numpy methods of the same names and label
what they give back as an ensemble store labels its members:

- dims ``(sample, time, y, x)``, or ``(time, y, x)`` for a single window; a DataArray input
  keeps its own dim names and coordinates (e.g. ``(member, time, y, x)`` of
  :func:`cloudburst.open_ensemble`, or a data store's real times and grid);
- otherwise coordinates ``sample`` (0..n-1), ``time`` (hours since the window's first step,
  the store's ``time_step_hours`` apart, 1 when unknown), ``y`` and ``x`` (window pixel
  indices);
- CF ``units`` (:data:`cloudburst.ensembles.store.CF_UNITS`), name ``precip`` (a translation:
  the target variable's name);
- the model's provenance in ``attrs``: ``model_kind``, ``model_uri`` (when loaded through
  :func:`cloudburst.tracking.load_model`), ``model_window``, ``dry_threshold`` (when set),
  ``seed`` (samples), ``operation`` and the package version. Attribute values are all
  netCDF-writable.

xarray is imported here only, so code that never asks for labelled results never loads it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from cloudburst.ensembles.store import CF_UNITS

if TYPE_CHECKING:
    from cloudburst.models.package import PrecipitationModel

__all__ = ["SAMPLE_DIM", "WINDOW_DIMS", "reconstruct_array", "sample_array", "translate_array"]

log = logging.getLogger(__name__)

SAMPLE_DIM = "sample"
WINDOW_DIMS = ("time", "y", "x")


def cf_units(units: str) -> str:
    """The CF spelling of a store's units (``mm/h`` -> ``mm h-1``); unknown ones as they are."""
    return CF_UNITS.get(units, units)


def sample_array(model: PrecipitationModel, n: int, seed: int = 0) -> xr.DataArray:
    """:meth:`PrecipitationModel.sample` as a DataArray (sample, time, y, x)."""
    values = model.sample(n, seed)
    coords = default_coords(model, values.shape)
    attrs = provenance(model, "sample")
    attrs["seed"] = int(seed)
    return labelled(values, (SAMPLE_DIM, *WINDOW_DIMS), coords, "precip", model.units, attrs)


def reconstruct_array(model: PrecipitationModel, x: xr.DataArray | np.ndarray) -> xr.DataArray:
    """:meth:`PrecipitationModel.reconstruct` of windows (time, y, x) or (n, time, y, x), a
    DataArray (its dims and coordinates kept, its ``units`` checked against the model's) or an
    array; the result is labelled like the input."""
    values, dims, coords = unlabel(model, x, model.units, "reconstruct")
    out = model.reconstruct(values)
    return labelled(out, dims, coords, "precip", model.units, provenance(model, "reconstruction"))


def translate_array(model: PrecipitationModel, x: xr.DataArray | np.ndarray) -> xr.DataArray:
    """:meth:`PrecipitationModel.translate` of windows of the input variable, as
    :func:`reconstruct_array`; named after the target variable, in its units."""
    values, dims, coords = unlabel(model, x, model.units, "translate")
    out = model.translate(values)  # refuses a model not trained on a pair of variables
    target = model.target
    if target is None:
        raise ValueError(f"this {model.name!r} model has no target variable to translate to")
    units = str((target.stats or {}).get("units", ""))
    attrs = provenance(model, "translation")
    attrs["input_variable"] = str(model.input_variable or "")
    return labelled(out, dims, coords, target.variable, units, attrs, long_name=target.variable)


# ----------------------------------------------------------------------------- pieces


def provenance(model: PrecipitationModel, operation: str) -> dict[str, Any]:
    """The model's provenance as netCDF-writable attributes."""
    from cloudburst import __version__

    attrs: dict[str, Any] = {"model_kind": model.name}
    if model.uri:
        attrs["model_uri"] = model.uri
    attrs["model_window"] = [int(n) for n in model.window]
    if model.dry_threshold is not None:
        attrs["dry_threshold"] = float(model.dry_threshold)
    if model.units:
        attrs["training_units"] = model.units
    attrs["operation"] = operation
    attrs["cloudburst_version"] = __version__
    return attrs


def step_hours(model: PrecipitationModel) -> float:
    """Hours between the window's steps: the store's ``time_step_hours``, 1 when unknown."""
    value = (model.stats or {}).get("time_step_hours")
    try:
        hours = float(value) if value is not None else 1.0
    except (TypeError, ValueError):
        hours = 1.0
    return hours if np.isfinite(hours) and hours > 0 else 1.0


def default_coords(model: PrecipitationModel, shape: tuple[int, ...]) -> dict[str, Any]:
    """Coordinates of windows of ``shape`` ((n,) time, y, x) when none are known, with the
    ensemble store's attributes."""
    t, y, x = shape[-3:]
    coords: dict[str, Any] = {
        "time": (
            "time",
            np.arange(t, dtype=np.float64) * step_hours(model),
            {"long_name": "time since the window's first step", "units": "hours"},
        ),
        "y": ("y", np.arange(y, dtype=np.int64), {"long_name": "grid row of the window"}),
        "x": ("x", np.arange(x, dtype=np.int64), {"long_name": "grid column of the window"}),
    }
    if len(shape) == 4:
        coords[SAMPLE_DIM] = (SAMPLE_DIM, np.arange(shape[0], dtype=np.int64), {})
    return coords


def unlabel(
    model: PrecipitationModel, x: xr.DataArray | np.ndarray, units: str, what: str
) -> tuple[np.ndarray, tuple[str, ...], dict[str, Any]]:
    """The values of windows ``x``, their dims and their coordinates (the input's, with the
    defaults for dims that have none)."""
    if not isinstance(x, xr.DataArray):
        values = np.asarray(x, dtype=np.float32)
        if values.ndim not in (3, 4):
            raise ValueError(
                f"{what} takes windows (time, y, x) or (n, time, y, x), got {values.shape}"
            )
        dims = (SAMPLE_DIM, *WINDOW_DIMS) if values.ndim == 4 else WINDOW_DIMS
        return values, dims, default_coords(model, values.shape)
    if x.ndim not in (3, 4):
        raise ValueError(f"{what} takes windows (time, y, x) or (n, time, y, x), got {x.dims}")
    given = str(x.attrs.get("units", "") or "")
    if given and units and cf_units(given) != cf_units(units):
        raise ValueError(
            f"the windows are in {given!r} but the model works in {units!r}; "
            "convert them before calling it"
        )
    dims = tuple(str(d) for d in x.dims)
    defaults = default_coords(model, x.shape)
    # defaults by position, under the input's dim names, for dims without a coordinate
    positional = [SAMPLE_DIM, *WINDOW_DIMS] if x.ndim == 4 else list(WINDOW_DIMS)
    coords: dict[str, Any] = {}
    for dim, role in zip(dims, positional, strict=True):
        if dim not in x.coords:
            _, values, attrs = defaults[role]
            coords[dim] = (dim, values, attrs)
    coords.update({str(name): coord.variable for name, coord in x.coords.items()})
    return np.asarray(x.values, dtype=np.float32), dims, coords


def labelled(
    values: np.ndarray,
    dims: tuple[str, ...],
    coords: dict[str, Any],
    name: str,
    units: str,
    attrs: dict[str, Any],
    *,
    long_name: str = "precipitation",
) -> xr.DataArray:
    """``values`` as a named DataArray with CF units and ``attrs``."""
    head: dict[str, Any] = {"long_name": long_name}
    if name == "precip":
        head["standard_name"] = "lwe_precipitation_rate" if "/" in units else "precipitation"
    if units:
        head["units"] = cf_units(units)
    return xr.DataArray(values, dims=dims, coords=coords, name=name, attrs={**head, **attrs})
