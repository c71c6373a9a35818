"""Conditional ensembles of a diffusion model through the engine: interpolation, forecast and
extension conditioned on a window of a real ingested store, written to Zarr with the
condition's times and coordinates, each member regenerating alone byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from pydantic import ValidationError

from cloudburst import tracking
from cloudburst.data.ingest import open_store
from cloudburst.data.synthetic import SyntheticConfig, write_synthetic
from cloudburst.data.transforms import Scale
from cloudburst.ensembles.checks import EnsembleError, check_request
from cloudburst.ensembles.generate import ResolvedModel, generate, regenerate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.models.package import PrecipitationModel

WINDOW = (4, 8, 8)
START = "2001-01-03T00:00"  # the store's third day


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("obs") / "obs.zarr")
    write_synthetic(SyntheticConfig(nt=30, ny=12, nx=12, seed=3), path, progress=False)
    return path


@pytest.fixture(scope="module")
def observed(store) -> np.ndarray:
    """Steps 2-11 (START on), rows 2-9, columns 3-10 of the store, read with zarr itself."""
    return zarr.open_array(store, path="precip", mode="r")[2:12, 2:10, 3:11]


def diffusion(store: str, transform: str = "learnt") -> ResolvedModel:
    from cloudburst.config import DiffusionConfig
    from cloudburst.models import registry

    _, stats = open_store(store)
    torch.manual_seed(0)
    cfg = DiffusionConfig(widths=(8, 16), embedding=16, transform=transform, steps=6)
    net = registry.build("diffusion", cfg, WINDOW)
    packaged = PrecipitationModel(
        net, "diffusion", cfg, WINDOW, Scale(0.0, stats.max, "unit"), stats
    )
    return ResolvedModel(packaged, "models:/d/1", "models:/d/1", None)


@pytest.fixture(scope="module")
def model(store) -> ResolvedModel:
    return diffusion(store)


def ask(store: str, output: str, **scenario) -> EnsembleRequest:
    condition = {"data": store, "time": START, "y": 2, "x": 3}
    body = {"condition": condition, "guidance": 1.0, **scenario}
    if body.get("condition") is None:
        body.pop("condition")
    return EnsembleRequest.model_validate(
        {
            "model": "models:/d/1",
            "members": 5,
            "seed": 4,
            "output": output,
            "batch_size": 2,
            "chunk_members": 3,
            "scenario": body,
        }
    )


def test_a_forecast_keeps_the_observed_context_and_says_where_and_when(
    store, observed, model, tmp_path
):
    request = ask(store, str(tmp_path / "f.zarr"), kind="forecast", context=2)
    result = generate(request, model=model)
    assert result.members == 5 and result.chunks_written == 2
    ens = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    x = ens.precip.values
    assert x.shape == (5, *WINDOW) and np.isfinite(x).all() and (x >= 0).all()
    # the known steps are the observed values exactly; the rest are generated and differ
    assert (x[:, :2] == observed[None, :2]).all()
    assert not np.allclose(x[:, 2:], observed[None, 2:4])
    assert np.ptp(x[:, 2:], axis=0).max() > 0  # members are not copies of one another
    # real times from the condition and the store's own grid coordinates
    ds, _ = open_store(store)
    assert ens.time.values[0] == np.datetime64(START, "ns")
    assert (np.diff(ens.time.values) == np.timedelta64(1, "D")).all()
    assert (ens.y.values == ds.y.values[2:10]).all() and (ens.x.values == ds.x.values[3:11]).all()
    assert ens.attrs["condition_data"] == store and ens.attrs["context_steps"] == 2
    assert ens.attrs["guidance"] == 1.0 and ens.attrs["steps"] == 6
    assert json.loads(ens.attrs["request"])["condition_store_fingerprint"]
    again, w = regenerate(request, [3], model=model)
    assert again[0].tobytes() == x[3].tobytes() and w[0] == 1.0


def test_an_interpolation_keeps_every_other_step(store, observed, model, tmp_path):
    request = ask(store, str(tmp_path / "i.zarr"), kind="interpolation")
    generate(request, model=model)
    ens = xr.open_zarr(tmp_path / "i.zarr", consolidated=False)
    x = ens.precip.values
    assert (x[:, 0::2] == observed[None, 0:4:2]).all()
    assert not np.allclose(x[:, 1::2], observed[None, 1:4:2])
    assert ens.attrs["known_steps"] == [0, 2]


def test_an_extension_reaches_its_length_from_the_observed_start(store, observed, model, tmp_path):
    request = ask(store, str(tmp_path / "e.zarr"), kind="extension", context=1, length=10)
    generate(request, model=model)
    ens = xr.open_zarr(tmp_path / "e.zarr", consolidated=False)
    x = ens.precip.values
    assert x.shape == (5, 10, 8, 8) and np.isfinite(x).all() and (x >= 0).all()
    assert (x[:, 0] == observed[None, 0]).all()
    assert len(ens.time) == 10 and ens.time.values[-1] == np.datetime64("2001-01-12", "ns")
    again, _ = regenerate(request, [4, 0], model=model)
    assert again.tobytes() == x[[4, 0]].tobytes()
    short = ask(store, str(tmp_path / "s.zarr"), kind="extension", context=2, length=3)
    generate(short, model=model)
    x = xr.open_zarr(tmp_path / "s.zarr", consolidated=False).precip.values
    assert x.shape == (5, 3, 8, 8) and (x[:, :2] == observed[None, :2]).all()
    # without a condition the first window is an unconditional draw, times are step indices
    free = ask(store, str(tmp_path / "free.zarr"), kind="extension", length=7, condition=None)
    generate(free, model=model)
    ens = xr.open_zarr(tmp_path / "free.zarr", consolidated=False)
    assert ens.precip.shape == (5, 7, 8, 8) and ens.time.values.tolist() == list(range(7))


def test_a_threshold_keeps_only_members_that_reach_it(store, model, tmp_path):
    request = ask(store, str(tmp_path / "t.zarr"), kind="forecast", threshold=1.0)
    result = generate(request, model=model)
    ens = xr.open_zarr(tmp_path / "t.zarr", consolidated=False)
    assert (ens.precip.values.reshape(5, -1).max(axis=1) >= 1.0).all()
    assert (ens.weight.values == 1.0).all() and 0 < result.acceptance_rate <= 1


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"time": "1999-01-01"}, "no time step at 1999-01-01; it runs from 2001-01-01"),
        ({"time": "2001-01-29"}, "runs past the end"),
        ({"time": "yesterday"}, "not an ISO time"),
        ({"y": 5}, "y must be <= 4"),
        ({"x": 9}, "and x <= 4"),
        ({"data": "/nowhere/obs.zarr"}, "no store at /nowhere/obs.zarr"),
    ],
)
def test_bad_conditions_are_refused_before_anything_is_written(
    store, model, tmp_path, change, words
):
    request = ask(store, str(tmp_path / "bad.zarr"), kind="forecast")
    condition = request.scenario.condition.model_copy(update=change)
    request.scenario.condition = condition
    with pytest.raises(EnsembleError, match=words.replace("(", r"\(")):
        generate(request, model=model)
    tags = tracking.default_tags(model.packaged)
    with pytest.raises(EnsembleError, match=words.replace("(", r"\(")):
        check_request(request, tags, request.model)
    assert not (tmp_path / "bad.zarr").exists()


def test_scenarios_a_model_cannot_serve_are_refused(store, model, tmp_path):
    from test_serving import tiny_model

    vae = ResolvedModel(tiny_model(), "models:/v/1", "models:/v/1", None)
    request = ask(store, str(tmp_path / "x.zarr"), kind="forecast")
    with pytest.raises(EnsembleError, match="forecast is served by diffusion models"):
        generate(request, model=vae)
    with pytest.raises(EnsembleError, match="forecast is served by diffusion models"):
        check_request(request, tracking.default_tags(vae.packaged), request.model)
    steps = EnsembleRequest.model_validate({**request.model_dump(), "scenario": {}, "steps": 5})
    with pytest.raises(EnsembleError, match="apply to models with an iterative sampler"):
        generate(steps, model=vae)
    units = diffusion(store)
    units.packaged.stats["units"] = "mm/h"
    with pytest.raises(EnsembleError, match="in mm/day but the model was trained in mm/h"):
        generate(request, model=units)
    wide = ask(store, str(tmp_path / "x.zarr"), kind="interpolation", every=4)
    with pytest.raises(EnsembleError, match="every = 4"):
        generate(wide, model=model)
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize(
    ("scenario", "words"),
    [
        ({"kind": "forecast"}, "a forecast needs scenario.condition"),
        ({"kind": "interpolation"}, "an interpolation needs scenario.condition"),
        ({"kind": "extension"}, "an extension needs scenario.length"),
        ({"kind": "unconditional", "guidance": 1.0}, "scenario.guidance applies to"),
        (
            {"kind": "interpolation", "context": 2, "condition": {"data": "s", "time": "t"}},
            "scenario.context applies to forecast and extension",
        ),
        ({"kind": "extension", "length": 0}, "length"),
        (
            {"kind": "forecast", "length": 8, "condition": {"data": "s", "time": "t"}},
            "scenario.length applies to extension",
        ),
    ],
)
def test_scenario_fields_are_checked_together(scenario, words):
    with pytest.raises(ValidationError, match=words):
        EnsembleRequest.model_validate(
            {"model": "models:/d/1", "members": 1, "output": "o.zarr", "scenario": scenario}
        )


def test_the_job_takes_the_conditional_scenarios_as_flags(store):
    import importlib.util
    import sys
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    sys.path.insert(0, str(jobs))
    spec = importlib.util.spec_from_file_location("ensemble_job", jobs / "ensemble.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tree, _, _ = module.parse(
        ["--model", "models:/d/1", "--members", "3", "--output", "o.zarr",
         "--scenario", "extension", "--length", "20", "--context", "2", "--guidance", "5",
         "--condition-data", store, "--condition-time", START, "--condition-y", "1",
         "--steps", "10", "--sampler", "ddim", "--proposal", "shift"]
    )  # fmt: skip
    request = EnsembleRequest.model_validate(tree)
    s = request.scenario
    assert (s.kind, s.length, s.context, s.guidance) == ("extension", 20, 2, 5.0)
    assert s.proposal == "shift" and s.steered
    assert s.condition.data == store and s.condition.y == 1 and s.condition.x == 0
    assert (request.steps, request.sampler) == (10, "ddim")


def crps_direct(members: np.ndarray, y: np.ndarray) -> float:
    """E|X - y| - E|X - X'| / 2 over equally weighted members, averaged over pixels."""
    skill = np.abs(members - y[None]).mean(axis=0)
    spread = np.abs(members[:, None] - members[None, :]).mean(axis=(0, 1))
    return float((skill - 0.5 * spread).mean())


