"""The dry threshold: chosen to match the observed wet fraction, applied to everything a
packaged model makes (samples, reconstructions, ensembles), saved and loaded with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cloudburst.data.transforms import Scale
from cloudburst.models import dry, registry
from cloudburst.models.package import METADATA_FILE, PrecipitationModel
from cloudburst.models.vae import VAEConfig

WINDOW = (4, 8, 8)


def test_the_threshold_matches_the_observed_wet_fraction():
    observed = np.array([0.0, 0.0, 0.0, 1.0, 2.0, np.nan])  # 2 of 5 valid values wet
    generated = np.arange(1, 11) / 10.0  # 0.1 ... 1.0, all wet
    chosen = dry.choose(observed, generated)
    assert chosen.observed_wet_fraction == pytest.approx(0.4)
    assert chosen.generated_wet_fraction == 1.0
    assert chosen.detection_limit == 1.0
    assert chosen.value == pytest.approx(0.7)  # 0.7, 0.8, 0.9, 1.0 stay: 4 of 10
    kept = dry.apply(generated.copy(), chosen.value)
    assert np.mean(kept > 0) == pytest.approx(0.4)
    assert set(kept[kept > 0]) == {0.7, 0.8, 0.9, 1.0}


def test_a_model_no_wetter_than_the_data_is_left_alone():
    chosen = dry.choose(np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 0.5]))
    assert chosen.value == 0.0
    x = np.array([0.0, 0.001], dtype=np.float32)
    assert dry.apply(x.copy(), chosen.value).tolist() == x.tolist()
    assert math.isnan(dry.choose(np.zeros(4), np.ones(4)).detection_limit)
    with pytest.raises(ValueError, match="needs observed and generated"):
        dry.choose(np.array([np.nan]), np.ones(3))


def packaged(threshold):
    torch.manual_seed(0)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, WINDOW)
    stats = {"units": "mm/day", "max": 60.0}
    return PrecipitationModel(net, "vae", cfg, WINDOW, Scale(0.0, 60.0, "unit"), stats, threshold)


def test_samples_and_reconstructions_are_exactly_dry_below_the_threshold(tmp_path):
    plain = packaged(None).sample(8, seed=3)
    threshold = float(np.quantile(plain, 0.6))
    model = packaged(threshold)
    out = model.sample(8, seed=3)
    below = plain < threshold
    assert below.any() and (out[below] == 0).all()
    assert np.array_equal(out[~below], plain[~below])
    recon = model.reconstruct(plain)
    assert not ((recon > 0) & (recon < threshold)).any()
    assert model.tags()["dry_threshold"] == f"{threshold:g}"
    again = PrecipitationModel.load(model.save(tmp_path / "m"))
    assert again.dry_threshold == pytest.approx(threshold)
    assert np.array_equal(again.sample(8, seed=3), out)
    # a package written before dry thresholds existed loads without one
    meta = json.loads((tmp_path / "m" / METADATA_FILE).read_text())
    del meta["dry_threshold"]
    (tmp_path / "m" / METADATA_FILE).write_text(json.dumps(meta))
    assert PrecipitationModel.load(tmp_path / "m").dry_threshold is None
    with pytest.raises(ValueError, match="dry_threshold must be >= 0"):
        packaged(-1.0)


def test_ensembles_carry_the_threshold_and_its_zeros(tmp_path):
    import xarray as xr

    from cloudburst.ensembles.generate import ResolvedModel, generate
    from cloudburst.ensembles.request import EnsembleRequest

    threshold = float(np.quantile(packaged(None).sample(8, seed=0), 0.5))
    resolved = ResolvedModel(packaged(threshold), "models:/d/1", "models:/d/1", None)
    output = tmp_path / "e.zarr"
    request = EnsembleRequest(
        model="models:/d/1", members=16, seed=2, output=str(output), batch_size=8, chunk_members=8
    )
    generate(request, model=resolved)
    ds = xr.open_zarr(output, consolidated=False)
    values = ds.precip.values
    assert (values == 0).any() and not ((values > 0) & (values < threshold)).any()
    assert ds.attrs["dry_threshold"] == pytest.approx(threshold)
