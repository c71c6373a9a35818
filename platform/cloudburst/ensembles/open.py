"""Open a complete ensemble store with xarray: :func:`open_ensemble` (``cloudburst.open_ensemble``).

The dataset is the store as :mod:`cloudburst.ensembles.store` lays it out, read lazily
(dask, one chunk per member chunk): ``precip`` (member, time, y, x) in CF units, the
importance ``weight`` and the ``candidate`` of each member as data variables, coordinates
``member``, ``time``, ``y``, ``x``; its attributes are the store's provenance (model URI and
version, run id, seed rule...), with ``request`` parsed back from JSON into a dict (dump it
again before ``to_netcdf``), and from the completion marker ``draws`` (N, the number of draws
the members came from: weighted estimates divide by it, see
:func:`cloudburst.ensembles.extremes.exceedance_probability`), ``acceptance_rate`` and
``completed`` (when the marker was written).

A store without its completion marker (a generation interrupted or still running) and a path
that holds no ensemble store are refused with :class:`EnsembleStoreError`, saying why.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import xarray as xr
import zarr

from cloudburst import storage
from cloudburst.ensembles.store import FORMAT, PROGRESS, EnsembleStoreError
from cloudburst.markers import MARKER, read_marker

__all__ = ["open_ensemble"]

log = logging.getLogger(__name__)

# marker fields copied into the dataset's attributes (when present and not None)
MARKER_ATTRS = {"draws": "draws", "acceptance_rate": "acceptance_rate", "written": "completed"}


def open_ensemble(url: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The complete ensemble store at ``url`` (a local path, ``file://``, ``s3://``, ``gs://``)
    as a lazily read :class:`xarray.Dataset`; ``storage_options``: fsspec options of its
    filesystem (endpoint, credentials...), as the request's ``storage.options``.

    Refuses (:class:`EnsembleStoreError`) a path that is not a Cloudburst ensemble store and a
    store that is not complete yet.
    """
    url = str(url)
    options = dict(storage_options or {})
    attrs = ensemble_attrs(url, options)
    marker = read_marker(url, options)
    if marker is None:
        raise EnsembleStoreError(incomplete_message(url, options, attrs))
    key = attrs.get("cloudburst_fingerprint")
    if marker.get("fingerprint") != key:
        raise EnsembleStoreError(
            f"{url}: its completion marker ({MARKER}) belongs to another ensemble "
            f"(fingerprint {marker.get('fingerprint')}, the store's {key}); the store was "
            "overwritten mid-way. Re-run its request to finish it."
        )
    store = storage.zarr_store(url, options, read_only=True)
    ds = xr.open_zarr(store, consolidated=False)
    try:
        ds.attrs["request"] = json.loads(str(ds.attrs["request"]))
    except (KeyError, ValueError):
        log.warning("%s: its request attribute is not JSON; left as it is", url)
    for field, name in MARKER_ATTRS.items():
        if marker.get(field) is not None:
            ds.attrs[name] = marker[field]
    log.info("opened ensemble %s: %d members", url, ds.sizes.get("member", 0))
    return ds


def ensemble_attrs(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The group attributes of the ensemble store at ``url``; refuses anything else."""
    if not storage.exists(url, options):
        raise EnsembleStoreError(f"{url} does not exist; no ensemble store to open there")
    fs, path = storage.filesystem(url, options)
    if fs.isfile(path):
        raise EnsembleStoreError(f"{url} is a file, not a Cloudburst ensemble store")
    if not storage.exists(storage.join(url, "zarr.json"), options):
        raise EnsembleStoreError(
            f"{url} is not a Cloudburst ensemble store (no zarr.json: not a Zarr v3 store); "
            "give the URL of a store written by an ensemble request"
        )
    try:
        group = zarr.open_group(storage.zarr_store(url, options, read_only=True), mode="r")
    except (zarr.errors.BaseZarrError, ValueError, TypeError) as exc:
        raise EnsembleStoreError(f"{url} is not a Cloudburst ensemble store ({exc})") from None
    attrs = dict(group.attrs)
    if attrs.get("cloudburst_format") != FORMAT:
        raise EnsembleStoreError(
            f"{url} is a Zarr store but not a Cloudburst ensemble (its cloudburst_format is "
            f"{attrs.get('cloudburst_format')!r}, expected {FORMAT!r})"
        )
    if not attrs.get("cloudburst_fingerprint") or "precip" not in group:
        raise EnsembleStoreError(incomplete_message(url, options, attrs, created=False))
    return attrs


def incomplete_message(
    url: str, options: dict[str, Any], attrs: dict[str, Any], *, created: bool = True
) -> str:
    """Why the ensemble at ``url`` cannot be opened yet, and how to finish it."""
    if created:
        done = written_chunks(url, options)
        members = json_field(attrs.get("request"), "members")
        chunk = attrs.get("chunk_members")
        total = -(-int(members) // int(chunk)) if members and chunk else None
        progress = f"{done} of {total}" if total is not None else f"{done}"
        state = f"{progress} member chunks written, no completion marker {MARKER}"
    else:
        state = "its creation was cut short before its layout was written"
    return (
        f"{url} is an incomplete ensemble ({state}): its generation was interrupted or is "
        "still running. Finish it by re-running the same request (same model, members, seed "
        "and scenario, e.g. python jobs/ensemble.py ... --output with this URL, or "
        "cloudburst.ensembles.generate.generate): it resumes, writing only the missing chunks."
    )


def written_chunks(url: str, options: dict[str, Any]) -> int:
    """How many member chunks have a progress record."""
    fs, path = storage.filesystem(storage.join(url, PROGRESS), options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return 0
    return sum(1 for name in names if str(name).rstrip("/").rsplit("/", 1)[-1].startswith("chunk-"))


def json_field(blob: Any, field: str) -> Any:
    """``field`` of a JSON object given as text; None when it is not one."""
    try:
        value = json.loads(str(blob))
    except (TypeError, ValueError):
        return None
    return value.get(field) if isinstance(value, dict) else None
