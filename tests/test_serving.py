"""The ensemble endpoint on a real Ray Serve on loopback, a real MLflow registry (SQLite) and
real S3 / GCS servers: requests over HTTP, results in the stores."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import servers
import xarray as xr

from cloudburst import tracking
from cloudburst.ensembles.generate import generate, resolve
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.models.package import PrecipitationModel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
]

KEY = "test-key"


def tiny_model():
    import torch

    from cloudburst.config import VAEConfig
    from cloudburst.data.transforms import Scale
    from cloudburst.models import registry

    torch.manual_seed(0)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, (4, 8, 8))
    stats = {"units": "mm/day", "max": 60.0, "quantiles": {"0.99": 20.0}}
    return PrecipitationModel(net, "vae", cfg, (4, 8, 8), Scale(0.0, 60.0, "unit"), stats)


def tiny_diffusion():
    import torch

    from cloudburst.config import DiffusionConfig
    from cloudburst.data.transforms import Scale
    from cloudburst.models import registry

    torch.manual_seed(0)
    cfg = DiffusionConfig(widths=(4, 8), embedding=8, steps=4, transform="sqrt")
    net = registry.build("diffusion", cfg, (4, 8, 8))
    stats = {"units": "mm/day", "max": 60.0, "quantiles": {"0.99": 20.0}}
    return PrecipitationModel(net, "diffusion", cfg, (4, 8, 8), Scale(0.0, 60.0, "unit"), stats)


MAX_QUEUE = 6
MAX_BODY = 65_536
TERMINAL = ("done", "failed", "cancelled")


class Endpoint:
    def __init__(self, url: str, root: Path, tracking_uri: str) -> None:
        self.url = url
        self.root = root
        self.tracking_uri = tracking_uri

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        key: str | None = KEY,
        raw: bytes | list[bytes] = b"",
    ) -> tuple[int, dict]:
        """(status, JSON answer); ``raw`` bytes as the body, or a list of byte strings sent
        chunked (no Content-Length)."""
        data: object = raw or (json.dumps(body).encode() if body is not None else None)
        if isinstance(raw, list):
            data = iter(raw)
        req = urllib.request.Request(self.url + path, data=data, method=method)  # type: ignore[arg-type]
        req.add_header("Content-Type", "application/json")
        if key:
            req.add_header("X-API-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait(self, job_id: str, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                status, body = self.call("GET", f"/v1/ensembles/{job_id}")
            except OSError:  # an ingress replica being replaced
                status = 0
            if status == 200 and body["status"] in TERMINAL:
                return body
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished in {timeout} s: {body}")

    def health(self, key: str | None = None) -> tuple[int, dict]:
        try:
            return self.call("GET", "/healthz", key=key)
        except OSError:
            return 0, {}

    def wait_idle(self, timeout: float = 240.0) -> None:
        """Until the ingress drives no job (every job it had has ended)."""
        deadline = time.monotonic() + timeout
        answer: dict = {}
        while time.monotonic() < deadline:
            status, answer = self.health()
            if status == 200 and answer["jobs_in_flight"] == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"jobs still in flight after {timeout} s: {answer}")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory, s3_server, gcs_server):
    import ray
    from ray import serve

    from cloudburst.serving.app import build

    root = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{root}/mlflow/mlflow.db"
    tracking.setup(tracking_uri, experiment="serving")
    tracking.log_and_register(
        tiny_model(), name="serve-vae", tags={"dataset": "synthetic"}, tracking_uri=tracking_uri
    )
    tracking.log_and_register(
        tiny_diffusion(),
        name="serve-diffusion",
        tags={"dataset": "synthetic"},
        tracking_uri=tracking_uri,
    )
    from cloudburst.data.synthetic import SyntheticConfig, write_synthetic

    write_synthetic(
        SyntheticConfig(nt=20, ny=12, nx=12), str(root / "data" / "obs.zarr"), progress=False
    )
    env = {**servers.TEST_ENV, **servers.RAY_ENV, "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(servers.RAY_ENV)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    port = servers.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    s3_server.make_bucket("ensembles")
    gcs_server.make_bucket("ensembles")
    offline = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there
    settings = {
        "tracking_uri": tracking_uri,
        "state_url": str(root / "state"),
        "allowed_prefixes": [
            str(root / "out"),
            {"prefix": "s3://ensembles/", "storage": {"options": s3_server.options}},
            {"prefix": "gs://ensembles/", "storage": {"options": gcs_server.options}},
            {"prefix": "s3://offline/", "storage": {"endpoint_url": offline}},
        ],
        "data_prefixes": [str(root / "data")],
        "api_key": KEY,
        "max_members": 5000,
        "max_queue": MAX_QUEUE,
        "max_body_bytes": MAX_BODY,
        "max_steps": 50,
        "max_candidates_per_member": 100,
        "max_draws": 200_000,
        "job_deadline_s": 3600,
        "min_replicas": 1,
        "max_replicas": 2,
    }
    serve.run(build(settings), name="ensembles", route_prefix="/", blocking=False)
    ep = Endpoint(f"http://127.0.0.1:{port}", root, tracking_uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ep.health()[0] == 200:
            break
        time.sleep(0.5)
    yield ep
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def keeps_serving(endpoint):
    """Whatever a test sent, the server answers afterwards."""
    yield
    assert endpoint.health()[0] == 200
    assert endpoint.call("GET", "/v1/ensembles/doesnotexist")[0] == 404


def body(output: str, **kw) -> dict:
    out = {"model": "models:/serve-vae@candidate", "members": 200, "seed": 1, "output": output}
    out.update(batch_size=50, chunk_members=100)
    out.update(kw)
    return out


def slow(endpoint, name: str, **kw) -> dict:
    """A job that takes minutes (5000 members, two per chunk) unless stopped."""
    out = str(endpoint.root / "out" / f"{name}.zarr")
    return body(out, members=5000, batch_size=2, chunk_members=2, **kw)


def state_files(endpoint, job_id: str) -> list[Path]:
    return [p for p in (endpoint.root / "state").rglob("*") if p.is_file() and job_id in p.name]


def test_health_and_models(endpoint):
    assert endpoint.call("GET", "/healthz", key=None)[0] == 200
    status, listed = endpoint.call("GET", "/v1/models")
    assert status == 200
    (model,) = [m for m in listed["models"] if m["name"] == "serve-vae"]
    assert model["aliases"] == {"candidate": "1"}


@pytest.mark.parametrize("where", ["local", "s3", "gs"])
def test_thousand_members_over_http(endpoint, where, s3_server, gcs_server):
    options = {}
    if where == "local":
        output = str(endpoint.root / "out" / "http.zarr")
    else:
        server = s3_server if where == "s3" else gcs_server
        output, options = f"{where}://ensembles/http-{where}.zarr", server.options
    # the server reaches the bucket with its own settings for the prefix
    status, accepted = endpoint.call("POST", "/v1/ensembles", body(output, members=1000))
    assert status == 202, accepted
    assert accepted["model"] == "models:/serve-vae/1"
    done = endpoint.wait(accepted["id"])
    assert done["status"] == "done", done
    assert done["members_done"] == 1000
    ds = xr.open_zarr(output, consolidated=False, storage_options=options or None)
    assert ds.precip.shape == (1000, 4, 8, 8)
    assert (ds.candidate.values == np.arange(1000)).all()


def replica_actors(deployment: str = "EnsembleGenerator"):
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if deployment in a["name"]]


def kill(actors) -> None:
    import ray

    for actor in actors:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


def replace_ingress(endpoint, killed: Callable[[], None] | None = None) -> None:
    """Kill the ingress replica (then call ``killed``) and wait, without an API key, until
    its successor answers."""
    actors = replica_actors("EnsembleAPI")
    old = {a["name"] for a in actors}
    assert old, "no EnsembleAPI replica found"
    kill(actors)
    if killed is not None:
        killed()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        new = {a["name"] for a in replica_actors("EnsembleAPI")} - old
        if new and endpoint.health()[0] == 200:
            return
        time.sleep(0.5)
    raise AssertionError("no new EnsembleAPI replica answered within 180 s")


def wait_running(endpoint, job_id: str, members: int) -> dict:
    deadline = time.monotonic() + 120
    state: dict = {}
    while time.monotonic() < deadline:
        state = endpoint.call("GET", f"/v1/ensembles/{job_id}")[1]
        if (state.get("members_done") or 0) >= members:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {members} members: {state}")


def test_killed_replica_still_ends_with_every_member_once_and_the_same_bytes(endpoint):
    output = str(endpoint.root / "out" / "killed.zarr")
    # 200 chunks of 10: the kill lands while most of the job is still to do
    request = body(output, members=2000, chunk_members=10, batch_size=20)
    status, accepted = endpoint.call("POST", "/v1/ensembles", request)
    assert status == 202, accepted
    state = wait_running(endpoint, accepted["id"], 20)
    assert state["status"] == "running" and 0 < state["members_done"] < 2000, state
    generators = replica_actors("EnsembleGenerator")
    assert generators
    kill(generators)
    done = endpoint.wait(accepted["id"])
    assert done["status"] == "done", done
    # the job went on on replacement replicas (a chunk call caught by the kill is redone by
    # a new drive; a kill between calls leaves nothing to redo)
    after = {a["name"] for a in replica_actors("EnsembleGenerator")}
    assert after and not after & {a["name"] for a in generators}

    clean = str(endpoint.root / "out" / "clean.zarr")
    model = resolve("models:/serve-vae/1", endpoint.tracking_uri)
    generate(EnsembleRequest.model_validate({**request, "output": clean}), model=model)
    a, b = (xr.open_zarr(p, consolidated=False) for p in (output, clean))
    assert (a.candidate.values == np.arange(2000)).all()
    assert a.precip.values.tobytes() == b.precip.values.tobytes()


def test_job_outlives_its_ingress_replica(endpoint):
    from cloudburst.serving.jobs import JobStore

    output = str(endpoint.root / "out" / "ingress.zarr")
    # 300 chunks of 4: the kill lands while most of the job is still to do
    status, accepted = endpoint.call(
        "POST", "/v1/ensembles", body(output, members=1200, chunk_members=4, batch_size=4)
    )
    assert status == 202, accepted
    wait_running(endpoint, accepted["id"], 8)
    jobs = JobStore(str(endpoint.root / "state"))

    def still_running() -> None:
        view = jobs.view(accepted["id"])
        assert view["status"] == "running" and view["members_done"] < 1200, view

    replace_ingress(endpoint, killed=still_running)
    # the generator replica goes on with the job, and the replacement ingress reads it from the
    # state store (driving it again if it is unfinished): either way it ends, every member once
    done = endpoint.wait(accepted["id"], timeout=300)
    assert done["status"] == "done" and done["members_done"] == 1200, done
    ds = xr.open_zarr(output, consolidated=False)
    assert (ds.candidate.values == np.arange(1200)).all()
    assert np.isfinite(ds.precip.values).all()


def burst(endpoint, name: str, n: int) -> list[tuple[int, dict]]:
    """``n`` slow jobs submitted at once."""

    def submit(i: int) -> tuple[int, dict]:
        return endpoint.call("POST", "/v1/ensembles", slow(endpoint, f"{name}-{i}", seed=i))

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(submit, range(n)))


def cancel_all(endpoint, answers: list[tuple[int, dict]]) -> None:
    for status, accepted in answers:
        if status == 202:
            code, state = endpoint.call("DELETE", f"/v1/ensembles/{accepted['id']}")
            assert code == 200 and state["status"] == "cancelled", state
    endpoint.wait_idle()


def test_twenty_concurrent_requests_complete_or_get_429(endpoint):
    endpoint.wait_idle()
    answers = burst(endpoint, "many", 20)
    codes = [status for status, _ in answers]
    assert set(codes) <= {202, 429}, answers
    assert 1 <= codes.count(202) <= MAX_QUEUE, codes
    assert codes.count(429) >= 20 - MAX_QUEUE, codes
    for status, answer in answers:
        if status == 429:
            assert "retry later" in answer["error"] and "max_queue" in answer["error"]
    cancel_all(endpoint, answers)
    # the slots are free again: a small job runs to the end
    status, accepted = endpoint.call(
        "POST", "/v1/ensembles", body(str(endpoint.root / "out" / "after-burst.zarr"))
    )
    assert status == 202, accepted
    assert endpoint.wait(accepted["id"])["status"] == "done"


def test_max_queue_holds_exactly_under_concurrent_submissions(endpoint):
    endpoint.wait_idle()
    answers = burst(endpoint, "queue", MAX_QUEUE + 4)
    codes = [status for status, _ in answers]
    assert codes.count(202) == MAX_QUEUE and codes.count(429) == 4, answers
    assert endpoint.health()[1]["jobs_in_flight"] == MAX_QUEUE
    cancel_all(endpoint, answers)


def test_cancel_stops_a_running_job_within_its_chunks_in_flight_and_it_stays_cancelled(endpoint):
    from cloudburst.serving.jobs import JobStore

    status, accepted = endpoint.call("POST", "/v1/ensembles", slow(endpoint, "cancelled"))
    assert status == 202, accepted
    job = accepted["id"]
    wait_running(endpoint, job, 4)
    code, cancelled = endpoint.call("DELETE", f"/v1/ensembles/{job}")
    assert code == 200 and cancelled["status"] == "cancelled", cancelled
    asked_at = cancelled["members_done"]
    endpoint.wait_idle()  # the generator acknowledged: the job is driven no more
    state = endpoint.call("GET", f"/v1/ensembles/{job}")[1]
    assert state["status"] == "cancelled", state
    # the chunks in flight when it was asked end (one call per replica, of 2 members each)
    in_flight = 2 * 2
    assert state["halted_at"] <= asked_at + in_flight < 5000, (asked_at, state)
    # cancelling again is harmless; the POST form answers alike
    code, again = endpoint.call("POST", f"/v1/ensembles/{job}/cancel")
    assert code == 200 and again["status"] == "cancelled", again
    # a new ingress recovers unfinished jobs, and this one is not among them
    attempts = state["attempts"]
    replace_ingress(endpoint)
    code, after = endpoint.call("GET", f"/v1/ensembles/{job}")  # authenticated: recovery runs
    assert code == 200 and after["status"] == "cancelled", after
    assert endpoint.health()[1]["jobs_in_flight"] == 0
    record = JobStore(str(endpoint.root / "state")).get(job)
    assert record["status"] == "cancelled" and record["attempts"] == attempts, record
    assert after["members_done"] == state["members_done"]
    # a finished job cannot be cancelled
    status, small = endpoint.call(
        "POST", "/v1/ensembles", body(str(endpoint.root / "out" / "finished.zarr"))
    )
    assert endpoint.wait(small["id"])["status"] == "done"
    code, answer = endpoint.call("DELETE", f"/v1/ensembles/{small['id']}")
    assert code == 409 and "already done" in answer["error"], answer


def test_a_small_job_is_not_starved_by_a_large_one_running(endpoint):
    endpoint.wait_idle()
    status, large = endpoint.call("POST", "/v1/ensembles", slow(endpoint, "large"))
    assert status == 202, large
    wait_running(endpoint, large["id"], 4)
    small_out = str(endpoint.root / "out" / "small-beside-large.zarr")
    status, small = endpoint.call(
        "POST", "/v1/ensembles", body(small_out, members=20, batch_size=2, chunk_members=2)
    )
    assert status == 202, small
    finished = endpoint.wait(small["id"])
    assert finished["status"] == "done" and finished["members_done"] == 20, finished
    # the large job was queued first and shares the replicas chunk by chunk: it is still going
    state = endpoint.call("GET", f"/v1/ensembles/{large['id']}")[1]
    assert state["status"] == "running" and state["members_done"] < 5000, state
    assert endpoint.call("DELETE", f"/v1/ensembles/{large['id']}")[0] == 200
    endpoint.wait_idle()


def test_a_job_past_its_deadline_fails_saying_how_to_raise_it(endpoint):
    status, accepted = endpoint.call(
        "POST", "/v1/ensembles", slow(endpoint, "deadline", deadline_s=2)
    )
    assert status == 202, accepted
    done = endpoint.wait(accepted["id"])
    assert done["status"] == "failed", done
    assert "deadline of 2 s" in done["error"] and "job_deadline_s" in done["error"], done
    assert done["members_done"] < 5000
    endpoint.wait_idle()


def test_healthz_without_key_does_not_recover_and_every_recovered_job_ends(endpoint):
    from cloudburst.serving.jobs import JobStore

    endpoint.wait_idle()
    replace_ingress(endpoint)  # a fresh ingress has not recovered yet
    jobs = JobStore(str(endpoint.root / "state"))
    request = EnsembleRequest.model_validate(
        body(str((endpoint.root / "out" / "recovered.zarr").resolve()))
    ).model_dump(mode="json", exclude={"storage"})
    now = time.time()
    common = {"model_version": "models:/serve-vae/1", "members": 200, "members_done": 0}
    common.update(created=now, deadline=now + 600, deadline_s=600, deadline_limit=3600)
    fresh = {"id": uuid.uuid4().hex, "status": "queued", "output": request["output"], **common}
    spent = {**fresh, "id": uuid.uuid4().hex, "status": "running", "attempts": 5}
    jobs.create(fresh, request)
    jobs.create(spent, request)
    # anonymous health checks do not drive anything
    for _ in range(3):
        status, health = endpoint.call("GET", "/healthz", key=None)
        assert status == 200 and health["jobs_in_flight"] == 0, health
    assert "attempts" not in jobs.get(fresh["id"])
    # the first authenticated request does; a job out of attempts ends failed, saying why
    assert endpoint.wait(fresh["id"])["status"] == "done"
    gave_up = endpoint.wait(spent["id"])
    assert gave_up["status"] == "failed" and "gave up after 5 attempts" in gave_up["error"]
    endpoint.wait_idle()


def test_the_state_record_stays_small(endpoint):
    before = {p.name for p in (endpoint.root / "state").rglob("*")}
    longest = body(
        str(endpoint.root / "out" / "long-direction.zarr"),
        scenario={"kind": "extreme", "direction": [0.5] * 4096},
    )
    status, answer = endpoint.call("POST", "/v1/ensembles", longest)
    assert status == 400 and "give exactly 4" in answer["error"], answer
    assert {p.name for p in (endpoint.root / "state").rglob("*")} == before
    # an accepted request padded to near the body limit leaves small records only
    request = body(
        str(endpoint.root / "out" / "padded.zarr"),
        scenario={"kind": "extreme", "direction": [0.5, -0.5, 0.25, 1.0]},
    )
    raw = json.dumps(request).encode()
    raw = raw[:-1] + b" " * (MAX_BODY - len(raw) - 100) + b"}"
    status, accepted = endpoint.call("POST", "/v1/ensembles", raw=raw)
    assert status == 202, accepted
    assert endpoint.wait(accepted["id"])["status"] == "done"
    files = state_files(endpoint, accepted["id"])
    assert len(files) >= 3  # record, request, progress
    assert all(p.stat().st_size < 20_000 for p in files), [(p, p.stat().st_size) for p in files]
    assert (endpoint.root / "state" / f"{accepted['id']}.json").stat().st_size < 2_000


def test_request_storage_settings_are_refused(endpoint):
    for storage in (
        {"endpoint_url": "http://169.254.169.254"},
        {"options": {"token": "/root/.config/gcloud/credentials.json"}},
        {"anon": True},
    ):
        request = body("s3://ensembles/steered.zarr", storage=storage)
        status, answer = endpoint.call("POST", "/v1/ensembles", request)
        assert status == 400 and "remove storage from the request" in answer["error"], answer
    # an empty storage section (a client's default) asks for nothing
    request = body("s3://ensembles/default-storage.zarr", members=10, storage={})
    status, accepted = endpoint.call("POST", "/v1/ensembles", request)
    assert status == 202, accepted
    assert endpoint.wait(accepted["id"])["status"] == "done"


def test_symbolic_links_out_of_the_prefixes_are_refused(endpoint, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (endpoint.root / "out").mkdir(exist_ok=True)
    link = endpoint.root / "out" / "escape"
    link.symlink_to(elsewhere, target_is_directory=True)
    for output in (link / "x.zarr", link, link / "new" / "deeper.zarr"):
        status, answer = endpoint.call("POST", "/v1/ensembles", body(str(output)))
        assert status == 403 and "symbolic links" in answer["error"], (output, answer)
        assert str(elsewhere) not in answer["error"]
    assert list(elsewhere.iterdir()) == []
    data_link = endpoint.root / "data" / "escape"
    data_link.symlink_to(elsewhere, target_is_directory=True)
    request = forecast(endpoint)
    request["scenario"]["condition"]["data"] = str(data_link / "obs.zarr")
    status, answer = endpoint.call("POST", "/v1/ensembles", request)
    assert status == 403 and "readable data prefixes" in answer["error"], answer


def test_an_output_inside_an_existing_store_is_refused(endpoint, s3_server):
    import fsspec

    out = endpoint.root / "out"
    (out / "host.zarr").mkdir(parents=True, exist_ok=True)
    (out / "host.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (out / "old.zarr").mkdir(exist_ok=True)
    (out / "old.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    fs = fsspec.filesystem("s3", **s3_server.options)
    fs.pipe_file("ensembles/remote-host.zarr/zarr.json", b'{"zarr_format": 3}')
    for output in (
        out / "host.zarr" / "inner.zarr",
        out / "host.zarr" / "_cloudburst" / "progress" / "x.zarr",
        out / "old.zarr" / "a" / "b.zarr",
        "s3://ensembles/remote-host.zarr/inner.zarr",
    ):
        status, answer = endpoint.call("POST", "/v1/ensembles", body(str(output)))
        assert status == 409 and "inside the existing store" in answer["error"], (output, answer)
    assert not (out / "host.zarr" / "inner.zarr").exists()
    status, answer = endpoint.call("POST", "/v1/ensembles", body(str(out)))
    assert status == 403 and "itself" in answer["error"], answer


def forecast(endpoint, **scenario) -> dict:
    condition = {"data": str(endpoint.root / "data" / "obs.zarr"), "time": "2001-01-03", "y": 2}
    kind = {"kind": "forecast", "context": 2, "condition": condition, **scenario}
    return body(
        str(endpoint.root / "out" / "forecast.zarr"),
        model="models:/serve-diffusion@candidate",
        members=6,
        batch_size=4,
        chunk_members=4,
        scenario=kind,
    )


def test_a_forecast_over_http_keeps_the_observed_frames(endpoint):
    status, accepted = endpoint.call("POST", "/v1/ensembles", forecast(endpoint))
    assert status == 202, accepted
    done = endpoint.wait(accepted["id"])
    assert done["status"] == "done", done
    ens = xr.open_zarr(accepted["output"], consolidated=False)
    obs = xr.open_zarr(endpoint.root / "data" / "obs.zarr", consolidated=False).precip
    observed = obs.isel(time=slice(2, 6), y=slice(2, 10), x=slice(0, 8)).values
    assert ens.precip.shape == (6, 4, 8, 8)
    assert (ens.precip.values[:, :2] == observed[None, :2]).all()
    assert str(ens.time.values[0]).startswith("2001-01-03")
    assert ens.attrs["condition_time"] == "2001-01-03" and ens.attrs["context_steps"] == 2


def test_a_steered_forecast_over_http_is_weighted_and_checks_its_direction(endpoint):
    """Conditional extremes through the endpoint: a forecast whose initial noise is shifted
    along the sampler's own direction keeps the observed frames, carries importance weights
    and records the direction; a direction of the wrong size (the noise of one window is
    4 x 8 x 8 = 256 numbers) is refused before anything is written."""
    short = forecast(endpoint, proposal="shift", direction=[1.0] * 64)
    short["output"] = str(endpoint.root / "out" / "short-steered.zarr")
    status, answer = endpoint.call("POST", "/v1/ensembles", short)
    assert status == 400 and "give exactly 256" in answer["error"], answer
    assert not (endpoint.root / "out" / "short-steered.zarr").exists()
    request = forecast(endpoint, proposal="shift", shift=2.0)
    request["output"] = str(endpoint.root / "out" / "steered-forecast.zarr")
    status, accepted = endpoint.call("POST", "/v1/ensembles", request)
    assert status == 202, accepted
    assert endpoint.wait(accepted["id"])["status"] == "done"
    ens = xr.open_zarr(accepted["output"], consolidated=False)
    obs = xr.open_zarr(endpoint.root / "data" / "obs.zarr", consolidated=False).precip
    observed = obs.isel(time=slice(2, 4), y=slice(2, 10), x=slice(0, 8)).values
    assert (ens.precip.values[:, :2] == observed[None]).all()
    weights = ens.weight.values
    assert np.isfinite(weights).all() and (weights > 0).all() and np.ptp(weights) > 0
    assert ens.attrs["proposal"] == "shift" and "initial noise" in ens.attrs["steered_input"]
    assert ens.direction.shape == (256,)
    assert float(np.linalg.norm(ens.direction.values)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"time": "1999-01-01"}, 400, "no time step at 1999-01-01"),
        ({"y": 10}, 400, "runs past"),
        ({"data": "/etc/obs.zarr"}, 403, "readable data prefixes"),
        ({"kind": "extreme"}, 422, "scenario.condition applies to"),
    ],
)
def test_bad_conditions_get_4xx(endpoint, change, code, words):
    request = forecast(endpoint)
    scenario = request["scenario"]
    for key, value in change.items():
        (scenario["condition"] if key in ("time", "y", "data") else scenario)[key] = value
    status, answer = endpoint.call("POST", "/v1/ensembles", request)
    assert status == code, answer
    assert words in answer["error"]
    assert str(endpoint.root) not in answer["error"]
    wrong_kind = body(
        str(endpoint.root / "out" / "bad.zarr"), scenario={**forecast(endpoint)["scenario"]}
    )
    status, answer = endpoint.call("POST", "/v1/ensembles", wrong_kind)
    assert status == 400 and "forecast is served by diffusion models" in answer["error"], answer


def nested(depth: int) -> bytes:
    return b'{"scenario": ' + b"[" * depth + b"]" * depth + b"}"


BIG = b'{"model": "' + b"x" * (2 * MAX_BODY) + b'"}'
DIRECTION = {"kind": "extreme", "direction": [1.0, 0.0, 0.0, 0.0]}

# one bad input a line: what is sent, the status and words a user can act on
BAD_INPUTS = [
    (
        "unknown model",
        {"model": "models:/nobody@candidate"},
        KEY,
        b"",
        404,
        "not found in the registry",
    ),
    (
        "unknown alias",
        {"model": "models:/serve-vae@nope"},
        KEY,
        b"",
        404,
        "not found in the registry",
    ),
    ("not a registry URI", {"model": "serve-vae"}, KEY, b"", 404, "registry URI"),
    ("negative members", {"members": -1}, KEY, b"", 422, "members"),
    ("no members", {"members": 0}, KEY, b"", 422, "members"),
    ("members past the schema", {"members": 10**9}, KEY, b"", 422, "members"),
    ("members past the server", {"members": 6000}, KEY, b"", 400, "exceeds this server's 5000"),
    ("members not a number", {"members": "many"}, KEY, b"", 422, "members"),
    ("huge batch", {"batch_size": 100_000}, KEY, b"", 422, "batch_size"),
    (
        "too many steps",
        {"model": "models:/serve-diffusion@candidate", "steps": 500},
        KEY,
        b"",
        400,
        "max_steps 50",
    ),
    (
        "too many candidates",
        {"scenario": {"threshold": 5.0, "max_candidates_per_member": 1000}},
        KEY,
        b"",
        400,
        "max_candidates_per_member",
    ),
    (
        "too many draws",
        {"members": 5000, "scenario": {"threshold": 5.0, "max_candidates_per_member": 100}},
        KEY,
        b"",
        400,
        "max_draws 200000",
    ),
    ("deadline past the server's", {"deadline_s": 10**6}, KEY, b"", 400, "job_deadline_s 3600"),
    ("output outside", {"output": "/etc/cloudburst.zarr"}, KEY, b"", 403, "allowed prefixes"),
    ("other bucket", {"output": "s3://elsewhere/x.zarr"}, KEY, b"", 403, "allowed prefixes"),
    ("local ..", {"output": "OUT/../../escape.zarr"}, KEY, b"", 403, "allowed prefixes"),
    (
        "s3 key above its bucket",
        {"output": "s3://ensembles/../elsewhere/x.zarr"},
        KEY,
        b"",
        403,
        "climbs above its bucket",
    ),
    (
        "s3 key .. out of the prefix",
        {"output": "s3://ensembles/a/../../offline/x.zarr"},
        KEY,
        b"",
        403,
        "climbs above its bucket",
    ),
    (
        "output is the prefix",
        {"output": "s3://ensembles//"},
        KEY,
        b"",
        403,
        "prefix s3://ensembles/ itself",
    ),
    ("NUL byte", {"output": "OUT/a\x00b.zarr"}, KEY, b"", 422, "NUL byte"),
    ("long URL", {"output": "OUT/" + "a/" * 600 + "x.zarr"}, KEY, b"", 422, "at most 1024"),
    ("long name", {"output": "OUT/" + "n" * 300 + ".zarr"}, KEY, b"", 422, "at most 255"),
    (
        "storage in the request",
        {"storage": {"endpoint_url": "http://10.0.0.1:9000"}},
        KEY,
        b"",
        400,
        "remove storage",
    ),
    (
        "storage unreachable",
        {"output": "s3://offline/x.zarr"},
        KEY,
        b"",
        503,
        "storage for s3://offline/ unavailable",
    ),
    (
        "NaN direction",
        {"scenario": {"kind": "extreme", "direction": [float("nan")] * 4}},
        KEY,
        b"",
        422,
        "non-finite number NaN",
    ),
    (
        "infinite threshold",
        {"scenario": {"threshold": float("inf")}},
        KEY,
        b"",
        422,
        "non-finite number Infinity",
    ),
    (
        "overflowing shift",
        {},
        KEY,
        b'{"scenario": {"kind": "extreme", "shift": 1e999}}',
        422,
        "non-finite number 1e999",
    ),
    (
        "zero direction",
        {"scenario": {**DIRECTION, "direction": [0.0] * 4}},
        KEY,
        b"",
        422,
        "normalises to zero",
    ),
    (
        "vanishing direction",
        {"scenario": {**DIRECTION, "direction": [1e-200] * 4}},
        KEY,
        b"",
        422,
        "normalises to zero",
    ),
    (
        "short direction",
        {"scenario": {**DIRECTION, "direction": [1.0, 0.0]}},
        KEY,
        b"",
        400,
        "give exactly 4",
    ),
    (
        "long direction",
        {"scenario": {**DIRECTION, "direction": [1.0] * 5000}},
        KEY,
        b"",
        400,
        "give exactly 4",
    ),
    (
        "direction off its scenario",
        {"scenario": {"direction": [1.0, 0, 0, 0]}},
        KEY,
        b"",
        422,
        "applies to the shift proposal",
    ),
    ("unknown field", {"unknown": 1}, KEY, b"", 422, "unknown"),
    ("not JSON", {}, KEY, b"{not json", 400, "not valid JSON"),
    ("not an object", {}, KEY, b"[1, 2]", 400, "JSON object"),
    ("deep nesting", {}, KEY, nested(10_000), 400, "levels deep"),
    ("big body", {}, KEY, BIG, 413, "max_body_bytes"),
    ("big chunked body", {}, KEY, [b" " * 8192] * 20, 413, "max_body_bytes"),
    ("no key", {}, None, b"", 401, "missing API key"),
    ("wrong key", {}, "wrong", b"", 401, "wrong API key"),
]


@pytest.mark.parametrize(
    ("change", "key", "raw", "code", "words"),
    [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(endpoint, change, key, raw, code, words):
    out = str(endpoint.root / "out" / "bad.zarr")
    request = {**body(out), **change}
    if isinstance(request["output"], str) and request["output"].startswith("OUT/"):
        request["output"] = str(endpoint.root / "out") + request["output"][3:]
    status, answer = endpoint.call("POST", "/v1/ensembles", request, key=key, raw=raw)
    assert status == code, answer
    assert words in answer["error"]
    assert str(endpoint.root) not in answer["error"].replace(request["output"], "")
    assert "127.0.0.1" not in answer["error"]
    assert endpoint.call("GET", "/healthz")[0] == 200
    assert endpoint.call("GET", "/v1/ensembles/doesnotexist")[0] == 404
