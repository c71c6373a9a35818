"""Results as xarray for notebook users: a packaged model's labelled twins of ``sample``,
``reconstruct`` and ``translate`` (dims, coordinates, CF units, provenance), and
``cloudburst.open_ensemble`` on a real ensemble store (and its refusals)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr

import cloudburst
from cloudburst.config import VAEConfig
from cloudburst.data.transforms import Scale
from cloudburst.ensembles import extremes
from cloudburst.ensembles.generate import ResolvedModel, generate
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import EnsembleStoreError
from cloudburst.markers import MARKER
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel, TargetField
from cloudburst.models.vqvae import VQVAEConfig
from cloudburst.tracking import load_model

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

WINDOW = (4, 8, 8)
STATS = {"units": "mm/h", "max": 60.0, "time_step_hours": 0.5, "quantiles": {"0.99": 20.0}}


def tiny() -> PrecipitationModel:
    torch.manual_seed(0)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, WINDOW)
    return PrecipitationModel(net, "vae", cfg, WINDOW, Scale(0.0, 60.0), STATS, 0.1)


def translator() -> PrecipitationModel:
    """A tiny untrained VQ-VAE translating ``nir`` (K) to ``vis`` (reflectance)."""
    torch.manual_seed(1)
    cfg = VQVAEConfig(codebook_size=16, code_dim=4, widths=(4, 8), downsample=2, residual_blocks=0)
    window = (1, 8, 8)
    net = registry.build("vqvae", cfg, window)
    target = TargetField("vis", Scale(0.0, 1.0), {"units": "1", "min": 0.0, "max": 1.0})
    stats = {"units": "K", "min": 200.0, "max": 300.0}
    return PrecipitationModel(
        net, "vqvae", cfg, window, Scale(200.0, 300.0), stats, input_variable="nir", target=target
    )


@pytest.fixture(scope="module")
def model() -> PrecipitationModel:
    return tiny()


def windows(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).gamma(0.5, 4.0, size=(n, *WINDOW)).astype(np.float32)


# ------------------------------------------------------------------------ labelled results


def test_sample_array_is_labelled_like_an_ensemble_with_the_models_provenance(model):
    da = model.sample_array(3, seed=5)
    assert isinstance(da, xr.DataArray) and da.name == "precip"
    assert da.dims == ("sample", "time", "y", "x") and da.shape == (3, *WINDOW)
    assert da.dtype == np.float32
    np.testing.assert_array_equal(da["sample"].values, np.arange(3))
    np.testing.assert_array_equal(da["time"].values, [0.0, 0.5, 1.0, 1.5])  # the step's hours
    assert da["time"].attrs["units"] == "hours"
    np.testing.assert_array_equal(da["y"].values, np.arange(8))
    np.testing.assert_array_equal(da["x"].values, np.arange(8))
    assert da.attrs["units"] == "mm h-1"  # CF, as the ensemble store writes it
    assert da.attrs["standard_name"] == "lwe_precipitation_rate"
    assert da.attrs["model_kind"] == "vae"
    assert da.attrs["model_window"] == [4, 8, 8]
    assert da.attrs["dry_threshold"] == 0.1
    assert da.attrs["seed"] == 5
    assert da.attrs["operation"] == "sample"
    assert "model_uri" not in da.attrs  # made here, not loaded from anywhere
    # the numpy path, computed on its own, gives the same values
    np.testing.assert_array_equal(da.values, tiny().sample(3, seed=5))
    assert not np.array_equal(da.values, model.sample_array(3, seed=6).values)


def test_labelled_results_write_to_netcdf(model, tmp_path):
    da = model.sample_array(2, seed=1)
    da.to_netcdf(tmp_path / "s.nc")
    back = xr.open_dataarray(tmp_path / "s.nc")
    assert back.attrs["units"] == "mm h-1" and back.attrs["model_kind"] == "vae"
    np.testing.assert_array_equal(back.values, da.values)


def test_reconstruct_array_of_arrays_and_of_a_single_window(model):
    x = windows(2)
    da = model.reconstruct_array(x)
    assert da.dims == ("sample", "time", "y", "x") and da.name == "precip"
    assert da.attrs["units"] == "mm h-1" and da.attrs["operation"] == "reconstruction"
    assert "seed" not in da.attrs
    np.testing.assert_array_equal(da.values, tiny().reconstruct(x))
    one = model.reconstruct_array(x[0])
    assert one.dims == ("time", "y", "x")
    np.testing.assert_array_equal(one.values, tiny().reconstruct(x[0]))


def test_a_dataarray_input_keeps_its_dims_and_coordinates(model):
    x = windows(2, seed=4)
    times = pd.date_range("2022-10-18T06:00", periods=4, freq="30min")
    given = xr.DataArray(
        x,
        dims=("member", "time", "y", "x"),
        coords={
            "member": [10, 11],
            "time": times,
            "y": np.linspace(50.0, 50.7, 8),
            "x": np.linspace(7.0, 7.7, 8),
            "lat": (("y", "x"), np.full((8, 8), 50.0)),
        },
        attrs={"units": "mm/hr"},  # the same units, spelled otherwise
    )
    da = model.reconstruct_array(given)
    assert da.dims == given.dims
    for name in ("member", "time", "y", "x", "lat"):
        np.testing.assert_array_equal(da[name].values, given[name].values)
    np.testing.assert_array_equal(da.values, tiny().reconstruct(x))

    # a single window with real times only: the grid gets window indices
    one = model.reconstruct_array(xr.DataArray(x[0], dims=("t", "row", "col"), coords={"t": times}))
    assert one.dims == ("t", "row", "col")
    np.testing.assert_array_equal(one["t"].values, times.values)
    np.testing.assert_array_equal(one["row"].values, np.arange(8))
    np.testing.assert_array_equal(one.values, tiny().reconstruct(x[0]))


def test_inputs_in_other_units_or_shapes_are_refused(model):
    wrong = xr.DataArray(windows(1), dims=("n", "time", "y", "x"), attrs={"units": "mm day-1"})
    with pytest.raises(ValueError, match="'mm day-1' but the model works in 'mm/h'"):
        model.reconstruct_array(wrong)
    with pytest.raises(ValueError, match=r"windows \(time, y, x\) or \(n, time, y, x\)"):
        model.reconstruct_array(np.zeros((8, 8), np.float32))


def test_translate_array_is_named_after_the_target_in_its_units():
    model = translator()
    x = np.random.default_rng(0).uniform(210, 290, size=(2, 1, 8, 8)).astype(np.float32)
    da = model.translate_array(x)
    assert da.name == "vis" and da.dims == ("sample", "time", "y", "x")
    assert da.attrs["units"] == "1" and da.attrs["long_name"] == "vis"
    assert da.attrs["input_variable"] == "nir" and da.attrs["model_kind"] == "vqvae"
    assert da.attrs["operation"] == "translation"
    np.testing.assert_array_equal(da.values, translator().translate(x))
    coords = {"time": pd.date_range("2021-06-01", periods=1), "x": np.arange(8) * 2.0}
    given = xr.DataArray(x[0], dims=("time", "y", "x"), coords=coords, attrs={"units": "K"})
    one = model.translate_array(given)
    np.testing.assert_array_equal(one["x"].values, coords["x"])
    np.testing.assert_array_equal(one["time"].values, coords["time"].values)
    np.testing.assert_array_equal(one.values, translator().translate(x[0]))


def test_translate_array_of_a_model_without_a_target_is_refused(model):
    with pytest.raises(ValueError, match="not trained on a pair of variables"):
        model.translate_array(windows(1))


def test_load_model_records_the_uri_in_the_provenance(model, tmp_path):
    folder = model.save(tmp_path / "pkg")
    loaded = load_model(str(folder))
    assert loaded.uri == str(folder)
    da = loaded.sample_array(2, seed=5)
    assert da.attrs["model_uri"] == str(folder)
    np.testing.assert_array_equal(da.values, model.sample(2, seed=5))


# ------------------------------------------------------------------------ open_ensemble


def ask(output, **kw) -> EnsembleRequest:
    base = {"model": "models:/tiny/1", "members": 10, "seed": 7, "output": str(output)}
    base.update(batch_size=4, chunk_members=4)
    return EnsembleRequest.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("ensembles") / "ens.zarr"
    generate(ask(out), model=ResolvedModel(model, "models:/tiny/1", "models:/tiny/1", None))
    return out


def test_open_ensemble_gives_the_store_with_weights_and_provenance(ensemble):
    ds = cloudburst.open_ensemble(str(ensemble))
    assert isinstance(ds, xr.Dataset)
    assert ds.precip.dims == ("member", "time", "y", "x") and ds.precip.shape == (10, *WINDOW)
    assert ds.precip.attrs["units"] == "mm h-1"
    assert "weight" in ds.data_vars and ds.weight.dims == ("member",)
    assert (ds.weight.values == 1.0).all()
    np.testing.assert_array_equal(ds["time"].values, [0.0, 0.5, 1.0, 1.5])
    assert ds.attrs["model_version_uri"] == "models:/tiny/1"
    assert ds.attrs["model_kind"] == "vae" and ds.attrs["dry_threshold"] == 0.1
    request = ds.attrs["request"]
    assert isinstance(request, dict) and request["seed"] == 7 and request["members"] == 10
    assert ds.attrs["draws"] == 10 and ds.attrs["acceptance_rate"] == 1.0
    assert "SeedSequence" in ds.attrs["seed_rule"]
    plain = xr.open_zarr(ensemble, consolidated=False)
    np.testing.assert_array_equal(ds.precip.values, plain.precip.values)
    # its weights and draws give the same estimate as the streamed one
    maxima = extremes.window_statistic(ds.precip.values, "max")
    mine = extremes.exceedance_probability(
        maxima, [1.0, 5.0], weights=ds.weight.values, draws=ds.attrs["draws"]
    )
    streamed = extremes.ensemble_exceedance(str(ensemble), [1.0, 5.0])
    np.testing.assert_allclose(mine.probability, streamed.probability)


def test_members_reconstruct_with_their_coordinates(ensemble, model):
    members = cloudburst.open_ensemble(str(ensemble)).precip.isel(member=[3, 7])
    da = model.reconstruct_array(members)
    assert da.dims == ("member", "time", "y", "x")
    np.testing.assert_array_equal(da["member"].values, [3, 7])
    np.testing.assert_array_equal(da.values, model.reconstruct(members.values))


def test_an_incomplete_store_is_refused_saying_how_to_finish_it(ensemble, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(ensemble, partial)
    (partial / MARKER).unlink()
    with pytest.raises(EnsembleStoreError) as info:
        cloudburst.open_ensemble(str(partial))
    message = str(info.value)
    assert str(partial) in message and "incomplete ensemble" in message
    assert "3 of 3 member chunks written" in message and MARKER in message
    assert "re-running the same request" in message and "resumes" in message


def test_what_is_not_an_ensemble_store_is_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(EnsembleStoreError, match="is not a Cloudburst ensemble store"):
        cloudburst.open_ensemble(str(folder))
    with pytest.raises(EnsembleStoreError, match="is a file"):
        cloudburst.open_ensemble(str(folder / "readme.txt"))
    with pytest.raises(EnsembleStoreError, match="does not exist"):
        cloudburst.open_ensemble(str(tmp_path / "nowhere.zarr"))
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w", zarr_format=3).attrs["title"] = "someone else's"
    with pytest.raises(EnsembleStoreError, match="Zarr store but not a Cloudburst ensemble"):
        cloudburst.open_ensemble(str(other))


@pytest.mark.integration
def test_open_ensemble_on_object_storage(s3_server, model):
    url = f"{s3_server.make_bucket('opened')}/ens.zarr"
    req = ask(url)
    req = req.model_copy(
        update={"storage": req.storage.model_copy(update={"options": s3_server.options})}
    )
    generate(req, model=ResolvedModel(model, "models:/tiny/1", "models:/tiny/1", None))
    ds = cloudburst.open_ensemble(url, storage_options=s3_server.options)
    assert ds.precip.shape == (10, *WINDOW) and ds.attrs["request"]["seed"] == 7
    assert (ds.weight.values == 1.0).all()
    json.dumps(ds.attrs["request"])
