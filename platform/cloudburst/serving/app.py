"""The ensemble endpoint: a Ray Serve application with a FastAPI ingress.

    POST /v1/ensembles        an EnsembleRequest (JSON) -> 202 {"id", "status", "output"}
    GET  /v1/ensembles/{id}   status, members done, output URL, error
    GET  /v1/models           registered models, versions and aliases
    GET  /healthz             liveness

The ingress (``EnsembleAPI``) validates, pins the model alias to a version, records the job in
the state store and hands it to ``EnsembleGenerator`` replicas without waiting: they load models
from the MLflow registry by URI (multiplexed, least recently used evicted), run the engine of
``cloudburst.ensembles.generate`` in a worker thread, and record progress per chunk. Job state
lives in the state store (files, local or object storage), never only in memory: a replica
that dies mid-request is replaced and the job re-driven, and the engine writes only the chunks
that are missing, so the store ends with every member once and the same bytes.

``build(args)`` is the application builder that ``serve run`` / ``serve deploy`` call with the
``args`` of a Serve config (see jobs/configs/serve.yaml); :class:`ServeSettings` lists them.
"""

import asyncio
import dataclasses
import hmac
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from cloudburst import storage, tracking

TERMINAL = ("done", "failed")
# models kept loaded per generator replica (least recently used evicted); read at import,
# since Serve fixes the multiplexing bound when the deployment class is defined
MODELS_PER_REPLICA = int(os.environ.get("CLOUDBURST_MODELS_PER_REPLICA", "2"))
API_KEY_HEADER = "X-API-Key"


class ServeSettings(BaseModel):
    """What the endpoint is allowed to do; the ``args`` of the Serve config."""

    model_config = ConfigDict(extra="forbid")

    root: str | None = Field(
        None, description="folder that relative local paths mean (default: where build runs)"
    )
    tracking_uri: str | None = None
    state_url: str = "outputs/serve/state"
    allowed_prefixes: list[str] = Field(default_factory=lambda: ["outputs/ensembles"])
    data_prefixes: list[str] = Field(
        default_factory=lambda: ["outputs"],
        description="stores that conditional scenarios may read their observed window from",
    )
    api_key: str | None = Field(None, description="required in X-API-Key when set")
    api_key_env: str = "CLOUDBURST_API_KEY"
    max_members: int = Field(1_000_000, ge=1)
    max_batch_size: int = Field(1024, ge=1)
    max_chunk_members: int = Field(10_000, ge=1)
    max_queue: int = Field(16, ge=1, description="jobs in flight per ingress replica; then 429")
    max_attempts: int = Field(5, ge=1, description="drives of a job whose replica died")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    def key(self) -> str | None:
        return self.api_key or os.environ.get(self.api_key_env) or None

    def prefixes(self) -> list[str]:
        return [_normal(self.absolute(p)) for p in self.allowed_prefixes]

    def readable(self, url: str) -> bool:
        """Whether a request may condition on the store ``url``."""
        target = _normal(self.absolute(url))
        return any(target.startswith(_normal(self.absolute(p))) for p in self.data_prefixes)

    def absolute(self, url: str) -> str:
        """``url`` with a relative local path taken under ``root`` (replicas' working
        directories are not the caller's)."""
        if storage.is_remote(url):
            return url
        return os.path.normpath(os.path.join(self.root or os.getcwd(), storage.local_path(url)))

    def resolved(self) -> "ServeSettings":
        """Paths and the tracking URI fixed where ``build`` runs, for every replica alike."""
        root = os.path.abspath(self.root or os.getcwd())
        out = self.model_copy(update={"root": root})
        return out.model_copy(
            update={
                "state_url": out.absolute(self.state_url),
                "allowed_prefixes": [out.absolute(p) for p in self.allowed_prefixes],
                "data_prefixes": [out.absolute(p) for p in self.data_prefixes],
                "tracking_uri": tracking.tracking_uri(self.tracking_uri, root=root),
            }
        )


def _normal(url: str) -> str:
    """Comparable form of an output URL: normalised, ending in one slash."""
    if storage.is_remote(url):
        return url.rstrip("/") + "/"
    return os.path.normpath(storage.local_path(url)).rstrip("/") + "/"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


# ---------------------------------------------------------------------------------- state


