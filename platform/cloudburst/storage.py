"""Where bytes live: URLs to fsspec filesystems, storage options, atomic writes, fast failure.

Every place in Cloudburst that reads or writes a store goes through here, so that a local path,
``file://``, ``s3://`` and ``gs://`` behave the same, and an unreachable endpoint or a missing
bucket is reported within seconds with what to do about it.

Storage options come from (highest first) explicit arguments, then the environment:

- ``CLOUDBURST_ENDPOINT_URL``: endpoint of an S3- or GCS-compatible server;
- ``CLOUDBURST_ANON``: ``1``/``true`` for anonymous (public bucket) access.

Retries are bounded, and every retry is logged (WARNING, logger ``cloudburst.storage``):

- ``CLOUDBURST_STORAGE_ATTEMPTS`` (default 5): attempts botocore makes of one S3 request
  (the first included), in ``CLOUDBURST_STORAGE_RETRY_MODE`` (``standard``, the default, or
  ``adaptive``): 5xx answers, throttling and dropped connections are retried with capped
  exponential backoff. s3fs repeats a request that still failed at the connection level or
  was throttled (``SlowDown``) up to :data:`S3FS_REPEATS` times, so such a request is sent
  at most ``S3FS_REPEATS x attempts`` times;
- gcsfs makes at most :data:`GCSFS_ATTEMPTS` attempts of a GCS request (fixed by gcsfs),
  each bounded by ``CLOUDBURST_STORAGE_TIMEOUT_S`` (default 60 s, also S3's read timeout).

The libraries retry inside their own calls and note it at DEBUG only; :func:`log_retries`
(installed on import) turns those notes into WARNINGs; an operation that still fails once
its retries are spent raises :class:`StorageError` naming the store and this policy.

Credentials themselves are left to the usual mechanisms (``AWS_ACCESS_KEY_ID``, application
default credentials, ...).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

from cloudburst import environment, netcheck

# before fsspec can load gcsfs, which reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT once, at import:
# unless told not to, it probes every bucket for hierarchical namespaces, about 60 s per bucket
# call against emulators and with anonymous access (export "true" to opt back in)
environment.apply_defaults(environment.IMPORT)

import fsspec  # noqa: E402

log = logging.getLogger(__name__)

REMOTE_PROTOCOLS = ("s3", "gs", "gcs")
CONNECT_TIMEOUT_S = 3.0
ATTEMPTS_ENV = "CLOUDBURST_STORAGE_ATTEMPTS"
RETRY_MODE_ENV = "CLOUDBURST_STORAGE_RETRY_MODE"
TIMEOUT_ENV = "CLOUDBURST_STORAGE_TIMEOUT_S"
DEFAULT_ATTEMPTS = 5
DEFAULT_RETRY_MODE = "standard"
DEFAULT_TIMEOUT_S = 60.0
RETRY_MODES = ("standard", "adaptive")
S3FS_REPEATS = 5  # s3fs.S3FileSystem.retries: its own loop around botocore's
GCSFS_ATTEMPTS = 6  # gcsfs.retry.retry_request's default, used by every GCS request
BOTOCORE_POOL = 10  # botocore.config.Config's default max_pool_connections


class StorageError(RuntimeError):
    """A store or object location cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often one object-store request is tried before its error is raised."""

    attempts: int  # botocore's total attempts of an S3 request
    mode: str  # botocore retry mode: standard or adaptive
    timeout_s: float  # read timeout (S3), request timeout (GCS)

    def describe(self, url: str) -> str:
        if protocol_of(url) == "gs":
            return f"gcsfs: up to {GCSFS_ATTEMPTS} attempts per request"
        return (
            f"botocore {self.mode} mode: up to {self.attempts} attempts per request "
            f"({ATTEMPTS_ENV}), repeated up to {S3FS_REPEATS} times by s3fs on dropped "
            "connections and throttling"
        )


def retry_policy() -> RetryPolicy:
    """The retry policy from the environment (see the module doc); bad values raise."""
    raw = os.environ.get(ATTEMPTS_ENV, str(DEFAULT_ATTEMPTS))
    mode = os.environ.get(RETRY_MODE_ENV, DEFAULT_RETRY_MODE).strip().lower()
    raw_timeout = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        attempts, timeout_s = int(raw), float(raw_timeout)
    except ValueError:
        attempts, timeout_s = 0, 0.0
    if attempts < 1 or attempts > 20 or mode not in RETRY_MODES or not timeout_s > 0:
        raise StorageError(
            f"bad retry settings: {ATTEMPTS_ENV}={raw!r} (an integer 1..20), "
            f"{RETRY_MODE_ENV}={mode!r} (one of {', '.join(RETRY_MODES)}), "
            f"{TIMEOUT_ENV}={raw_timeout!r} (seconds > 0)"
        )
    return RetryPolicy(attempts, mode, timeout_s)


class _RetryNotes(logging.Filter):
    """Sits on a library's logger: re-logs its DEBUG notes of a retry as WARNINGs of
    ``cloudburst.storage`` and lets through only what the logger showed before."""

    def __init__(self, name: str, markers: tuple[str, ...], shown_from: int) -> None:
        super().__init__()
        self.source, self.markers, self.shown_from = name, markers, shown_from

    def filter(self, record: logging.LogRecord) -> bool:
        if any(m in str(record.msg) for m in self.markers):
            log.warning("object store request failed (%s): %s", self.source, record.getMessage())
        return record.levelno >= self.shown_from


_RETRY_LOGGERS = {
    "botocore.retries.standard": ("Retry needed", "retry quota reached", "Max attempts"),
    "botocore.retries.adaptive": ("Retry needed",),
    "s3fs": ("Retryable error",),
    "gcsfs": ("retrying after exception",),
}


def log_retries() -> None:
    """Make the retries s3fs, botocore and gcsfs do inside their calls visible (idempotent)."""
    for name, markers in _RETRY_LOGGERS.items():
        logger = logging.getLogger(name)
        if any(isinstance(f, _RetryNotes) for f in logger.filters):
            continue
        shown_from = logger.getEffectiveLevel()
        logger.addFilter(_RetryNotes(name, markers, shown_from))
        if shown_from > logging.DEBUG:
            logger.setLevel(logging.DEBUG)


log_retries()


def gave_up(action: str, url: str, exc: BaseException) -> StorageError:
    """The error for ``action`` on ``url`` (e.g. "writing") that still failed once the
    retries of its requests were spent: names the store, the retry policy and the cause."""
    try:
        policy = retry_policy().describe(url)
    except StorageError as bad:
        policy = str(bad)
    return StorageError(
        f"{action} {url} failed after retries ({policy}): {type(exc).__name__}: {exc}"
    )


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
    if proto in ("s3", "gs"):
        policy = retry_policy()
    if proto == "s3":
        if endpoint_url:
            opts["endpoint_url"] = endpoint_url
        if anon:
            opts["anon"] = True
        # a bounded retry policy (module doc) instead of botocore's legacy defaults
        opts["config_kwargs"] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": policy.timeout_s,
            "retries": {"total_max_attempts": policy.attempts, "mode": policy.mode},
        }
    elif proto == "gs":
        if endpoint_url:
            opts["endpoint_url"] = endpoint_url
        if anon:
            opts["token"] = "anon"
        opts["requests_timeout"] = policy.timeout_s
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
        if not ok:  # exists() answers False for any failure: ask again, letting errors out
            fs.invalidate_cache(bucket)
            fs.ls(bucket)
    except FileNotFoundError:
        ok = False
    except Exception as exc:  # noqa: BLE001 - any client error means the bucket is unusable
        raise StorageError(
            f"cannot access bucket '{bucket}': {gave_up('reading', url, exc)}. "
            "Check the server, credentials, endpoint and anonymous-access settings."
        ) from exc
    if not ok:
        raise StorageError(
            f"bucket '{bucket}' of {url} does not exist (or is not visible with these "
            "credentials). Create it first, or fix the URL."
        )


def zarr_options(url: str, options: dict[str, Any] | None, requests: int = 1) -> dict[str, Any]:
    """The fsspec options to open the Zarr store ``url`` with: ``options``, tuned on S3.

    On S3, ``max_concurrency`` defaults to 1 (unless ``options`` set it): zarr reads every
    chunk as a whole object, and s3fs with ``max_concurrency`` > 1 sends a HEAD before each
    whole-object GET to decide whether to split it into parallel ranged GETs (only objects
    over its 50 MB block size are split). Chunks are far smaller, and zarr and the loader
    keep many chunk requests in flight themselves, so the HEAD would only add a round trip.
    ``requests``: how many requests the caller keeps in flight at once; on S3 the client's
    connection pool (botocore's ``max_pool_connections``, 10 by default) is made at least
    that large, so they do not queue for a connection.
    """
    opts = dict(options or {})
    if protocol_of(url) == "s3":
        opts.setdefault("max_concurrency", 1)
        config = dict(opts.get("config_kwargs") or {})
        if requests > config.get("max_pool_connections", BOTOCORE_POOL):
            opts["config_kwargs"] = {**config, "max_pool_connections": int(requests)}
    return opts


def zarr_store(
    url: str, options: dict[str, Any] | None, read_only: bool = False, requests: int = 1
) -> Any:
    """The Zarr v3 store object for ``url``: an ``FsspecStore`` on object storage (with
    :func:`zarr_options`), a ``LocalStore`` for a local path or ``file://`` URL."""
    import zarr  # not every user of this module needs it loaded

    if is_remote(url):
        opts = zarr_options(url, options, requests)
        return zarr.storage.FsspecStore.from_url(url, storage_options=opts, read_only=read_only)
    return zarr.storage.LocalStore(local_path(url), read_only=read_only)


def exists(url: str, options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, options)
    return bool(fs.exists(path))


def read_bytes(url: str, options: dict[str, Any] | None = None) -> bytes:
    """The object at ``url``; FileNotFoundError if absent, StorageError once retries are spent."""
    fs, path = filesystem(url, options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise
    except OSError as exc:
        if not is_remote(url):
            raise
        raise gave_up("reading", url, exc) from exc


def write_bytes_atomic(url: str, data: bytes, options: dict[str, Any] | None = None) -> None:
    """Write ``data`` so that readers see either the old object or the whole new one.

    Locally: a temporary file in the same folder, fsynced, then renamed over the target.
    On object storage a single PUT (or a multipart upload, completed last) is already atomic;
    a write that still fails after its retries raises :class:`StorageError`.
    """
    if is_remote(url):
        fs, path = filesystem(url, options)
        try:
            fs.pipe_file(path, data)
        except OSError as exc:
            raise gave_up("writing", url, exc) from exc
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
