"""Object storage that fails: ingest, window reads, atomic writes and ensembles on a moto S3
server behind a fault injector (tests/faults.py), and the batch ensemble job killed mid-run.

With a tenth of the requests failing (5xx answers, dropped connections, answers lost after
the server acted), every operation completes with the bytes of a fault-free run, its
retries logged; with every request failing, it stops within its retry limit with an error
naming the store and the retry policy, and leaves nothing that reads as complete.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import FaultProxy
from servers import JOB_ENV

from cloudburst import storage, tracking
from cloudburst.config import SyntheticConfig, VAEConfig, WindowConfig
from cloudburst.data import ingest, synthetic
from cloudburst.data.loader import WindowDataset
from cloudburst.data.transforms import Scale
from cloudburst.data.windows import build_index
from cloudburst.ensembles.generate import ResolvedModel, generate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import PROGRESS, read_marker
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
# seed 57: the first request and others soon after fail, so even a short run meets faults
FAULTS = {"fraction": 0.1, "seed": 57, "kinds": ("500", "503", "drop", "lost")}
WINDOW = (4, 8, 8)


def options(endpoint: str, url: str = "s3://b") -> dict:
    """The platform's options for ``url`` (its retry policy included) at ``endpoint``."""
    creds = {"key": "testing", "secret": "testing"}
    return storage.storage_options(url, endpoint_url=endpoint, extra=creds)


def objects(url: str, opts: dict) -> dict[str, bytes]:
    """Every object under ``url`` (a store on S3 or a local folder), by relative key.

    s3fs may list a prefix with nothing under it yet (a store a job is still creating) as
    the prefix itself; only entries that read as objects count."""
    fs, root = storage.filesystem(url, opts)
    fs.invalidate_cache()
    found = {}
    for p in sorted(fs.find(root)):
        try:
            found[p[len(root) :].lstrip("/")] = fs.cat_file(p)
        except FileNotFoundError:
            continue
    return found


def chunk_objects(url: str, opts: dict | None = None) -> dict[str, bytes]:
    return {k: v for k, v in objects(url, opts or {}).items() if "/c/" in k}


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.make_bucket(f"faults-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def direct(s3_server) -> dict:
    return options(s3_server.endpoint)


@pytest.fixture(scope="module")
def source():
    cfg = SyntheticConfig(nt=48, ny=16, nx=16, seed=3)
    return synthetic.generate(cfg)


def run_ingest(source, target: str, opts: dict) -> ingest.IngestResult:
    return ingest.ingest(
        source, target, chunks={"time": 8}, target_options=opts, progress=False, bins=10
    )


@pytest.fixture(scope="module")
def clean_store(source, bucket, direct) -> str:
    url = f"{bucket}/clean.zarr"
    run_ingest(source, url, direct)
    return url


def without_time(marker: dict) -> dict:
    return {k: v for k, v in marker.items() if k != "written"}


# ---------------------------------------------------------------------------- ten percent


def test_ingest_through_faults_writes_the_fault_free_bytes(
    s3_server, source, bucket, direct, clean_store, caplog
):
    url = f"{bucket}/faulty.zarr"
    with (
        caplog.at_level(logging.WARNING, "cloudburst.storage"),
        FaultProxy(s3_server.endpoint, **FAULTS) as proxy,
    ):
        result = run_ingest(source, url, options(proxy.endpoint))
    assert proxy.injected > 0, "no fault was injected: the test proves nothing"
    assert not result.skipped
    got, want = objects(url, direct), objects(clean_store, direct)
    marker = ingest.MARKER
    assert json.loads(got.pop(marker))["fingerprint"] == json.loads(want.pop(marker))["fingerprint"]
    assert sorted(got) == sorted(want)
    assert got == want  # every chunk and metadata document, byte for byte
    assert without_time(ingest.read_marker(url, direct)) == without_time(
        ingest.read_marker(clean_store, direct)
    )
    assert any("object store request failed" in r.getMessage() for r in caplog.records)


def test_loader_reads_the_fault_free_windows_through_faults(s3_server, clean_store, direct):
    ds, _ = ingest.open_store(clean_store, direct)
    index = build_index(ds, WindowConfig(length=4, size=8, stride=4))

    def windows(opts: dict) -> list[tuple[bytes, bytes, bytes]]:
        data = WindowDataset(clean_store, index, storage_options=opts, shuffle=False)
        return [
            (w["x"].numpy().tobytes(), w["mask"].numpy().tobytes(), w["origin"].numpy().tobytes())
            for w in data
        ]

    want = windows(direct)
    with FaultProxy(s3_server.endpoint, **FAULTS) as proxy:
        got = windows(options(proxy.endpoint))
    assert proxy.injected > 0
    assert len(want) == len(index) > 0
    assert got == want


def test_atomic_writes_through_faults_land_whole(s3_server, bucket, direct):
    rng = np.random.default_rng(0)
    blobs = {f"{bucket}/ckpt/part-{i}.bin": rng.bytes(50_000 + i) for i in range(12)}
    with FaultProxy(s3_server.endpoint, **FAULTS) as proxy:
        faulty = options(proxy.endpoint)
        for url, data in blobs.items():
            storage.write_bytes_atomic(url, data, faulty)
    assert proxy.injected > 0
    for url, data in blobs.items():
        assert storage.read_bytes(url, direct) == data


def tiny(seed: int = 0) -> PrecipitationModel:
    torch.manual_seed(seed)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, WINDOW)
    stats = {"units": "mm/day", "max": 60.0, "quantiles": {"0.99": 20.0, "0.999": 45.0}}
    return PrecipitationModel(net, "vae", cfg, WINDOW, Scale(0.0, 60.0, "unit"), stats)


