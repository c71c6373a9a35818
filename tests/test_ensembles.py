"""The ensemble engine, its Zarr store and the weighted extreme estimates, on real files,
a real MLflow registry and real S3 / GCS servers on loopback."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from pydantic import ValidationError

from cloudburst import tracking
from cloudburst.config import VAEConfig
from cloudburst.data.transforms import Scale
from cloudburst.ensembles import extremes
from cloudburst.ensembles.generate import (
    EnsembleError,
    Generator,
    ResolvedModel,
    generate,
    regenerate,
    resolve,
)
from cloudburst.ensembles.request import EnsembleRequest
from cloudburst.ensembles.store import EnsembleStoreError, member_chunks, read_marker
from cloudburst.models import registry
from cloudburst.models.package import PrecipitationModel

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (4, 8, 8)
STATS = {"units": "mm/day", "max": 60.0, "quantiles": {"0.99": 20.0, "0.999": 45.0}}


def tiny(seed: int = 0) -> PrecipitationModel:
    torch.manual_seed(seed)
    cfg = VAEConfig(widths=(4, 8), latent=4)
    net = registry.build("vae", cfg, WINDOW)
    return PrecipitationModel(net, "vae", cfg, WINDOW, Scale(0.0, 60.0, "unit"), STATS)


@pytest.fixture(scope="module")
def model() -> ResolvedModel:
    return ResolvedModel(tiny(), "models:/tiny/1", "models:/tiny/1", None)


def ask(output, **kw) -> EnsembleRequest:
    base = {"model": "models:/tiny/1", "members": 300, "seed": 7, "output": str(output)}
    base.update(batch_size=16, chunk_members=64)
    return EnsembleRequest.model_validate({**base, **kw})


def chunk_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and "/c/" in str(p.relative_to(store)).replace("\\", "/")
    }


# ------------------------------------------------------------------------ store and bytes


def test_store_reopens_with_xarray_in_physical_units_with_provenance(tmp_path, model):
    out = tmp_path / "ens.zarr"
    result = generate(ask(out), model=model)
    assert result.chunks_written == 5 and result.acceptance_rate == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing foreign in the store for readers to trip on
        ds = xr.open_zarr(out, consolidated=False)
    assert ds.precip.dims == ("member", "time", "y", "x")
    assert ds.precip.shape == (300, *WINDOW)
    assert ds.precip.attrs["units"] == "mm day-1"
    values = ds.precip.values
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 60.0
    assert (ds.weight.values == 1.0).all()
    assert (ds.candidate.values == np.arange(300)).all()
    assert ds.attrs["model_version_uri"] == "models:/tiny/1"
    assert '"seed": 7' in ds.attrs["request"] and "SeedSequence" in ds.attrs["seed_rule"]
    assert read_marker(str(out))["members"] == 300
    # members differ from each other (noise really depends on k)
    assert not np.allclose(values[0], values[1])


def test_a_member_regenerated_alone_is_byte_identical(tmp_path, model):
    req = ask(tmp_path / "ens.zarr")
    generate(req, model=model)
    stored = xr.open_zarr(req.output, consolidated=False).precip.values
    for k in (0, 63, 64, 299):
        x, w = regenerate(req, [k], model=model)
        assert x[0].tobytes() == stored[k].tobytes()
        assert w[0] == 1.0


def test_seed_changes_every_member(tmp_path, model):
    generate(ask(tmp_path / "a.zarr"), model=model)
    generate(ask(tmp_path / "b.zarr", seed=8), model=model)
    a = xr.open_zarr(tmp_path / "a.zarr", consolidated=False).precip.values
    b = xr.open_zarr(tmp_path / "b.zarr", consolidated=False).precip.values
    assert not np.isclose(a, b).all(axis=(1, 2, 3)).any()


def test_interrupted_request_resumes_with_the_same_bytes(tmp_path, model):
    clean = tmp_path / "clean.zarr"
    generate(ask(clean), model=model)

    out = tmp_path / "resumed.zarr"

    class Interrupted(Exception):
        pass

    def stop_after_two(done, total):
        if done >= 128:
            raise Interrupted

    with pytest.raises(Interrupted):
        generate(ask(out), model=model, on_chunk=stop_after_two)
    assert read_marker(str(out)) is None  # a partial store never reads as complete
    with pytest.raises(EnsembleStoreError, match="not a complete ensemble"):
        next(iter(member_chunks(str(out))))

    again = generate(ask(out), model=model)
    assert again.chunks_written == 3  # only the missing chunks
    assert chunk_files(out) == chunk_files(clean)
    assert generate(ask(out), model=model).chunks_written == 0  # complete: nothing to do


def test_memory_is_bounded_by_the_chunk_not_the_ensemble(tmp_path, model):
    import tracemalloc

    peaks = {}
    for members in (256, 2048):
        tracemalloc.start()
        generate(ask(tmp_path / f"m{members}.zarr", members=members), model=model)
        peaks[members] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # 8x the members, far from 8x the memory (one chunk is 64 x 256 x 4 B = 64 kB)
    assert peaks[2048] < 1.5 * peaks[256], peaks


def test_refuses_outputs_it_must_not_touch(tmp_path, model):
    out = tmp_path / "ens.zarr"
    generate(ask(out), model=model)
    with pytest.raises(EnsembleStoreError, match="different ensemble"):
        generate(ask(out, seed=99), model=model)
    assert read_marker(str(out)) is not None  # the old ensemble is untouched

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(EnsembleStoreError, match="not a Cloudburst ensemble"):
        generate(ask(foreign), model=model)
    assert (foreign / "notes.txt").read_text() == "keep me"

    other_zarr = tmp_path / "other.zarr"
    zarr.open_group(str(other_zarr), mode="w", zarr_format=3).create_array(
        "a", shape=(2,), dtype="f4"
    )
    with pytest.raises(EnsembleStoreError, match="not a Cloudburst ensemble"):
        generate(ask(other_zarr), model=model)


@pytest.mark.parametrize("cut", ["before its first attribute", "inside the arrays"])
def test_a_store_whose_creation_was_cut_short_is_made_again(tmp_path, model, cut):
    clean, out = tmp_path / "clean.zarr", tmp_path / "ens.zarr"
    generate(ask(clean), model=model)
    # what a run killed while creating the store leaves behind
    group = zarr.open_group(str(out), mode="w", zarr_format=3)
    if cut == "inside the arrays":
        group.attrs.update(
            {"cloudburst_format": "cloudburst-ensemble/1", "cloudburst_creating": "x"}
        )
        group.create_array("member", shape=(300,), dtype="int64")
    result = generate(ask(out), model=model)
    assert result.chunks_written == 5
    assert chunk_files(out) == chunk_files(clean)
    assert read_marker(str(out))["members"] == 300


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"members": 0}, "members"),
        ({"members": -5}, "members"),
        ({"members": 10**12}, "members"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"scenario": {"kind": "storm"}}, "scenario.kind"),
        ({"scenario": {"threshold": 5, "threshold_quantile": 0.99}}, "not both"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_requests_name_the_field(tmp_path, change, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        ask(tmp_path / "x.zarr", **change)


# ------------------------------------------------------------------------ extreme scenarios


def test_threshold_rejection_keeps_only_exceeding_members(tmp_path, model):
    # threshold = the 0.8 quantile of plain members' maxima: acceptance about 0.2
    plain = Generator(ask(tmp_path / "p.zarr"), model)
    maxima = extremes.window_statistic(plain.draws(np.arange(400))[0])
    cut = float(np.quantile(maxima, 0.8))
    req = ask(tmp_path / "rej.zarr", members=100, scenario={"threshold": cut})
    result = generate(req, model=model)
    ds = xr.open_zarr(req.output, consolidated=False)
    assert (extremes.window_statistic(ds.precip.values) >= cut).all()
    assert 0.1 < result.acceptance_rate < 0.35
    assert result.summary["draws"] == int(ds.candidate.values.max()) + 1
    # a member regenerated alone from its draw index is the stored one
    x, _ = regenerate(req, [0, 57, 99], model=model)
    assert x.tobytes() == ds.precip.values[[0, 57, 99]].tobytes()


def test_unreachable_threshold_fails_clearly_and_leaves_no_complete_store(tmp_path, model):
    req = ask(
        tmp_path / "never.zarr",
        members=10,
        scenario={"threshold": 1e6, "max_candidates_per_member": 5},
    )
    with pytest.raises(EnsembleError, match="acceptance"):
        generate(req, model=model)
    assert read_marker(req.output) is None


def test_threshold_quantile_comes_from_the_training_statistics(tmp_path, model):
    gen = Generator(ask(tmp_path / "q.zarr", scenario={"threshold_quantile": 0.999}), model)
    assert gen.threshold == 45.0
    with pytest.raises(EnsembleError, match="0.95 quantile"):
        Generator(ask(tmp_path / "q.zarr", scenario={"threshold_quantile": 0.95}), model)


def test_extreme_weights_have_mean_one_under_the_proposal(tmp_path, model):
    for proposal in ("shift", "tail"):
        req = ask(tmp_path / "w.zarr", scenario={"kind": "extreme", "proposal": proposal})
        _, w = Generator(req, model).proposal.draw(3, np.arange(20_000))
        # E_q[p/q] = 1; the weights are bounded by 1 / defensive
        assert w.mean() == pytest.approx(1.0, abs=0.05), proposal
        assert w.max() <= 1.0 / 0.1 + 1e-9


@pytest.mark.integration
@pytest.mark.parametrize("proposal", ["shift", "fitted"])
def test_weighted_extremes_agree_with_plain_monte_carlo_with_ten_times_fewer_members(
    tmp_path, model, proposal
):
    plain = ask(tmp_path / "mc.zarr", members=20_000, batch_size=256, chunk_members=4096)
    generate(plain, model=model)
    mc_max = np.concatenate(
        [extremes.window_statistic(c["precip"]) for c in member_chunks(plain.output)]
    )
    thresholds = np.quantile(mc_max, [0.99, 0.998])
    mc = extremes.exceedance_probability(mc_max, thresholds)

    steered = ask(
        tmp_path / "is.zarr",
        members=2_000,
        batch_size=256,
        chunk_members=1024,
        scenario={"kind": "extreme", "proposal": proposal, "tail_quantile": 0.998},
    )
    generate(steered, model=model)
    weighted = extremes.ensemble_exceedance(steered.output, thresholds)
    unweighted_share = (
        np.concatenate(
            [extremes.window_statistic(c["precip"]) for c in member_chunks(steered.output)]
        )[:, None]
        > thresholds
    ).mean(axis=0)

    for i in range(len(thresholds)):
        gap = abs(weighted.probability[i] - mc.probability[i])
        assert gap < 3.5 * np.hypot(weighted.stderr[i], mc.stderr[i]), (weighted, mc)
    # the steered members land in the tail far more often: that is the saving
    assert (unweighted_share > 3 * mc.probability).all()
    # and its estimate is at least as precise with a tenth of the members
    assert weighted.stderr[-1] < 1.5 * mc.stderr[-1]
    years = weighted.return_period(events_per_year=365 / 4)
    assert (years > 0).all() and np.isfinite(years).all()


def test_fitted_weights_are_p_over_q_and_the_fit_is_pinned_and_recorded(tmp_path, model):
    """The fitted proposal's weights against a direct density computation (scipy's
    multivariate normal), its fit recorded in the store and given to another process as a
    vector (the fan-out and the endpoint) with the same bytes; its pilot draws climb levels."""
    from scipy import stats as sps

    scenario = {"kind": "extreme", "proposal": "fitted", "pilot_draws": 300}
    request = ask(tmp_path / "fit.zarr", members=40, scenario=scenario)
    gen = Generator(request, model)
    fit = gen.fitted
    assert fit is not None and fit.pilot_draws == 300 * len(fit.levels)
    assert all(b > a for a, b in zip(fit.levels, fit.levels[1:], strict=False))
    z, w = gen.proposal.draw(request.seed, np.arange(200))
    a = request.scenario.defensive
    log_p = sps.norm.logpdf(z).sum(axis=1)
    log_fit = sps.multivariate_normal(fit.mean, fit.covariance).logpdf(z)
    np.testing.assert_allclose(w, 1.0 / (a + (1 - a) * np.exp(log_fit - log_p)), rtol=1e-9)
    generate(request, model=model)
    ens = xr.open_zarr(request.output, consolidated=False)
    np.testing.assert_array_equal(ens.fitted_mean.values, fit.mean)
    np.testing.assert_array_equal(ens.fitted_covariance.values, fit.covariance)
    assert ens.attrs["fit_pilot_draws"] == fit.pilot_draws
    pinned = Generator(request, model, steering=gen.steering)
    x, wk = pinned.draws(np.array([5]))
    assert x[0].tobytes() == ens.precip.values[5].tobytes() and wk[0] == ens.weight.values[5]
    with pytest.raises(EnsembleError, match="pinned fit has 3 numbers"):
        Generator(request, model, steering=np.ones(3))
    with pytest.raises(ValidationError, match="shift proposal"):
        ask(tmp_path / "x.zarr", scenario={**scenario, "direction": [1.0] * 4})


def test_exceedance_by_hand():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    weights = np.array([0.5, 1.0, 1.5, 1.0])
    e = extremes.exceedance_probability(values, [2.5, 0.0, 10.0], weights, draws=8)
    # sorted thresholds 0, 2.5, 10: (0.5 + 1 + 1.5 + 1) / 8, (1.5 + 1) / 8, 0
    assert e.thresholds.tolist() == [0.0, 2.5, 10.0]
    assert e.probability.tolist() == pytest.approx([0.5, 0.3125, 0.0])
    assert e.effective_members == pytest.approx(4.0**2 / (0.25 + 1 + 2.25 + 1))
    assert extremes.return_period(np.array([0.01, 0.0]), 10).tolist() == [10.0, np.inf]
    with pytest.raises(ValueError, match="fewer than members"):
        extremes.exceedance_probability(values, [1.0], weights, draws=2)


# ------------------------------------------------------------------------ registry and clouds


@pytest.fixture
def registered(tmp_path, mlflow_state):
    uri = tracking.setup(f"sqlite:///{tmp_path}/mlflow/mlflow.db", experiment="tests")
    version, _ = tracking.log_and_register(tiny(), name="ens-vae", tags={"dataset": "synthetic"})
    return uri, version


def test_alias_is_resolved_and_pinned_in_the_store(tmp_path, registered):
    uri, version = registered
    req = ask(tmp_path / "ens.zarr", model="models:/ens-vae@candidate", members=64)
    result = generate(req, tracking_uri=uri)
    assert result.model_version == f"models:/ens-vae/{version}"
    ds = xr.open_zarr(req.output, consolidated=False)
    assert ds.attrs["model_uri"] == "models:/ens-vae@candidate"
    assert ds.attrs["mlflow_run_id"]
    for bad in ("models:/ens-vae@nope", "models:/ens-vae/99", "models:/unknown@candidate"):
        with pytest.raises(EnsembleError, match="not found in the registry"):
            resolve(bad, tracking_uri=uri)
    with pytest.raises(EnsembleError, match="models:/NAME@ALIAS"):
        resolve("runs:/abc/model", tracking_uri=uri)


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/ensemble.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_batch_job_generates_resumes_and_refuses_bad_requests(tmp_path, registered):
    uri, version = registered
    out = str(tmp_path / "job.zarr")
    common = ["--model", "models:/ens-vae@candidate", "--tracking-uri", uri, "--output", out]
    first = run_job(*common, "--members", "200", "--seed", "3", "--chunk-members", "64")
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"ensemble: {out}" in first.stdout
    assert xr.open_zarr(out, consolidated=False).precip.shape == (200, *WINDOW)
    again = run_job(*common, "--members", "200", "--seed", "3", "--chunk-members", "64")
    assert again.returncode == 0 and '"chunks_written": 0' in again.stdout

    for args, words in [
        (["--members", "-3"], "members"),
        (["--members", "10", "--model", "models:/ens-vae@nope"], "not found in the registry"),
        (["--members", "10", "--seed", "4"], "different ensemble"),
        (["--members", "10", "--scenario", "extreme", "--threshold", "-1"], "threshold"),
    ]:
        bad = run_job(*common, *args)
        assert bad.returncode == 2, (args, bad.stderr[-2000:])
        assert words in bad.stderr, (args, bad.stderr[-2000:])
        assert "Traceback" not in bad.stderr


@pytest.mark.integration
@pytest.mark.parametrize("cloud", ["s3_server", "gcs_server"])
def test_thousand_members_land_in_object_storage_and_reopen(cloud, request, model):
    server = request.getfixturevalue(cloud)
    bucket = server.make_bucket("ensembles")
    url = f"{bucket}/run-1/ens.zarr"
    req = ask(url, members=1000, chunk_members=250, batch_size=50)
    req = req.model_copy(
        update={"storage": req.storage.model_copy(update={"options": server.options})}
    )
    result = generate(req, model=model)
    assert result.chunks_written == 4
    ds = xr.open_zarr(url, consolidated=False, storage_options=server.options)
    assert ds.precip.shape == (1000, *WINDOW)
    x, _ = regenerate(req, [999], model=model)
    assert x[0].tobytes() == ds.precip.values[999].tobytes()
    assert read_marker(url, server.options)["members"] == 1000
