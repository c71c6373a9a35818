"""The ensemble endpoint: a Ray Serve application with a FastAPI ingress.

    POST   /v1/ensembles              an EnsembleRequest (JSON) -> 202 {"id", "status", "output"}
    GET    /v1/ensembles/{id}         status, members done, output URL, error
    DELETE /v1/ensembles/{id}         cancel (also POST /v1/ensembles/{id}/cancel)
    POST   /v1/translations           a TranslationRequest -> 202; GET, DELETE as above
    GET    /v1/models                 registered models, versions and aliases
    GET    /healthz                   liveness

The ingress (``EnsembleAPI``) reads the body within bounds (size, nesting, finite numbers),
validates it, checks it against the server's limits and places (``settings``), pins the model
alias to a version, records the job in the state store (``jobs``) and drives it without making
the caller wait: the job is cut into work units (:mod:`cloudburst.ensembles.plan`) that run as
separate calls on the ``EnsembleGenerator`` replicas (:mod:`cloudburst.serving.generator`):
plan the store, screen draw blocks (rejecting scenarios), write member chunks, finish. A job
keeps at most ``job_chunks_in_flight`` calls in flight (default one per replica), so one large
request spreads over every replica (which autoscale on the calls waiting) while concurrent
requests share them chunk by chunk: a 10^6-member job does not starve a 10^3-member one.
Progress is recorded per chunk; once a job is cancelled or past its deadline no new call is
made and queued ones skip their work. Job state lives in the state store, never only in
memory: a replica that dies mid-job is replaced and the job driven again (up to
``max_attempts``), writing only the chunks that are missing, so the store ends with every
member once and the same bytes; a new ingress replica drives again the jobs its predecessor
left unfinished. Every job ends done, failed or cancelled.

Object storage is reached with the server's storage settings of the prefix a place lies in;
a request carrying its own ``storage`` is refused. Messages name places as the caller wrote
them, or by prefix, never by the server's absolute paths or storage endpoints.

Translation and codes jobs (:mod:`cloudburst.serving.translations`) share the state store,
the queue bound, deadlines, cancellation and the retries of a job whose replica died.

``build(args)`` is the application builder that ``serve run`` / ``serve deploy`` call with the
``args`` of a Serve config (see jobs/configs/serve.yaml); :class:`ServeSettings` lists them.
"""

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from cloudburst import storage, tracking, versions
from cloudburst.serving.body import parse_json, read_body, validation_message, without_storage
from cloudburst.serving.drive import JobDriver, JobFailed
from cloudburst.serving.generator import MODELS_PER_REPLICA, EnsembleGenerator, job_store
from cloudburst.serving.jobs import (
    JOB_ID,
    PRODUCT_KINDS,
    TERMINAL,
    JobStopped,
    deadline_message,
)
from cloudburst.serving.settings import ApiError, ServeSettings
from cloudburst.serving.translations import ProductChecks

__all__ = ["TERMINAL", "ApiError", "EnsembleAPI", "EnsembleGenerator", "ServeSettings", "build"]

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
DEADLINE_GRACE_S = 60.0  # the ingress stops waiting this long after a job's deadline


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


# ---------------------------------------------------------------------------------- ingress

api = FastAPI(title="Cloudburst ensembles", version="1")