def test_a_forecast_store_is_verified_against_the_steps_it_withheld(
    store, observed, model, tmp_path
):
    from cloudburst.evaluation.evaluate import EvaluationRequest, evaluate

    url = str(tmp_path / "f.zarr")
    generate(ask(store, url, kind="forecast", context=2), model=model)
    out = tmp_path / "eval"
    said: list[str] = []
    result = evaluate(
        EvaluationRequest(
            ensembles=[url], data=store, split="train@none", out=str(out), log_to_mlflow=False
        ),
        progress=said.append,
    )
    (entry,) = result.report["models"]
    # the line the job prints says the skill against persistence, with the weight used
    (line,) = [s for s in said if "verified against" in s]
    skill = entry["metrics"]["cond_crps_skill"]
    assert f"against persistence MAE {entry['metrics']['cond_baseline_mae']:.4g}" in line
    assert f"skill {skill:+.2f}" in line and ("WORSE" in line) == (skill < 0)
    assert entry["kind"] == "conditional ensemble" and entry["known_steps"] == [0, 1]
    members = xr.open_zarr(url, consolidated=False).precip.values
    by_step = entry["curves"]["cond_by_step"]
    assert by_step["hours"] == [48.0, 72.0]  # daily steps 2 and 3
    for k, t in enumerate((2, 3)):
        assert by_step["crps"][k] == pytest.approx(crps_direct(members[:, t], observed[t]), 1e-6)
        # persistence: the last known (observed) frame, step 1
        mae = float(np.abs(observed[1] - observed[t]).mean())
        assert by_step["baseline_mae"][k] == pytest.approx(mae, rel=1e-6)
    m = entry["metrics"]
    assert m["cond_crps"] == pytest.approx(np.mean(by_step["crps"]), rel=1e-6)
    assert m["cond_crps_skill"] == pytest.approx(1 - m["cond_crps"] / m["cond_baseline_mae"])
    assert sum(entry["curves"]["cond_rank_histogram"]) == pytest.approx(1.0)
    assert (out / "figures" / "conditional_crps.png").stat().st_size > 10_000
    assert (out / "figures" / "conditional_rank_histograms.png").exists()


