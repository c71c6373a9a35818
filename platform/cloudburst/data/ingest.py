"""Ingest: from a source archive to an analysis-ready Zarr v3 store, with its statistics.

The store holds ``precip`` (time, y, x) in physical units, chunked for window reads, and the
statistics training needs (quantiles, max, histogram edges, NaN fraction). It is written time
block by time block (memory bounded by a block, not the archive), and a completion marker
holding the statistics and a fingerprint of the request is written last:

- a store without the marker is incomplete and :func:`open_store` refuses it;
- re-running the same request on a complete store does nothing (idempotent);
- a failure while writing removes what this run wrote.

Times keep the source's calendar: a model calendar (``360_day``, ``noleap``, ...) is written as
CF numbers with ``units`` and ``calendar`` attributes and reads back as the same cftime times;
``member`` picks one member of an ensemble source (see :func:`sources.select_member`).

Several variables (``variables``, e.g. two satellite channels) go into one store the same way:
each a (time, y, x) float32 array under its own name, on the grid of one of them (``grid``; the
others regridded bicubically, see :func:`sources.open_fields`), each with its own statistics
(:class:`FieldStatsAccumulator`: exact, in bounded memory, including the minimum), kept in the
marker under ``variables``. A store of one precipitation variable keeps its exact layout and
fingerprint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time as _time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from cloudburst import markers, storage
from cloudburst.config import IngestConfig
from cloudburst.data import calendars
from cloudburst.data.regrid import METHOD as REGRID_METHOD
from cloudburst.data.sources import PRECIP, SourceError, open_fields, open_source

log = logging.getLogger(__name__)

MARKER = markers.MARKER
LEGACY_MARKER = ".cloudburst-complete.json"  # where stores before format 1.1 kept it
FORMAT_VERSION = 1
QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.995, 0.999)
CHUNK_TARGET_BYTES = 4 * 2**20
WRITE_BLOCK_BYTES = 64 * 2**20  # data loaded and written at a time (whole time chunks)


class StoreError(RuntimeError):
    """A store is missing, incomplete or not a Cloudburst store; the message says what to do."""


@dataclass
class StoreStats:
    """Statistics of the valid (non-NaN) values of a store."""

    count: int
    nan_fraction: float
    wet_fraction: float
    mean: float
    max: float
    quantiles: dict[str, float]
    bins: int
    histogram_edges: list[float]
    histogram_counts: list[int]
    units: str = ""
    min: float | None = None  # kept for variables of several-variable stores (any sign)

    def quantile(self, q: float) -> float:
        return self.quantiles[f"{q:g}"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["min"] is None:  # precipitation stores keep their exact marker
            del d["min"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreStats:
        return cls(**d)


@dataclass
class StatsAccumulator:
    """Exact statistics streamed over blocks; memory is the wet values only (rain is sparse)."""

    total: int = 0
    nans: int = 0
    zeros: int = 0
    total_sum: float = 0.0
    wet: list[np.ndarray] = field(default_factory=list)

    def add(self, block: np.ndarray) -> None:
        flat = np.asarray(block, dtype=np.float32).ravel()
        self.total += flat.size
        valid = flat[~np.isnan(flat)]
        self.nans += flat.size - valid.size
        positive = valid[valid > 0]
        self.zeros += valid.size - positive.size
        self.total_sum += float(positive.sum(dtype=np.float64))
        self.wet.append(positive)

    def finish(self, bins: int, units: str = "") -> StoreStats:
        count = self.total - self.nans
        if count == 0:
            raise SourceError(
                "every value in the selected region and period is NaN (no data there). "
                "Choose another --bbox or time range."
            )
        wet = np.sort(np.concatenate(self.wet)) if self.wet else np.zeros(0, np.float32)
        vmax = float(wet[-1]) if wet.size else 0.0

        def quantile(q: float) -> float:
            # numpy's linear interpolation over the virtual array [0] * zeros + sorted(wet)
            pos = q * (count - 1)
            lo, frac = int(math.floor(pos)), pos - math.floor(pos)

            def at(i: int) -> float:
                return 0.0 if i < self.zeros else float(wet[i - self.zeros])

            hi = min(lo + 1, count - 1)
            return at(lo) + frac * (at(hi) - at(lo))

        edges = np.linspace(0.0, vmax if vmax > 0 else 1.0, bins + 1)
        counts, _ = np.histogram(wet, bins=edges)
        counts[0] += self.zeros
        return StoreStats(
            count=count,
            nan_fraction=self.nans / self.total,
            wet_fraction=wet.size / count,
            mean=self.total_sum / count,
            max=vmax,
            quantiles={f"{q:g}": quantile(q) for q in QUANTILES},
            bins=bins,
            histogram_edges=[float(e) for e in edges],
            histogram_counts=[int(c) for c in counts],
            units=units,
        )


TOP_BITS = 16  # FieldStatsAccumulator: bits of a value's order key histogrammed in pass 1
_SIGN = np.uint32(0x80000000)


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 ``values`` that sort as the values do (-0.0 as 0.0)."""
    v = np.asarray(values, dtype=np.float32).ravel() + np.float32(0.0)
    # negative values: every bit flipped; the others: the sign bit set
    flip = (v.view(np.int32) >> 31).view(np.uint32)
    flip |= _SIGN
    return v.view(np.uint32) ^ flip