class JobStore:
    """Job records as JSON objects under ``url`` (one per job, replaced atomically)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.options = dict(options or {})

    @classmethod
    def of(cls, settings: ServeSettings) -> "JobStore":
        url = settings.state_url
        return cls(url, storage.storage_options(url, extra=settings.storage_options))

    def _url(self, job_id: str) -> str:
        return storage.join(self.url, f"{job_id}.json")

    def put(self, record: dict[str, Any]) -> None:
        record = {**record, "updated": time.time()}
        storage.write_bytes_atomic(
            self._url(record["id"]), json.dumps(record).encode(), self.options
        )

    def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self._url(job_id), self.options))
        except FileNotFoundError:
            return None

    def update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        record = self.get(job_id) or {"id": job_id}
        record.update(changes)
        self.put(record)
        return record

    def unfinished(self) -> list[dict[str, Any]]:
        fs, path = storage.filesystem(self.url, self.options)
        if not fs.exists(path):
            return []
        out = []
        for name in fs.ls(path, detail=False):
            if name.endswith(".json"):
                with fs.open(name, "rb") as f:
                    record = json.loads(f.read())
                if record.get("status") not in TERMINAL:
                    out.append(record)
        return out


# ---------------------------------------------------------------------------------- generator


@serve.deployment(name="EnsembleGenerator", max_ongoing_requests=2)
class EnsembleGenerator:
    """Runs requests through the engine; models multiplexed by pinned version URI."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        self.settings = ServeSettings.model_validate(settings)
        self.jobs = JobStore.of(self.settings)
        self.tracking_uri = tracking.tracking_uri(self.settings.tracking_uri)
        torch.set_num_threads(max(1, int(self.settings.cpus_per_replica)))

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def load(self, version_uri: str) -> Any:
        from cloudburst.ensembles.generate import resolve

        model = await asyncio.to_thread(resolve, version_uri, self.tracking_uri)
        if self.settings.gpus_per_replica > 0:
            import torch

            if torch.cuda.is_available():
                model.packaged.model.to("cuda")
        return model

    async def run(self, job_id: str, request_json: dict[str, Any]) -> dict[str, Any]:
        from cloudburst.ensembles.generate import EnsembleError, generate
        from cloudburst.ensembles.request import EnsembleRequest
        from cloudburst.ensembles.store import EnsembleStoreError

        request = EnsembleRequest.model_validate(request_json)
        model = await self.load(serve.get_multiplexed_model_id())
        model = dataclasses.replace(model, uri=request.model)
        self.jobs.update(job_id, status="running")

        def progress(done: int, total: int) -> None:
            self.jobs.update(job_id, status="running", members_done=done)

        try:
            result = await asyncio.to_thread(
                generate, request, model=model, tracking_uri=self.tracking_uri, on_chunk=progress
            )
        except (EnsembleError, EnsembleStoreError, storage.StorageError) as exc:
            self.jobs.update(job_id, status="failed", error=str(exc))
            return {"status": "failed"}
        except Exception as exc:  # noqa: BLE001 - the job fails, the replica keeps serving
            self.jobs.update(job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
            return {"status": "failed"}
        self.jobs.update(
            job_id,
            status="done",
            members_done=result.members,
            seconds=round(result.seconds, 3),
            acceptance_rate=result.acceptance_rate,
            model_version=result.model_version,
        )
        return {"status": "done"}


# ---------------------------------------------------------------------------------- ingress

api = FastAPI(title="Cloudburst ensembles", version="1")


@serve.deployment(name="EnsembleAPI")
@serve.ingress(api)
class EnsembleAPI:
    """Validates and records requests, drives them on the generator, answers status."""

    def __init__(self, generator: Any, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(settings)
        self.generator = generator
        self.jobs = JobStore.of(self.settings)
        self.tracking_uri = tracking.tracking_uri(self.settings.tracking_uri)
        self.tasks: dict[str, asyncio.Task] = {}
        self.recovered = False

    async def _recover(self) -> None:
        """Once per replica, on its first request: drive again the jobs an earlier ingress
        replica left unfinished (they resume from the store's progress)."""
        if self.recovered:
            return
        self.recovered = True
        for record in await asyncio.to_thread(self.jobs.unfinished):
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

    def _check_bounds(self, req: Any) -> None:
        s = self.settings
        if req.members > s.max_members:
            raise ApiError(400, f"members {req.members} exceeds this server's {s.max_members}")
        if req.batch_size > s.max_batch_size:
            raise ApiError(400, f"batch_size {req.batch_size} exceeds {s.max_batch_size}")
        if req.chunk_members > s.max_chunk_members:
            raise ApiError(400, f"chunk_members {req.chunk_members} exceeds {s.max_chunk_members}")
        output = _normal(req.output)
        if not any(output.startswith(p) for p in s.prefixes()):
            raise ApiError(
                403,
                f"output {req.output} is outside the allowed prefixes "
                f"{', '.join(s.allowed_prefixes)}",
            )
        condition = req.scenario.condition
        if condition is not None and not s.readable(condition.data):
            raise ApiError(
                403,
                f"scenario.condition.data {condition.data} is outside the readable data "
                f"prefixes {', '.join(s.data_prefixes)}",
            )

    def _absolute(self, req: Any) -> Any:
        """The request with its local paths (output, condition store) made absolute."""
        req = req.model_copy(update={"output": self.settings.absolute(req.output)})
        condition = req.scenario.condition
        if condition is None:
            return req
        condition = condition.model_copy(update={"data": self.settings.absolute(condition.data)})
        scenario = req.scenario.model_copy(update={"condition": condition})
        return req.model_copy(update={"scenario": scenario})

    def _drive(self, record: dict[str, Any]) -> None:
        job_id = record["id"]
        task = asyncio.get_running_loop().create_task(self._run(record))
        self.tasks[job_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job_id, None))

    async def _run(self, record: dict[str, Any]) -> None:
        """Hand the job to a generator replica; again (it resumes) if that replica dies."""
        from ray.exceptions import RayActorError, RaySystemError

        handle = self.generator.options(multiplexed_model_id=record["model_version"])
        attempts = int(record.get("attempts", 0))
        while attempts < self.settings.max_attempts:
            attempts += 1
            self.jobs.update(record["id"], attempts=attempts)
            try:
                await handle.run.remote(record["id"], record["request"])
                return
            except (RayActorError, RaySystemError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(min(2.0**attempts, 10.0))
            except Exception as exc:  # noqa: BLE001 - recorded for GET, the server goes on
                self.jobs.update(record["id"], status="failed", error=f"{exc}")
                return
        self.jobs.update(
            record["id"], status="failed", error=f"gave up after {attempts} attempts: {last}"
        )

    # ------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self._recover()
        return {"status": "ok", "jobs_in_flight": len(self.tasks)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        await self._recover()
        try:
            self._check_key(request)
            listed = await asyncio.to_thread(tracking.list_models, self.tracking_uri)
        except ApiError as exc:
            return _error(exc)
        except tracking.TrackingError as exc:
            return _error(ApiError(503, str(exc)))
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
        from cloudburst.ensembles.generate import EnsembleError, check_request
        from cloudburst.ensembles.request import EnsembleRequest

        await self._recover()
        try:
            self._check_key(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise ApiError(400, "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object (an ensemble request)")
            try:
                req = EnsembleRequest.model_validate(body)
            except ValidationError as exc:
                raise ApiError(422, _validation_message(exc)) from None
            req = self._absolute(req)
            self._check_bounds(req)
            if len(self.tasks) >= self.settings.max_queue:
                raise ApiError(429, f"{len(self.tasks)} jobs in flight; retry later")
            try:
                version_uri, _, tags = await asyncio.to_thread(
                    tracking.pin_version, req.model, self.tracking_uri
                )
            except tracking.TrackingError as exc:
                raise ApiError(404, str(exc)) from None
            try:
                await asyncio.to_thread(check_request, req, tags, req.model)
            except EnsembleError as exc:
                raise ApiError(400, str(exc)) from None
        except ApiError as exc:
            return _error(exc)
        job_id = uuid.uuid4().hex
        record = {
            "id": job_id,
            "status": "queued",
            "request": req.model_dump(mode="json"),
            "model_version": version_uri,
            "output": req.output,
            "members": req.members,
            "members_done": 0,
            "created": time.time(),
        }
        self.jobs.put(record)
        self._drive(record)
        return JSONResponse(
            {"id": job_id, "status": "queued", "output": req.output, "model": version_uri},
            status_code=202,
        )

    @api.get("/v1/ensembles/{job_id}")
    async def status(self, job_id: str, request: Request) -> Any:
        await self._recover()
        try:
            self._check_key(request)
            if not job_id.isalnum():
                raise ApiError(400, "a job id is letters and digits")
            record = await asyncio.to_thread(self.jobs.get, job_id)
            if record is None:
                raise ApiError(404, f"no ensemble job {job_id}")
        except ApiError as exc:
            return _error(exc)
        keys = ("id", "status", "members", "members_done", "output", "model_version", "error")
        out = {k: record.get(k) for k in keys}
        for extra in ("seconds", "acceptance_rate", "attempts"):
            if extra in record:
                out[extra] = record[extra]
        return out


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
