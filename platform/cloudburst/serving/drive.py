"""How the ingress drives one job over the generator replicas.

One drive (:meth:`JobDriver.run`): ``plan`` on a replica (open the store, what is left), then
``screen`` draw blocks (rejecting scenarios) and ``write`` member chunks as separate calls that
Serve routes over the replicas, at most ``job_chunks_in_flight`` of them at a time, so one
large job spreads over every replica while concurrent jobs share them chunk by chunk; then
``finish`` (the completion marker). The job's stop marks (cancel, deadline) are read after
every answer: once stopped, no new call is made and queued ones skip their work. A replica
dying raises out of the drive: the ingress drives the job again, and the new plan holds only
the chunks still missing.

A translation (or codes) job is one call (:meth:`JobDriver.product`): the replica writes the
whole derived store, stopping between blocks once the job is stopped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cloudburst.serving.jobs import JobStopped, JobStore
from cloudburst.serving.settings import ServeSettings


class JobFailed(Exception):
    """A work unit answered an error: the job fails with this message (already redacted)."""


def answered(answer: dict[str, Any]) -> dict[str, Any]:
    """A work unit's answer, or :class:`JobFailed` with its error."""
    if "error" in answer:
        raise JobFailed(answer["error"])
    return answer


class JobDriver:
    """Drives jobs on ``handle`` (the generator deployment's handle, bound to the job's
    model version), recording status and progress in ``jobs``."""

    def __init__(self, jobs: JobStore, settings: ServeSettings, handle: Any) -> None:
        self.jobs, self.settings, self.handle = jobs, settings, handle

    async def run(self, job_id: str, request: dict[str, Any]) -> None:
        """One drive of the job: plan on a replica, screen draw blocks and write chunks as
        separate calls spread over the replicas (at most ``chunks_in_flight`` at a time, so
        concurrent jobs share the replicas chunk by chunk), then the completion marker.
        A replica dying raises out of here: the next drive plans again and writes only what
        is missing."""
        import numpy as np

        from cloudburst.ensembles.plan import PlanError, plain_tasks, screening
        from cloudburst.ensembles.store import Layout

        t0 = time.perf_counter()
        plan = answered(await self.handle.plan.remote(job_id, request))
        if "complete" in plan:
            marker = plan["complete"]
            await asyncio.to_thread(
                self.jobs.update,
                job_id,
                status="done",
                members_done=int(marker.get("members", 0)),
                seconds=0.0,
                acceptance_rate=float(marker.get("acceptance_rate", 1.0)),
            )
            return
        members, window, chunk_members = plan["layout"]
        layout = Layout(int(members), tuple(window), int(chunk_members))
        done = {int(c): r for c, r in plan["done"].items()}
        steering = plan["steering"]
        progress = {"members": int(plan["members_done"])}
        await asyncio.to_thread(self.jobs.update, job_id, status="running")
        if plan["threshold"] is None:
            tasks: Any = plain_tasks(layout, done)
        else:
            scenario = request.get("scenario") or {}
            screen = screening(
                layout,
                done,
                batch_size=int(request["batch_size"]),
                max_candidates_per_member=int(scenario.get("max_candidates_per_member", 1)),
                threshold=float(plan["threshold"]),
            )

            def screened(_: Any, answer: dict[str, Any]) -> None:
                screen.add(answer["start"], np.asarray(answer["accepted"]))

            await self.spread(
                job_id,
                screen.blocks(),
                lambda block: self.handle.screen.remote(job_id, request, steering, block),
                screened,
            )
            try:
                tasks = screen.tasks()
            except PlanError as exc:
                raise JobFailed(self.settings.redact(str(exc))) from None

        def wrote(_: Any, answer: dict[str, Any]) -> None:
            progress["members"] += int(answer.get("members", 0))
            self.jobs.set_progress(job_id, progress["members"])

        await self.spread(
            job_id,
            tasks,
            lambda task: self.handle.write.remote(job_id, request, steering, task),
            wrote,
        )
        final = answered(await self.handle.finish.remote(job_id, request))
        await asyncio.to_thread(
            self.jobs.update,
            job_id,
            status="done",
            members_done=layout.members,
            seconds=round(time.perf_counter() - t0, 3),
            acceptance_rate=final["acceptance_rate"],
            model_version=final["model_version"],
        )

    async def product(self, job_id: str, request: dict[str, Any]) -> None:
        """One drive of a translation (or codes) job: a single call on a replica, which
        writes the whole store (or keeps it when an earlier run of the same request
        finished it) and stops between blocks once the job is cancelled or past its
        deadline. A replica dying raises out of here: the next drive writes it again."""
        t0 = time.perf_counter()
        await asyncio.to_thread(self.jobs.update, job_id, status="running")
        answer = await self.handle.translate.remote(job_id, request)
        if "skipped" in answer:
            stop = await asyncio.to_thread(self.jobs.stop_reason, job_id)
            raise stop or JobFailed(str(answer["skipped"]))
        summary = answered(answer)["summary"]
        await asyncio.to_thread(
            self.jobs.update,
            job_id,
            status="done",
            summary=summary,
            seconds=round(time.perf_counter() - t0, 3),
        )

    async def spread(
        self,
        job_id: str,
        items: Iterable[Any],
        call: Callable[[Any], Awaitable[dict[str, Any]]],
        on_answer: Callable[[Any, dict[str, Any]], None],
    ) -> None:
        """``call(item)`` for every item of the iterable ``items``, at most
        ``chunks_in_flight`` at a time; ``on_answer(item, answer)`` (in a thread) as each
        ends. Checks the job's stop marks after each answer: once stopped, no new call is
        made, those in flight end (a queued one skips its work), and :class:`JobStopped` is
        raised."""
        limit = self.settings.chunks_in_flight()
        source = iter(items)
        pending: set[asyncio.Task] = set()
        stopped: JobStopped | None = None

        async def one(item: Any) -> tuple[Any, dict[str, Any]]:
            return item, await call(item)

        try:
            while True:
                while stopped is None and len(pending) < limit:
                    item = next(source, None)
                    if item is None:
                        break
                    pending.add(asyncio.create_task(one(item)))
                if not pending:
                    break
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    item, answer = task.result()
                    if "skipped" in answer:
                        continue
                    await asyncio.to_thread(on_answer, item, answered(answer))
                if stopped is None:
                    stopped = await asyncio.to_thread(self.jobs.stop_reason, job_id)
        finally:
            for task in pending:
                task.cancel()
        if stopped is not None:
            halted = await asyncio.to_thread(self.jobs.members_done, job_id)
            await asyncio.to_thread(self.jobs.update, job_id, halted_at=halted or 0)
            raise stopped