def key_values(keys: np.ndarray) -> np.ndarray:
    """The float32 values of order keys (inverse of :func:`order_keys`)."""
    k = np.asarray(keys, dtype=np.uint32)
    return np.where(k & _SIGN, k & ~_SIGN, ~k).astype(np.uint32).view(np.float32)


def _pieces(block: np.ndarray, size: int = 2**22) -> Iterator[np.ndarray]:
    """``block`` as flat float32 pieces of at most ``size`` values (bounded temporaries)."""
    flat = np.asarray(block, dtype=np.float32).ravel()
    for a in range(0, flat.size, size):
        yield flat[a : a + size]


@dataclass
class FieldStatsAccumulator:
    """Exact statistics of any values (counts, radiances; not only rain) in bounded memory.

    Two passes over the same blocks: :meth:`add` (count, NaNs, sum, min, max and a histogram of
    the top bits of each value's order key), then :meth:`refine` (the ``bins`` histogram over
    [min, max] and, for the few top-bit buckets holding a quantile's neighbours, a histogram
    of the low bits): every quantile is then numpy's linear one, exactly. Memory is a few
    65,536-bin histograms, whatever the size of the data.
    """

    total: int = 0
    nans: int = 0
    positive: int = 0
    total_sum: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    top: np.ndarray = field(default_factory=lambda: np.zeros(2**TOP_BITS, np.int64))
    bins: int = 0
    edges: np.ndarray | None = None
    counts: np.ndarray | None = None
    buckets: dict[int, np.ndarray] = field(default_factory=dict)

    def add(self, block: np.ndarray) -> None:
        """Pass 1: one block of values."""
        for piece in _pieces(block):
            self._add(piece)

    def _add(self, flat: np.ndarray) -> None:
        valid = flat[~np.isnan(flat)]
        self.total += flat.size
        self.nans += flat.size - valid.size
        if valid.size == 0:
            return
        self.positive += int(np.count_nonzero(valid > 0))
        self.total_sum += float(valid.sum(dtype=np.float64))
        self.low = min(self.low, float(valid.min()))
        self.high = max(self.high, float(valid.max()))
        self.top += np.bincount(order_keys(valid) >> (32 - TOP_BITS), minlength=2**TOP_BITS)

    @property
    def count(self) -> int:
        return self.total - self.nans

    def _ranks(self) -> dict[str, tuple[int, int, float]]:
        out = {}
        for q in QUANTILES:
            pos = q * (self.count - 1)
            lo = int(math.floor(pos))
            out[f"{q:g}"] = (lo, min(lo + 1, self.count - 1), pos - lo)
        return out

    def begin_refine(self, bins: int) -> None:
        """Between the passes: what pass 2 histograms (needs every block added)."""
        if self.count == 0:
            raise SourceError(
                "every value in the selected region and period is NaN (no data there). "
                "Choose another --bbox or time range."
            )
        self.bins = bins
        high = self.high if self.high > self.low else self.low + 1.0
        self.edges = np.linspace(self.low, high, bins + 1)
        self.counts = np.zeros(bins, np.int64)
        cum = np.cumsum(self.top)
        wanted = {r for lo, hi, _ in self._ranks().values() for r in (lo, hi)}
        self.buckets = {
            int(np.searchsorted(cum, r, side="right")): np.zeros(2 ** (32 - TOP_BITS), np.int64)
            for r in wanted
        }

    def refine(self, block: np.ndarray) -> None:
        """Pass 2: the same blocks again."""
        assert self.edges is not None and self.counts is not None, "call begin_refine first"
        for piece in _pieces(block):
            self._refine(piece)

    def _refine(self, flat: np.ndarray) -> None:
        assert self.edges is not None and self.counts is not None
        valid = flat[~np.isnan(flat)]
        if valid.size == 0:
            return
        # numpy's equal-width path: the same counts as with the edges, without sorting
        self.counts += np.histogram(valid, bins=self.bins, range=(self.edges[0], self.edges[-1]))[0]
        keys = order_keys(valid)
        top = keys >> (32 - TOP_BITS)
        mask = np.uint32(2 ** (32 - TOP_BITS) - 1)
        for bucket, hist in self.buckets.items():
            hist += np.bincount(keys[top == bucket] & mask, minlength=hist.size)

    def _at(self, rank: int) -> float:
        """The value of the ``rank``-th smallest valid value (0-based)."""
        cum = np.cumsum(self.top)
        bucket = int(np.searchsorted(cum, rank, side="right"))
        within = rank - (int(cum[bucket - 1]) if bucket else 0)
        low = int(np.searchsorted(np.cumsum(self.buckets[bucket]), within, side="right"))
        key = np.uint32((bucket << (32 - TOP_BITS)) | low)
        return float(key_values(np.array([key]))[0])

    def finish(self, units: str = "") -> StoreStats:
        """The statistics (after both passes)."""
        assert self.edges is not None and self.counts is not None, "run both passes first"
        quantiles = {
            name: self._at(lo) + frac * (self._at(hi) - self._at(lo))
            for name, (lo, hi, frac) in self._ranks().items()
        }
        return StoreStats(
            count=self.count,
            nan_fraction=self.nans / self.total,
            wet_fraction=self.positive / self.count,
            mean=self.total_sum / self.count,
            max=self.high,
            quantiles=quantiles,
            bins=self.bins,
            histogram_edges=[float(e) for e in self.edges],
            histogram_counts=[int(c) for c in self.counts],
            units=units,
            min=self.low,
        )