def test_the_skill_line_names_the_baseline_and_warns_when_worse():
    from cloudburst.evaluation.score_stores import skill_line

    good = {"cond_crps": 0.5, "cond_baseline_mae": 1.0, "cond_crps_skill": 0.5}
    line = skill_line({"scenario": "interpolation", "guidance": 1.0}, good)
    assert line == "CRPS 0.5 at guidance 1 against linear interpolation MAE 1: skill +0.50"
    bad = {"cond_crps": 4.7, "cond_baseline_mae": 1.0, "cond_crps_skill": -3.7}
    line = skill_line({"scenario": "forecast", "guidance": 1e6}, bad)
    assert "skill -3.70 - WORSE than persistence" in line and "guidance 1e+06" in line


def test_an_interpolation_baseline_is_linear_between_known_frames():
    from cloudburst.evaluation.conditional import baseline

    truth = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    known = np.array([True, False, True, False, False])
    lin = baseline(truth, known, "interpolation")
    assert lin[1, 0, 0] == 1.0 and lin[3, 0, 0] == 2.0 and lin[4, 0, 0] == 2.0
    persistence = baseline(truth, known, "forecast")
    assert persistence[1, 0, 0] == 0.0 and persistence[4, 0, 0] == 2.0


GUIDED = 100.0  # a large reconstruction-guidance weight, against 0 (plain imputation)


