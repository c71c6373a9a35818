"""Fail fast: how long each refusal of an unusable endpoint or config takes, against its limit.

    .venv/bin/python benchmarks/fail_fast.py [--repeat 3] [--no-job]

Each case is timed ``--repeat`` times (the slowest is printed) and set beside the time a user
should wait at most for it, as measured / limit (above 1: too slow):

- an unreachable object-store endpoint (a loopback port nothing listens on), s3 and gs:
  ``ingest``, ``open_store`` and ``open_source``, refused by the TCP pre-check (limit 10 s
  for the three together) instead of the clients' retries and read timeouts;
- an unreachable MLflow tracking server: ``check_tracking``, ``list_models`` and ``promote``
  (limit 10 s for the three);
- a port that accepts connections but never answers HTTP: ``check_tracking`` gives up after
  the connect and one request of ``tracking.HTTP_TIMEOUT_S`` (limit: that timeout + 5 s);
- ``jobs/train.py`` with a tracking URI nothing answers: refused by its pre-flight before Ray
  starts, as a whole process with its imports (limit 45 s; ``--no-job`` skips it).

The figures are only as steady as the machine: on a loaded one the job's start-up (Python,
torch and MLflow imports) dominates its figure.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from _common import ROOT  # before cloudburst: package path, quiet defaults
from cloudburst import storage, tracking, versions
from cloudburst.data import ingest, sources


def free_port() -> int:
    from servers import free_port as pick  # the tests' helpers: on the path after _common

    return pick()


def slowest(repeat: int, case: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        case()
        times.append(time.perf_counter() - t0)
    return max(times)


def refused(call: Callable[[], object], error: type[BaseException]) -> None:
    try:
        call()
    except error:
        return
    raise SystemExit(f"{call} did not fail with {error.__name__}")


def storage_case(protocol: str, data: Path) -> Callable[[], None]:
    def case() -> None:
        endpoint = f"http://127.0.0.1:{free_port()}"
        if protocol == "s3":
            opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        else:
            opts = {"token": "anon", "project": "test", "endpoint_url": endpoint}
        target = f"{protocol}://bucket/x.zarr"
        refused(
            lambda: ingest.ingest(data, target, target_options=opts, progress=False),
            storage.StorageError,
        )
        refused(lambda: ingest.open_store(target, opts), storage.StorageError)
        refused(
            lambda: sources.open_source(f"{protocol}://bucket/x.nc", storage_options=opts),
            storage.StorageError,
        )

    return case


def tracking_case() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    refused(lambda: tracking.check_tracking(uri), tracking.TrackingError)
    refused(lambda: versions.list_models(uri), tracking.TrackingError)
    refused(lambda: versions.promote("m", "1", tracking_uri=uri), tracking.TrackingError)


def silent_case() -> None:
    with socket.socket() as listener:  # accepts connections (backlog), never speaks HTTP
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        refused(lambda: tracking.check_tracking(uri), tracking.TrackingError)


def job_case(store: str, folder: Path) -> Callable[[], None]:
    def case() -> None:
        args = [
            sys.executable, "jobs/train.py", "--config", "jobs/configs/vae-demo.yaml",
            f"data.store={store}", "data.windows.size=8", "data.windows.length=4",
            f"run.storage_path={folder / 'ray'}",
            f"run.tracking_uri=http://127.0.0.1:{free_port()}",
        ]  # fmt: skip
        from servers import JOB_ENV

        env = {**os.environ, **JOB_ENV}
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 2 or "unreachable" not in done.stderr:
            raise SystemExit(f"the train job did not refuse the config:\n{done.stderr[-2000:]}")

    return case


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-job", action="store_true", help="skip the train job's case")
    args = parser.parse_args()
    from servers import TEST_ENV

    os.environ.update(TEST_ENV)  # no cloud metadata probes or region guessing

    from cloudburst.config import SyntheticConfig
    from cloudburst.data.synthetic import write_synthetic

    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="cloudburst-fail-fast-") as tmp:
        folder = Path(tmp)
        store = str(folder / "s.zarr")
        write_synthetic(SyntheticConfig(nt=40, ny=16, nx=16), store, progress=False)
        with warnings.catch_warnings():  # a local store without consolidated metadata
            warnings.simplefilter("ignore", RuntimeWarning)
            source = sources.open_source(store).load()
        for protocol in ("s3", "gs"):
            took = slowest(args.repeat, storage_case(protocol, source))
            rows.append((f"object store {protocol}: ingest, open_store, open_source", took, 10.0))
        rows.append(
            ("tracking: check, list_models, promote", slowest(args.repeat, tracking_case), 10.0)
        )
        limit = tracking.HTTP_TIMEOUT_S + 5.0
        rows.append(
            ("tracking: a port that never answers HTTP", slowest(args.repeat, silent_case), limit)
        )
        if not args.no_job:
            rows.append(
                ("train job: pre-flight refusal", slowest(1, job_case(store, folder)), 45.0)
            )

    print(f"{'case':58}{'measured s':>12}{'limit s':>10}{'ratio':>8}")
    for name, took, limit in rows:
        print(f"{name:58}{took:12.2f}{limit:10.1f}{took / limit:8.2f}")
    return 0 if all(took <= limit for _, took, limit in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
