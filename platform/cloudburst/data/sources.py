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
"""

from __future__ import annotations

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
