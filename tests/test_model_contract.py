"""The model contract: every registered family honours the roles it declares and refuses the
others by name; and a family defined here, in this file alone, registered through the public
registry and nothing else, trains through jobs/train.py, registers, is evaluated by
jobs/evaluate.py and makes ensembles through jobs/ensemble.py and through the endpoint.

The toy family (a per-pixel Gaussian) is also importable by other processes: jobs started
here get ``CLOUDBURST_MODEL_FAMILIES=test_model_contract`` and this folder on their path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import Field
from torch import nn

from cloudburst.data.transforms import Scale
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.models.registry import ModelFamily
from cloudburst.models.roles import (
    ROLES,
    Condition,
    ConditionalSampler,
    DiscreteCoder,
    Generative,
    LatentModel,
    Reconstructor,
    RoleError,
    Trainable,
    TransformedInput,
    Translator,
)
from cloudburst.schema import Strict

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------- the toy family


class ToyConfig(Strict):
    """A per-pixel Gaussian over the window: each pixel has its own mean and spread."""

    kind: Literal["toy"] = "toy"
    init_sigma: float = Field(0.3, gt=0)


class PixelGaussian(nn.Module):
    def __init__(self, cfg: ToyConfig, window: tuple[int, int, int]) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.full((1, 1, *window), 0.5))
        self.log_sigma = nn.Parameter(torch.full((1, 1, *window), float(np.log(cfg.init_sigma))))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        x, mask = batch["x"], batch["mask"].to(batch["x"].dtype)
        z = (x - self.mean) / self.log_sigma.exp()
        nll = ((0.5 * z**2 + self.log_sigma) * mask).sum() / mask.sum().clamp_min(1.0)
        return nll, {"loss": float(nll.detach()), "nll": float(nll.detach())}

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn((n, *self.mean.shape[1:]), generator=generator)
        eps = eps.to(self.mean.device)
        return (self.mean + self.log_sigma.exp() * eps).clamp(0.0, 1.0)


TOY = ModelFamily(
    name="toy",
    config=ToyConfig,
    build=PixelGaussian,
    roles=frozenset({Trainable, Generative}),
    learning_rate=lambda _cfg: 0.05,
    tags=lambda cfg: {"init_sigma": cfg.init_sigma},
)
if "toy" not in registry.names(plugins=False):
    registry.register(TOY)


# ------------------------------------------------------------------- the contract itself

WINDOWS = [(4, 8, 8), (2, 12, 12)]


def small(name: str) -> object:
    entry = registry.family(name)
    return entry.config.model_validate({"kind": name, **entry.small})


def batch_of(window: tuple[int, int, int], n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wet = torch.rand((n, 1, *window), generator=g) < 0.4
    x = torch.rand((n, 1, *window), generator=g) * wet
    return {"x": x, "mask": torch.ones_like(x, dtype=torch.bool)}


@pytest.mark.parametrize("name", registry.names())
@pytest.mark.parametrize("window", WINDOWS)
def test_a_training_step_lowers_the_loss(name, window):
    torch.manual_seed(0)
    net = registry.build(name, small(name), window)
    trainable = registry.require(net, name, Trainable)
    batch = batch_of(window)

    def loss() -> float:
        torch.manual_seed(1)  # the same noise draws (diffusion times, VAE codes) each time
        return float(trainable.loss(batch)[0].detach())

    before = loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(5):
        torch.manual_seed(1)
        value, logs = trainable.loss(batch)
        assert value.ndim == 0 and "loss" in logs
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert loss() < before


@pytest.mark.parametrize("name", registry.names())
def test_packaged_models_sample_in_physical_units_and_survive_save_and_load(name, tmp_path):
    """A family that samples does so in physical units; one that does not (no Generative
    role) refuses by name and reconstructs physical windows instead; both survive a round
    trip to disk unchanged."""
    window = WINDOWS[0]
    torch.manual_seed(0)
    cfg = small(name)
    net = registry.build(name, cfg, window)
    stats = {"units": "mm/h", "max": 40.0}
    packaged = PrecipitationModel(net, name, cfg, window, Scale(0.0, 40.0, "unit"), stats)
    if packaged.plays(Generative):

        def made(model: PrecipitationModel) -> np.ndarray:
            return model.sample(3, seed=5)

    else:
        assert packaged.plays(Reconstructor), f"{name} neither samples nor reconstructs"
        with pytest.raises(RoleError, match="Generative"):
            packaged.sample(3, seed=5)
        windows = batch_of(window, n=3, seed=5)["x"][:, 0].numpy() * 40.0

        def made(model: PrecipitationModel) -> np.ndarray:
            return model.reconstruct(windows)

    out = made(packaged)
    assert out.shape == (3, *window) and out.dtype == np.float32
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 40.0 + 1e-3).all()
    again = PrecipitationModel.load(packaged.save(tmp_path / "m"))
    assert again.name == name and again.window == window
    assert np.array_equal(made(again), out)
    assert packaged.tags()["model"] == name


# what a conditional scenario needs to be a valid request (never read: refused before)
CONDITIONS = {
    kind: {"condition": {"data": "/tmp/never-read.zarr", "time": "2000-01-01T00:00"}}
    for kind in ("interpolation", "forecast")
} | {"extension": {"length": 8}}


@pytest.mark.parametrize("name", registry.names())
def test_scenarios_a_family_does_not_serve_are_refused_naming_what_serves_them(name):
    from cloudburst.ensembles.checks import EnsembleError, check_kind
    from cloudburst.ensembles.request import EnsembleRequest

    entry = registry.family(name)
    if not entry.scenarios:
        assert not entry.plays(Generative), f"{name} samples but serves no scenario"
    for scenario in registry.SCENARIOS:
        if scenario in entry.scenarios:
            continue
        request = EnsembleRequest.model_validate(
            {
                "model": f"models:/{name}-model/1",
                "members": 4,
                "output": "/tmp/never-written.zarr",
                "scenario": {"kind": scenario, **CONDITIONS.get(scenario, {})},
            }
        )
        others = [f.name for f in registry.families() if scenario in f.scenarios]
        with pytest.raises(EnsembleError, match=f"is a {name} model") as refused:
            check_kind(request, name, f"models:/{name}-model/1")
        message = str(refused.value)
        assert all(k in message for k in entry.scenarios), message
        if others:
            assert f"{scenario} is served by" in message and others[0] in message, message


@pytest.mark.parametrize("name", registry.names())
def test_declared_roles_are_honoured_and_the_others_refused_by_name(name):
    window = WINDOWS[0]
    torch.manual_seed(0)
    entry = registry.family(name)
    net = registry.build(name, small(name), window).eval()
    x = batch_of(window, n=2)["x"]
    for role in ROLES:
        if role not in entry.roles:
            with pytest.raises(RoleError, match=role.__name__):
                registry.require(net, name, role)
            continue
        assert isinstance(registry.require(net, name, role), role)
    with torch.no_grad():
        if entry.plays(Generative):
            assert net.sample(2, torch.Generator().manual_seed(0)).shape == (2, 1, *window)
        if entry.plays(LatentModel):
            mu, logvar = net.encode(x)
            assert mu.shape == logvar.shape == (2, net.latent_size)
            assert net.decode(mu).shape == x.shape
        if entry.plays(Reconstructor):
            assert net.reconstruct(x).shape == x.shape
        if entry.plays(TransformedInput):
            assert net.to_model_space(x).shape == x.shape
        if entry.plays(Translator):
            assert net.translate(x).shape == x.shape
        if entry.plays(DiscreteCoder):
            codes = net.encode_codes(x)
            assert codes.dtype == torch.int64 and codes.shape[:2] == (2, window[0])
            assert 0 <= int(codes.min()) and int(codes.max()) < net.codebook_size
            assert net.decode_codes(codes).shape == x.shape
    if entry.plays(ConditionalSampler):
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, :, :2] = True
        out = net.sample(2, torch.Generator().manual_seed(0), condition=Condition(x, mask, 1.0))
        assert torch.allclose(out[mask], x[mask], atol=1e-5)


def test_a_family_must_declare_what_its_scenarios_need():
    with pytest.raises(ValueError, match="LatentModel"):
        ModelFamily(
            name="toy",
            config=ToyConfig,
            build=PixelGaussian,
            roles=frozenset({Trainable, Generative}),
            scenarios=frozenset({"unconditional", "extreme"}),
        )
    with pytest.raises(ValueError, match='kind: Literal\\["other"\\]'):
        ModelFamily(
            name="other", config=ToyConfig, build=PixelGaussian, roles=frozenset({Trainable})
        )
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ModelFamily(**{**TOY.__dict__}))


def test_the_job_config_takes_the_new_family_and_names_bad_fields():
    from cloudburst.config import ConfigError, TrainJobConfig, validate

    cfg = validate(TrainJobConfig, {"model": {"kind": "toy", "init_sigma": 0.1}})
    assert isinstance(cfg.model, ToyConfig) and cfg.learning_rate() == 0.05
    with pytest.raises(ConfigError, match="model.init_sigma"):
        validate(TrainJobConfig, {"model": {"kind": "toy", "init_sigma": -1}})
    with pytest.raises(ConfigError, match="model.latent: .*unknown field"):
        validate(TrainJobConfig, {"model": {"kind": "toy", "latent": 4}})


# -------------------------------------------------- the toy family through jobs and endpoint


def toy_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), env.get("PYTHONPATH", "")) if p)
    return {
        **env,
        "PYTHONPATH": path,
        "CLOUDBURST_MODEL_FAMILIES": "test_model_contract",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def run_job(script: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        cwd=ROOT,
        env=toy_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.integration
def test_a_family_defined_in_a_test_file_trains_evaluates_and_makes_ensembles(tmp_path):
    import xarray as xr
    from mlflow.tracking import MlflowClient

    from cloudburst.data.synthetic import SyntheticConfig, write_synthetic

    store = str(tmp_path / "obs.zarr")
    write_synthetic(SyntheticConfig(nt=120, ny=12, nx=12), store, progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    config = tmp_path / "toy.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"kind": "toy", "init_sigma": 0.2},
                "data": {"store": store, "windows": {"length": 4, "size": 8, "stride": 4}},
                "train": {"epochs": 1, "max_steps_per_epoch": 5, "max_val_batches": 2},
                "run": {
                    "name": "toy",
                    "storage_path": str(tmp_path / "ray"),
                    "tracking_uri": uri,
                    "registered_model": "toy-pixels",
                    "system_metrics_interval": None,
                },
            }
        )
    )
    trained = run_job("train.py", "--config", str(config))
    assert "model: models:/toy-pixels/1" in trained.stdout
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("toy-pixels", "1")
    assert version.tags["model"] == "toy" and version.tags["init_sigma"] == "0.2"
    run = client.get_run(version.run_id).data
    assert {"train_nll", "val_nll", "eval_q0.99_sample"} <= set(run.metrics)
    assert run.params["model.kind"] == "toy"

    evaluated = run_job(
        "evaluate.py",
        "--model",
        "models:/toy-pixels@candidate",
        "--data",
        store,
        "--split",
        "train",
        "--limit",
        "40",
        "--samples",
        "40",
        "--out",
        str(tmp_path / "evaluation"),
        "--tracking-uri",
        uri,
    )
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert "toy-pixels" in json.dumps(metrics), evaluated.stdout[-2000:]

    output = tmp_path / "toy-ensemble.zarr"
    run_job(
        "ensemble.py",
        "--model",
        "models:/toy-pixels@candidate",
        "--members",
        "24",
        "--seed",
        "3",
        "--batch-size",
        "8",
        "--chunk-members",
        "8",
        "--output",
        str(output),
        "--tracking-uri",
        uri,
    )
    ds = xr.open_zarr(output, consolidated=False)
    values = ds.precip.values
    assert values.shape == (24, 4, 8, 8) and np.isfinite(values).all() and (values >= 0).all()
    assert ds.attrs["model_kind"] == "toy"
    # member 13 regenerates alone, byte for byte, in this process (the family is registered)
    from cloudburst.ensembles.generate import regenerate
    from cloudburst.ensembles.request import EnsembleRequest

    request = EnsembleRequest(
        model="models:/toy-pixels@candidate",
        members=24,
        seed=3,
        batch_size=8,
        chunk_members=8,
        output=str(output),
    )
    again, _ = regenerate(request, [13], tracking_uri=uri)
    assert again[0].tobytes() == values[13].tobytes()
    # a scenario the family does not serve is refused with what it serves
    refused = subprocess.run(
        [sys.executable, "jobs/ensemble.py", "--model", "models:/toy-pixels/1"]
        + ["--members", "4", "--output", str(tmp_path / "no.zarr"), "--tracking-uri", uri]
        + ["--scenario", "extreme"],
        cwd=ROOT,
        env=toy_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "its scenarios are unconditional" in refused.stderr
    assert not (tmp_path / "no.zarr").exists()

    endpoint_makes_an_ensemble(tmp_path, uri)


def endpoint_makes_an_ensemble(tmp_path: Path, uri: str) -> None:
    """The endpoint (Ray Serve on loopback) serves the toy model registered above."""
    import ray
    import servers
    from ray import serve

    from cloudburst.serving.app import build

    env = toy_env()
    keys = ("PYTHONPATH", "CLOUDBURST_MODEL_FAMILIES", *servers.RAY_ENV)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {k: env[k] for k in keys if k in env}},
    )
    try:
        port = servers.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {
            "tracking_uri": uri,
            "state_url": str(tmp_path / "state"),
            "allowed_prefixes": [str(tmp_path / "out")],
            "max_members": 1000,
            "min_replicas": 1,
            "max_replicas": 1,
        }
        serve.run(build(settings), name="toy", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        body = {
            "model": "models:/toy-pixels@candidate",
            "members": 16,
            "seed": 3,
            "batch_size": 8,
            "chunk_members": 8,
            "output": str(tmp_path / "out" / "api.zarr"),
        }
        req = urllib.request.Request(
            f"{base}/v1/ensembles",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    assert resp.status == 202
                    job = json.loads(resp.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        deadline = time.monotonic() + 180
        status: dict = {}
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{base}/v1/ensembles/{job['id']}", timeout=30) as r:
                status = json.loads(r.read())
            if status["status"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert status.get("status") == "done", status
        import xarray as xr

        served = xr.open_zarr(tmp_path / "out" / "api.zarr", consolidated=False).precip.values
        made = xr.open_zarr(tmp_path / "toy-ensemble.zarr", consolidated=False).precip.values
        # the same request (model, seed, batches) gives the same members through either path
        assert served.shape == (16, 4, 8, 8)
        assert served.tobytes() == made[:16].tobytes()
    finally:
        serve.shutdown()
        ray.shutdown()
