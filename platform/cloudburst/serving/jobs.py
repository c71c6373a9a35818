"""Job records of the ensemble endpoint, in the state store (files, local or object storage).

Per job, under ``state_url``:

- ``ID.json``: the small main record (status, attempts, deadline, error), written on status
  changes only;
- ``requests/ID.json``: the request as validated, written once;
- ``progress/ID.json``: members written so far, replaced after every chunk;
- ``cancelled/ID``: the cancellation mark, written once and never removed, so that no later
  write (a replica finishing a chunk, a recovery) can bring the job back.

A translation (or codes) job's main record has ``kind`` (:data:`PRODUCT_KINDS`), its input
and output, and once done the summary of the store it made; its progress counts time steps.

A job leaves a terminal status (:data:`TERMINAL`) never; a cancelled job reads as cancelled
whatever its main record says.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from cloudburst import storage

TERMINAL = ("done", "failed", "cancelled")
PRODUCT_KINDS = ("translate", "codes")  # jobs that make one derived store (not ensembles)
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobStopped(Exception):
    """Raised from the engine's progress callback: the job must stop where it is."""

    status = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobCancelled(JobStopped):
    status = "cancelled"


class JobDeadlineExceeded(JobStopped):
    status = "failed"


def deadline_message(seconds: float, server_limit: float) -> str:
    return (
        f"the job passed its deadline of {seconds:g} s from submission; ask for a larger "
        f"deadline_s (at most {server_limit:g}), or raise the server's job_deadline_s setting"
    )


class JobStore:
    """Job records as JSON objects under ``url`` (each replaced atomically)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.options = dict(options or {})

    def _url(self, job_id: str, kind: str = "") -> str:
        if not JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        if kind == "cancelled":
            return storage.join(self.url, kind, job_id)
        if kind:
            return storage.join(self.url, kind, f"{job_id}.json")
        return storage.join(self.url, f"{job_id}.json")

    def _read(self, url: str) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(url, self.options))
        except FileNotFoundError:
            return None

    def _write(self, url: str, record: dict[str, Any]) -> None:
        storage.write_bytes_atomic(url, json.dumps(record).encode(), self.options)

    # ------------------------------------------------------------ records

    def create(self, record: dict[str, Any], request: dict[str, Any]) -> None:
        """A new job: its request first, then the record that makes it visible."""
        self._write(self._url(record["id"], "requests"), request)
        self.put(record)

    def put(self, record: dict[str, Any]) -> None:
        self._write(self._url(record["id"]), {**record, "updated": time.time()})

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self._read(self._url(job_id))

    def request(self, job_id: str) -> dict[str, Any] | None:
        return self._read(self._url(job_id, "requests"))

    def update(self, job_id: str, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into the main record; a terminal status is never left, and a
        cancelled job stays cancelled."""
        record = self.get(job_id) or {"id": job_id}
        status = changes.get("status")
        if status is not None:
            if record.get("status") in TERMINAL and status != record.get("status"):
                changes = {k: v for k, v in changes.items() if k not in ("status", "error")}
            elif status != "cancelled" and self.cancelled(job_id):
                changes = {k: v for k, v in changes.items() if k not in ("status", "error")}
                changes["status"] = "cancelled"
        record.update(changes)
        self.put(record)
        return record

    # ------------------------------------------------------------ progress and stops

    def set_progress(self, job_id: str, members_done: int, total: int | None = None) -> None:
        """Members (of a translation: time steps) written so far, of ``total``."""
        record: dict[str, Any] = {"members_done": members_done, "updated": time.time()}
        if total is not None:
            record["total"] = total
        self._write(self._url(job_id, "progress"), record)

    def members_done(self, job_id: str) -> int | None:
        found = self._read(self._url(job_id, "progress"))
        return None if found is None else int(found["members_done"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        storage.write_bytes_atomic(self._url(job_id, "cancelled"), b"cancelled", self.options)
        return self.update(job_id, status="cancelled", error="cancelled on request")

    def cancelled(self, job_id: str) -> bool:
        return storage.exists(self._url(job_id, "cancelled"), self.options)

    def stop_reason(self, job_id: str, now: float | None = None) -> JobStopped | None:
        """Why the job must not go on (cancelled, past its deadline, already ended)."""
        if self.cancelled(job_id):
            return JobCancelled("cancelled on request")
        record = self.get(job_id) or {}
        status = record.get("status")
        if status in TERMINAL:
            stop = JobCancelled if status == "cancelled" else JobStopped
            return stop(str(record.get("error") or f"the job is already {status}"))
        deadline = record.get("deadline")
        if deadline is not None and (now or time.time()) > float(deadline):
            return JobDeadlineExceeded(
                deadline_message(
                    float(record.get("deadline_s", 0.0)), float(record.get("deadline_limit", 0))
                )
            )
        return None

    def view(self, job_id: str) -> dict[str, Any] | None:
        """What GET answers about a job."""
        record = self.get(job_id)
        if record is None:
            return None
        if record.get("kind") in PRODUCT_KINDS:
            return self.product_view(record)
        keys = ("id", "status", "members", "members_done", "output", "model_version", "error")
        out = {k: record.get(k) for k in keys}
        done = self.members_done(job_id)
        if done is not None and out["status"] != "done":
            out["members_done"] = done
        if self.cancelled(job_id):
            out["status"] = "cancelled"
        for extra in ("seconds", "acceptance_rate", "attempts", "halted_at", "deadline_s"):
            if extra in record:
                out[extra] = record[extra]
        return out

    def product_view(self, record: dict[str, Any]) -> dict[str, Any]:
        """What GET answers about a translation (or codes) job: its progress in time steps
        while it runs, the store's summary once done."""
        job_id = record["id"]
        keys = ("id", "kind", "status", "model_version", "input", "output", "error")
        out = {k: record.get(k) for k in keys}
        if self.cancelled(job_id):
            out["status"] = "cancelled"
        if out["status"] != "done":
            found = self._read(self._url(job_id, "progress"))
            if found is not None:
                out["steps_done"] = int(found["members_done"])
                out["steps"] = found.get("total")
        for extra in ("summary", "seconds", "attempts", "deadline_s"):
            if extra in record:
                out[extra] = record[extra]
        return out

    def unfinished(self) -> list[dict[str, Any]]:
        """Main records of jobs that are neither ended nor cancelled."""
        fs, path = storage.filesystem(self.url, self.options)
        if not fs.exists(path):
            return []
        out = []
        for name in fs.ls(path, detail=False):
            stem = str(name).rstrip("/").rsplit("/", 1)[-1]
            if not stem.endswith(".json") or not JOB_ID.match(stem[: -len(".json")]):
                continue
            with fs.open(name, "rb") as f:
                record = json.loads(f.read())
            if record.get("status") not in TERMINAL and not self.cancelled(record["id"]):
                out.append(record)
        return out
