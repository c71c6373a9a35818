"""Open any precipitation archive as one CF-normalised xarray Dataset.

Whatever comes in (NetCDF3/4, HDF5, Zarr, kerchunk references, a glob of files; local or on
object storage), what comes out is the same shape, so everything downstream has one case:

- one variable ``precip`` with dims ``(time, y, x)``, float32, a rate in ``mm/day`` (daily or
  coarser steps) or ``mm/h`` (sub-daily steps);
- fill values, non-finite and negative values are NaN;
- the original coordinates kept: 1-D ``lat``/``lon`` become coordinates along ``y``/``x``,
  2-D ``lat``/``lon`` and projected ``y``/``x`` coordinates stay as they are;
- time sorted, duplicate times dropped; a model calendar (``360_day``, ``noleap`` /
  ``365_day``, ...) is kept as cftime times (see :mod:`cloudburst.data.calendars`), a
  Gregorian one becomes datetime64;
- an ensemble dimension (``ensemble_member``, ``realization``, ``member``) is reduced to the
  one member asked for (``member``); with several members and none asked for, it is an error.

The data stay lazy (dask) until someone reads them.

:func:`open_fields` opens several variables (channels, e.g. two satellite bands) instead: each
keeps its own units and values (float32, no precipitation semantics), all on one grid (the
others regridded bicubically onto it, see :mod:`cloudburst.data.regrid`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np
import xarray as xr

from cloudburst import storage
from cloudburst.data import calendars, references

PRECIP = "precip"
NAME_HINTS = ("precip", "precipitation", "pr", "tp", "prcp", "rain", "rainfall", "rr", "pre", "ppt")
Y_NAMES = (
    "y",
    "lat",
    "latitude",
    "rlat",
    "grid_latitude",
    "projection_y_coordinate",
    "northing",
    "south_north",
    "j",
    "row",
    "nlat",
)
X_NAMES = (
    "x",
    "lon",
    "longitude",
    "rlon",
    "grid_longitude",
    "projection_x_coordinate",
    "easting",
    "west_east",
    "i",
    "col",
    "nlon",
)
Y_STANDARD = ("latitude", "projection_y_coordinate")  # standard_name contains one: a y axis
X_STANDARD = ("longitude", "projection_x_coordinate")
MEMBER_NAMES = ("ensemble_member", "realization", "realisation", "member", "ensemble")
log = logging.getLogger(__name__)

HOUR_NS = np.timedelta64(3600, "s")
DAY_NS = np.timedelta64(86400, "s")


class SourceError(ValueError):
    """A source archive cannot be read as precipitation; the message says why and what to do."""


# ---------------------------------------------------------------------------- opening


def _is_zarr(url: str, options: dict[str, Any] | None) -> bool:
    if url.rstrip("/").endswith(".zarr"):
        return True
    fs, path = storage.filesystem(url, options)
    try:
        return fs.isdir(path) and (fs.exists(f"{path}/zarr.json") or fs.exists(f"{path}/.zgroup"))
    except Exception:  # noqa: BLE001 - a probe; the real open reports the error
        return False


def open_raw(source: str | list[str], options: dict[str, Any] | None = None) -> xr.Dataset:
    """Open ``source`` lazily, as the archive has it (no normalisation)."""
    first = source[0] if isinstance(source, list) and source else source
    storage.check_reachable(str(first), options)
    if isinstance(source, list) or any(c in source for c in "*?["):
        return references.open_references(
            references.build_references(source, options), options, chunks={}
        )
    url = str(source)
    if url.startswith("reference://") or url.endswith(".json"):
        return references.open_references(url, options, chunks={})
    storage.check_reachable(url, options)
    if not storage.exists(url, options):
        raise SourceError(f"no such file or store: {url}. Check the path or URL.")
    if _is_zarr(url, options):
        target = storage.local_path(url) if not storage.is_remote(url) else url
        return xr.open_zarr(
            target, storage_options=options if storage.is_remote(url) else None, chunks={}
        )
    if not storage.is_remote(url):
        path = storage.local_path(url)
        try:
            return xr.open_dataset(path, chunks={})
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read {url} as NetCDF/HDF5/Zarr: {exc}") from exc
    # remote NetCDF: go through references so reads are lazy byte-range requests
    return references.open_references(references.build_references(url, options), options, chunks={})


# ---------------------------------------------------------------------------- variable


def _looks_like_precip(da: xr.DataArray) -> int:
    """A score: 3 standard_name, 2 name, 1 units; 0 not precipitation."""
    std = str(da.attrs.get("standard_name", "")).lower()
    if "precipitation" in std or "rainfall" in std:
        return 3
    if str(da.name).lower() in NAME_HINTS:
        return 2
    if _rate_factor(str(da.attrs.get("units", "")), None) is not None and da.ndim >= 3:
        return 1
    return 0


def pick_variable(ds: xr.Dataset, variable: str | None) -> str:
    if variable is not None:
        if variable not in ds.data_vars:
            raise SourceError(
                f"variable '{variable}' is not in the source; it has "
                f"{_inventory(ds)}. Pass one of those with --variable."
            )
        return variable
    scored = sorted(
        ((_looks_like_precip(ds[v]), v) for v in ds.data_vars if ds[v].ndim >= 2),
        key=lambda t: -t[0],
    )
    if not scored or scored[0][0] == 0:
        raise SourceError(
            f"no precipitation variable found (by standard_name, name or units) among "
            f"{_inventory(ds)}. Name it with --variable."
        )
    return scored[0][1]


def _inventory(ds: xr.Dataset) -> str:
    items = [
        f"{v} {tuple(ds[v].dims)} [{ds[v].attrs.get('units', 'no units')}]" for v in ds.data_vars
    ]
    return "; ".join(items) if items else "no data variables"


# ---------------------------------------------------------------------------- units


def _canon_units(units: str) -> str:
    u = units.strip().lower().replace("**", "^").replace("per", "/")
    u = re.sub(r"\s+", " ", u)
    u = u.replace("^", "").replace("hours", "h").replace("hour", "h").replace("hr", "h")
    u = u.replace("days", "d").replace("day", "d").replace("sec", "s")
    u = u.replace("kg/m2", "kg m-2").replace("kg m2", "kg m-2")
    return u.replace(" / ", "/").replace(" ", "")


RATE_UNITS = {  # canonical form -> mm per hour per unit value
    "mm/d": 1 / 24,
    "mmd-1": 1 / 24,
    "kgm-2d-1": 1 / 24,
    "kgm-2/d": 1 / 24,
    "mm/h": 1.0,
    "mmh-1": 1.0,
    "kgm-2h-1": 1.0,
    "kgm-2/h": 1.0,
    "kgm-2s-1": 3600.0,
    "kgm-2/s": 3600.0,
    "mm/s": 3600.0,
    "mms-1": 3600.0,
    "m/s": 3.6e6,
    "ms-1": 3.6e6,
    "m/h": 1000.0,
    "mh-1": 1000.0,
    "m/d": 1000 / 24,
    "md-1": 1000 / 24,
}
AMOUNT_UNITS = {"mm": 1.0, "kgm-2": 1.0, "m": 1000.0, "cm": 10.0}  # mm per unit value


def _rate_factor(units: str, step: np.timedelta64 | None) -> float | None:
    """Factor turning values in ``units`` into mm/h; amounts are spread over ``step``."""
    canon = _canon_units(units)
    if canon in RATE_UNITS:
        return RATE_UNITS[canon]
    if canon in AMOUNT_UNITS:
        if step is None:
            return 1.0  # shape only: recognised as precipitation
        return AMOUNT_UNITS[canon] / (step / HOUR_NS)
    return None


# ---------------------------------------------------------------------------- dims


def _is_time_coord(dim: Any, ds: xr.Dataset) -> bool:
    return dim in ds.coords and calendars.is_time(ds[dim].variable.values)


def _time_dim(da: xr.DataArray, ds: xr.Dataset) -> str:
    for dim in da.dims:
        if _is_time_coord(dim, ds):
            return str(dim)
    for dim in da.dims:
        if str(dim).lower() in ("time", "t", "valid_time", "date"):
            return str(dim)
    raise SourceError(
        f"variable '{da.name}' has dims {tuple(da.dims)} and none of them is time. "
        "Cloudburst needs (time, y, x) fields with a datetime time coordinate."
    )


def _classify(
    dim: str, ds: xr.Dataset, names: tuple[str, ...], axis: str, std: tuple[str, ...]
) -> bool:
    if dim.lower() in names:
        return True
    if dim in ds.coords:
        attrs = ds[dim].attrs
        standard = str(attrs.get("standard_name", ""))
        return str(attrs.get("axis", "")).upper() == axis or any(s in standard for s in std)
    return False


def _spatial_dims(da: xr.DataArray, ds: xr.Dataset, tdim: str) -> tuple[str, str]:
    rest = [str(d) for d in da.dims if d != tdim]
    if len(rest) != 2:
        raise SourceError(
            f"variable '{da.name}' has dims {tuple(da.dims)}; after time, exactly two spatial "
            "dims (y, x or lat, lon) are needed. Select a level or member first."
        )
    a, b = rest
    if _classify(a, ds, X_NAMES, "X", X_STANDARD) or _classify(b, ds, Y_NAMES, "Y", Y_STANDARD):
        a, b = b, a
    return a, b


# ---------------------------------------------------------------------------- normalise


def time_step(times: np.ndarray) -> np.timedelta64 | None:
    """Median step of ``times`` (datetime64 or cftime) as timedelta64[s]; None for one step."""
    if len(times) < 2:
        return None
    return np.median(calendars.deltas(times).astype("timedelta64[s]"))


def member_dim(da: xr.DataArray) -> str | None:
    """The ensemble-member dimension of ``da`` (ensemble_member, realization, member), if any."""
    for dim in da.dims:
        if str(dim).lower() in MEMBER_NAMES:
            return str(dim)
    return None


def _member_labels(da: xr.DataArray, ds: xr.Dataset, dim: str) -> list[list[Any]]:
    """Per member, its labels: the member coordinate's value and those of other 1-D
    coordinates along the dimension (e.g. UKCP18's ``ensemble_member_id``)."""
    labels: list[list[Any]] = [[] for _ in range(da.sizes[dim])]
    names = [dim] if dim in ds.coords else []
    names += [str(c) for c in ds.coords if c != dim and ds[c].dims == (dim,)]
    for name in names:
        for i, v in enumerate(np.asarray(ds[name].values).tolist()):
            labels[i].append(v.decode() if isinstance(v, bytes) else v)
    return labels


def select_member(
    da: xr.DataArray, ds: xr.Dataset, member: int | str | None
) -> tuple[xr.DataArray, str | None]:
    """``da`` with its member dimension reduced to ``member``, and the member's label.

    ``member`` is a label of the member coordinate (UKCP18's ``ensemble_member`` 1, 4, ... or
    its ``ensemble_member_id``), or, where the dimension has no coordinate, its 0-based
    position. A single member is taken as it is; several without ``member`` are an error.
    """
    dim = member_dim(da)
    if dim is None:
        if member is not None:
            raise SourceError(
                f"member {member!r} was asked for but '{da.name}' has no ensemble dimension "
                f"(dims {tuple(da.dims)}); leave member unset"
            )
        return da, None
    labels = _member_labels(da, ds, dim)
    n = da.sizes[dim]
    shown = ", ".join(
        "/".join(str(v) for v in labs) if labs else str(i) for i, labs in enumerate(labels)
    )
    if member is None:
        if n == 1:
            label = labels[0][0] if labels[0] else 0
            return da.isel({dim: 0}, drop=True), str(label)
        raise SourceError(
            f"'{da.name}' has {n} ensemble members along '{dim}' ({shown}); Cloudburst reads one "
            f"member at a time: choose it with the ingest option member (e.g. member: "
            f"{labels[0][0] if labels[0] else 0})"
        )
    text = str(member).strip()
    for i, labs in enumerate(labels):
        if any(str(v).strip() == text for v in labs):
            return da.isel({dim: i}, drop=True), str(labs[0])
    if not any(labels) and text.lstrip("-").isdigit() and 0 <= int(text) < n:
        return da.isel({dim: int(text)}, drop=True), text
    raise SourceError(
        f"member {member!r} is not one of the {n} members along '{dim}' of '{da.name}' "
        f"({shown}); choose one of those"
    )


def _ordered_times(da: xr.DataArray, tdim: str, name: Any) -> tuple[xr.DataArray, np.ndarray]:
    """``da`` with its times standardised, sorted and without duplicates, and those times."""
    times = np.asarray(da[tdim].values)
    if not calendars.is_time(times):
        raise SourceError(f"time coordinate of '{name}' is not decodable as dates ({times.dtype})")
    standard = calendars.standardise(times)  # Gregorian cftime -> datetime64
    if standard is not times:
        da = da.assign_coords({tdim: (tdim, standard, da[tdim].attrs)})
        times = standard
    order = np.argsort(times, kind="stable")
    keep = order[np.r_[True, calendars.deltas(times[order]) > np.timedelta64(0, "s")]]
    if len(keep) != len(times) or np.any(np.diff(keep) < 0):
        da = da.isel({tdim: keep})
        times = times[keep]
    return da, times


def normalise(
    ds: xr.Dataset,
    variable: str | None = None,
    *,
    units: str | None = None,
    origin: str = "",
    member: int | str | None = None,
) -> xr.Dataset:
    """The CF-normalised form of ``ds`` (see module docstring)."""
    name = pick_variable(ds, variable)
    da, member_label = select_member(ds[name], ds, member)
    if da.ndim > 3:  # e.g. a length-1 level or band axis
        singles = [d for d in da.dims if da.sizes[d] == 1 and not _is_time_coord(d, ds)]
        da = da.isel({d: 0 for d in singles}, drop=True)
    tdim = _time_dim(da, ds)
    ydim, xdim = _spatial_dims(da, ds, tdim)
    da = da.transpose(tdim, ydim, xdim)

    da, times = _ordered_times(da, tdim, name)
    step = time_step(times)

    src_units = units or str(da.attrs.get("units", ""))
    per_hour = _rate_factor(src_units, step if step is not None else DAY_NS)
    if per_hour is None:
        raise SourceError(
            f"units {src_units!r} of '{name}' are not understood as precipitation. Known: "
            "mm/day, mm/h, kg m-2 s-1, mm or m per time step. Pass the units explicitly if the "
            "file lacks them."
        )
    daily = step is None or step >= DAY_NS
    out_units = "mm/day" if daily else "mm/h"
    factor = per_hour * (24.0 if daily else 1.0)

    data = da.astype("float32")
    if factor != 1.0:
        data = data * np.float32(factor)
    data = data.where(np.isfinite(data) & (data >= 0) & (data < 1e10))

    # dims become (time, y, x); 1-D coordinates of other names (lat, lon, ...) stay as
    # non-index coordinates along y and x, renamed lat/lon when they are geographic
    out = data.to_dataset(name=PRECIP)
    out = out.drop_vars(
        [
            c
            for c in out.coords
            if c not in da.dims
            and out[c].ndim != 2
            and not (out[c].ndim == 1 and out[c].dims[0] in (ydim, xdim))
        ]
    )
    if tdim != "time":
        out = out.rename({tdim: "time"})
    out = out.rename_dims({k: v for k, v in ((ydim, "y"), (xdim, "x")) if k != v})
    for old in (ydim, xdim):
        low = old.lower()
        new_name = {"latitude": "lat", "longitude": "lon"}.get(low, low)
        if old not in ("y", "x") and new_name != old and new_name not in out.variables:
            out = out.rename({old: new_name})
    data = out[PRECIP]
    data.attrs = {
        "units": out_units,
        "standard_name": "lwe_precipitation_rate",
        "long_name": "precipitation rate",
        "source_variable": str(name),
        "source_units": src_units,
    }
    data.encoding = {}
    out[PRECIP] = data
    out.attrs = {k: v for k, v in ds.attrs.items() if isinstance(v, (str, int, float))}
    if origin:
        out.attrs["cloudburst_source"] = origin
    if member_label is not None:
        out.attrs["cloudburst_member"] = member_label
    calendar = calendars.calendar_of(times)
    if calendar != calendars.STANDARD:
        out.attrs["cloudburst_calendar"] = calendar
    out.attrs["Conventions"] = "CF-1.8"
    for dim in ("time",):
        out[dim].encoding = {}
    return out


def open_source(
    source: str | list[str] | xr.Dataset,
    *,
    variable: str | None = None,
    units: str | None = None,
    storage_options: dict[str, Any] | None = None,
    time_start: str | None = None,
    time_end: str | None = None,
    member: int | str | None = None,
) -> xr.Dataset:
    """Open ``source`` as one CF-normalised, lazy precipitation Dataset.

    ``member`` picks one ensemble member (see :func:`select_member`); ``time_start`` and
    ``time_end`` are ISO times in the source's calendar.
    """
    if isinstance(source, xr.Dataset):
        raw, origin = source, source.attrs.get("cloudburst_source", "in-memory dataset")
    else:
        if isinstance(source, str) and not storage.is_remote(source) and "://" not in source:
            if not any(c in source for c in "*?[") and not os.path.exists(source):
                raise SourceError(f"no such file or store: {source}. Check the path.")
        raw, origin = open_raw(source, storage_options), str(source)
    ds = normalise(raw, variable, units=units, origin=origin, member=member)
    if time_start or time_end:
        ds = ds.sel(time=slice(time_start, time_end))
        if ds.sizes["time"] == 0:
            raise SourceError(f"no time steps between {time_start} and {time_end} in {origin}")
    return ds


# ---------------------------------------------------------------------------- several fields

RESERVED_NAMES = ("time", "y", "x")
REGRID_CHUNK_BYTES = 16 * 2**20  # source data regridded at a time (whole time steps)


def _field(
    ds: xr.Dataset, name: str, member: int | str | None
) -> tuple[xr.DataArray, tuple[str, str], str | None]:
    """Variable ``name`` as (time, y-dim, x-dim), times ordered; its spatial dims; member."""
    da, label = select_member(ds[name], ds, member)
    if da.ndim > 3:  # e.g. a length-1 level or band axis
        singles = [d for d in da.dims if da.sizes[d] == 1 and not _is_time_coord(d, ds)]
        da = da.isel({d: 0 for d in singles}, drop=True)
    tdim = _time_dim(da, ds)
    ydim, xdim = _spatial_dims(da, ds, tdim)
    da, _ = _ordered_times(da.transpose(tdim, ydim, xdim), tdim, name)
    if tdim != "time":
        da = da.rename({tdim: "time"})
    return da, (ydim, xdim), label


def _axis(ds: xr.Dataset, da: xr.DataArray, dim: str) -> np.ndarray:
    """The 1-D coordinate values along ``dim`` (its index, or a 1-D coordinate along it)."""
    if dim in ds.coords and ds[dim].dims == (dim,):
        return np.asarray(ds[dim].values)
    for c in da.coords:
        if da[c].dims == (dim,):
            return np.asarray(da[c].values)
    raise SourceError(
        f"'{da.name}' has no 1-D coordinate along '{dim}': regridding needs rectilinear grids "
        "(1-D y/x or lat/lon coordinates)"
    )


def _as_float(da: xr.DataArray) -> xr.DataArray:
    """float32, non-finite values NaN (fill values are already NaN once decoded)."""
    data = da.astype("float32")
    return data.where(np.isfinite(data))


def within_range(out: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``out`` clipped to the finite range of ``source`` (NaN stays NaN; an all-NaN source
    leaves ``out`` as it is)."""
    finite = source[np.isfinite(source)]
    if finite.size == 0:
        return out
    return np.clip(out, finite.min(), finite.max()).astype(out.dtype, copy=False)


def open_fields(
    source: str | list[str] | xr.Dataset,
    variables: list[str],
    *,
    grid: str | None = None,
    units: str | dict[str, str] | None = None,
    region: Any = None,
    storage_options: dict[str, Any] | None = None,
    time_start: str | None = None,
    time_end: str | None = None,
    member: int | str | None = None,
    missing_values: float | dict[str, float] | None = None,
) -> xr.Dataset:
    """Several variables of ``source`` as one lazy Dataset of (time, y, x) float32 fields on
    one grid: the grid of variable ``grid`` (required when the variables' grids differ).

    Values keep their source units (no conversion; raw counts become float32, non-finite values
    NaN). Variables on another grid are regridded bicubically (see :mod:`.regrid`): target
    cells outside their extent are NaN, and their number is the variable's
    ``regrid_outside_cells`` attribute. ``units`` (one for all, or per variable) is recorded
    where the file has none. ``region`` (a function of a Dataset with y/x coordinates) crops
    the grid before the others are regridded onto it. ``member`` and the time range act as in
    :func:`open_source`. ``missing_values`` (one for all, or per variable) is a value that
    means "no data" in the source (e.g. the 0 counts of a satellite image's missing tiles): it
    becomes NaN before any regridding, so the cells it reaches are NaN too. Regridded values
    are kept within the range of the source values they come from (per block of time steps),
    so bicubic overshoot at sharp edges never leaves the source's range.
    """
    from cloudburst.data.regrid import METHOD, Regridder

    if isinstance(source, xr.Dataset):
        raw, origin = source, source.attrs.get("cloudburst_source", "in-memory dataset")
    else:
        if isinstance(source, str) and not storage.is_remote(source) and "://" not in source:
            if not any(c in source for c in "*?[") and not os.path.exists(source):
                raise SourceError(f"no such file or store: {source}. Check the path.")
        raw, origin = open_raw(source, storage_options), str(source)
    names = [str(v) for v in variables]
    if not names or len(set(names)) != len(names):
        raise SourceError(f"variables must be distinct names, at least one (got {names})")
    available = [str(v) for v in raw.data_vars]
    missing = [v for v in names if v not in raw.data_vars]
    if missing:
        raise SourceError(
            f"variable(s) {', '.join(missing)} not in the source; it has {_inventory(raw)}. "
            f"Choose variables among: {', '.join(available)}"
        )
    reserved = [v for v in names if v in RESERVED_NAMES]
    if reserved:
        raise SourceError(f"variable names {reserved} clash with the store's dims time, y, x")
    if grid is not None and grid not in names:
        raise SourceError(
            f"grid {grid!r} is not one of the variables; name the variable whose grid the others "
            f"are regridded onto, one of: {', '.join(names)}"
        )
    if isinstance(units, dict):
        unknown = sorted(set(units) - set(names))
        if unknown:
            raise SourceError(
                f"units given for {unknown}, which are not among the variables {names}"
            )
    if isinstance(missing_values, dict):
        unknown = sorted(set(missing_values) - set(names))
        if unknown:
            raise SourceError(
                f"missing_values given for {unknown}, which are not among the variables {names}"
            )

    fields, member_label = {}, None
    for name in names:
        da, dims, label = _field(raw, name, member)
        fields[name] = (da, dims)
        member_label = member_label if label is None else label
    times = {n: np.asarray(da["time"].values) for n, (da, _) in fields.items()}
    first = names[0]
    for name in names[1:]:
        a, b = times[first], times[name]
        if len(a) != len(b) or not np.all(a == b):
            raise SourceError(
                f"variables {first} and {name} have different times ({len(a)} and {len(b)} "
                "steps); several variables go into one store only with the same time axis"
            )
    grid_name = grid
    if grid_name is None:
        shapes = {n: tuple(da.sizes[d] for d in dims) for n, (da, dims) in fields.items()}
        dimsets = {n: dims for n, (_, dims) in fields.items()}
        if len(set(dimsets.values())) > 1 or len(set(shapes.values())) > 1:
            shown = "; ".join(f"{n} {dimsets[n]} {shapes[n][0]}x{shapes[n][1]}" for n in names)
            raise SourceError(
                f"the variables are on different grids ({shown}); name the grid to regrid "
                f"onto with grid: one of {', '.join(names)}"
            )
        grid_name = first

    # the target grid: the grid variable's, with dims and 1-D coordinates named y and x
    gda, (gy, gx) = fields[grid_name]
    ty, tx = _axis(raw, gda, gy), _axis(raw, gda, gx)
    coord_attrs = {
        "y": dict(raw[gy].attrs) if gy in raw.coords else {},
        "x": dict(raw[gx].attrs) if gx in raw.coords else {},
    }
    base = xr.Dataset(
        coords={
            "time": ("time", times[first]),
            "y": ("y", ty, coord_attrs["y"]),
            "x": ("x", tx, coord_attrs["x"]),
        }
    )
    if region is not None:
        base = region(base)
    ty, tx = np.asarray(base["y"].values), np.asarray(base["x"].values)

    out = xr.Dataset(coords=base.coords)
    for name in names:
        da, (ydim, xdim) = fields[name]
        attrs = dict(raw[name].attrs)
        src_units = (units.get(name) if isinstance(units, dict) else units) or str(
            attrs.get("units", "")
        )
        meta = {
            "units": src_units,
            "long_name": str(attrs.get("long_name", name)),
            "source_variable": name,
            "source_units": src_units,
        }
        values = _as_float(da.drop_vars([c for c in da.coords if c != "time"]))
        no_data = missing_values.get(name) if isinstance(missing_values, dict) else missing_values
        if no_data is not None:
            values = values.where(values != np.float32(no_data))
            meta["missing_value_in_source"] = float(no_data)
        if name == grid_name or (ydim, xdim) == (gy, gx):
            # the grid itself (or a variable on it): cut to the region by coordinate value
            yi = _positions_of(_axis(raw, da, ydim), ty, name, "y")
            xi = _positions_of(_axis(raw, da, xdim), tx, name, "x")
            values = values.isel({ydim: yi, xdim: xi})
            values = values.rename({ydim: "y", xdim: "x"}) if (ydim, xdim) != ("y", "x") else values
        else:
            sy, sx = _axis(raw, da, ydim), _axis(raw, da, xdim)
            regrid = Regridder.between(sy, sx, ty, tx)
            per_step = 4 * max(da.sizes[ydim] * da.sizes[xdim], len(ty) * len(tx))
            ct = int(max(1, min(da.sizes["time"], REGRID_CHUNK_BYTES // per_step)))
            if hasattr(values.data, "chunks"):
                values = values.chunk({"time": ct, ydim: -1, xdim: -1})
            values = xr.apply_ufunc(
                lambda block, regrid=regrid: within_range(regrid(block), block),
                values,
                input_core_dims=[[ydim, xdim]],
                output_core_dims=[["y", "x"]],
                exclude_dims={ydim, xdim} & {"y", "x"},  # same names, other sizes
                dask="parallelized",
                output_dtypes=[np.float32],
                dask_gufunc_kwargs={"output_sizes": {"y": len(ty), "x": len(tx)}},
            )
            meta.update(
                regridded_from=f"{ydim} x {xdim}: {len(sy)} x {len(sx)}",
                regrid_method=METHOD,
                regrid_outside_cells=int(regrid.outside_cells),
            )
            if regrid.outside_cells:
                log.info(
                    "%s: %d of %d cells of the %s grid lie outside its extent (NaN)",
                    name,
                    regrid.outside_cells,
                    len(ty) * len(tx),
                    grid_name,
                )
        values = values.assign_coords(y=ty, x=tx).transpose("time", "y", "x")
        values.attrs = meta
        values.encoding = {}
        out[name] = values
    out["y"].attrs, out["x"].attrs = coord_attrs["y"], coord_attrs["x"]
    out.attrs = {k: v for k, v in raw.attrs.items() if isinstance(v, (str, int, float))}
    if origin:
        out.attrs["cloudburst_source"] = origin
    if member_label is not None:
        out.attrs["cloudburst_member"] = member_label
    calendar = calendars.calendar_of(times[first])
    if calendar != calendars.STANDARD:
        out.attrs["cloudburst_calendar"] = calendar
    out.attrs["cloudburst_grid"] = grid_name
    out.attrs["Conventions"] = "CF-1.8"
    out["time"].encoding = {}
    if time_start or time_end:
        out = out.sel(time=slice(time_start, time_end))
        if out.sizes["time"] == 0:
            raise SourceError(f"no time steps between {time_start} and {time_end} in {origin}")
    return out


def _positions_of(axis: np.ndarray, wanted: np.ndarray, name: str, what: str) -> np.ndarray:
    """Indices of the coordinate values ``wanted`` in ``axis`` (exact matches)."""
    lookup = {float(v): i for i, v in enumerate(np.asarray(axis, dtype=np.float64))}
    try:
        return np.array([lookup[float(v)] for v in np.asarray(wanted, dtype=np.float64)])
    except KeyError:
        raise SourceError(
            f"'{name}' shares the grid's dims but not its {what} coordinates; name it as "
            "the grid or regrid it"
        ) from None
