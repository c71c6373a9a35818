"""Translation and codes requests of the endpoint: a registered model applied to an ingested
store, frame block by frame block, into one derived store.

    POST   /v1/translations           a TranslationRequest (JSON) -> 202 {"id", "status", ...}
    GET    /v1/translations/{id}      status, time steps done, the store's summary once done
    DELETE /v1/translations/{id}      cancel (also POST /v1/translations/{id}/cancel)

``kind`` ``translate`` writes the model's target variable (a model trained on a pair of
variables: :func:`cloudburst.products.translate.translate_store`); ``codes`` writes a discrete
coder's codes and codebook (:func:`cloudburst.products.codes.encode_store`). The input must lie
under the server's ``data_prefixes`` and the output under its ``allowed_prefixes``, checked in
their resolved forms as ensemble outputs and condition stores are; each store is reached with
the server's storage settings of its prefix. Jobs share the ensembles' state store, queue bound
(``max_queue``), deadlines, cancellation and replica-death retries.

:class:`ProductChecks` is what the ingress checks before it answers 202; :func:`run_product`
is the work a generator replica does for one job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from cloudburst import storage, tracking, versions
from cloudburst.ensembles.request import MAX_URL_CHARS, check_place
from cloudburst.markers import read_marker
from cloudburst.serving.body import validation_message, without_storage
from cloudburst.serving.jobs import JobStopped, JobStore
from cloudburst.serving.settings import ApiError, ServeSettings

__all__ = ["ModelRoles", "ProductChecks", "TranslationRequest", "run_product"]

log = logging.getLogger(__name__)

MARKER_KINDS = {"translate": "translation", "codes": "codes"}  # request kind -> store kind
# the marker fields a finished job's status shows (never paths)
SUMMARY_KEYS = (
    "kind",
    "fingerprint",
    "variable",
    "shape",
    "finite_values",
    "codes",
    "code_shape",
    "codebook_usage",
    "perplexity",
    "ratio",
)
WATCH_EVERY_S = 1.0  # a running job's stop marks are read (and progress written) this often


class TranslationRequest(BaseModel):
    """What a translation (or codes) request asks for."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, max_length=1024, description="models:/NAME@ALIAS, models:/NAME/VERSION"
    )
    input: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="ingested Zarr store URL under a data prefix: path, s3://, gs://",
    )
    output: str = Field(
        min_length=1,
        max_length=MAX_URL_CHARS,
        description="Zarr store URL under an allowed prefix: path, s3://, gs://",
    )
    variable: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="input variable (default: the model's, or the store's only one)",
    )
    kind: Literal["translate", "codes"] = Field(
        "translate", description="translate: the model's target variable; codes: its codes"
    )
    deadline_s: float | None = Field(
        None, gt=0, description="seconds the job may take from submission (<= job_deadline_s)"
    )

    @field_validator("input", "output")
    @classmethod
    def _place(cls, value: str, info: ValidationInfo) -> str:
        return check_place(str(info.field_name), value)


@dataclass(frozen=True)
class ModelRoles:
    """What a registered version can make: a translation (it has a target and plays
    Translator), codes (it plays DiscreteCoder)."""

    family: str
    translates: bool
    codes: bool
    input_variable: str | None
    target: str | None


def model_roles(version_uri: str, tracking_uri: str) -> ModelRoles:
    """Load ``version_uri`` and ask its package which roles it plays."""
    from cloudburst.models.roles import DiscreteCoder, Translator

    packaged = tracking.load_model(version_uri, tracking_uri=tracking_uri)
    return ModelRoles(
        family=packaged.name,
        translates=packaged.target is not None and packaged.plays(Translator),
        codes=packaged.plays(DiscreteCoder),
        input_variable=packaged.input_variable,
        target=None if packaged.target is None else packaged.target.variable,
    )


