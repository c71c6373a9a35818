"""The endpoint's generator replicas: the engine's work units, one call each.

An ensemble job is driven by the ingress (:mod:`cloudburst.serving.app`) as a sequence of
calls on this deployment, each short and self-contained, so one large request spreads over
every replica and concurrent requests interleave at chunk granularity:

- ``plan``: open (create or reopen) the output store; what is left to write;
- ``screen``: the accepted draws of one draw block (rejecting scenarios);
- ``write``: one member chunk, written whole with its progress record;
- ``finish``: the completion marker;
- ``translate``: the whole store of a translation (or codes) job, in blocks of time steps.

Every call reloads nothing but what its replica lacks: models are multiplexed by pinned
version URI (least recently used evicted) and a job's bound generator (its proposal and its
steering, condition) is kept for its next chunks. A call answers a dict; a request the
engine refuses, or storage that fails, answers ``{"error": message}`` in the words the API
may show (never the server's paths or endpoints), and the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ray import serve

from cloudburst import storage, tracking
from cloudburst.serving.jobs import JobStore
from cloudburst.serving.settings import ServeSettings

log = logging.getLogger(__name__)

# models kept loaded per generator replica (least recently used evicted); read at import,
# since Serve fixes the multiplexing bound when the deployment class is defined
MODELS_PER_REPLICA = int(os.environ.get("CLOUDBURST_MODELS_PER_REPLICA", "2"))
JOBS_PER_REPLICA = 8  # bound generators kept per replica


def job_store(settings: ServeSettings) -> JobStore:
    url = settings.state_url
    return JobStore(url, storage.storage_options(url, extra=settings.storage_options))


@serve.deployment(name="EnsembleGenerator", max_ongoing_requests=2)
class EnsembleGenerator:
    """Runs the engine's work units (see the module doc)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        self.settings = ServeSettings.model_validate(settings)
        self.jobs = job_store(self.settings)
        self.tracking_uri = tracking.tracking_uri(self.settings.tracking_uri)
        self.bound: OrderedDict[str, Any] = OrderedDict()  # job id -> Generator
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

    async def model_for(self, request: Any) -> Any:
        model = await self.load(serve.get_multiplexed_model_id())
        return dataclasses.replace(model, uri=request.model)

    def request(self, request_json: dict[str, Any]) -> Any:
        from cloudburst.ensembles.request import EnsembleRequest

        request = EnsembleRequest.model_validate(request_json)
        return request.model_copy(update={"storage": self.settings.storage_for(request.output)})

    def guarded(self, request: Any, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``work()``, or ``{"error": ...}`` in words the API may show when it fails."""
        from cloudburst.ensembles.generate import EnsembleError
        from cloudburst.ensembles.plan import PlanError
        from cloudburst.ensembles.store import EnsembleStoreError

        s = self.settings
        try:
            return work()
        except storage.StorageError as exc:
            log.warning("storage failed for %s: %s", request.output, exc)
            prefix = s.output_prefix(request.output)
            return {"error": s.unavailable(prefix) if prefix is not None else s.redact(str(exc))}
        except (EnsembleError, EnsembleStoreError, PlanError) as exc:
            return {"error": s.redact(str(exc))}
        except Exception as exc:  # noqa: BLE001 - the job fails, the replica keeps serving
            log.exception("an ensemble work unit failed")
            return {"error": s.redact(f"{type(exc).__name__}: {exc}")}

    def generator(self, job_id: str, request: Any, model: Any, steering: Any) -> Any:
        """The job's generator bound to its request (cached for the job's next calls)."""
        import numpy as np

        from cloudburst.ensembles.generate import Generator

        gen = self.bound.get(job_id)
        if gen is None or gen.model.version_uri != model.version_uri:
            pinned = None if steering is None else np.asarray(steering, dtype=np.float64)
            gen = Generator(request, model, steering=pinned)
            self.bound[job_id] = gen
            while len(self.bound) > JOBS_PER_REPLICA:
                self.bound.popitem(last=False)
        self.bound.move_to_end(job_id)
        return gen

    # ------------------------------------------------------------ work units

    async def plan(self, job_id: str, request_json: dict[str, Any]) -> dict[str, Any]:
        """Open the job's store: ``complete`` (a summary) when an earlier run finished it,
        else its layout, the chunks written, the threshold and the proposal's steering."""
        request = self.request(request_json)
        model = await self.model_for(request)
        return await asyncio.to_thread(self.guarded, request, lambda: self.opened(request, model))

    def opened(self, request: Any, model: Any) -> dict[str, Any]:
        from cloudburst.ensembles.generate import open_ensemble

        opened = open_ensemble(request, model=model, tracking_uri=self.tracking_uri)
        if opened.complete is not None:
            return {"complete": opened.complete}
        gen, layout = opened.gen, opened.layout
        done = {c: {"draws": r["draws"]} for c, r in opened.store.done().items()}
        members_done = sum(len(range(*layout.span(c))) for c in done)
        return {
            "layout": [layout.members, list(layout.window), layout.chunk_members],
            "done": done,
            "members_done": members_done,
            "threshold": gen.threshold,
            "steering": None if gen.steering is None else [float(v) for v in gen.steering],
        }

    async def screen(
        self,
        job_id: str,
        request_json: dict[str, Any],
        steering: list[float] | None,
        block: tuple[int, int],
    ) -> dict[str, Any]:
        """The accepted draws of draw block ``block`` (start, stop)."""
        request = self.request(request_json)
        model = await self.model_for(request)

        def work() -> dict[str, Any]:
            gen = self.generator(job_id, request, model, steering)
            return {"start": int(block[0]), "accepted": gen.accepted(*block)}

        return await asyncio.to_thread(self.guarded, request, work)

    async def write(
        self,
        job_id: str,
        request_json: dict[str, Any],
        steering: list[float] | None,
        task: Any,
    ) -> dict[str, Any]:
        """Write chunk ``task`` (a :class:`~cloudburst.ensembles.plan.ChunkTask`) whole, unless
        the job was stopped while the task waited (``{"skipped": reason}``)."""
        stop = await asyncio.to_thread(self.jobs.stop_reason, job_id)
        if stop is not None:
            return {"skipped": stop.message}
        request = self.request(request_json)
        model = await self.model_for(request)

        def work() -> dict[str, Any]:
            from cloudburst.ensembles.generate import layout_of
            from cloudburst.ensembles.store import EnsembleStore

            gen = self.generator(job_id, request, model, steering)
            options = storage.options_from(request.output, request.storage)
            store = EnsembleStore(request.output, options, layout_of(request, gen.window))
            x, w, record = gen.members(task.candidates, task.draws)
            store.write_chunk(task.chunk, x, w, task.candidates, record)
            return {"chunk": task.chunk, "members": len(task.candidates)}

        return await asyncio.to_thread(self.guarded, request, work)

    async def finish(self, job_id: str, request_json: dict[str, Any]) -> dict[str, Any]:
        """Write the completion marker; the run's acceptance rate and model version."""
        import time

        from cloudburst.ensembles.generate import finish, open_ensemble

        request = self.request(request_json)
        model = await self.model_for(request)

        def work() -> dict[str, Any]:
            opened = open_ensemble(request, model=model, tracking_uri=self.tracking_uri)
            marker = opened.complete or finish(opened, 0, time.perf_counter()).summary
            self.bound.pop(job_id, None)
            return {
                "acceptance_rate": float(marker.get("acceptance_rate", 1.0)),
                "model_version": model.version_uri,
            }

        return await asyncio.to_thread(self.guarded, request, work)

    async def translate(self, job_id: str, request_json: dict[str, Any]) -> dict[str, Any]:
        """Write a translation (or codes) job's whole store (see
        :func:`cloudburst.serving.translations.run_product`): ``{"summary": ...}``,
        ``{"skipped": why}`` once the job was stopped, or ``{"error": ...}``."""
        from cloudburst.serving.translations import TranslationRequest, run_product

        request = TranslationRequest.model_validate(request_json)
        model = await self.model_for(request)

        def work() -> dict[str, Any]:
            return run_product(
                self.jobs, self.settings, job_id, request, model.packaged, model.version_uri
            )

        return await asyncio.to_thread(self.guarded, request, work)
