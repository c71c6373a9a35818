"""Ray's view of a storage URL: a path and a ``pyarrow.fs.FileSystem`` for Train and Tune.

Ray Train and Ray Tune write results and checkpoints through ``pyarrow.fs``. Given an
``s3://`` or ``gs://`` URL alone, pyarrow resolves its own client, which knows nothing of
Cloudburst's storage options (an S3- or GCS-compatible endpoint, anonymous access, the
bounded retry policy of :mod:`cloudburst.storage`). :func:`ray_storage` gives Ray the same
fsspec filesystem the rest of Cloudburst uses, wrapped for pyarrow, so checkpoints, their
resumption and Tune's experiment state go where the data and models go, on every node.

With a filesystem given, Ray takes the path without its scheme (``s3://bucket/runs`` ->
``bucket/runs``); local paths go to Ray as absolute paths, with no filesystem, as before.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cloudburst import storage

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = ["arrow_filesystem", "ray_storage"]

# Ray reads back what other processes (other nodes) wrote: a run's checkpoint index, a
# sweep's experiment state. Listings are not cached, so no process sees a stale folder.
UNCACHED = {"use_listings_cache": False}


def arrow_filesystem(url: str, options: dict[str, Any] | None = None) -> pyarrow.fs.FileSystem:
    """A ``pyarrow.fs`` filesystem over Cloudburst's fsspec filesystem for ``url``'s store.

    It pickles (the fsspec filesystem is rebuilt from its options in each process), so Ray
    can hand it to its controller and workers on other nodes."""
    import pyarrow.fs

    fs, _ = storage.filesystem(url, {**(options or {}), **UNCACHED})
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_storage(
    url: str, options: dict[str, Any] | None = None, *, check: bool = False
) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig`` (Train and Tune) and
    ``Tuner.restore`` from a storage URL and its storage options.

    Object storage (``s3://``, ``gs://``): the bucket-relative path and a filesystem built
    from ``options`` (:func:`cloudburst.storage.options_from`). A local path or ``file://``
    URL: its absolute path and None (Ray's local filesystem). With ``check``, a location
    that cannot be written to (unreachable endpoint, missing bucket) raises
    :class:`cloudburst.storage.StorageError` first, within seconds.
    """
    if not storage.is_remote(url):
        return os.path.abspath(storage.local_path(url)), None
    if check:
        storage.check_writable(url, options)
    _, path = storage.filesystem(url, options)
    return path.rstrip("/"), arrow_filesystem(url, options)
