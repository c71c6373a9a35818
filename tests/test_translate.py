"""A VQ-VAE trained on a pair of variables (coarse infrared -> fine visible counts, synthetic
here) through the training job: paired windows, held-out frames, the translation scores
beside both baselines; then jobs/translate.py writes the translated field, and the codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from cloudburst.data.ingest import ingest, open_store

ROOT = Path(__file__).resolve().parents[1]
NT, NC, K = 20, 8, 3  # frames, coarse grid side, fine cells per coarse cell


def pair_source(path: Path) -> str:
    """``nir`` on a coarse grid and ``vis`` on a 3x finer one: vis is a smooth, nonlinear
    function of the (interpolated) nir field, with a missing nir tile (0 counts)."""
    rng = np.random.default_rng(5)
    yc, xc = 1000.0 * np.arange(NC), 1000.0 * np.arange(NC)
    yf = np.arange(K * (NC - 1) + 1) * (1000.0 / K)
    xf = yf.copy()
    t = np.arange(NT)[:, None, None]
    base = 300 + 200 * np.sin(yc[None, :, None] / 2500.0 + t / 4.0) * np.cos(
        xc[None, None, :] / 3000.0 - t / 6.0
    )
    nir = (base + rng.normal(0, 5, (NT, NC, NC))).round().astype(np.int16)
    nir[:, 0, 0] = 0  # a missing tile
    fine = 300 + 200 * np.sin(yf[None, :, None] / 2500.0 + t / 4.0) * np.cos(
        xf[None, None, :] / 3000.0 - t / 6.0
    )
    vis = (60 + 0.002 * (fine - 100) ** 2).round().astype(np.int16)
    times = pd.date_range("2020-04-01T12:00", periods=NT, freq="5min")
    xr.Dataset(
        {
            "vis": (("time", "y_hrv", "x_hrv"), vis),
            "nir": (("time", "y", "x"), nir),
        },
        coords={"time": times, "y_hrv": yf, "x_hrv": xf, "y": yc, "x": xc},
    ).to_netcdf(path)
    return str(path)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out.update(
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
    )
    return out


def job(script: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == expect, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.mark.integration
def test_a_vqvae_learns_a_translation_and_the_job_writes_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from cloudburst.tracking import load_model

    store = str(tmp_path / "pair.zarr")
    ingest(
        pair_source(tmp_path / "pair.nc"),
        store,
        variables=["nir", "vis"],
        grid="vis",
        units="1",
        missing_values={"nir": 0},
        progress=False,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "vq.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {
                    "kind": "vqvae",
                    "codebook_size": 32,
                    "code_dim": 8,
                    "widths": [8, 16],
                    "downsample": 2,
                    "residual_blocks": 1,
                    "adversarial_weight": 0.0,
                    "ema": True,
                    "dead_code_steps": 5,
                },
                "data": {
                    "store": store,
                    "input": "nir",
                    "target": "vis",
                    "windows": {"length": 1, "size": 8, "stride": 4},
                    "split": {"scheme": "frames", "every": 5, "guard": 1, "val_fraction": 0.2},
                    "loader": {"batch_size": 16},
                },
                "train": {"epochs": 3, "max_steps_per_epoch": 30, "lr": 3e-3},
                "run": {
                    "name": "vq-pair",
                    "storage_path": str(tmp_path / "ray"),
                    "tracking_uri": uri,
                    "registered_model": "vq-pair",
                    "system_metrics_interval": None,
                },
            }
        )
    )
    trained = job("train.py", "--config", str(config))
    assert "model: models:/vq-pair/1" in trained.stdout
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("vq-pair", "1")
    assert version.tags["input"] == "nir" and version.tags["target"] == "vis"
    run = client.get_run(version.run_id)
    metrics = run.data.metrics
    expected = {f"eval_{p}{m}" for p in ("", "linear_", "conv_") for m in ("ssim", "psnr", "mae")}
    assert expected <= set(metrics)
    assert {"val_ssim", "val_codebook_usage", "eval_codebook_usage"} <= set(metrics)
    assert run.data.tags["evaluation_split"].startswith("test")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "translation.md" in artifacts
    assert "figures/translation.png" in {
        a.path for a in client.list_artifacts(run.info.run_id, "figures")
    }
    assert all(np.isfinite(metrics[k]) for k in expected)
    assert 0 < metrics["eval_codebook_usage"] <= 1

    def translate(output: str, *flags: str, expect: int = 0) -> subprocess.CompletedProcess:
        args = ("--model", "models:/vq-pair/1", "--input", store, "--output", output)
        return job("translate.py", *args, "--tracking-uri", uri, *flags, expect=expect)

    output = str(tmp_path / "visible.zarr")
    made = translate(output)
    assert f"translation: {output}" in made.stdout
    out = xr.open_zarr(output, consolidated=False)
    src, _ = open_store(store)
    assert list(out.data_vars) == ["vis"]
    np.testing.assert_array_equal(out["time"].values, src["time"].values)
    np.testing.assert_array_equal(out["y"].values, src["y"].values)
    assert out.attrs["model"] == "models:/vq-pair/1" and out.attrs["input_variable"] == "nir"
    # the job's values are the package's translation of each frame; NaN where nir is missing
    model = load_model("models:/vq-pair/1", tracking_uri=uri)
    nir = src["nir"].values
    expected_vis = model.translate(nir[:, None])[:, 0]
    got = out["vis"].values
    missing = np.isnan(nir)
    assert missing.any() and np.isnan(got[missing]).all()
    np.testing.assert_allclose(got[~missing], expected_vis[~missing], rtol=1e-5, atol=1e-3)
    # in the target's physical units (counts of vis), not the normalised ones
    assert np.nanmax(got) > 10

    # the same request keeps the store (its chunk untouched); the codes go elsewhere
    chunk = next(Path(output, "vis").rglob("c/*/*/*"))
    before = chunk.stat().st_mtime_ns
    translate(output)
    assert chunk.stat().st_mtime_ns == before
    codes = str(tmp_path / "codes.zarr")
    assert f"codes: {codes}" in translate(codes, "--codes").stdout
    # a variable the store lacks is refused, naming what it has; nothing is written
    refused = translate(str(tmp_path / "no.zarr"), "--variable", "ir", expect=2)
    assert "nir" in refused.stderr and "vis" in refused.stderr
    assert not (tmp_path / "no.zarr").exists()


def test_a_translating_package_round_trips_in_physical_units(tmp_path):
    """Saved and loaded, a package trained on a pair translates the same input to the same
    target values, in the target's units (its own scaling, not the input's)."""
    import torch

    from cloudburst.data.transforms import Scale
    from cloudburst.models import registry
    from cloudburst.models.package import PrecipitationModel, TargetField

    torch.manual_seed(0)
    entry = registry.family("vqvae")
    cfg = entry.config.model_validate({"kind": "vqvae", **entry.small})
    window = (1, 8, 8)
    net = registry.build("vqvae", cfg, window)
    target = TargetField("vis", Scale(50.0, 700.0, "unit"), {"units": "1", "min": 50.0})
    package = PrecipitationModel(
        net,
        "vqvae",
        cfg,
        window,
        Scale(0.0, 860.0, "unit"),
        {"units": "1"},
        input_variable="nir",
        target=target,
    )
    x = np.random.default_rng(1).uniform(0, 860, (3, *window)).astype(np.float32)
    made = package.translate(x)
    # the network's output in [0, 1] (sigmoid) mapped onto the target's range [50, 700]
    assert made.shape == x.shape and made.min() >= 50.0 and made.max() <= 700.0
    with torch.no_grad():
        u = net.translate(torch.from_numpy(x / 860.0)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(made, 50.0 + 650.0 * u, rtol=1e-5)
    loaded = PrecipitationModel.load(package.save(tmp_path / "pkg"))
    assert loaded.input_variable == "nir" and loaded.target is not None
    assert loaded.target.variable == "vis"
    np.testing.assert_array_equal(loaded.translate(x), made)
    assert package.tags()["target"] == "vis" and package.tags()["input"] == "nir"
    # a package without a target has nothing to translate to
    plain = PrecipitationModel(net, "vqvae", cfg, window, Scale(0.0, 860.0, "unit"), None)
    with pytest.raises(ValueError, match="pair of variables"):
        plain.translate(x)