@serve.deployment(name="EnsembleAPI")
@serve.ingress(api)
class EnsembleAPI:
    """Validates and records requests, drives them on the generator, answers status."""

    def __init__(self, generator: Any, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(settings)
        self.generator = generator
        self.jobs = job_store(self.settings)
        self.tracking_uri = tracking.tracking_uri(self.settings.tracking_uri)
        self.tasks: dict[str, asyncio.Task] = {}
        self.reserved = 0  # queue slots held by submissions still being checked
        self.steered_sizes: dict[str, int | None] = {}
        self.recovered = False
        self.products = ProductChecks(self.settings, self.tracking_uri, MODELS_PER_REPLICA)
        self.writing: dict[str, str] = {}  # translation job id -> its resolved output

    async def _recover(self) -> None:
        """Once per replica, on its first authenticated request: drive again the jobs an
        earlier ingress replica left unfinished (they resume from the store's progress)."""
        if self.recovered:
            return
        self.recovered = True
        try:
            unfinished = await asyncio.to_thread(self.jobs.unfinished)
        except Exception:  # noqa: BLE001 - a later request tries again
            log.exception("listing unfinished jobs failed")
            self.recovered = False
            return
        for record in unfinished:
            if record["id"] not in self.tasks:
                self._drive(record)

    # ------------------------------------------------------------ helpers

    def _check_key(self, request: Request) -> None:
        key = self.settings.key()
        if key is None:
            return
        given = request.headers.get(API_KEY_HEADER)
        if not given:
            raise ApiError(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, f"wrong API key in {API_KEY_HEADER}")

    async def _authenticated(self, request: Request) -> None:
        self._check_key(request)
        await self._recover()

    def _bounded(self, req: Any) -> Any:
        """``req`` within this server's limits (400 naming the limit), with the candidates
        per member of a rejecting scenario fitted to ``max_draws`` when not asked for."""
        s = self.settings
        if req.members > s.max_members:
            raise ApiError(400, f"members {req.members} exceeds this server's {s.max_members}")
        if req.batch_size > s.max_batch_size:
            raise ApiError(400, f"batch_size {req.batch_size} exceeds {s.max_batch_size}")
        if req.chunk_members > s.max_chunk_members:
            raise ApiError(400, f"chunk_members {req.chunk_members} exceeds {s.max_chunk_members}")
        if req.steps is not None and req.steps > s.max_steps:
            raise ApiError(
                400, f"steps {req.steps} exceeds this server's max_steps {s.max_steps}; ask fewer"
            )
        sc = req.scenario
        if sc.length is not None and sc.length > s.max_extension_length:
            raise ApiError(
                400,
                f"scenario.length {sc.length} exceeds this server's max_extension_length "
                f"{s.max_extension_length}",
            )
        if req.deadline_s is not None and req.deadline_s > s.job_deadline_s:
            raise ApiError(
                400,
                f"deadline_s {req.deadline_s:g} exceeds this server's job_deadline_s "
                f"{s.job_deadline_s:g}; ask for at most that",
            )
        if not sc.rejects:
            return req
        candidates = sc.max_candidates_per_member
        if "max_candidates_per_member" in sc.model_fields_set:
            if candidates > s.max_candidates_per_member:
                raise ApiError(
                    400,
                    f"scenario.max_candidates_per_member {candidates} exceeds this server's "
                    f"{s.max_candidates_per_member}",
                )
        else:
            candidates = min(s.max_candidates_per_member, max(1, s.max_draws // req.members))
            sc = sc.model_copy(update={"max_candidates_per_member": candidates})
            req = req.model_copy(update={"scenario": sc})
        if req.members * candidates > s.max_draws:
            raise ApiError(
                400,
                f"members x scenario.max_candidates_per_member = {req.members * candidates} "
                f"draws exceeds this server's max_draws {s.max_draws}; ask for fewer members "
                "or fewer candidates per member",
            )
        return req

    def _places(self, req: Any) -> Any:
        """``req`` with its output and condition store resolved and checked (in a thread)."""
        s = self.settings
        output, prefix = s.check_output(req.output)
        s.check_no_store_above(output, prefix)
        req = req.model_copy(update={"output": output})
        condition = req.scenario.condition
        if condition is None:
            return req
        data, source = s.check_source(condition.data)
        both_remote = storage.is_remote(output) and storage.is_remote(data)
        if both_remote and source.storage != prefix.storage:
            raise ApiError(
                400,
                f"scenario.condition.data lies under {source.name} and the output under "
                f"{prefix.name}, which this server reaches with different storage settings; "
                "write the output where the condition's storage settings apply",
            )
        condition = condition.model_copy(update={"data": data})
        scenario = req.scenario.model_copy(update={"condition": condition})
        return req.model_copy(update={"scenario": scenario})

    def _steered_size(self, version_uri: str) -> int | None:
        """How many numbers a shift direction of a registered version has (None: its draws
        cannot be steered), cached."""
        if version_uri not in self.steered_sizes:
            from cloudburst.ensembles.checks import steered_size
            from cloudburst.ensembles.generate import resolve

            size = steered_size(resolve(version_uri, self.tracking_uri).packaged)
            if len(self.steered_sizes) >= MODELS_PER_REPLICA:
                self.steered_sizes.pop(next(iter(self.steered_sizes)))
            self.steered_sizes[version_uri] = size
        return self.steered_sizes[version_uri]

    async def _check_direction(self, req: Any, version_uri: str) -> None:
        direction = req.scenario.direction
        if direction is None:
            return
        try:
            size = await asyncio.to_thread(self._steered_size, version_uri)
        except Exception as exc:  # noqa: BLE001 - reported without the server's paths
            log.exception("loading %s to check its steered input failed", version_uri)
            raise ApiError(
                503, self.settings.redact(f"cannot load {req.model} now ({exc}); retry later")
            ) from None
        if size is None:
            raise ApiError(400, f"scenario.direction: the draws of {req.model} cannot be steered")
        if len(direction) != size:
            raise ApiError(
                400,
                f"scenario.direction has {len(direction)} numbers; {req.model} steers an input "
                f"of {size} (a latent code, or a diffusion window's time x y x x noise): give "
                f"exactly {size}",
            )

    def _drive(self, record: dict[str, Any], request: dict[str, Any] | None = None) -> None:
        job_id = record["id"]
        task = asyncio.get_running_loop().create_task(self._run(record, request))
        self.tasks[job_id] = task

        def ended(_: asyncio.Task) -> None:
            self.tasks.pop(job_id, None)
            self.writing.pop(job_id, None)

        task.add_done_callback(ended)

    async def _run(self, record: dict[str, Any], request: dict[str, Any] | None) -> None:
        """Hand the job to a generator replica; again (it resumes) if that replica dies.
        Every way out leaves the job done, failed or cancelled."""
        job_id = record["id"]
        try:
            await self._attempts(record, request)
        except asyncio.CancelledError:
            raise  # this replica is going away: the next one recovers the job
        except Exception as exc:  # noqa: BLE001 - recorded for GET, the server goes on
            log.exception("driving job %s failed", job_id)
            error = self.settings.redact(f"the job could not be driven: {type(exc).__name__}")
            await asyncio.to_thread(self._settle, job_id, error)
            return
        await asyncio.to_thread(self._settle, job_id, "the job ended without a result; resubmit")

    def _settle(self, job_id: str, error: str) -> None:
        """Fail the job with ``error`` unless it already ended."""
        try:
            record = self.jobs.get(job_id) or {}
            if record.get("status") not in TERMINAL:
                self.jobs.update(job_id, status="failed", error=error)
        except Exception:  # noqa: BLE001 - the state store itself is failing
            log.exception("recording the end of job %s failed", job_id)

    async def _attempts(self, record: dict[str, Any], request: dict[str, Any] | None) -> None:
        from ray.exceptions import RayActorError, RaySystemError
        from ray.serve.exceptions import DeploymentUnavailableError

        job_id = record["id"]
        s = self.settings
        if request is None:
            request = record.get("request") or await asyncio.to_thread(self.jobs.request, job_id)
        if request is None:
            await asyncio.to_thread(
                self.jobs.update, job_id, status="failed", error="the job's request is lost"
            )
            return
        handle = self.generator.options(multiplexed_model_id=record["model_version"])
        attempts = int(record.get("attempts", 0))
        last = "no attempt finished"
        while True:
            stop = await asyncio.to_thread(self.jobs.stop_reason, job_id)
            if stop is not None:
                await asyncio.to_thread(
                    self.jobs.update, job_id, status=stop.status, error=stop.message
                )
                return
            if attempts >= s.max_attempts:
                await asyncio.to_thread(
                    self.jobs.update,
                    job_id,
                    status="failed",
                    error=f"gave up after {attempts} attempts (max_attempts {s.max_attempts}): "
                    f"{last}; resubmit the request (it resumes what was written)",
                )
                return
            attempts += 1
            await asyncio.to_thread(self.jobs.update, job_id, attempts=attempts)
            deadline = float(record.get("deadline") or time.time() + s.job_deadline_s)
            wait = max(0.0, deadline - time.time()) + DEADLINE_GRACE_S
            try:
                drive = JobDriver(self.jobs, self.settings, handle)
                one = drive.product if record.get("kind") in PRODUCT_KINDS else drive.run
                await asyncio.wait_for(one(job_id, request), timeout=wait)
                return
            except TimeoutError:
                message = deadline_message(
                    float(record.get("deadline_s", s.job_deadline_s)), s.job_deadline_s
                )
                await asyncio.to_thread(self.jobs.update, job_id, status="failed", error=message)
                return
            except JobStopped as exc:
                await asyncio.to_thread(
                    self.jobs.update, job_id, status=exc.status, error=exc.message
                )
                return
            except JobFailed as exc:
                await asyncio.to_thread(self.jobs.update, job_id, status="failed", error=str(exc))
                return
            except (
                RayActorError,
                RaySystemError,
                ConnectionError,
                DeploymentUnavailableError,
            ) as exc:
                last = self.settings.redact(f"{type(exc).__name__}: {exc}")[:2000]
                await asyncio.sleep(min(2.0**attempts, 10.0))

    # ------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "jobs_in_flight": len(self.tasks)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            await self._authenticated(request)
            listed = await asyncio.to_thread(versions.list_models, self.tracking_uri)
        except ApiError as exc:
            return error_response(exc)
        except tracking.TrackingError as exc:
            return error_response(ApiError(503, self.settings.redact(str(exc))))
        return {
            "models": [
                {
                    "name": m["name"],
                    "aliases": m["aliases"],
                    "versions": [
                        {k: v.get(k) for k in ("version", "aliases", "tags", "val_loss")}
                        for v in m["versions"]
                    ],
                }
                for m in listed
            ]
        }

    @api.post("/v1/ensembles", status_code=202)
    async def submit(self, request: Request) -> Any:
        from cloudburst.ensembles.checks import EnsembleError, check_request
        from cloudburst.ensembles.request import EnsembleRequest

        s = self.settings
        reserved = False
        try:
            await self._authenticated(request)
            body = parse_json(await read_body(request, s.max_body_bytes))
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object (an ensemble request)")
            try:
                req = EnsembleRequest.model_validate(without_storage(body))
            except ValidationError as exc:
                raise ApiError(422, validation_message(exc)) from None
            req = self._bounded(req)
            reserved = self._reserve()
            engine_req = await asyncio.to_thread(self._places, req)
            prefix = s.output_prefix(engine_req.output)
            checked = engine_req.model_copy(update={"storage": s.storage_for(engine_req.output)})
            try:
                version_uri, _, tags = await asyncio.to_thread(
                    versions.pin_version, req.model, self.tracking_uri
                )
            except tracking.TrackingError as exc:
                raise ApiError(404, s.redact(str(exc))) from None
            try:
                await asyncio.to_thread(check_request, checked, tags, req.model)
            except EnsembleError as exc:
                raise ApiError(400, s.redact(str(exc))) from None
            except storage.StorageError:
                raise ApiError(
                    503, s.unavailable(prefix) if prefix else "storage unavailable"
                ) from None
            except Exception as exc:  # noqa: BLE001 - reported without the server's paths
                log.exception("checking a request against %s failed", version_uri)
                raise ApiError(
                    400,
                    s.redact(f"the request cannot be checked: {type(exc).__name__}: {exc}"),
                ) from None
            await self._check_direction(req, version_uri)
            job_id = uuid.uuid4().hex
            deadline_s = req.deadline_s or s.job_deadline_s
            now = time.time()
            record = {
                "id": job_id,
                "status": "queued",
                "model_version": version_uri,
                "output": req.output,
                "members": req.members,
                "members_done": 0,
                "created": now,
                "deadline": now + deadline_s,
                "deadline_s": deadline_s,
                "deadline_limit": s.job_deadline_s,
            }
            stored = engine_req.model_dump(mode="json", exclude={"storage"})
            await asyncio.to_thread(self.jobs.create, record, stored)
            self._drive(record, stored)
        except ApiError as exc:
            return error_response(exc)
        finally:
            if reserved:
                self.reserved -= 1
        return JSONResponse(
            {"id": job_id, "status": "queued", "output": req.output, "model": version_uri},
            status_code=202,
        )

    def _reserve(self) -> bool:
        """Take a queue slot (429 when ``max_queue`` jobs are in flight or being checked);
        call before any await, and give it back (``reserved -= 1``) once the job is driven
        or refused."""
        s = self.settings
        if len(self.tasks) + self.reserved >= s.max_queue:
            raise ApiError(
                429,
                f"{len(self.tasks) + self.reserved} jobs in flight (max_queue "
                f"{s.max_queue}); retry later",
            )
        self.reserved += 1
        return True

    @api.post("/v1/translations", status_code=202)
    async def submit_translation(self, request: Request) -> Any:
        checks = self.products
        job_id = uuid.uuid4().hex
        reserved = driven = False
        try:
            await self._authenticated(request)
            body = parse_json(await read_body(request, self.settings.max_body_bytes))
            asked = checks.parsed(body)
            reserved = self._reserve()
            checked = await asyncio.to_thread(checks.places, asked)
            # held from here (no await between the look and the hold) until the job ends
            if checked.output in self.writing.values():
                raise ApiError(
                    409,
                    f"output {asked.output} is being written by another job; wait for it, "
                    "or choose another output",
                )
            self.writing[job_id] = checked.output
            version_uri, roles = await asyncio.to_thread(checks.pinned, checked)
            await asyncio.to_thread(checks.check_input, checked, roles)
            record, stored = checks.record(job_id, asked, checked, version_uri)
            await asyncio.to_thread(self.jobs.create, record, stored)
            self._drive(record, stored)
            driven = True
        except ApiError as exc:
            return error_response(exc)
        finally:
            if reserved:
                self.reserved -= 1
            if not driven:
                self.writing.pop(job_id, None)
        return JSONResponse(
            {
                "id": job_id,
                "kind": asked.kind,
                "status": "queued",
                "input": asked.input,
                "output": asked.output,
                "model": version_uri,
            },
            status_code=202,
        )

    def _job_id(self, job_id: str) -> str:
        if not JOB_ID.match(job_id):
            raise ApiError(400, "a job id is 32 hexadecimal digits, as POST answered")
        return job_id

    @staticmethod
    def _kind_matches(record: dict[str, Any] | None, product: bool) -> bool:
        """Whether ``record`` is a job of the route's kind (a product job or an ensemble)."""
        return record is not None and (record.get("kind") in PRODUCT_KINDS) == product

    async def _status(self, job_id: str, request: Request, product: bool) -> Any:
        what = "translation" if product else "ensemble"
        try:
            await self._authenticated(request)
            if not job_id.isalnum():
                raise ApiError(400, "a job id is letters and digits")
            view = None
            if JOB_ID.match(job_id):
                view = await asyncio.to_thread(self.jobs.view, job_id)
            if view is None or ("kind" in view) != product:
                raise ApiError(404, f"no {what} job {job_id}")
        except ApiError as exc:
            return error_response(exc)
        return view

    @api.get("/v1/ensembles/{job_id}")
    async def status(self, job_id: str, request: Request) -> Any:
        return await self._status(job_id, request, product=False)

    @api.get("/v1/translations/{job_id}")
    async def translation_status(self, job_id: str, request: Request) -> Any:
        return await self._status(job_id, request, product=True)

    @api.delete("/v1/translations/{job_id}")
    async def cancel_translation(self, job_id: str, request: Request) -> Any:
        return await self._cancel(job_id, request, product=True)

    @api.post("/v1/translations/{job_id}/cancel")
    async def cancel_translation_post(self, job_id: str, request: Request) -> Any:
        return await self._cancel(job_id, request, product=True)

    @api.delete("/v1/ensembles/{job_id}")
    async def cancel(self, job_id: str, request: Request) -> Any:
        return await self._cancel(job_id, request, product=False)

    async def _cancel(self, job_id: str, request: Request, product: bool) -> Any:
        what = "translation" if product else "ensemble"
        try:
            await self._authenticated(request)
            self._job_id(job_id)
            record = await asyncio.to_thread(self.jobs.get, job_id)
            if not self._kind_matches(record, product):
                raise ApiError(404, f"no {what} job {job_id}")
            if record.get("status") in ("done", "failed"):
                raise ApiError(
                    409, f"job {job_id} is already {record['status']}; there is nothing to stop"
                )
            await asyncio.to_thread(self.jobs.cancel, job_id)
            view = await asyncio.to_thread(self.jobs.view, job_id)
        except ApiError as exc:
            return error_response(exc)
        return view

    @api.post("/v1/ensembles/{job_id}/cancel")
    async def cancel_post(self, job_id: str, request: Request) -> Any:
        return await self.cancel(job_id, request)


def build(args: dict[str, Any] | None = None) -> Any:
    """The application for ``serve run`` / ``serve deploy`` (``args``: :class:`ServeSettings`)."""
    settings = ServeSettings.model_validate(args or {}).resolved()
    as_dict = settings.model_dump(mode="json")
    generator = EnsembleGenerator.options(
        autoscaling_config={
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": 1,
        },
        ray_actor_options={
            "num_cpus": settings.cpus_per_replica,
            "num_gpus": settings.gpus_per_replica,
        },
    ).bind(as_dict)
    return EnsembleAPI.bind(generator, as_dict)
