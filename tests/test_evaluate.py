"""jobs/evaluate.py end to end: a tiny trained VAE and an ensemble store, evaluated against a
real store's test split, logged to a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import servers
import torch
from mlflow.tracking import MlflowClient

from cloudburst import tracking
from cloudburst.config import SyntheticConfig, VAEConfig, WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.synthetic import write_synthetic
from cloudburst.data.transforms import for_data
from cloudburst.data.windows import build_index
from cloudburst.ensembles.generate import generate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.evaluation.evaluate import SCHEMA, EvaluationError, EvaluationRequest, evaluate
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (4, 8, 8)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("eval") / "s.zarr")
    write_synthetic(SyntheticConfig(nt=400, ny=16, nx=16), path, progress=False)
    return path


def trained(store: str, steps: int = 40, seed: int = 0, kind: str = "vae") -> PrecipitationModel:
    """A tiny VAE (or diffusion model) after ``steps`` Adam steps on the store's windows."""
    from cloudburst.config import DiffusionConfig
    from cloudburst.data.transforms import Scale

    torch.manual_seed(seed)
    ds, stats = open_store(store)
    if kind == "vae":
        transform = for_data(stats)
        cfg = VAEConfig(widths=(4, 8), latent=4, loss="rec+wqt", rec_weight=100)
    else:
        transform = Scale(0.0, stats.max, "unit")
        cfg = DiffusionConfig(widths=(4, 8), embedding=8, steps=4, transform="sqrt")
    net = registry.build(kind, cfg, WINDOW)
    index = build_index(ds, WindowConfig(length=4, size=8, stride=8))
    data = WindowDataset(store, index, transform=transform, seed=seed, rank=0, world_size=1)
    batch_x = torch.stack([item["x"] for _, item in zip(range(64), data, strict=False)])
    mask = torch.ones_like(batch_x, dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = net.loss({"x": batch_x, "mask": mask})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return PrecipitationModel(net, kind, cfg, WINDOW, transform, stats)


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory, mlflow_module_state):
    """The tiny model registered on a real MLflow server; (tracking URI, model URI, run id)."""
    folder = tmp_path_factory.mktemp("mlflow")
    try:
        with servers.mlflow_server(folder) as uri:
            tracking.setup(uri, experiment="eval-test")
            version, model_uri = tracking.log_and_register(trained(store), name="tiny-eval")
            client = MlflowClient(uri, registry_uri=uri)
            run_id = client.get_model_version("tiny-eval", str(version)).run_id
            yield uri, "models:/tiny-eval@candidate", run_id
    except servers.ServerNotFound as exc:
        pytest.skip(str(exc))


def small(store: str, out: Path, **kw) -> EvaluationRequest:
    base = {
        "data": store,
        "split": "test@seasons:2",
        "out": str(out),
        "limit": 60,
        "samples": 120,
        "members": 8,
        "periods": [10, 100],
        "bootstrap": 10,
        "top_n": 5,
    }
    return EvaluationRequest.model_validate({**base, **kw})


