"""Where bytes live: URLs to fsspec filesystems, storage options, atomic writes, fast failure.

Every place in Cloudburst that reads or writes a store goes through here, so that a local path,
``file://``, ``s3://`` and ``gs://`` behave the same, and an unreachable endpoint or a missing
bucket is reported within seconds with what to do about it.

Storage options come from (highest first) explicit arguments, then the environment:

- ``CLOUDBURST_ENDPOINT_URL``: endpoint of an S3- or GCS-compatible server;
- ``CLOUDBURST_ANON``: ``1``/``true`` for anonymous (public bucket) access.

Credentials themselves are left to the usual mechanisms (``AWS_ACCESS_KEY_ID``, application
default credentials, ...).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

from cloudburst import environment, netcheck

# before fsspec can load gcsfs, which reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT once, at import:
# unless told not to, it probes every bucket for hierarchical namespaces, about 60 s per bucket
# call against emulators and with anonymous access (export "true" to opt back in)
environment.apply_defaults(environment.IMPORT)

import fsspec  # noqa: E402

REMOTE_PROTOCOLS = ("s3", "gs", "gcs")
CONNECT_TIMEOUT_S = 3.0


class StorageError(RuntimeError):
    """A store or object location cannot be used; the message says why and what to do."""


def protocol_of(url: str) -> str:
    """``"file"``, ``"s3"``, ``"gs"``, ... for a URL or a plain path."""
    if "://" not in str(url):
        return "file"
    proto = str(url).split("://", 1)[0].lower()
    return "gs" if proto == "gcs" else proto


def is_remote(url: str) -> bool:
    return protocol_of(url) in ("s3", "gs")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file://`` stripped)."""
    url = str(url)
    return url[len("file://") :] if url.startswith("file://") else url


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def storage_options(
    url: str,
    *,
    endpoint_url: str | None = None,
    anon: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """fsspec options for ``url`` from arguments and the environment (see module docstring)."""
    proto = protocol_of(url)
    endpoint_url = endpoint_url or os.environ.get("CLOUDBURST_ENDPOINT_URL") or None
    if anon is None and "CLOUDBURST_ANON" in os.environ:
        anon = _truthy(os.environ["CLOUDBURST_ANON"])
    opts: dict[str, Any] = {}
    if proto == "s3":
        if endpoint_url:
            opts["endpoint_url"] = endpoint_url
        if anon:
            opts["anon"] = True
        # fail fast instead of botocore's long default retry/timeout ladder
        opts["config_kwargs"] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": 60,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
    elif proto == "gs":
        if endpoint_url:
            opts["endpoint_url"] = endpoint_url
        if anon:
            opts["token"] = "anon"
        if endpoint_url and "project" not in (extra or {}):
            opts["project"] = os.environ.get("GOOGLE_CLOUD_PROJECT", "cloudburst")
    opts.update(extra or {})
    return opts


def options_from(url: str, settings: Any) -> dict[str, Any]:
    """:func:`storage_options` from a config's storage section (endpoint_url, anon, options)."""
    return storage_options(
        url, endpoint_url=settings.endpoint_url, anon=settings.anon, extra=settings.options
    )


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``."""
    proto = protocol_of(url)
    if proto == "file":
        return fsspec.filesystem("file"), os.path.abspath(local_path(url))
    fs, path = fsspec.core.url_to_fs(str(url), **(options or {}))
    return fs, path


def join(url: str, *parts: str) -> str:
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def endpoint_of(url: str, options: dict[str, Any] | None) -> str | None:
    """The endpoint a remote URL talks to, if it is not the provider's default."""
    if not is_remote(url):
        return None
    return (options or {}).get("endpoint_url") or (
        os.environ.get("STORAGE_EMULATOR_HOST") if protocol_of(url) == "gs" else None
    )


def check_reachable(url: str, options: dict[str, Any] | None = None) -> None:
    """Raise :class:`StorageError` within seconds if the endpoint or bucket is unusable."""
    if not is_remote(url):
        return
    endpoint = endpoint_of(url, options)
    if endpoint:
        failure = netcheck.tcp_probe(*netcheck.endpoint_address(endpoint), CONNECT_TIMEOUT_S)
        if failure is not None:
            raise StorageError(
                f"cannot reach the object-store endpoint {endpoint} for {url}: {failure}. "
                "Check that the server is running and that --endpoint-url / "
                "CLOUDBURST_ENDPOINT_URL points at it."
            )
    fs, path = filesystem(url, options)
    bucket = path.split("/", 1)[0]
    try:
        ok = fs.exists(bucket)
    except Exception as exc:  # noqa: BLE001 - any client error means the bucket is unusable
        raise StorageError(
            f"cannot access bucket '{bucket}' of {url}: {type(exc).__name__}: {exc}. "
            "Check credentials, endpoint and anonymous-access settings."
        ) from exc
    if not ok:
        raise StorageError(
            f"bucket '{bucket}' of {url} does not exist (or is not visible with these "
            "credentials). Create it first, or fix the URL."
        )


def zarr_store(url: str, options: dict[str, Any] | None, read_only: bool = False) -> Any:
    """The Zarr v3 store object for ``url``: an ``FsspecStore`` on object storage (with
    ``options``), a ``LocalStore`` for a local path or ``file://`` URL."""
    import zarr  # not every user of this module needs it loaded

    if is_remote(url):
        return zarr.storage.FsspecStore.from_url(
            url, storage_options=dict(options or {}), read_only=read_only
        )
    return zarr.storage.LocalStore(local_path(url), read_only=read_only)


def exists(url: str, options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, options)
    return bool(fs.exists(path))


def read_bytes(url: str, options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(url: str, data: bytes, options: dict[str, Any] | None = None) -> None:
    """Write ``data`` so that readers see either the old object or the whole new one.

    Locally: a temporary file in the same folder, fsynced, then renamed over the target.
    On object storage a single PUT is already atomic.
    """
    if is_remote(url):
        fs, path = filesystem(url, options)
        fs.pipe_file(path, data)
        return
    path = os.path.abspath(local_path(url))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# Cloudburst's own records inside a Zarr store (completion marker, progress) live in this
# subgroup: readers that list the store (xarray, zarr) see a group and warn about nothing.
SIDECAR = "_cloudburst"
_EMPTY_GROUP = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


def write_sidecar(store_url: str, name: str, data: bytes, options: dict[str, Any] | None) -> None:
    """Write ``data`` as ``SIDECAR/name`` inside the Zarr store ``store_url``, atomically."""
    group = join(store_url, SIDECAR, "zarr.json")
    if not exists(group, options):
        write_bytes_atomic(group, _EMPTY_GROUP, options)
    write_bytes_atomic(join(store_url, SIDECAR, name), data, options)


def remove(url: str, options: dict[str, Any] | None = None, *, recursive: bool = True) -> None:
    fs, path = filesystem(url, options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def check_writable(url: str, options: dict[str, Any] | None = None) -> None:
    """Raise :class:`StorageError` unless an object can be written under ``url``."""
    check_reachable(url, options)
    probe = join(url, f".cloudburst-write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes_atomic(probe, b"ok", options)
        remove(probe, options, recursive=False)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(
            f"cannot write under {url}: {type(exc).__name__}: {exc}. "
            "Choose a location you can write to."
        ) from exc