@pytest.fixture(scope="module")
def coupled(store) -> ResolvedModel:
    """The tiny model with its zero-initialised layers (residual blocks start as the identity,
    the output at 0, so x^ ignores the other pixels and guidance has no gradient to follow)
    given small seeded weights: an x^ that couples pixels, as a trained network's does."""
    resolved = diffusion(store)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weights in resolved.packaged.model.parameters():
            if not weights.any():
                weights.copy_(0.1 * torch.randn(weights.shape, generator=gen))
    return resolved


def members_at(store: str, url: str, weight: float, model: ResolvedModel, **scenario) -> np.ndarray:
    generate(ask(store, url, guidance=weight, **scenario), model=model)
    ens = xr.open_zarr(url, consolidated=False)
    assert ens.attrs["guidance"] == weight and ens.attrs["guidance_source"] == "the request"
    return ens.precip.values


def measurably_apart(a: np.ndarray, b: np.ndarray) -> bool:
    """Mean absolute difference above 1 % of the mean magnitude (float32 noise is ~1e-7)."""
    return float(np.abs(a - b).mean()) > 0.01 * float(np.abs(b).mean())


@pytest.mark.parametrize(
    ("kind", "extra", "known"),
    [("forecast", {"context": 2}, [0, 1]), ("interpolation", {}, [0, 2])],
)
def test_the_guidance_weight_changes_the_unknown_frames_only(
    store, observed, coupled, tmp_path, kind, extra, known
):
    plain, guided = (
        members_at(store, str(tmp_path / f"{w:g}.zarr"), w, coupled, kind=kind, **extra)
        for w in (0.0, GUIDED)
    )
    unknown = [t for t in range(WINDOW[0]) if t not in known]
    # the same seed and noise: the known frames are the observed ones under either weight
    assert (plain[:, known] == observed[None, known]).all()
    assert (guided[:, known] == observed[None, known]).all()
    # the weight reaches the sampler: the frames it fills are not the same
    assert measurably_apart(guided[:, unknown], plain[:, unknown])
    # and the change is the guidance's, not noise: the same weight gives the same members
    again = members_at(store, str(tmp_path / "again.zarr"), GUIDED, coupled, kind=kind, **extra)
    assert again.tobytes() == guided.tobytes()


def test_an_extension_forwards_the_guidance_weight_to_each_new_window(store, coupled, tmp_path):
    # without a condition the first window is an unconditional draw (no guidance applies);
    # the windows after it are conditioned on its last frames with the request's weight
    plain, guided = (
        members_at(
            store, str(tmp_path / f"{w:g}.zarr"), w, coupled, kind="extension", length=7,
            condition=None,
        )
        for w in (0.0, GUIDED)
    )  # fmt: skip
    first = WINDOW[0]
    assert plain.shape == guided.shape == (5, 7, 8, 8)
    assert plain[:, :first].tobytes() == guided[:, :first].tobytes()
    assert measurably_apart(guided[:, first:], plain[:, first:])