@pytest.mark.integration
def test_models_and_an_ensemble_store_evaluated_and_logged(
    store, registered, tmp_path, mlflow_state
):
    uri, model_uri, model_run = registered
    tracking.setup(uri, experiment="eval-test")
    ens = tmp_path / "ens.zarr"
    generate(
        EnsembleRequest.model_validate(
            {"model": model_uri, "members": 200, "seed": 3, "output": str(ens)}
        ),
        tracking_uri=uri,
    )
    out = tmp_path / "eval"
    result = evaluate(
        small(store, out, models=[model_uri], ensembles=[str(ens)], chunk_mb=0.01),
        tracking_uri=uri,
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["schema"] == SCHEMA
    assert report["data"]["windows"] == 60 and report["data"]["window"] == list(WINDOW)
    model, ensemble = report["models"]
    assert model["kind"] == "model" and model["version_uri"] == "models:/tiny-eval/1"
    assert ensemble["kind"] == "ensemble" and ensemble["members"] == 200
    m = model["metrics"]
    for key in ("qmse_top5", "cond_crps", "cond_crps_fair", "cond_spread_skill", "mean_bias"):
        assert np.isfinite(m[key]), key
    assert m["cond_crps_fair"] <= m["cond_crps"] + 1e-12  # the fair spread term is larger
    assert {"cond_twcrps_q0.95", "cond_twcrps_q0.99", "cond_brier_q0.99"} <= set(m)
    assert len(model["curves"]["cond_rank_histogram"]) == 9  # min(20, members + 1)
    assert np.isfinite(ensemble["metrics"]["clim_crps_fair"])
    # the store is the same model's prior: generation scores of model and store agree
    assert ensemble["metrics"]["mean"] == pytest.approx(m["mean"], rel=0.35)
    curves = model["curves"]
    assert len(curves["qq_generation"]["levels"]) == len(curves["qq_generation"]["model"])
    assert curves["return_levels"]["method"] == "gev-block-maxima"
    assert np.asarray(curves["bias_map"], dtype=float).shape == WINDOW[1:]
    names = {p.name for p in result.figures}
    for fig in (
        "quantized_mse",
        "qq_reconstruction",
        "intensity_histograms",
        "qq_generation",
        "bias_maps",
        "psd_spatial",
        "psd_temporal",
        "extremes_qq",
        "rank_histogram",
        "reliability_q0.99",
        "return_levels",
        "latent_interpolation_tiny-eval-v1",
    ):
        assert f"{fig}.png" in names, fig
        assert (out / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    # logged to the server, linked both ways
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["tiny-eval-v1.cond_crps"] == pytest.approx(m["cond_crps"])
    assert json.loads(run.data.tags["evaluated_runs"])["tiny-eval v1"] == model_run
    assert client.get_run(model_run).data.tags["last_evaluation_run"] == result.run_id
    logged = {a.path for a in client.list_artifacts(result.run_id, "figures")}
    assert "figures/qq_generation.png" in logged
    assert "metrics.json" in {a.path for a in client.list_artifacts(result.run_id)}


@pytest.mark.integration
def test_the_job_evaluates_from_the_command_line_and_refuses_bad_input(store, registered, tmp_path):
    uri, model_uri, _ = registered
    job = str(ROOT / "jobs" / "evaluate.py")
    cmd = [sys.executable, job, "--data", store, "--tracking-uri", uri]
    small_args = ["--limit", "30", "--samples", "40", "--members", "4", "--split", "test@seasons:2"]
    ok = subprocess.run(
        [*cmd, *small_args, "--model", model_uri, "--out", str(tmp_path / "a"), "--no-mlflow"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.strip().endswith(f"evaluation: {tmp_path / 'a'}")
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["schema"] == SCHEMA
    for bad, message in (
        (["--model", "models:/nope@candidate"], "not found in the registry"),
        (["--model", "tiny-eval"], "not a registry URI"),
        (["--ensemble", str(tmp_path / "missing.zarr")], "not a complete ensemble"),
        (["--model", model_uri, "--split", "test@years:1900-1901/1902-1903"], "no (4, 8, 8)"),
        (["--model", model_uri, "--members", "1"], "--members"),
    ):
        out = tmp_path / "bad"
        run = subprocess.run(
            [*cmd, *bad, "--out", str(out), "--no-mlflow"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 2, (bad, run.stderr[-2000:])
        assert message in run.stderr, (bad, run.stderr[-2000:])
        assert "Traceback" not in run.stderr
        assert not (out / "metrics.json").exists()  # nothing half-written


def test_nothing_to_evaluate_is_refused(store, tmp_path):
    with pytest.raises(EvaluationError, match="at least one --model or --ensemble"):
        evaluate(small(store, tmp_path))


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["vae", "diffusion"])
def test_an_extreme_scenario_store_is_verified_against_observed_extremes(store, tmp_path, kind):
    from cloudburst.ensembles.generate import ResolvedModel

    packaged = trained(store, steps=20 if kind == "vae" else 60, seed=1, kind=kind)
    maxima = packaged.sample(400, seed=5).reshape(400, -1).max(axis=1)
    threshold = float(np.quantile(maxima, 0.7))
    model = ResolvedModel(packaged, "models:/x/1", "models:/x/1", None)
    ens = tmp_path / "extreme.zarr"
    request = {
        "model": "models:/x/1",
        "members": 150,
        "seed": 4,
        "output": str(ens),
        "scenario": {"kind": "extreme", "threshold": threshold},
    }
    generate(EnsembleRequest.model_validate(request), model=model)
    result = evaluate(
        small(store, tmp_path / "eval", ensembles=[str(ens)], log_to_mlflow=False),
    )
    assert result.run_id is None
    (entry,) = result.report["models"]
    assert entry["verified_against"].startswith(f"observed windows with a pixel >= {threshold:g}")
    # importance weights: the return levels are the weighted empirical ones
    assert entry["curves"]["return_levels"]["method"] == "importance-weighted-empirical"
    assert "clim_crps_fair" not in entry["metrics"]  # defined for equal weights only
    # the threshold is one the observed test windows reach: they are verified against
    assert entry["verified_against"] == f"observed windows with a pixel >= {threshold:g}"
    assert np.isfinite(entry["metrics"]["clim_crps"])


def test_importance_return_levels_match_the_prior_from_a_shifted_proposal():
    from scipy import stats as sps

    from cloudburst.evaluation.observations import importance_levels

    rng = np.random.default_rng(0)
    periods = np.array([10.0, 100.0, 1000.0])
    truth = sps.norm.isf(1.0 / periods)
    # plain Monte Carlo: the empirical levels
    plain = importance_levels(rng.normal(size=200_000), np.ones(200_000), 200_000, periods, rng, 10)
    np.testing.assert_allclose(plain["levels"], truth, atol=0.05)
    # draws from N(2.5, 1) with weights p/q; only those above 1.0 kept (rejection), as stores do
    z = rng.normal(2.5, 1.0, 20_000)
    w = np.exp(-0.5 * z**2 + 0.5 * (z - 2.5) ** 2)
    keep = z > 1.0
    out = importance_levels(z[keep], w[keep], z.size, periods, rng, 50)
    np.testing.assert_allclose(out["levels"], truth, atol=0.06)
    assert (np.array(out["lower"]) <= out["levels"]).all()
    assert (np.array(out["levels"]) <= out["upper"]).all()
    # a level below the rejection threshold cannot be told: NaN, not a wrong number
    low = importance_levels(z[keep], w[keep], z.size, np.array([1.5]), rng, 10)
    assert np.isnan(low["levels"][0])


def test_extreme_windows_are_the_wettest_with_a_pixel_above_the_threshold():
    from cloudburst.evaluation.observations import top_windows

    x = np.zeros((5, 1, 2, 2))
    x[0] = 3.0  # the largest total, no pixel above 5
    x[1, 0, 0, 0] = 9.0
    x[2, 0, 0, 0], x[2, 0, 1, 1] = 6.0, 4.0
    x[3, 0, 0, 0] = np.nan
    assert list(top_windows(x, 2, 5.0)) == [2, 1]
    assert list(top_windows(x, 1, 100.0)) == []


def test_store_verification_does_not_depend_on_the_tile_size(store, tmp_path):
    from cloudburst.ensembles.generate import ResolvedModel

    model = ResolvedModel(trained(store, steps=5, seed=2), "models:/y/1", "models:/y/1", None)
    ens = tmp_path / "plain.zarr"
    request = {"model": "models:/y/1", "members": 64, "seed": 1, "output": str(ens)}
    generate(EnsembleRequest.model_validate(request), model=model)
    scores = []
    for mb in (0.002, 64.0):  # one row of one step per tile, or the whole store at once
        r = evaluate(
            small(
                store, tmp_path / f"e{mb}", ensembles=[str(ens)], log_to_mlflow=False, chunk_mb=mb
            )
        )
        scores.append(r.report["models"][0]["metrics"])
    for key in ("clim_crps", "clim_crps_fair", "clim_twcrps_q0.99", "clim_spread_skill"):
        assert scores[0][key] == pytest.approx(scores[1][key], rel=1e-9), key
    assert scores[0]["clim_cases"] == 60 * 4 * 8 * 8


@pytest.mark.integration
@pytest.mark.parametrize("cloud", ["s3_server", "gcs_server"])
def test_a_store_on_object_storage_is_verified_in_tiles(cloud, request, store, tmp_path):
    from cloudburst.ensembles.generate import ResolvedModel

    server = request.getfixturevalue(cloud)
    url = f"{server.make_bucket('evaluated')}/ens.zarr"
    model = ResolvedModel(trained(store, steps=5, seed=3), "models:/z/1", "models:/z/1", None)
    ask = {"model": "models:/z/1", "members": 96, "seed": 2, "output": url, "chunk_members": 32}
    ask["storage"] = {"options": server.options}
    generate(EnsembleRequest.model_validate(ask), model=model)
    result = evaluate(
        small(
            store,
            tmp_path / "e",
            ensembles=[url],
            log_to_mlflow=False,
            chunk_mb=0.01,
            storage={"options": server.options},
        )
    )
    (entry,) = result.report["models"]
    assert entry["url"] == url and entry["members"] == 96
    assert np.isfinite(entry["metrics"]["clim_crps_fair"])
    assert entry["curves"]["return_levels"]["method"] == "gev-block-maxima"