class ProductChecks:
    """The ingress's checks of a translation request, before it answers 202."""

    def __init__(self, settings: ServeSettings, tracking_uri: str, cache_size: int = 8) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.cache_size = cache_size
        self.roles: dict[str, ModelRoles] = {}

    def parsed(self, body: Any) -> TranslationRequest:
        """The validated request (400 storage settings, 422 invalid, 400 past a limit)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object (a translation request)")
        body = {k: v for k, v in without_storage(body).items() if k != "storage"}
        try:
            req = TranslationRequest.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, validation_message(exc)) from None
        limit = self.settings.job_deadline_s
        if req.deadline_s is not None and req.deadline_s > limit:
            raise ApiError(
                400,
                f"deadline_s {req.deadline_s:g} exceeds this server's job_deadline_s "
                f"{limit:g}; ask for at most that",
            )
        return req

    def places(self, req: TranslationRequest) -> TranslationRequest:
        """``req`` with its input and output resolved and checked (reads storage: in a thread):
        the input under a data prefix, the output under an allowed one and inside no store,
        not the input, and not a complete store of another kind."""
        s = self.settings
        source, _ = s.check_source(req.input, "input")
        output, prefix = s.check_output(req.output)
        if output.rstrip("/") == source.rstrip("/"):
            raise ApiError(409, f"output {req.output} is the input store; choose another output")
        s.check_no_store_above(output, prefix)
        try:
            marker = read_marker(output, storage.options_from(output, prefix.storage))
        except Exception:  # noqa: BLE001 - any storage failure: the prefix is unusable
            raise ApiError(503, s.unavailable(prefix)) from None
        if marker is not None and marker.get("kind") != MARKER_KINDS[req.kind]:
            what = marker.get("kind") or "Cloudburst"
            raise ApiError(
                409,
                f"output {req.output} holds a complete {what} store; choose another output",
            )
        return req.model_copy(update={"input": source, "output": output})

    def model_roles(self, version_uri: str) -> ModelRoles:
        """:func:`model_roles`, cached per version (reads the registry: in a thread)."""
        if version_uri not in self.roles:
            if len(self.roles) >= self.cache_size:
                self.roles.pop(next(iter(self.roles)))
            self.roles[version_uri] = model_roles(version_uri, self.tracking_uri)
        return self.roles[version_uri]

    def pinned(self, req: TranslationRequest) -> tuple[str, ModelRoles]:
        """(the version ``req.model`` points at now, its roles): 404 when it is not
        registered, 400 when it cannot make what ``req.kind`` asks, 503 when it cannot be
        loaded now. Reads the registry: call in a thread."""
        s = self.settings
        try:
            version_uri, _, _ = versions.pin_version(req.model, self.tracking_uri)
        except tracking.TrackingError as exc:
            raise ApiError(404, s.redact(str(exc))) from None
        try:
            roles = self.model_roles(version_uri)
        except Exception as exc:  # noqa: BLE001 - reported without the server's paths
            log.exception("loading %s to check its roles failed", version_uri)
            raise ApiError(
                503, s.redact(f"cannot load {req.model} now ({exc}); retry later")
            ) from None
        if req.kind == "translate" and not roles.translates:
            raise ApiError(
                400,
                f"{req.model} does not translate: it is a {roles.family} model not trained on "
                "a pair of variables (data.input and data.target); use a model trained on a "
                "pair, or ask kind codes of a discrete coder",
            )
        if req.kind == "codes" and not roles.codes:
            raise ApiError(
                400,
                f"{req.model} makes no codes: a {roles.family} model is not a discrete coder "
                "(a VQ-VAE is); use one, or ask kind translate",
            )
        return version_uri, roles

    def check_input(self, req: TranslationRequest, roles: ModelRoles) -> None:
        """The input is a complete ingested store holding the variable to read (400), its
        storage reachable (503). Reads storage: call in a thread."""
        from cloudburst.data.ingest import StoreError, open_store
        from cloudburst.data.loader import resolve_variable

        s = self.settings
        options = storage.options_from(req.input, s.source_storage(req.input))
        try:
            ds, _ = open_store(req.input, options)
            name = req.variable or (roles.input_variable if req.kind == "translate" else None)
            resolve_variable([str(v) for v in ds.data_vars], name, "input")
        except (StoreError, ValueError) as exc:
            raise ApiError(400, s.redact(f"input: {exc}")) from None
        except Exception as exc:  # noqa: BLE001 - any storage failure
            log.warning("reading the input %s failed: %s: %s", req.input, type(exc).__name__, exc)
            raise ApiError(503, "the input's storage is unavailable; retry later") from None

    def record(
        self,
        job_id: str,
        asked: TranslationRequest,
        checked: TranslationRequest,
        version_uri: str,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the new job's main record, the request it stores: places resolved)."""
        s = self.settings
        deadline_s = asked.deadline_s or s.job_deadline_s
        now = time.time()
        record = {
            "id": job_id,
            "kind": asked.kind,
            "status": "queued",
            "model_version": version_uri,
            "input": asked.input,
            "output": asked.output,
            "created": now,
            "deadline": now + deadline_s,
            "deadline_s": deadline_s,
            "deadline_limit": s.job_deadline_s,
        }
        return record, checked.model_dump(mode="json")


