"""An ensemble fanned out over a Ray cluster: one actor per CPU or GPU, chunks written in place.

The driver resolves the model, creates (or reopens) the store and cuts the request into chunk
tasks (:mod:`cloudburst.ensembles.plan`); it only schedules. Each :class:`ChunkWorker` actor
loads the model once and writes whole member chunks straight into the store, each with its
progress record, so memory per worker is one chunk whatever the member count, and no Zarr
chunk ever has two writers. With a threshold, the workers first screen draw blocks for
accepted draws (indices only travel back), then write the chunks those draws fill.

The bytes are those of the single-process path (:func:`~cloudburst.ensembles.generate.
generate`): member k depends on (seed, k) alone and is decoded in fixed-size batches; the
steering of an extreme scenario (its shift direction or fitted Gaussian) is computed once, by
the driver, and given to every worker. That holds for workers on the same kind of device with
the same number of intra-op threads (one per worker here): floating-point reductions may be
ordered differently on another device or thread count.

A worker that dies (its process, or its node) has its task redone by another worker, and a
replacement is started; a task is tried at most :data:`MAX_TRIES` times. Re-running the request
resumes it: only chunks without a progress record are written.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from cloudburst import storage
from cloudburst.ensembles.generate import (
    EnsembleError,
    EnsembleResult,
    Generator,
    Opened,
    finish,
    layout_of,
    open_ensemble,
    resolve,
    result_of,
)
from cloudburst.ensembles.plan import ChunkTask, PlanError, plain_tasks, screening
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import EnsembleStore

log = logging.getLogger(__name__)

MAX_TRIES = 3  # attempts of one task across dying workers
IN_FLIGHT = 2  # tasks queued per worker, so it never waits on the driver between tasks
DRAIN_SECONDS = 120.0  # how long a failing run waits for the calls it already sent


class ChunkWorker:
    """A Ray actor's model and store for one request (see the module doc)."""

    def __init__(
        self,
        request_json: dict[str, Any],
        version_uri: str,
        tracking_uri: str | None,
        steering: list[float] | None,
        threads: int = 1,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        request = EnsembleRequest.model_validate(request_json)
        model = resolve(version_uri, tracking_uri)
        model = dataclasses.replace(model, uri=request.model)
        if torch.cuda.is_available():  # Ray gave this actor a GPU
            model.packaged.model.to("cuda")
        pinned = np.asarray(steering, dtype=np.float64) if steering is not None else None
        self.gen = Generator(request, model, steering=pinned)
        options = storage.options_from(request.output, request.storage)
        self.store = EnsembleStore(request.output, options, layout_of(request, self.gen.window))

    def node(self) -> str:
        """The Ray node this worker runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def screen(self, block: tuple[int, int]) -> tuple[int, np.ndarray]:
        """(start, the accepted draws in [start, stop)) of the draw block (start, stop)."""
        start, stop = block
        return start, self.gen.accepted(start, stop)

    def write(self, task: ChunkTask) -> dict[str, Any]:
        """Generate and write chunk ``task`` whole, then its progress record."""
        x, w, record = self.gen.members(task.candidates, task.draws)
        self.store.write_chunk(task.chunk, x, w, task.candidates, record)
        return {"chunk": task.chunk, "members": len(task.candidates), "node": self.node()}


def cluster_share(workers: int | None = None) -> tuple[int, dict[str, float]]:
    """(number of workers, Ray resources of each): one per GPU when the cluster has GPUs,
    else one per CPU; ``workers`` overrides the count."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    each = {"num_cpus": 1.0, "num_gpus": 1.0} if gpus else {"num_cpus": 1.0}
    offered = gpus or cpus
    if workers is not None and workers < 1:
        raise EnsembleError(f"workers must be >= 1 (got {workers})")
    return int(workers or max(1, offered)), each


class WorkerPool:
    """Ray actors bound to one opened request; runs calls on them, redoing a dead one's."""

    def __init__(
        self,
        opened: Opened,
        count: int,
        each: dict[str, float],
        tracking_uri: str | None,
    ) -> None:
        import ray

        steering = opened.gen.steering
        self.args = (
            opened.request.model_dump(mode="json"),
            opened.model.version_uri,
            tracking_uri,
            [float(v) for v in steering] if steering is not None else None,
            1,
        )
        self.actor_class = ray.remote(ChunkWorker).options(
            **each, max_restarts=0, max_task_retries=0
        )
        self.actors: list[Any] = []
        self.starting: dict[Any, Any] = {}  # readiness ref -> actor not yet serving
        self.deaths = 0
        self.started = count
        self.chunks_by_node: Counter[str] = Counter()  # chunks written on each Ray node
        for _ in range(count):
            self.spawn()

    def spawn(self) -> None:
        actor = self.actor_class.remote(*self.args)
        self.starting[actor.node.remote()] = actor

    def close(self) -> None:
        import ray

        for actor in [*self.actors, *self.starting.values()]:
            ray.kill(actor, no_restart=True)
        self.actors, self.starting = [], {}

    def run(
        self,
        method: str,
        items: Iterable[Any],
        on_result: Callable[[Any, Any], None],
        label: Callable[[Any], str] = str,
    ) -> None:
        """Call ``method(item)`` on the workers for every item (lazily drawn from ``items``),
        at most :data:`IN_FLIGHT` per worker, and ``on_result(item, value)`` in completion
        order. A task whose worker died is redone elsewhere (at most :data:`MAX_TRIES`). If
        this raises, the calls already sent have ended first (up to :data:`DRAIN_SECONDS`)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        source: Iterator[Any] = iter(items)
        retry: deque[tuple[Any, int]] = deque()
        inflight: dict[Any, tuple[Any, Any, int]] = {}  # ref -> (actor, item, tries)
        exhausted = False

        def load(actor: Any) -> int:
            return sum(1 for a, _, _ in inflight.values() if a is actor)

        try:
            while True:
                for actor in self.actors:
                    while load(actor) < IN_FLIGHT:
                        if retry:
                            item, tries = retry.popleft()
                        elif not exhausted:
                            try:
                                item, tries = next(source), 0
                            except StopIteration:
                                exhausted = True
                                break
                        else:
                            break
                        ref = getattr(actor, method).remote(item)
                        inflight[ref] = (actor, item, tries)
                if not inflight and (exhausted and not retry):
                    return
                if not inflight and not self.actors and not self.starting:
                    raise EnsembleError("every ensemble worker died; check the cluster's nodes")
                ready, _ = ray.wait([*inflight, *self.starting], num_returns=1)
                ref = ready[0]
                if ref in self.starting:
                    actor = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as exc:
                        self.deaths += 1
                        log.warning("an ensemble worker failed to start: %s", exc)
                        if not self.actors and not inflight and not self.starting:
                            raise EnsembleError(f"no ensemble worker could start: {exc}") from None
                        continue
                    except RayTaskError as exc:  # the worker's own check refused the request
                        raise exc.as_instanceof_cause() from None
                    self.actors.append(actor)
                    continue
                actor, item, tries = inflight.pop(ref)
                try:
                    value = ray.get(ref)
                except RayActorError as exc:
                    self.deaths += 1
                    if actor in self.actors:
                        self.actors.remove(actor)
                        self.spawn()
                    if tries + 1 >= MAX_TRIES:
                        raise EnsembleError(
                            f"{label(item)} failed on {MAX_TRIES} workers in turn; last: {exc}"
                        ) from None
                    log.warning("an ensemble worker died during %s; redoing it", label(item))
                    retry.append((item, tries + 1))
                    continue
                except RayTaskError as exc:
                    raise exc.as_instanceof_cause() from None
                on_result(item, value)
        except BaseException:
            # Calls already sent still write their chunks: let them end before the caller
            # sees the error, so that nothing writes into the store after this returns.
            if inflight:
                ray.wait(list(inflight), num_returns=len(inflight), timeout=DRAIN_SECONDS)
            raise


def generate_on_cluster(
    request: EnsembleRequest,
    *,
    workers: int | None = None,
    tracking_uri: str | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    progress: bool = False,
    pool_ready: Callable[[WorkerPool], None] | None = None,
) -> EnsembleResult:
    """Make (or finish) the ensemble ``request`` asks for on the connected Ray cluster.

    ``workers``: how many actors (default :func:`cluster_share`); ``on_chunk(members_done,
    members)`` after each chunk is written; ``pool_ready(pool)`` once the actors are started
    (the pool counts the chunks written on each node, and the workers that died)."""
    t0 = time.perf_counter()
    opened = open_ensemble(request, tracking_uri=tracking_uri)
    if opened.complete is not None:
        return result_of(request, opened.complete, opened.model, 0, t0)
    layout, store, gen = opened.layout, opened.store, opened.gen
    done = store.done()
    count, each = cluster_share(workers)
    pending = layout.chunks - len(done)
    pool = WorkerPool(opened, max(1, min(count, pending)), each, tracking_uri)
    members_done = sum(r["members"][1] - r["members"][0] for r in done.values())
    bar = None
    try:
        if pool_ready is not None:
            pool_ready(pool)
        if gen.threshold is None:
            tasks = list(plain_tasks(layout, done))
        else:
            plan = screening(
                layout,
                done,
                batch_size=request.batch_size,
                max_candidates_per_member=request.scenario.max_candidates_per_member,
                threshold=gen.threshold,
            )
            pool.run(
                "screen",
                plan.blocks(),
                lambda _, value: plan.add(*value),
                lambda block: f"screening draws {block[0]}-{block[1]}",
            )
            try:
                tasks = plan.tasks()
            except PlanError as exc:
                raise EnsembleError(str(exc)) from None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=request.members, desc=f"ensemble {request.output}", unit="member")
            bar.update(members_done)

        def wrote(task: ChunkTask, value: dict[str, Any]) -> None:
            nonlocal members_done
            pool.chunks_by_node[value["node"]] += 1
            members_done += len(task.candidates)
            if bar is not None:
                bar.update(len(task.candidates))
            if on_chunk is not None:
                on_chunk(members_done, request.members)

        pool.run("write", tasks, wrote, lambda task: f"chunk {task.chunk}")
        written = len(tasks)
    finally:
        if bar is not None:
            bar.close()
        pool.close()
    result = finish(opened, written, t0)
    result.workers = pool.started
    return result