def ask(output: str, opts: dict | None = None, **kw) -> EnsembleRequest:
    base = {"model": "models:/tiny/1", "members": 96, "seed": 7, "output": output}
    base.update(batch_size=16, chunk_members=32, storage={"options": opts or {}})
    return EnsembleRequest.model_validate({**base, **kw})


@pytest.fixture
def one_thread():
    """A tiny model decodes fastest on one thread (both runs compared use the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ensemble_through_faults_has_the_fault_free_bytes(
    s3_server, bucket, direct, tmp_path, one_thread
):
    model = ResolvedModel(tiny(), "models:/tiny/1", "models:/tiny/1", None)
    local = str(tmp_path / "clean.zarr")
    generate(ask(local), model=model)
    url = f"{bucket}/ens/faulty.zarr"
    with FaultProxy(s3_server.endpoint, **FAULTS) as proxy:
        result = generate(ask(url, options(proxy.endpoint)), model=model)
    assert proxy.injected > 0
    assert result.chunks_written == 3
    want = chunk_objects(local)
    assert len(want) == 3 * 3 + 4  # precip, weight, candidate; member, time, y, x
    assert chunk_objects(url, direct) == want
    assert read_marker(url, direct)["members"] == 96


# ---------------------------------------------------------------------------- every request


@pytest.fixture
def two_attempts(monkeypatch):
    monkeypatch.setenv(storage.ATTEMPTS_ENV, "2")


def test_a_dead_store_fails_clearly_within_the_retry_limit(
    s3_server, source, bucket, direct, two_attempts, caplog
):
    target, blob = f"{bucket}/dead/x.zarr", f"{bucket}/dead/ckpt.bin"
    with (
        caplog.at_level(logging.WARNING, "cloudburst.storage"),
        FaultProxy(s3_server.endpoint, fraction=1.0, kinds=("500",)) as proxy,
    ):
        dead = options(proxy.endpoint)
        with pytest.raises(storage.StorageError) as written:
            storage.write_bytes_atomic(blob, b"state", dead)
        with pytest.raises(storage.StorageError) as ingested:
            run_ingest(source, target, dead)
    for error, url in ((written, blob), (ingested, target)):
        message = str(error.value)
        assert url in message and "up to 2 attempts per request" in message, message
        assert "internal" in message.lower(), message
    # the code's own limit stopped it: each request was tried exactly twice, then given up
    retried = [r.getMessage() for r in caplog.records if r.name == "cloudburst.storage"]
    assert any("Max attempts of 2 reached" in m for m in retried), retried
    assert proxy.forwarded == 0 and proxy.injected > 0
    assert not storage.exists(blob, direct)
    assert not storage.exists(target, direct)
    assert ingest.read_marker(target, direct) is None


# ---------------------------------------------------------------------------- SIGKILL


@pytest.fixture
def registered(tmp_path, mlflow_state) -> str:
    uri = tracking.setup(f"sqlite:///{tmp_path}/mlflow/mlflow.db", experiment="faults")
    tracking.log_and_register(tiny(), name="faults-vae")
    return uri


MEMBERS, CHUNK = 192, 8  # 24 chunks: the job is still writing when it is killed


def job(uri: str, output: str, endpoint: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "jobs" / "ensemble.py"),
        "--model", "models:/faults-vae@candidate", "--tracking-uri", uri,
        "--members", str(MEMBERS), "--chunk-members", str(CHUNK), "--batch-size", str(CHUNK),
        "--seed", "5", "--output", output, "--endpoint-url", endpoint,
    ]  # fmt: skip


def progress(url: str, opts: dict) -> list[dict]:
    found = objects(storage.join(url, PROGRESS), opts)
    return [json.loads(v) for k, v in sorted(found.items()) if k.startswith("chunk-")]


def test_killed_job_rerun_writes_every_member_once_with_the_same_bytes(
    s3_server, bucket, direct, registered, one_thread
):
    env = {**os.environ, **JOB_ENV, "OMP_NUM_THREADS": "1"}  # tiny model: one thread is fastest
    env.pop("MLFLOW_TRACKING_URI", None)
    killed, clean = f"{bucket}/job/killed.zarr", f"{bucket}/job/clean.zarr"
    cmd = job(registered, killed, s3_server.endpoint)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not progress(killed, direct):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    before = len(progress(killed, direct))
    assert 0 < before < MEMBERS // CHUNK
    assert read_marker(killed, direct) is None  # a killed run never reads as complete

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout.rsplit("ensemble:", 1)[0])["chunks_written"] == (
        MEMBERS // CHUNK - before
    )
    # the uninterrupted run, in this process on one thread like the job's
    generate(
        ask(clean, members=MEMBERS, chunk_members=CHUNK, batch_size=CHUNK, seed=5,
            model="models:/faults-vae@candidate", storage={"endpoint_url": s3_server.endpoint}),
        tracking_uri=registered,
    )  # fmt: skip

    want = chunk_objects(clean, direct)
    assert len(want) == 3 * MEMBERS // CHUNK + 4
    assert chunk_objects(killed, direct) == want
    spans = sorted(tuple(r["members"]) for r in progress(killed, direct))
    covered = np.concatenate([np.arange(a, b) for a, b in spans])
    assert covered.tolist() == list(range(MEMBERS))  # every member exactly once
    assert read_marker(killed, direct)["members"] == MEMBERS
