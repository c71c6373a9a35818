"""Which draws make which member chunk: the work units an ensemble is cut into.

A chunk task is one member chunk of the store (exactly one Zarr chunk of every array, so two
tasks never share a Zarr chunk) with the draw indices of its members and the draw range it
accounts for. Without a threshold, chunk ``c`` is draws ``span(c)`` and tasks are independent.
With a threshold, chunk ``c`` takes the next accepted draws after those of chunk ``c - 1``;
acceptance depends on the draw alone, so draw blocks are screened independently (in any order,
by any worker) and the tasks follow from the accepted indices: the same members, weights and
records as the single-process path, which walks the draws in order.

Used by the batch fan-out (:mod:`cloudburst.ensembles.fanout`) and the endpoint, which each
schedule these units on their own workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudburst.ensembles.store import Layout


class PlanError(ValueError):
    """The draws screened so far cannot fill the ensemble within its candidate budget."""


@dataclass(frozen=True)
class ChunkTask:
    """Member chunk ``chunk``: its members are draws ``candidates`` (in member order) and it
    accounts for every draw in ``[draws[0], draws[1])``, accepted or not."""

    chunk: int
    candidates: np.ndarray  # int64
    draws: tuple[int, int]


def plain_tasks(layout: Layout, done: dict[int, Any]) -> Iterator[ChunkTask]:
    """Tasks of the chunks not yet written when every draw is a member (made lazily: a
    scheduler holds the tasks in flight, not the whole ensemble's)."""
    for c in range(layout.chunks):
        if c not in done:
            a, b = layout.span(c)
            yield ChunkTask(c, np.arange(a, b, dtype=np.int64), (a, b))


def resume_point(layout: Layout, done: dict[int, dict[str, Any]]) -> tuple[int, int]:
    """(first chunk not in the written prefix, the draw it starts from)."""
    chunk, start = 0, 0
    while chunk < layout.chunks and chunk in done:
        start = int(done[chunk]["draws"][1])
        chunk += 1
    return chunk, start


class Screening:
    """Collects screened draw blocks (any order) until the accepted draws fill the chunks.

    ``blocks()`` yields the draw ranges to screen, in order; ``add(a, accepted)`` records one;
    ``tasks()`` is ready once the contiguous prefix of screened blocks holds enough accepted
    draws for every chunk from ``first`` on.
    """

    def __init__(
        self,
        layout: Layout,
        done: dict[int, dict[str, Any]],
        *,
        block: int,
        limit: int,
        threshold: float,
    ) -> None:
        self.layout, self.done = layout, done
        self.first, self.start = resume_point(layout, done)
        self.block, self.limit, self.threshold = max(1, block), limit, threshold
        self.need = layout.members - layout.span(self.first)[0] if self.first < layout.chunks else 0
        self.results: dict[int, np.ndarray] = {}
        self.next = self.start
        self.screened = self.start  # end of the contiguous screened prefix
        self.found = 0  # accepted draws in that prefix

    def blocks(self) -> Iterator[tuple[int, int]]:
        """The next draw ranges to screen, while more may be needed."""
        while not self.enough() and self.next < self.limit:
            a, self.next = self.next, min(self.limit, self.next + self.block)
            yield a, self.next

    def add(self, start: int, accepted: np.ndarray) -> None:
        self.results[int(start)] = np.asarray(accepted, dtype=np.int64)
        while self.screened in self.results and self.found < self.need:
            got = self.results[self.screened]
            self.found += len(got)
            self.screened = min(self.limit, self.screened + self.block)

    def enough(self) -> bool:
        return self.found >= self.need

    def exhausted(self) -> bool:
        """Every draw up to the budget is screened and the members are still short."""
        return not self.enough() and self.screened >= self.limit

    def error(self) -> PlanError:
        have = self.layout.span(self.first)[0] + self.found
        return PlanError(
            f"after {self.limit} draws only {have} members reach the threshold "
            f"{self.threshold:g} (acceptance {have / max(self.limit, 1):.2g}); lower the "
            "threshold, use an extreme scenario, or raise max_candidates_per_member"
        )

    def tasks(self) -> list[ChunkTask]:
        """The chunk tasks from ``first`` on (chunks already written are left out)."""
        if not self.enough():
            raise self.error() if self.exhausted() else PlanError("screening is not finished")
        blocks = sorted(k for k in self.results if self.start <= k < self.screened)
        pool = np.concatenate([self.results[k] for k in blocks]) if blocks else np.zeros(0, int)
        out, used, cursor = [], 0, self.start
        for c in range(self.first, self.layout.chunks):
            a, b = self.layout.span(c)
            cand = pool[used : used + (b - a)]
            used += b - a
            end = int(cand[-1]) + 1
            if c not in self.done:
                out.append(ChunkTask(c, cand, (cursor, end)))
            cursor = end
        return out


def screening(
    layout: Layout,
    done: dict[int, dict[str, Any]],
    *,
    batch_size: int,
    max_candidates_per_member: int,
    threshold: float,
) -> Screening:
    """A :class:`Screening` of blocks a few batches long (one chunk's worth at least)."""
    block = batch_size * max(1, -(-layout.chunk_members // batch_size))
    return Screening(
        layout,
        done,
        block=block,
        limit=max_candidates_per_member * layout.members,
        threshold=threshold,
    )
