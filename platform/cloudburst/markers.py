"""Completion markers and request fingerprints of the stores Cloudburst writes.

An ingested store and an ensemble store are both written piece by piece and marked complete
last: the marker ``_cloudburst/complete.json`` (inside the store's Cloudburst subgroup, see
:data:`cloudburst.storage.SIDECAR`) is a JSON object holding at least the ``fingerprint`` of
the request that made the store. A store without a marker never reads as complete; a store
whose marker holds the same fingerprint as a new request is that request's result.

The formats are stable: stores written by earlier versions stay valid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from cloudburst import storage

MARKER_NAME = "complete.json"
MARKER = f"{storage.SIDECAR}/{MARKER_NAME}"  # relative to the store's URL


def fingerprint(identity: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """A stable 16-hex-digit key of a JSON-able ``identity``: the SHA-256 of its JSON with
    sorted keys.

    ``default`` is :func:`json.dumps`'s: how values JSON cannot encode are turned into ones it
    can (e.g. ``str``); without it such values raise ``TypeError``. It does not change the key
    of an identity that is JSON-able as it is.
    """
    blob = json.dumps(identity, sort_keys=True, default=default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_marker(
    url: str, options: dict[str, Any] | None = None, *, legacy: Iterable[str] = ()
) -> dict[str, Any] | None:
    """The completion marker of the store at ``url``, or None when it has none.

    ``legacy``: other marker paths (relative to ``url``) tried in order after :data:`MARKER`,
    for stores written before the marker moved there.
    """
    for name in (MARKER, *legacy):
        try:
            return json.loads(storage.read_bytes(storage.join(url, name), options))
        except FileNotFoundError:
            continue
    return None


def write_marker(url: str, body: dict[str, Any], options: dict[str, Any] | None = None) -> None:
    """Write ``body`` as the completion marker of the store at ``url``, atomically (readers see
    no marker or the whole one). Call it last, once everything else is written."""
    storage.write_sidecar(url, MARKER_NAME, json.dumps(body, indent=1).encode(), options)


def remove_marker(
    url: str, options: dict[str, Any] | None = None, *, legacy: Iterable[str] = ()
) -> None:
    """Remove the completion marker (and the ``legacy`` ones): the store stops being complete."""
    for name in (MARKER, *legacy):
        storage.remove(storage.join(url, name), options, recursive=False)
