"""What the ensemble endpoint may do, and where it may read and write.

:class:`ServeSettings` is the ``args`` of the Serve config (see jobs/configs/serve.yaml). How
object storage is reached comes from these settings only, one storage section per allowed
prefix: a request names a place, never how to get there.

Paths are checked in their resolved form: local paths through ``os.path.realpath`` (symbolic
links and ``..`` followed, also for an output that does not exist yet), object-storage keys
with ``.``, ``..`` and empty segments normalised. Messages name places as the caller wrote them
or by the name of their prefix, never by the server's absolute paths or storage endpoints.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cloudburst import storage, tracking
from cloudburst.config import StorageConfig
from cloudburst.ensembles.request import check_place

log = logging.getLogger(__name__)

MAX_DEPTH = 32  # levels of an output below its prefix
# files that make a folder (or object prefix) a Zarr store or group
STORE_MARKERS = ("zarr.json", ".zgroup", ".zattrs", ".zarray")


class ApiError(Exception):
    """A refusal: the HTTP status and a message that says what was wrong and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class StorePrefix(BaseModel):
    """A place the endpoint may use and how it reaches it."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(min_length=1, description="local folder, s3://BUCKET/KEY/, gs://...")
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="endpoint_url, anon and fsspec options for this prefix (server side only)",
    )
    name: str | None = Field(
        None,
        description="how messages name this prefix (default: an object-storage prefix as "
        "written, a local one relative to root, else 'local prefix N')",
    )


PrefixEntry = str | StorePrefix


class ServeSettings(BaseModel):
    """What the endpoint is allowed to do; the ``args`` of the Serve config."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None, description="folder that relative local paths mean (default: where build runs)"
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI models are loaded from (None: `MLFLOW_TRACKING_URI`, "
        "else the local store under `root`)",
    )
    state_url: str = Field(
        "outputs/serve/state",
        description="where job records are kept: a local path (relative: under `root`) or an "
        "object-storage URL",
    )
    allowed_prefixes: list[PrefixEntry] = Field(
        default_factory=lambda: ["outputs/ensembles"],
        description="where outputs may go: a path or URL, or {prefix, storage, name}",
    )
    data_prefixes: list[PrefixEntry] = Field(
        default_factory=lambda: ["outputs"],
        description="stores that conditional scenarios may read their observed window from",
    )
    api_key: str | None = Field(None, description="required in X-API-Key when set")
    api_key_env: str = Field(
        "CLOUDBURST_API_KEY",
        description="environment variable holding the API key when `api_key` is not set",
    )
    max_members: int = Field(1_000_000, ge=1, description="members one request may ask, at most")
    max_batch_size: int = Field(1024, ge=1, description="a request's `batch_size`, at most")
    max_chunk_members: int = Field(10_000, ge=1, description="a request's `chunk_members`, at most")
    max_candidates_per_member: int = Field(
        1000, ge=1, description="rejection sampling: draws tried per member, at most"
    )
    max_draws: int = Field(
        10_000_000, ge=1, description="members x candidates per member of one job, at most"
    )
    max_steps: int = Field(1000, ge=1, description="diffusion sampler steps a request may ask")
    max_extension_length: int = Field(
        1000, ge=1, description="time steps of an extension member, at most"
    )
    max_body_bytes: int = Field(262_144, ge=1024, description="request body size; then 413")
    job_deadline_s: float = Field(
        21_600.0, gt=0, description="seconds a job may take from submission; then it fails"
    )
    max_queue: int = Field(16, ge=1, description="jobs in flight per ingress replica; then 429")
    max_attempts: int = Field(5, ge=1, description="drives of a job whose replica died")
    min_replicas: int = Field(
        1, ge=0, description="generator replicas the autoscaler keeps, at least (0: none when idle)"
    )
    max_replicas: int = Field(
        2, ge=1, description="generator replicas the autoscaler may start, at most"
    )
    cpus_per_replica: float = Field(
        1.0, gt=0, description="CPUs each generator replica reserves (also its torch threads)"
    )
    gpus_per_replica: float = Field(
        0.0,
        ge=0,
        description="GPUs each generator replica reserves; above 0 models run on CUDA when "
        "available (0: CPU only)",
    )
    job_chunks_in_flight: int = Field(
        0,
        ge=0,
        le=256,
        description="chunk calls one job keeps in flight on the generator replicas (its share "
        "of them: concurrent jobs interleave chunk by chunk); 0 = max_replicas",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the state store (state_url)"
    )

    def key(self) -> str | None:
        return self.api_key or os.environ.get(self.api_key_env) or None

    def chunks_in_flight(self) -> int:
        """Work units one job keeps in flight (``job_chunks_in_flight``, or one per replica)."""
        return self.job_chunks_in_flight or self.max_replicas

    # ------------------------------------------------------------ resolution

    def absolute(self, url: str) -> str:
        """``url`` with a relative local path taken under ``root`` (replicas' working
        directories are not the caller's)."""
        if storage.is_remote(url):
            return url
        return os.path.normpath(os.path.join(self.root or os.getcwd(), storage.local_path(url)))

    def resolved(self) -> ServeSettings:
        """Paths and the tracking URI fixed where ``build`` runs, for every replica alike."""
        root = os.path.abspath(self.root or os.getcwd())
        out = self.model_copy(update={"root": root})

        def fixed(entry: PrefixEntry) -> PrefixEntry:
            if isinstance(entry, str):
                return out.absolute(entry)
            return entry.model_copy(update={"prefix": out.absolute(entry.prefix)})

        return out.model_copy(
            update={
                "state_url": out.absolute(self.state_url),
                "allowed_prefixes": [fixed(p) for p in self.allowed_prefixes],
                "data_prefixes": [fixed(p) for p in self.data_prefixes],
                "tracking_uri": tracking.tracking_uri(self.tracking_uri, root=root),
            }
        )

    def outputs(self) -> list[StorePrefix]:
        """The allowed output prefixes, each with its storage section and display name."""
        return self._entries(self.allowed_prefixes, "output")

    def sources(self) -> list[StorePrefix]:
        """The prefixes conditional scenarios may read from."""
        return self._entries(self.data_prefixes, "data")

    def _entries(self, entries: list[PrefixEntry], kind: str) -> list[StorePrefix]:
        out = []
        for i, entry in enumerate(entries):
            item = StorePrefix(prefix=entry) if isinstance(entry, str) else entry
            prefix = self.absolute(item.prefix)
            if item.name:
                name = item.name
            elif storage.is_remote(prefix):
                name = prefix
            else:
                root = os.path.abspath(self.root or os.getcwd())
                rel = os.path.relpath(prefix, root)
                name = rel if not rel.startswith("..") else f"local {kind} prefix {i + 1}"
            out.append(item.model_copy(update={"prefix": prefix, "name": name}))
        return out

    def canonical(self, url: str, field: str = "output") -> str:
        """Comparable form of a place: a local path through ``realpath``, an object-storage
        URL with its key normalised (``.``, ``..``, ``//``); a key above its bucket refused."""
        if storage.is_remote(url):
            return normal_key(url, field)
        return os.path.realpath(self.absolute(url))

    # ------------------------------------------------------------ checks

    def check_output(self, url: str) -> tuple[str, StorePrefix]:
        """(resolved output URL, its prefix), or :class:`ApiError` naming the fix."""
        check_name("output", url)
        if storage.protocol_of(url) not in ("file", "s3", "gs"):
            raise ApiError(400, f"output {url}: give a local path, an s3:// or a gs:// URL")
        target = self.canonical(url)
        prefix = self._match(target, self.outputs())
        names = ", ".join(p.name or "" for p in self.outputs())
        if prefix is None:
            raise ApiError(
                403,
                f"output {url} is outside the allowed prefixes {names} (symbolic links and "
                "'..' followed); choose a store inside one of them",
            )
        below = relative_parts(target, self.canonical(prefix.prefix))
        if not below:
            raise ApiError(
                403,
                f"output {url} is the prefix {prefix.name} itself; name a store inside it, "
                f"e.g. {prefix.name.rstrip('/')}/my-ensemble.zarr",
            )
        if len(below) > MAX_DEPTH:
            raise ApiError(
                400,
                f"output {url} is {len(below)} levels below {prefix.name}; at most {MAX_DEPTH}",
            )
        state = self.canonical(self.state_url)
        if within(target, state) or within(state, target):
            raise ApiError(
                403,
                f"output {url} overlaps the server's job state store; choose another name "
                f"under {prefix.name}",
            )
        return target, prefix

    def check_source(
        self, url: str, field: str = "scenario.condition.data"
    ) -> tuple[str, StorePrefix]:
        """(resolved URL of a store to read, its prefix), or :class:`ApiError`; ``field``
        names it in messages."""
        check_name(field, url)
        if storage.protocol_of(url) not in ("file", "s3", "gs"):
            raise ApiError(400, f"{field} {url}: give a local path, s3:// or gs:// URL")
        target = self.canonical(url, field)
        prefix = self._match(target, self.sources())
        state = self.canonical(self.state_url)
        if prefix is None or within(target, state):
            names = ", ".join(p.name or "" for p in self.sources())
            raise ApiError(
                403,
                f"{field} {url} is outside the readable data prefixes "
                f"{names} (symbolic links and '..' followed); ingest the data under one of them",
            )
        return target, prefix

    def _match(self, target: str, prefixes: list[StorePrefix]) -> StorePrefix | None:
        """The longest prefix ``target`` lies in (or is)."""
        best: tuple[int, StorePrefix] | None = None
        for p in prefixes:
            base = self.canonical(p.prefix, "prefix")
            if (target.rstrip("/") == base.rstrip("/") or within(target, base)) and (
                best is None or len(base) > best[0]
            ):
                best = (len(base), p)
        return best[1] if best else None

    def check_no_store_above(self, target: str, prefix: StorePrefix) -> None:
        """Refuse an output inside an existing store (another ensemble, a data store) or one
        that is a non-empty folder holding other things. Reads storage: call in a thread."""
        options = storage.options_from(target, prefix.storage)
        base = self.canonical(prefix.prefix, "prefix")
        parts = relative_parts(target, base)
        try:
            storage.check_reachable(target, options)
            for depth in range(1, len(parts)):
                above = storage.join(base, *parts[:depth])
                for marker in STORE_MARKERS:
                    if storage.exists(storage.join(above, marker), options):
                        inside = "/".join(parts[:depth])
                        raise ApiError(
                            409,
                            f"output {target_name(prefix, parts)} lies inside the existing "
                            f"store {prefix.name.rstrip('/')}/{inside}; choose a path "
                            "outside every store",
                        )
            if storage.exists(target, options) and not any(
                storage.exists(storage.join(target, m), options) for m in STORE_MARKERS
            ):
                fs, path = storage.filesystem(target, options)
                if fs.isfile(path) or fs.ls(path):
                    raise ApiError(
                        409,
                        f"output {target_name(prefix, parts)} exists and is not a store; "
                        "choose another name",
                    )
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - any storage failure: the prefix is unusable
            log.warning("storage check of %s failed: %s: %s", target, type(exc).__name__, exc)
            raise ApiError(503, self.unavailable(prefix)) from None

    def unavailable(self, prefix: StorePrefix) -> str:
        return (
            f"storage for {prefix.name} unavailable; retry later, or ask the operator to "
            "check the server's storage settings for it"
        )

    def output_prefix(self, url: str) -> StorePrefix | None:
        return self._match(self.canonical(url), self.outputs())

    def storage_for(self, url: str) -> StorageConfig:
        """How the server reaches ``url`` (an output or a condition store it accepted)."""
        target = self.canonical(url, "url")
        for prefixes in (self.outputs(), self.sources()):
            found = self._match(target, prefixes)
            if found is not None:
                return found.storage
        return StorageConfig()

    def source_storage(self, url: str) -> StorageConfig:
        """How the server reaches a store it reads (one it accepted under a data prefix)."""
        found = self._match(self.canonical(url, "url"), self.sources())
        return StorageConfig() if found is None else found.storage

    # ------------------------------------------------------------ messages

    def redact(self, message: str) -> str:
        """``message`` without the server's absolute paths and storage endpoints."""
        swaps: dict[str, str] = {}
        for p in [*self.outputs(), *self.sources()]:
            if not storage.is_remote(p.prefix):
                for form in {p.prefix, os.path.realpath(p.prefix)}:
                    swaps[form.rstrip("/")] = (p.name or "").rstrip("/")
            if p.storage.endpoint_url:
                swaps[p.storage.endpoint_url] = "<storage endpoint>"
            endpoint = p.storage.options.get("endpoint_url")
            if isinstance(endpoint, str) and endpoint:
                swaps[endpoint] = "<storage endpoint>"
        for form in {self.state_url, os.path.realpath(self.absolute(self.state_url))}:
            swaps[form.rstrip("/")] = "<job state store>"
        root = os.path.abspath(self.root or os.getcwd())
        swaps[root + "/"] = ""
        for var in ("CLOUDBURST_ENDPOINT_URL", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST"):
            if os.environ.get(var):
                swaps[os.environ[var]] = "<storage endpoint>"
        for old in sorted(swaps, key=len, reverse=True):
            if old:
                message = message.replace(old, swaps[old])
        message = _URL.sub("<storage endpoint>", message)
        return _ABSOLUTE_PATH.sub("<server path>", message)


_URL = re.compile(r"\bhttps?://[^\s'\"),;]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.<>-])/(?:[\w.@+-]+/)*[\w.@+-]+")


def check_name(field: str, url: str) -> None:
    """Refuse NUL bytes and names longer than filesystems and object stores take."""
    try:
        check_place(field, url)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


def normal_key(url: str, field: str = "output") -> str:
    """``proto://bucket/key`` with ``.``, ``..`` and empty segments of the key resolved;
    :class:`ApiError` for a key that climbs above its bucket."""
    proto = storage.protocol_of(url)
    rest = str(url).split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket or bucket in (".", ".."):
        raise ApiError(400, f"{field} {url} names no bucket; write {proto}://BUCKET/KEY")
    parts: list[str] = []
    for part in key.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ApiError(
                    403,
                    f"{field} {url} climbs above its bucket with '..'; "
                    "name a key inside an allowed prefix",
                )
            parts.pop()
            continue
        parts.append(part)
    return f"{proto}://{bucket}/" + "/".join(parts)


def within(path: str, base: str) -> bool:
    """Whether ``path`` lies strictly inside ``base`` (both canonical)."""
    return path.startswith(base.rstrip("/") + "/") and path.rstrip("/") != base.rstrip("/")


def relative_parts(path: str, base: str) -> list[str]:
    """The path segments of ``path`` below ``base`` (both canonical; ``path`` in ``base``)."""
    rest = path[len(base.rstrip("/")) :]
    return [p for p in posixpath.normpath("/" + rest).split("/") if p]


def target_name(prefix: StorePrefix, parts: list[str]) -> str:
    """A place inside ``prefix`` as messages name it."""
    return "/".join([(prefix.name or "").rstrip("/"), *parts])