# ---------------------------------------------------------------------------- region


def crop(ds: xr.Dataset, bbox: tuple[float, float, float, float] | None) -> xr.Dataset:
    """The smallest index rectangle holding every cell inside ``bbox`` = (W, S, E, N).

    The box is in lon/lat where the data have them (1-D or 2-D), else in the x/y coordinates.
    """
    if bbox is None:
        return ds
    west, south, east, north = bbox
    # lat/lon may keep their CF long names (2-D latitude/longitude); projected coordinates
    # keep theirs (e.g. projection_y_coordinate) along the y/x dims
    lat_name = next((n for n in ("lat", "latitude") if n in ds.coords), None)
    lon_name = next((n for n in ("lon", "longitude") if n in ds.coords), None)
    y_name, x_name = (
        d if d in ds.coords else next((str(c) for c in ds.coords if ds[c].dims == (d,)), None)
        for d in ("y", "x")
    )
    if lat_name and lon_name:
        lat, lon = ds[lat_name], ds[lon_name]
        lon = ((lon + 180.0) % 360.0) - 180.0 if float(lon.max()) > 180 else lon
        kind = "lon/lat"
    elif y_name and x_name:
        lat, lon = ds[y_name], ds[x_name]
        kind = "x/y"
    else:
        raise SourceError("cannot crop: the data have neither lat/lon nor x/y coordinates")
    inside = (lon >= west) & (lon <= east) & (lat >= south) & (lat <= north)
    inside = (
        inside.broadcast_like(
            xr.DataArray(np.zeros((ds.sizes["y"], ds.sizes["x"])), dims=("y", "x"))
        )
        .transpose("y", "x")
        .values
    )
    if not inside.any():
        raise SourceError(
            f"bbox {bbox} selects no cell: the data cover {kind} "
            f"[{float(lon.min()):g}, {float(lat.min()):g}, {float(lon.max()):g}, "
            f"{float(lat.max()):g}]. Give a box (W,S,E,N) inside that range."
        )
    ys, xs = np.nonzero(inside)
    return ds.isel(y=slice(ys.min(), ys.max() + 1), x=slice(xs.min(), xs.max() + 1))


