"""Translation and codes requests on a real Ray Serve on loopback, with a real MLflow registry
(SQLite) and local stores: the endpoint writes the same arrays as the products called
directly, and refuses what it cannot serve before answering 202."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import servers
import xarray as xr
from test_translate import pair_source

from cloudburst import tracking
from cloudburst.data.ingest import ingest, variable_stats

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
]

KEY = "translate-key"
TERMINAL = ("done", "failed", "cancelled")


def vqvae(store: str, *, paired: bool):
    """A tiny untrained VQ-VAE on ``nir``, translating to ``vis`` when ``paired``."""
    import torch

    from cloudburst.data.transforms import for_data
    from cloudburst.models import registry
    from cloudburst.models.package import PrecipitationModel, TargetField
    from cloudburst.models.vqvae import VQVAEConfig

    torch.manual_seed(1)
    stats = variable_stats(store)
    cfg = VQVAEConfig(codebook_size=16, code_dim=4, widths=(4, 8), downsample=2, residual_blocks=0)
    window = (1, 8, 8)
    net = registry.build("vqvae", cfg, window)
    target = None
    if paired:
        target = TargetField("vis", for_data(stats["vis"]), stats["vis"].to_dict())
    return PrecipitationModel(
        net,
        "vqvae",
        cfg,
        window,
        for_data(stats["nir"]),
        stats["nir"].to_dict(),
        input_variable="nir" if paired else None,
        target=target,
    )


def tiny_vae():
    import torch

    from cloudburst.config import VAEConfig
    from cloudburst.data.transforms import Scale
    from cloudburst.models import registry
    from cloudburst.models.package import PrecipitationModel

    torch.manual_seed(0)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, (4, 8, 8))
    return PrecipitationModel(net, "vae", cfg, (4, 8, 8), Scale(0.0, 60.0, "unit"), {"max": 60.0})


class Endpoint:
    def __init__(self, url: str, root: Path, tracking_uri: str) -> None:
        self.url, self.root, self.tracking_uri = url, root, tracking_uri
        self.store = str(root / "data" / "pair.zarr")

    def call(self, method: str, path: str, body: object = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("X-API-Key", KEY)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def request(self, name: str, **kw) -> dict:
        return {
            "model": "models:/tr-vq@candidate",
            "input": self.store,
            "output": str(self.root / "out" / name),
            **kw,
        }

    def submit(self, body: dict) -> dict:
        status, answer = self.call("POST", "/v1/translations", body)
        assert status == 202, answer
        return answer

    def wait(self, job_id: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        answer: dict = {}
        while time.monotonic() < deadline:
            status, answer = self.call("GET", f"/v1/translations/{job_id}")
            if status == 200 and answer["status"] in TERMINAL:
                return answer
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not finished in {timeout} s: {answer}")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    import ray
    from ray import serve

    from cloudburst.serving.app import build

    root = tmp_path_factory.mktemp("serve-translate")
    store = str(root / "data" / "pair.zarr")
    ingest(
        pair_source(root / "pair.nc"),
        store,
        variables=["nir", "vis"],
        grid="vis",
        units="1",
        missing_values={"nir": 0},
        progress=False,
    )
    tracking_uri = f"sqlite:///{root}/mlflow/mlflow.db"
    tracking.setup(tracking_uri, experiment="serving-translate")
    for name, model in (
        ("tr-vq", vqvae(store, paired=True)),
        ("codes-vq", vqvae(store, paired=False)),
        ("tr-vae", tiny_vae()),
    ):
        tracking.log_and_register(model, name=name, tracking_uri=tracking_uri)
    env = {**servers.TEST_ENV, **servers.RAY_ENV, "MLFLOW_DISABLE_TELEMETRY": "true"}
    os.environ.update(servers.RAY_ENV)
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    port = servers.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "tracking_uri": tracking_uri,
        "state_url": str(root / "state"),
        "allowed_prefixes": [str(root / "out")],
        "data_prefixes": [str(root / "data")],
        "api_key": KEY,
        "job_deadline_s": 600,
        "min_replicas": 1,
        "max_replicas": 1,
    }
    serve.run(build(settings), name="translations", route_prefix="/", blocking=False)
    ep = Endpoint(f"http://127.0.0.1:{port}", root, tracking_uri)
    deadline = time.monotonic() + 90
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


def test_a_translation_writes_what_translate_store_writes(endpoint):
    from cloudburst.products.translate import translate_store

    answer = endpoint.submit(endpoint.request("vis.zarr"))
    assert answer["kind"] == "translate" and answer["model"] == "models:/tr-vq/1"
    job = endpoint.wait(answer["id"])
    assert job["status"] == "done", job
    assert job["summary"]["variable"] == "vis" and job["summary"]["shape"] == [20, 22, 22]
    assert job["kind"] == "translate" and job["output"].endswith("vis.zarr")

    direct = str(endpoint.root / "direct-vis.zarr")
    model = tracking.load_model("models:/tr-vq/1", tracking_uri=endpoint.tracking_uri)
    translate_store(model, endpoint.store, direct, model_uri="models:/tr-vq/1", progress=False)
    served = xr.open_zarr(str(endpoint.root / "out" / "vis.zarr"), consolidated=False)
    made = xr.open_zarr(direct, consolidated=False)
    np.testing.assert_array_equal(served["vis"].values, made["vis"].values)
    np.testing.assert_array_equal(served["time"].values, made["time"].values)
    assert served.attrs["cloudburst_fingerprint"] == made.attrs["cloudburst_fingerprint"]

    # the same request again keeps the store; a job of the ensembles' routes it is not
    again = endpoint.wait(endpoint.submit(endpoint.request("vis.zarr"))["id"])
    assert again["status"] == "done" and again["summary"] == job["summary"], again
    assert endpoint.call("GET", f"/v1/ensembles/{answer['id']}")[0] == 404
    status, body = endpoint.call("DELETE", f"/v1/translations/{answer['id']}")
    assert status == 409 and "already done" in body["error"], body

    # another request on the complete store fails, naming no server path
    other = endpoint.wait(endpoint.submit(endpoint.request("vis.zarr", variable="vis"))["id"])
    assert other["status"] == "failed" and "another complete store" in other["error"], other
    assert str(endpoint.root) not in other["error"]


def test_a_codes_request_writes_the_codes(endpoint):
    from cloudburst.products.codes import encode_store

    answer = endpoint.submit(
        endpoint.request("codes.zarr", model="models:/codes-vq/1", kind="codes", variable="nir")
    )
    job = endpoint.wait(answer["id"])
    assert job["status"] == "done", job
    summary = job["summary"]
    assert summary["kind"] == "codes" and summary["ratio"] > 1 and summary["codes"] > 0, summary
    model = tracking.load_model("models:/codes-vq/1", tracking_uri=endpoint.tracking_uri)
    direct = str(endpoint.root / "direct-codes.zarr")
    encode_store(
        model,
        endpoint.store,
        direct,
        model_uri="models:/codes-vq/1",
        variable="nir",
        progress=False,
    )
    import zarr

    served = zarr.open_group(str(endpoint.root / "out" / "codes.zarr"), mode="r")
    made = zarr.open_group(direct, mode="r")
    np.testing.assert_array_equal(served["codes"][...], made["codes"][...])
    np.testing.assert_array_equal(served["codebook"][...], made["codebook"][...])
    # neither inside that store nor over it as another kind of store
    status, refused = endpoint.call("POST", "/v1/translations", endpoint.request("codes.zarr"))
    assert status == 409 and "holds a complete codes store" in refused["error"], refused
    inside = endpoint.request("codes.zarr/vis.zarr")
    status, refused = endpoint.call("POST", "/v1/translations", inside)
    assert status == 409 and "inside the existing store" in refused["error"], refused


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"model": "models:/codes-vq@candidate"}, 400, "does not translate"),
        ({"model": "models:/tr-vae/1", "kind": "codes"}, 400, "not a discrete coder"),
        ({"model": "models:/missing@candidate"}, 404, "not found"),
        ({"input": "/etc/pair.zarr"}, 403, "readable data prefixes"),
        ({"output": "/etc/vis.zarr"}, 403, "allowed prefixes"),
        ({"output": "OUT/../../escape.zarr"}, 403, "allowed prefixes"),
        ({"output": "INPUT/vis.zarr"}, 403, "allowed prefixes"),
        ({"colour": "blue"}, 422, "colour"),
        ({"kind": "ensemble"}, 422, "kind"),
        ({"storage": {"endpoint_url": "http://10.0.0.1:9000"}}, 400, "remove storage"),
        ({"deadline_s": 10_000}, 400, "job_deadline_s"),
        ({"variable": "ir"}, 400, "not in the store"),
    ],
)
def test_refusals_come_before_the_202(endpoint, change, code, words):
    body = endpoint.request("refused.zarr", **change)
    for key in ("input", "output"):
        body[key] = (
            body[key].replace("OUT", str(endpoint.root / "out")).replace("INPUT", endpoint.store)
        )
    status, answer = endpoint.call("POST", "/v1/translations", body)
    assert status == code and words in answer["error"], answer
    # places are named as the caller wrote them, never by other server paths
    shown = answer["error"].replace(body["input"], "").replace(body["output"], "")
    assert str(endpoint.root) not in shown
    assert not (endpoint.root / "out" / "refused.zarr").exists()


def test_an_empty_storage_section_asks_for_nothing(endpoint):
    job = endpoint.wait(endpoint.submit(endpoint.request("plain.zarr", storage={}))["id"])
    assert job["status"] == "done", job


def replica_job(endpoint, name: str, jobs_class=None, **record):
    """(job store, job id, request) of a translation job run here as a replica runs it."""
    import uuid

    from cloudburst.serving.jobs import JobStore
    from cloudburst.serving.settings import ServeSettings
    from cloudburst.serving.translations import TranslationRequest

    settings = ServeSettings(
        state_url=str(endpoint.root / "state-here"),
        allowed_prefixes=[str(endpoint.root / "out")],
        data_prefixes=[str(endpoint.root / "data")],
    )
    jobs = (jobs_class or JobStore)(settings.state_url)
    job_id = uuid.uuid4().hex
    request = TranslationRequest.model_validate(endpoint.request(name))
    jobs.create({"id": job_id, "status": "running", **record}, request.model_dump(mode="json"))
    return settings, jobs, job_id, request


def test_a_cancelled_translation_stops_between_blocks_and_leaves_nothing(endpoint, monkeypatch):
    from cloudburst.serving import translations
    from cloudburst.serving.jobs import JobStore

    class CancelOnProgress(JobStore):
        def set_progress(self, job_id, done, total=None):
            super().set_progress(job_id, done, total)
            self.cancel(job_id)

    monkeypatch.setattr(translations, "WATCH_EVERY_S", 0.0)
    settings, jobs, job_id, request = replica_job(endpoint, "stopped.zarr", CancelOnProgress)
    model = tracking.load_model("models:/tr-vq/1", tracking_uri=endpoint.tracking_uri)
    answer = translations.run_product(jobs, settings, job_id, request, model, "models:/tr-vq/1")
    assert answer == {"skipped": "cancelled on request"}
    assert jobs.members_done(job_id) == 1  # one block written, then the stop was seen
    assert not (endpoint.root / "out" / "stopped.zarr").exists()


def test_a_drive_after_a_dead_replica_rewrites_what_it_left(endpoint):
    from cloudburst.serving import translations

    left = endpoint.root / "out" / "left.zarr"
    left.mkdir()
    (left / "zarr.json").write_text("{}")  # what a replica that died mid-store left
    settings, jobs, job_id, request = replica_job(endpoint, "left.zarr", began=True)
    model = tracking.load_model("models:/tr-vq/1", tracking_uri=endpoint.tracking_uri)
    answer = translations.run_product(jobs, settings, job_id, request, model, "models:/tr-vq/1")
    assert answer["summary"]["variable"] == "vis", answer
    # a job that did not begin there refuses what it finds
    stray = endpoint.root / "out" / "stray.zarr"
    stray.mkdir()
    (stray / "zarr.json").write_text("{}")
    settings, jobs, job_id, request = replica_job(endpoint, "stray.zarr")
    answer = translations.run_product(jobs, settings, job_id, request, model, "models:/tr-vq/1")
    assert "not a complete translation store" in answer["error"], answer
    assert (stray / "zarr.json").exists()