# ---------------------------------------------------------------------------------- replica


class Watch:
    """The ``on_block`` hook of a running job: at most every :data:`WATCH_EVERY_S`, records
    the time steps written and raises the job's stop (cancelled, past its deadline)."""

    def __init__(self, jobs: JobStore, job_id: str) -> None:
        self.jobs, self.job_id = jobs, job_id
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() - self.last < WATCH_EVERY_S and done < total:
            return
        self.last = time.monotonic()
        stop = self.jobs.stop_reason(self.job_id)
        if stop is not None:
            raise stop
        self.jobs.set_progress(self.job_id, done, total)


def run_product(
    jobs: JobStore,
    settings: ServeSettings,
    job_id: str,
    request: TranslationRequest,
    packaged: Any,
    version_uri: str,
) -> dict[str, Any]:
    """Write the job's store with ``packaged`` (the loaded model of ``version_uri``): ``{"summary":
    ...}``, ``{"skipped": why}`` once the job was stopped (nothing left written), or
    ``{"error": message}`` (redacted) when the store cannot be made. Storage failures and
    anything unexpected raise (the replica's guard answers them)."""
    from cloudburst.data.ingest import StoreError
    from cloudburst.models.roles import RoleError
    from cloudburst.products.codes import encode_store
    from cloudburst.products.derived import DerivedStoreError
    from cloudburst.products.translate import translate_store

    source_options = storage.options_from(request.input, settings.source_storage(request.input))
    output_options = storage.options_from(request.output, settings.storage_for(request.output))
    stop = jobs.stop_reason(job_id)
    if stop is not None:
        return {"skipped": stop.message}
    started_here(jobs, job_id, request.output, output_options)
    make = translate_store if request.kind == "translate" else encode_store
    try:
        marker = make(
            packaged,
            request.input,
            request.output,
            model_uri=version_uri,
            variable=request.variable,
            source_options=source_options,
            output_options=output_options,
            progress=False,
            on_block=Watch(jobs, job_id),
        )
    except JobStopped as exc:
        return {"skipped": exc.message}
    except (DerivedStoreError, StoreError, RoleError, ValueError) as exc:
        return {"error": settings.redact(str(exc))}
    return {"summary": {k: marker[k] for k in SUMMARY_KEYS if k in marker}}


def started_here(jobs: JobStore, job_id: str, output: str, options: dict[str, Any]) -> None:
    """Before the job writes: when an earlier drive of this job began on an absent or empty
    output and died before the marker, remove what it left (no one else writes there);
    otherwise note that this drive begins on an absent or empty output."""
    record = jobs.get(job_id) or {}
    if read_marker(output, options) is not None:
        return  # complete: the product keeps it (same request) or refuses it
    if record.get("began"):
        log.info("job %s: removing what a replica that died left at its output", job_id)
        storage.remove(output, options)
        return
    fs, path = storage.filesystem(output, options)
    if not fs.exists(path) or (fs.isdir(path) and not fs.ls(path)):
        jobs.update(job_id, began=True)