def store_variables(ds: xr.Dataset) -> list[str]:
    """The data variables of a store (or normalised source): ``precip``, or its several fields."""
    if PRECIP in ds.data_vars:
        return [PRECIP]
    return [str(v) for v in ds.data_vars if ds[v].dims == ("time", "y", "x")]


def coarsen(ds: xr.Dataset, k: int) -> xr.Dataset:
    """Mean over k x k blocks (a block with any NaN is NaN); trailing rows/columns trimmed."""
    if k <= 1:
        return ds
    if ds.sizes["y"] < k or ds.sizes["x"] < k:
        raise SourceError(
            f"cannot coarsen {ds.sizes['y']}x{ds.sizes['x']} cells by {k}: the region is smaller "
            "than one block. Use a smaller --coarsen or a larger region."
        )
    names = store_variables(ds)
    attrs = {n: ds[n].attrs for n in names}
    out = ds.coarsen(y=k, x=k, boundary="trim").mean()  # coordinates averaged too
    for name in names:
        any_nan = ds[name].isnull().coarsen(y=k, x=k, boundary="trim").any()
        out[name] = out[name].where(~any_nan)
        out[name].attrs = attrs[name]
    out.attrs = {**ds.attrs, "cloudburst_coarsen": k}
    return out


def default_chunks(nt: int, ny: int, nx: int, min_time: int = 1) -> dict[str, int]:
    """Chunks of about 4 MB: whole small grids or 256-cell tiles, as many steps as fit."""
    cy, cx = min(ny, 256), min(nx, 256)
    ct = max(min_time, CHUNK_TARGET_BYTES // (4 * cy * cx))
    return {"time": int(min(nt, ct)), "y": int(cy), "x": int(cx)}


# ---------------------------------------------------------------------------- store


def read_marker(target: str, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The completion marker of the store ``target`` (also where older stores kept it)."""
    return markers.read_marker(target, options, legacy=(LEGACY_MARKER,))


def _looks_like_zarr(target: str, options: dict[str, Any] | None) -> bool:
    return storage.exists(storage.join(target, "zarr.json"), options)


@contextlib.contextmanager
def _writing(target: str) -> Iterator[None]:
    """A failed write to object storage (retries spent) raised as a StorageError naming it."""
    try:
        yield
    except OSError as exc:
        if not storage.is_remote(target) or isinstance(exc, FileNotFoundError):
            raise
        raise storage.gave_up("writing the store", target, exc) from exc


@dataclass
class IngestResult:
    target: str
    stats: StoreStats
    shape: tuple[int, int, int]
    chunks: dict[str, int]
    skipped: bool
    seconds: float
    variables: dict[str, StoreStats] | None = None  # several-variable stores: each one's


def ingest(
    source: str | list[str] | xr.Dataset,
    target: str,
    *,
    variable: str | None = None,
    units: str | dict[str, str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    coarsen_by: int = 1,
    chunks: dict[str, int] | None = None,
    bins: int = 100,
    time_start: str | None = None,
    time_end: str | None = None,
    source_options: dict[str, Any] | None = None,
    target_options: dict[str, Any] | None = None,
    progress: bool = True,
    member: int | str | None = None,
    variables: list[str] | None = None,
    grid: str | None = None,
    missing_values: float | dict[str, float] | None = None,
) -> IngestResult:
    """Write ``source`` (cropped, coarsened) to the Zarr v3 store ``target``; see module doc.

    ``member`` picks one member of a source with an ensemble dimension (a label of its member
    coordinate, e.g. UKCP18's ``ensemble_member``); required when it has several.

    ``variables`` writes several variables into one store instead of one precipitation
    variable: on the grid of ``grid`` (see :func:`sources.open_fields`), ``units`` one for all
    or per variable where the file lacks them; ``bbox`` is then in the grid's coordinates.
    The result's ``stats`` are the first variable's, ``variables`` holds each one's.
    ``missing_values`` (several variables only): the source value that means no data, one for
    all or per variable; it becomes NaN before regridding.
    """
    t0 = _time.perf_counter()
    if bins < 2:
        raise ValueError(f"bins must be >= 2 (got {bins})")
    several = variables is not None
    if several and variable is not None:
        raise ValueError("give either variable (one precipitation variable) or variables")
    if not several and (grid is not None or isinstance(units, dict)):
        raise ValueError("grid and per-variable units apply to several variables (variables)")
    storage.check_reachable(target, target_options)
    if several:
        ds = open_fields(
            source,
            list(variables or []),
            grid=grid,
            units=units,
            missing_values=missing_values,
            region=lambda d: crop(d, bbox),
            storage_options=source_options,
            time_start=time_start,
            time_end=time_end,
            member=member,
        )
        ds = coarsen(ds, coarsen_by)
        names = store_variables(ds)
    else:
        ds = open_source(
            source,
            variable=variable,
            units=units if isinstance(units, str) or units is None else None,
            storage_options=source_options,
            time_start=time_start,
            time_end=time_end,
            member=member,
        )
        ds = coarsen(crop(ds, bbox), coarsen_by)
        names = [PRECIP]
    nt, ny, nx = (ds.sizes[d] for d in ("time", "y", "x"))
    layout = default_chunks(nt, ny, nx)
    layout.update({k: min(int(v), ds.sizes[k]) for k, v in (chunks or {}).items()})

    request: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": ds.attrs.get("cloudburst_source", ""),
        "variable": ds[PRECIP].attrs.get("source_variable") if not several else None,
        "units": ds[PRECIP].attrs.get("source_units") if not several else None,
        "bbox": list(bbox) if bbox else None,
        "coarsen": coarsen_by,
        "chunks": layout,
        "bins": bins,
        "shape": [nt, ny, nx],
        "time": [str(ds.time.values[0]), str(ds.time.values[-1])],
    }
    if several:  # only in several-variable stores, so the others keep their fingerprint
        request["variables"] = names
        request["grid"] = ds.attrs.get("cloudburst_grid")
        request["units"] = {n: ds[n].attrs.get("source_units", "") for n in names}
        if any("regrid_method" in ds[n].attrs for n in names):
            request["regrid"] = REGRID_METHOD
        if missing_values is not None:
            request["missing_values"] = missing_values
    # only where they apply, so stores of Gregorian single-member sources keep their fingerprint
    calendar = calendars.calendar_of(ds.time.values)
    if calendar != calendars.STANDARD:
        request["calendar"] = calendar
    if member is not None:
        request["member"] = ds.attrs.get("cloudburst_member", str(member))
    fingerprint = markers.fingerprint(request, default=str)
    marker = read_marker(target, target_options)
    if marker is not None and marker.get("fingerprint") == fingerprint:
        return IngestResult(
            target,
            StoreStats.from_dict(marker["stats"]),
            (nt, ny, nx),
            layout,
            skipped=True,
            seconds=_time.perf_counter() - t0,
            variables=_marker_variables(marker) if several else None,
        )
    if (
        marker is None
        and storage.exists(target, target_options)
        and not _looks_like_zarr(target, target_options)
    ):
        fs, path = storage.filesystem(target, target_options)
        if not fs.isdir(path) or fs.ls(path):
            raise StoreError(
                f"{target} exists and is not a Cloudburst store; refusing to overwrite it. "
                "Choose another target or remove it."
            )
    if marker is not None:  # a different request: the old store stops being complete first
        markers.remove_marker(target, target_options, legacy=(LEGACY_MARKER,))

    zarr_target = storage.local_path(target) if not storage.is_remote(target) else target
    so = storage.zarr_options(target, target_options) if storage.is_remote(target) else None
    encoding = {n: {"chunks": (layout["time"], layout["y"], layout["x"])} for n in names}
    for name in ds.coords:
        ds[name].encoding = {}
    template = ds.chunk({"time": layout["time"], "y": -1, "x": -1})
    region_vars = [v for v in template.variables if "time" not in template[v].dims]
    for name in region_vars:  # written with the template, so they must not stay lazy (dask)
        template.variables[name].load()
    accs: dict[str, Any] = {
        n: FieldStatsAccumulator() if several else StatsAccumulator() for n in names
    }
    try:
        with _writing(target):
            template.to_zarr(
                zarr_target,
                mode="w",
                compute=False,
                zarr_format=3,
                encoding=encoding,
                consolidated=False,
                storage_options=so,
            )
        per_step = 4 * ny * nx * len(names)
        step = layout["time"] * max(1, WRITE_BLOCK_BYTES // (per_step * layout["time"]))
        bar = tqdm(total=nt, desc=f"ingest {target}", unit="step", disable=not progress)
        for a in range(0, nt, step):
            b = min(nt, a + step)
            block = ds.isel(time=slice(a, b)).drop_vars(region_vars).load()
            for name in names:
                accs[name].add(block[name].values)
            with _writing(target):
                block.to_zarr(
                    zarr_target,
                    region={"time": slice(a, b)},
                    zarr_format=3,
                    consolidated=False,
                    storage_options=so,
                )
            bar.update(b - a)
        bar.close()
        if several:
            all_stats = _second_pass(accs, zarr_target, so, step, bins, ds)
        else:
            all_stats = {PRECIP: accs[PRECIP].finish(bins, units=ds[PRECIP].attrs.get("units", ""))}
    except BaseException:
        try:
            storage.remove(target, target_options)
        except Exception as exc:  # noqa: BLE001 - the write's own error is the one to raise
            log.warning("could not remove the incomplete store %s: %s", target, exc)
        raise
    stats = all_stats[names[0]]
    record: dict[str, Any] = {
        "fingerprint": fingerprint,
        "request": request,
        "stats": stats.to_dict(),
        "written": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime()),
    }
    if several:
        record["variables"] = {n: s.to_dict() for n, s in all_stats.items()}
    markers.write_marker(target, record, target_options)
    return IngestResult(
        target,
        stats,
        (nt, ny, nx),
        layout,
        skipped=False,
        seconds=_time.perf_counter() - t0,
        variables=all_stats if several else None,
    )


def _second_pass(
    accs: dict[str, FieldStatsAccumulator],
    zarr_target: str,
    storage_options: dict[str, Any] | None,
    step: int,
    bins: int,
    ds: xr.Dataset,
) -> dict[str, StoreStats]:
    """Finish the statistics of every variable by reading the written store back in blocks."""
    written = xr.open_zarr(
        zarr_target,
        chunks=None,
        consolidated=False,
        zarr_format=3,
        storage_options=storage_options,
    )
    nt = written.sizes["time"]
    out = {}
    for name, acc in accs.items():
        acc.begin_refine(bins)
        for a in range(0, nt, step):
            acc.refine(np.asarray(written[name].isel(time=slice(a, a + step)).values))
        out[name] = acc.finish(units=str(ds[name].attrs.get("units", "")))
    return out


def _marker_variables(marker: dict[str, Any]) -> dict[str, StoreStats]:
    if "variables" in marker:
        return {n: StoreStats.from_dict(s) for n, s in marker["variables"].items()}
    return {PRECIP: StoreStats.from_dict(marker["stats"])}


def variable_stats(target: str, options: dict[str, Any] | None = None) -> dict[str, StoreStats]:
    """Statistics of every variable of the complete store ``target``, by name (a precipitation
    store: ``{"precip": ...}``)."""
    marker = read_marker(target, options)
    if marker is None:
        open_store(target, options)  # raises the error that says what is wrong
        raise StoreError(f"{target} has no completion marker")
    return _marker_variables(marker)


def ingest_config(
    cfg: IngestConfig,
    *,
    source_options: dict[str, Any] | None = None,
    target_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> IngestResult:
    """:func:`ingest` as a config asks (``cfg.source`` must be set)."""
    if cfg.source is None:
        raise ValueError("ingest needs a source; without one, generate synthetic data instead")
    return ingest(
        cfg.source,
        cfg.target,
        variable=cfg.variable,
        units=cfg.units,
        bbox=cfg.bbox,
        coarsen_by=cfg.coarsen,
        chunks=cfg.chunks,
        bins=cfg.bins,
        time_start=cfg.time_start,
        time_end=cfg.time_end,
        source_options=source_options,
        target_options=target_options,
        progress=progress,
        member=cfg.member,
        variables=cfg.variables,
        grid=cfg.grid,
        missing_values=cfg.missing_values,
    )


def open_store(target: str, options: dict[str, Any] | None = None) -> tuple[xr.Dataset, StoreStats]:
    """Open a complete store lazily (no dask: reads go straight to zarr) with its statistics
    (of its first variable in a several-variable store: see :func:`variable_stats`)."""
    storage.check_reachable(target, options)
    marker = read_marker(target, options)
    if marker is None:
        if storage.exists(target, options):
            raise StoreError(
                f"{target} is incomplete (no completion marker): an ingest into it did not "
                "finish. Re-run the ingest."
            )
        raise StoreError(f"no store at {target}. Create it with `cloudburst ingest`.")
    remote = storage.is_remote(target)
    zarr_target = target if remote else storage.local_path(target)
    with warnings.catch_warnings():  # zarr notes the marker is not a zarr node: it is ours
        warnings.filterwarnings("ignore", message=".*not recognized as a component")
        ds = xr.open_zarr(
            zarr_target,
            chunks=None,
            consolidated=False,
            zarr_format=3,
            storage_options=storage.zarr_options(target, options) if remote else None,
        )
    return ds, StoreStats.from_dict(marker["stats"])


def describe(target: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary `cloudburst info` prints (with each variable's, for several variables)."""
    ds, stats = open_store(target, options)
    marker = read_marker(target, options) or {}
    if PRECIP not in ds.data_vars:
        return _describe_fields(target, ds, marker)
    da = ds[PRECIP]
    return {
        "target": target,
        "variable": PRECIP,
        "source_variable": da.attrs.get("source_variable"),
        "units": da.attrs.get("units"),
        "dims": list(da.dims),
        "shape": list(da.shape),
        "chunks": marker.get("request", {}).get("chunks"),
        "coords": sorted(str(c) for c in ds.coords),
        "time_start": calendars.iso(ds.time.values[0], unit="s"),
        "time_end": calendars.iso(ds.time.values[-1], unit="s"),
        "calendar": calendars.calendar_of(ds.time.values),
        "time_step_hours": float(
            np.median(calendars.deltas(ds.time.values)) / np.timedelta64(1, "h")
        )
        if ds.sizes["time"] > 1
        else None,
        "nan_fraction": stats.nan_fraction,
        "wet_fraction": stats.wet_fraction,
        "mean": stats.mean,
        "max": stats.max,
        "quantiles": stats.quantiles,
        "bins": stats.bins,
        "source": marker.get("request", {}).get("source"),
    }


def _describe_fields(target: str, ds: xr.Dataset, marker: dict[str, Any]) -> dict[str, Any]:
    request = marker.get("request", {})
    names = list(request.get("variables") or store_variables(ds))
    per = _marker_variables(marker)
    nt, ny, nx = (int(ds.sizes[d]) for d in ("time", "y", "x"))
    variables = {}
    for name in names:
        st, attrs = per[name], ds[name].attrs
        variables[name] = {
            "source_variable": attrs.get("source_variable"),
            "units": attrs.get("units"),
            "regridded_from": attrs.get("regridded_from"),
            "regrid_outside_cells": attrs.get("regrid_outside_cells"),
            "nan_fraction": st.nan_fraction,
            "min": st.min,
            "max": st.max,
            "mean": st.mean,
            "quantiles": st.quantiles,
        }
    return {
        "target": target,
        "variables": variables,
        "grid": request.get("grid"),
        "dims": ["time", "y", "x"],
        "shape": [nt, ny, nx],
        "chunks": request.get("chunks"),
        "coords": sorted(str(c) for c in ds.coords),
        "time_start": calendars.iso(ds.time.values[0], unit="s"),
        "time_end": calendars.iso(ds.time.values[-1], unit="s"),
        "calendar": calendars.calendar_of(ds.time.values),
        "time_step_hours": float(
            np.median(calendars.deltas(ds.time.values)) / np.timedelta64(1, "h")
        )
        if nt > 1
        else None,
        "bins": per[names[0]].bins,
        "source": request.get("source"),
    }
