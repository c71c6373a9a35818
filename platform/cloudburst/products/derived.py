"""A store derived from another by a model: created for one request, complete or absent.

The request's identity (the model version, the source store's fingerprint, what is made) is
hashed into a fingerprint (:func:`cloudburst.markers.fingerprint`). :func:`write_derived`
creates the Zarr v3 group, lets the caller fill it block by block, and writes the completion
marker last; a complete store of the same fingerprint is returned as it is (nothing is
recomputed); a complete store of another request, or anything that is not a Cloudburst store,
is refused; a run that fails removes what it created, so no half-written store is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import xarray as xr
import zarr

from cloudburst import __version__, storage
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import resolve_variable
from cloudburst.markers import fingerprint, read_marker, write_marker

__all__ = ["DerivedStoreError", "open_derived", "source_field", "write_derived"]

log = logging.getLogger(__name__)


class DerivedStoreError(RuntimeError):
    """The output cannot take this product (another product, not a store, incomplete...)."""


def write_derived(
    url: str,
    options: dict[str, Any] | None,
    identity: dict[str, Any],
    fill: Callable[[zarr.Group], dict[str, Any]],
    *,
    kind: str,
) -> dict[str, Any]:
    """Create the store at ``url`` for ``identity`` and ``fill(group)`` it; returns its marker.

    ``fill`` writes the arrays and attributes and returns a summary (JSON-able) that goes into
    the marker; the provenance attributes (``cloudburst_product``, ``cloudburst_fingerprint``,
    ``request``) are added after it. ``kind`` names the product in messages and attributes
    (``codes``, ``translation``).
    """
    key = fingerprint(identity, default=str)
    marker = read_marker(url, options)
    if marker is not None:
        if marker.get("fingerprint") == key:
            log.info("%s at %s is complete already (same request): kept", kind, url)
            return marker
        raise DerivedStoreError(
            f"{url} holds another complete store (fingerprint {marker.get('fingerprint')}); "
            "choose another output or remove it"
        )
    if storage.exists(url, options):
        fs, path = storage.filesystem(url, options)
        if not fs.isdir(path) or fs.ls(path):
            raise DerivedStoreError(
                f"{url} exists and is not a complete {kind} store; refusing to overwrite it. "
                "Choose another output or remove it."
            )
    t0 = time.perf_counter()
    try:
        group = zarr.open_group(storage.zarr_store(url, options), mode="w", zarr_format=3)
        summary = fill(group)
        # after the fill: writing coordinates through xarray replaces the group's attributes
        group.attrs.update(
            {
                "cloudburst_product": kind,
                "cloudburst_fingerprint": key,
                "cloudburst_version": __version__,
                "request": identity,
            }
        )
        body = {
            "fingerprint": key,
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - t0, 3),
            **summary,
        }
        write_marker(url, body, options)
    except BaseException:
        try:
            storage.remove(url, options)
        except Exception as exc:  # noqa: BLE001 - the fill's own error is the one to raise
            log.warning("could not remove the unfinished %s store %s: %r", kind, url, exc)
        raise
    return body


def source_field(
    source: str, variable: str | None, options: dict[str, Any] | None
) -> tuple[xr.Dataset, str, xr.DataArray]:
    """(the ingested store ``source``, the variable's name, its (time, y, x) field):
    ``variable``, or the store's single variable; an error names the store's variables."""
    ds, _ = open_store(source, options)
    name = resolve_variable([str(v) for v in ds.data_vars], variable, "input")
    field = ds[name]
    if tuple(field.dims) != ("time", "y", "x"):
        raise ValueError(f"{source}:{name} has dims {field.dims}; expected (time, y, x)")
    return ds, name, field


def open_derived(url: str, options: dict[str, Any] | None, kind: str) -> zarr.Group:
    """The complete ``kind`` store at ``url`` (read-only); refused when incomplete or another
    kind."""
    marker = read_marker(url, options)
    if marker is None:
        raise DerivedStoreError(
            f"{url} is not a complete {kind} store (no completion marker); make it again"
        )
    if marker.get("kind") != kind:
        raise DerivedStoreError(f"{url} is a {marker.get('kind')} store, not a {kind} store")
    return zarr.open_group(storage.zarr_store(url, options, read_only=True), mode="r")
