"""The ensemble endpoint on a real Ray Serve on loopback, a real MLflow registry (SQLite) and
real S3 / GCS servers: requests over HTTP, results in the stores."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
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


class Endpoint:
    def __init__(self, url: str, root: Path, tracking_uri: str) -> None:
        self.url = url
        self.root = root
        self.tracking_uri = tracking_uri

    def call(
        self, method: str, path: str, body: object = None, key: str | None = KEY, raw: bytes = b""
    ) -> tuple[int, dict]:
        data = raw or (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
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
            if status == 200 and body["status"] in ("done", "failed"):
                return body
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished in {timeout} s: {body}")


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
    settings = {
        "tracking_uri": tracking_uri,
        "state_url": str(root / "state"),
        "allowed_prefixes": [str(root / "out"), "s3://ensembles/", "gs://ensembles/"],
        "data_prefixes": [str(root / "data")],
        "api_key": KEY,
        "max_members": 5000,
        "max_queue": 6,
        "min_replicas": 1,
        "max_replicas": 2,
    }
    serve.run(build(settings), name="ensembles", route_prefix="/", blocking=False)
    ep = Endpoint(f"http://127.0.0.1:{port}", root, tracking_uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if ep.call("GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    yield ep
    serve.shutdown()
    ray.shutdown()


def body(output: str, **kw) -> dict:
    out = {"model": "models:/serve-vae@candidate", "members": 200, "seed": 1, "output": output}
    out.update(batch_size=50, chunk_members=100)
    out.update(kw)
    return out


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
    storage = {"options": options}
    status, accepted = endpoint.call(
        "POST", "/v1/ensembles", body(output, members=1000, storage=storage)
    )
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


def wait_running(endpoint, job_id: str, members: int) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = endpoint.call("GET", f"/v1/ensembles/{job_id}")[1]
        if (state.get("members_done") or 0) >= members:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {members} members: {state}")


def test_killed_replica_still_ends_with_every_member_once_and_the_same_bytes(endpoint):
    output = str(endpoint.root / "out" / "killed.zarr")
    request = body(output, members=4000, chunk_members=100, batch_size=100)
    status, accepted = endpoint.call("POST", "/v1/ensembles", request)
    assert status == 202, accepted
    state = wait_running(endpoint, accepted["id"], 300)
    assert state["status"] == "running" and state["members_done"] < 4000, state
    kill(replica_actors("EnsembleGenerator"))
    done = endpoint.wait(accepted["id"])
    assert done["status"] == "done", done
    assert done["attempts"] >= 2

    clean = str(endpoint.root / "out" / "clean.zarr")
    model = resolve("models:/serve-vae/1", endpoint.tracking_uri)
    generate(EnsembleRequest.model_validate({**request, "output": clean}), model=model)
    a, b = (xr.open_zarr(p, consolidated=False) for p in (output, clean))
    assert (a.candidate.values == np.arange(4000)).all()
    assert a.precip.values.tobytes() == b.precip.values.tobytes()


def test_job_outlives_its_ingress_replica(endpoint):
    output = str(endpoint.root / "out" / "ingress.zarr")
    status, accepted = endpoint.call(
        "POST", "/v1/ensembles", body(output, members=3000, chunk_members=100, batch_size=100)
    )
    assert status == 202, accepted
    wait_running(endpoint, accepted["id"], 200)
    kill(replica_actors("EnsembleAPI"))
    # the replacement ingress reads the job from the state store and drives it to the end
    done = endpoint.wait(accepted["id"], timeout=300)
    assert done["status"] == "done", done
    ds = xr.open_zarr(output, consolidated=False)
    assert (ds.candidate.values == np.arange(3000)).all()
    assert np.isfinite(ds.precip.values).all()


def test_twenty_concurrent_requests_complete_or_get_429(endpoint):
    def submit(i: int) -> tuple[int, dict]:
        out = str(endpoint.root / "out" / f"many-{i}.zarr")
        return endpoint.call("POST", "/v1/ensembles", body(out, members=100, seed=i))

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    codes = [status for status, _ in answers]
    assert set(codes) <= {202, 429}, answers
    assert codes.count(202) >= 1
    for status, accepted in answers:
        if status == 202:
            assert endpoint.wait(accepted["id"])["status"] == "done"
        else:
            assert "retry" in accepted["error"]


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
    wrong_kind = body(
        str(endpoint.root / "out" / "bad.zarr"), scenario={**forecast(endpoint)["scenario"]}
    )
    status, answer = endpoint.call("POST", "/v1/ensembles", wrong_kind)
    assert status == 400 and "forecast is served by diffusion models" in answer["error"], answer


@pytest.mark.parametrize(
    ("change", "key", "raw", "code", "words"),
    [
        ({"model": "models:/nobody@candidate"}, KEY, b"", 404, "not found in the registry"),
        ({"model": "models:/serve-vae@nope"}, KEY, b"", 404, "not found in the registry"),
        ({"model": "serve-vae"}, KEY, b"", 404, "registry URI"),
        ({"members": -1}, KEY, b"", 422, "members"),
        ({"members": 0}, KEY, b"", 422, "members"),
        ({"members": 10**9}, KEY, b"", 422, "members"),
        ({"members": 6000}, KEY, b"", 400, "exceeds this server's 5000"),
        ({"batch_size": 100_000}, KEY, b"", 422, "batch_size"),
        ({"output": "/etc/cloudburst.zarr"}, KEY, b"", 403, "allowed prefixes"),
        ({"output": "s3://elsewhere/x.zarr"}, KEY, b"", 403, "allowed prefixes"),
        ({"output": "OUT/../../escape.zarr"}, KEY, b"", 403, "allowed prefixes"),
        ({"unknown": 1}, KEY, b"", 422, "unknown"),
        ({}, KEY, b"{not json", 400, "not valid JSON"),
        ({}, KEY, b"[1, 2]", 400, "JSON object"),
        ({}, None, b"", 401, "missing API key"),
        ({}, "wrong", b"", 401, "wrong API key"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(endpoint, change, key, raw, code, words):
    out = str(endpoint.root / "out" / "bad.zarr")
    request = {**body(out), **change}
    if isinstance(request["output"], str) and request["output"].startswith("OUT/"):
        request["output"] = str(endpoint.root / "out") + request["output"][3:]
    status, answer = endpoint.call("POST", "/v1/ensembles", request, key=key, raw=raw)
    assert status == code, answer
    assert words in answer["error"]
    assert endpoint.call("GET", "/healthz")[0] == 200
    assert endpoint.call("GET", "/v1/ensembles/doesnotexist")[0] == 404
