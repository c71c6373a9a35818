"""The guidance sweep: its scores, the engine's use of a version's swept weight, and a real
sweep of a tiny registered diffusion model through jobs/sweep.py --guidance (Ray Tune trials,
MLflow parent run, tags on the version)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from mlflow.tracking import MlflowClient
from servers import JOB_ENV

from cloudburst import tracking
from cloudburst.config import DiffusionConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.synthetic import SyntheticConfig, write_synthetic
from cloudburst.data.transforms import Scale
from cloudburst.ensembles.condition import tuned_weight
from cloudburst.ensembles.generate import ResolvedModel, generate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel
from cloudburst.tuning.guidance import GuidanceSweep, fair_crps, seam_jump

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (4, 8, 8)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("guid") / "obs.zarr")
    write_synthetic(SyntheticConfig(nt=120, ny=12, nx=12, seed=3), path, progress=False)
    return path


def tiny_diffusion(store: str) -> PrecipitationModel:
    _, stats = open_store(store)
    torch.manual_seed(0)
    cfg = DiffusionConfig(widths=(4, 8), embedding=8, transform="sqrt", steps=3)
    net = registry.build("diffusion", cfg, WINDOW)
    return PrecipitationModel(net, "diffusion", cfg, WINDOW, Scale(0.0, stats.max, "unit"), stats)


# ---------------------------------------------------------------------------------- scores


def test_fair_crps_and_seam_jump_by_hand():
    members = np.array([[0.0, 2.0], [2.0, 2.0]])  # 2 members, 2 pixels
    truth = np.array([1.0, 2.0])
    # pixel 0: E|X-y| = 1, E|X-X'| over m(m-1) = (2+2)/2 = 2 -> 1 - 1 = 0; pixel 1: 0
    assert fair_crps(members, truth) == pytest.approx(0.0)
    assert fair_crps(np.array([[3.0], [3.0]]), np.array([1.0])) == pytest.approx(2.0)
    x = np.zeros((3, 2, 2))
    x[1] = 1.0
    x[2] = 4.0
    known = np.array([True, True, False])
    assert seam_jump(x, known) == pytest.approx(3.0)  # only the step 1 -> 2 is a seam


def test_tuned_weight_reads_only_sane_tags():
    assert tuned_weight({"guidance_forecast": "3"}, "forecast") == 3.0
    assert tuned_weight({"guidance_forecast": "3"}, "extension") == 3.0
    assert tuned_weight({"guidance_extension": "5", "guidance_forecast": "3"}, "extension") == 5
    assert tuned_weight({"guidance_forecast": "3"}, "interpolation") is None
    for bad in ("nan", "-1", "inf", "lots"):
        assert tuned_weight({"guidance_forecast": bad}, "forecast") is None


def test_guidance_sweep_settings_are_checked():
    with pytest.raises(ValueError, match="finite number"):
        GuidanceSweep(model="models:/m/1", weights=[1.0, math.inf])
    with pytest.raises(ValueError, match="finite and >= 0"):
        GuidanceSweep(model="models:/m/1", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="kinds must be among"):
        GuidanceSweep(model="models:/m/1", kinds=["extreme"])
    with pytest.raises(ValueError, match="members must be in"):
        GuidanceSweep(model="models:/m/1", members=1)


# ------------------------------------------------------------------------ the engine's weight


def forecast(store: str, output: str, guidance: float | None = None) -> EnsembleRequest:
    scenario = {
        "kind": "forecast",
        "condition": {"data": store, "time": "2001-01-03T00:00", "y": 2, "x": 3},
    }
    if guidance is not None:
        scenario["guidance"] = guidance
    return EnsembleRequest.model_validate(
        {"model": "models:/d/1", "members": 2, "seed": 1, "output": output, "scenario": scenario}
    )


def test_engine_takes_the_swept_weight_unless_the_request_gives_one(store, tmp_path):
    packaged = tiny_diffusion(store)
    tagged = ResolvedModel(packaged, "models:/d/1", "models:/d/1", None, {"guidance_forecast": "7"})
    plain = ResolvedModel(packaged, "models:/d/1", "models:/d/1", None, {})
    generate(forecast(store, str(tmp_path / "a.zarr")), model=tagged)
    generate(forecast(store, str(tmp_path / "b.zarr"), guidance=2.0), model=tagged)
    generate(forecast(store, str(tmp_path / "c.zarr")), model=plain)
    attrs = {k: xr.open_zarr(tmp_path / f"{k}.zarr", consolidated=False).attrs for k in "abc"}
    assert attrs["a"]["guidance"] == 7.0
    assert attrs["a"]["guidance_source"] == "the version's guidance sweep"
    assert attrs["b"]["guidance"] == 2.0 and attrs["b"]["guidance_source"] == "the request"
    assert attrs["c"]["guidance"] == DiffusionConfig().guidance
    assert attrs["c"]["guidance_source"] == "the model's default"


# ----------------------------------------------------------------------- a real sweep


@pytest.mark.integration
def test_guidance_sweep_tags_the_version_and_the_engine_uses_it(store, tmp_path, mlflow_state):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.log_and_register(
        tiny_diffusion(store), name="tiny-d", tags={"dataset": store}, tracking_uri=uri
    )
    env = {**os.environ, **JOB_ENV}
    env.pop("RAY_ADDRESS", None)
    args = [
        sys.executable, "jobs/sweep.py", "--guidance", "--model", "models:/tiny-d@candidate",
        "--tracking-uri", uri, "--weights", "0", "1000", "--kinds", "forecast",
        "interpolation", "--windows", "1", "--members", "2", "--steps", "2",
        "--storage-path", str(tmp_path / "ray"),
    ]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("tiny-d", "1")
    parent = [line for line in done.stdout.splitlines() if line.startswith("run: ")][-1].split()[1]
    assert mv.tags["guidance_sweep_run"] == parent
    table = Path(client.download_artifacts(parent, "results.csv", str(tmp_path))).read_text()
    rows = [line.split(",") for line in table.splitlines()[1:]]
    header = table.splitlines()[0].split(",")
    assert len(rows) == 4  # 2 scenarios x 2 weights
    for kind in ("forecast", "interpolation"):
        mine = [dict(zip(header, r, strict=True)) for r in rows if r[0] == kind]
        best = min(mine, key=lambda r: float(r["crps"]))
        assert float(mv.tags[f"guidance_{kind}"]) == float(best["weight"])
        assert all(math.isfinite(float(r["baseline"])) for r in mine)
    # the engine now takes the swept weight for a request that gives none
    from cloudburst.ensembles.generate import resolve

    out = str(tmp_path / "after.zarr")
    generate(forecast(store, out), model=resolve("models:/tiny-d@candidate", uri))
    attrs = xr.open_zarr(out, consolidated=False).attrs
    assert attrs["guidance"] == float(mv.tags["guidance_forecast"])
    assert attrs["guidance_source"] == "the version's guidance sweep"
