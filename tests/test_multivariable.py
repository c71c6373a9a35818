"""Stores of several variables (channels on one grid): ingest with bicubic regridding, each
variable's own statistics, paired windows in the loader, and hold-out of whole frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from pydantic import ValidationError
from samples import needs_data

from cloudburst import storage
from cloudburst.config import DataConfig, IngestConfig, SplitConfig, WindowConfig
from cloudburst.data.ingest import (
    MARKER,
    StoreError,
    describe,
    ingest,
    ingest_config,
    open_store,
    variable_stats,
)
from cloudburst.data.loader import WindowDataset, dataset_for, make_loader
from cloudburst.data.sources import SourceError
from cloudburst.data.windows import WindowError, build_index, parse_split, split_index

NT, NYC, NXC, K = 4, 7, 9, 3  # coarse grid; the fine grid is K times finer
STEP = 3000.0


def grids() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fine y, fine x, coarse y, coarse x): x decreasing; every coarse point is a fine point;
    the fine grid reaches one fine column past the coarse extent in x (outside it)."""
    yc = 4.2e6 + STEP * np.arange(NYC)
    xc = 27000.0 - STEP * np.arange(NXC)
    yf = yc[0] + (STEP / K) * np.arange(K * (NYC - 1) + 1)
    xf = xc[0] + STEP / K - (STEP / K) * np.arange(K * (NXC - 1) + 2)
    return yf, xf, yc, xc


def quadratic(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A smooth field, in coordinates scaled to about a unit per coarse cell."""
    u, v = (y - 4.2e6) / STEP, (x - 27000.0) / STEP
    return 200.0 + 6.0 * u - 4.0 * v + 0.8 * u * u - 0.5 * u * v + 0.3 * v * v


def pair_source(path, smooth: bool = False) -> str:
    """A NetCDF of raw counts: ``vis`` (int16) on the fine grid, ``nir`` (int16, or the
    quadratic as float32 with ``smooth``) on the coarse grid, dims named as SEVIRI's."""
    yf, xf, yc, xc = grids()
    rng = np.random.default_rng(3)
    times = pd.date_range("2020-04-01T12:00", periods=NT, freq="5min")
    vis = rng.integers(40, 700, (NT, len(yf), len(xf))).astype(np.int16)
    if smooth:
        yy, xx = np.meshgrid(yc, xc, indexing="ij")
        nir = np.broadcast_to(quadratic(yy, xx), (NT, NYC, NXC)).astype(np.float32)
    else:
        nir = rng.integers(0, 860, (NT, NYC, NXC)).astype(np.int16)
    ds = xr.Dataset(
        {
            "vis": (("time", "y_hrv", "x_hrv"), vis, {"long_name": "visible counts"}),
            "nir": (("time", "y", "x"), nir, {"long_name": "near-infrared counts"}),
        },
        coords={
            "time": times,
            "y_hrv": ("y_hrv", yf, {"units": "m"}),
            "x_hrv": ("x_hrv", xf, {"units": "m"}),
            "y": ("y", yc, {"units": "m"}),
            "x": ("x", xc, {"units": "m"}),
        },
    )
    ds.to_netcdf(path)
    return str(path)


def ingest_pair(src: str, target, **kw):
    kw.setdefault("variables", ["vis", "nir"])
    kw.setdefault("grid", "vis")
    return ingest(src, str(target), progress=False, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    src = pair_source(root / "pair.nc")
    store = root / "pair.zarr"
    result = ingest_pair(src, store, units={"vis": "1", "nir": "1"}, bins=12)
    return src, str(store), result


# ---------------------------------------------------------------------------- ingest


def test_fine_variable_is_the_source_and_coarse_one_matches_at_coincident_points(pair):
    src, store, result = pair
    ds, _ = open_store(store)
    raw = xr.open_dataset(src)
    yf, xf, yc, xc = grids()
    assert result.shape == (NT, len(yf), len(xf))
    assert set(ds.data_vars) == {"vis", "nir"}
    assert ds["vis"].dtype == np.float32 and ds["nir"].dtype == np.float32
    np.testing.assert_array_equal(ds["y"].values, yf)
    np.testing.assert_array_equal(ds["x"].values, xf)
    np.testing.assert_array_equal(ds["vis"].values, raw["vis"].values.astype(np.float32))
    # coarse point (j, i) is fine point (K j, 1 + K i)
    nir = ds["nir"].values
    np.testing.assert_array_equal(nir[:, ::K, 1::K], raw["nir"].values.astype(np.float32))
    # the fine column past the coarse extent is NaN, and counted
    assert np.isnan(nir[:, :, 0]).all() and not np.isnan(nir[:, :, 1:]).any()
    assert ds["nir"].attrs["regrid_outside_cells"] == len(yf)
    assert ds["nir"].attrs["units"] == "1"
    assert "regrid_outside_cells" not in ds["vis"].attrs


def test_bicubic_regridding_reproduces_a_quadratic_field(tmp_path):
    src = pair_source(tmp_path / "smooth.nc", smooth=True)
    ingest_pair(src, tmp_path / "s.zarr")
    ds, _ = open_store(str(tmp_path / "s.zarr"))
    yf, xf, _, _ = grids()
    yy, xx = np.meshgrid(yf, xf, indexing="ij")
    exact = quadratic(yy, xx)[:, 1:]  # inside the coarse extent
    got = ds["nir"].values[:, :, 1:]
    # cubic convolution is exact for quadratics: what is left is float32 rounding of the
    # inputs and the output, each at most eps * max|f| scaled by the weights' sum of |w| (< 2)
    tol = 4 * np.finfo(np.float32).eps * float(np.abs(exact).max())
    assert np.abs(got - exact).max() <= tol
    # a curved field at this spacing (linear interpolation would miss it by far more than tol)
    assert np.abs(np.diff(exact, 2, axis=0)).min() > 10 * tol


def test_statistics_per_variable_equal_numpys(pair):
    _, store, result = pair
    ds, first = open_store(store)
    per = variable_stats(store)
    assert set(per) == {"vis", "nir"} and first == per["vis"] and result.variables == per
    for name, stats in per.items():
        values = ds[name].values
        valid = values[~np.isnan(values)]
        assert stats.count == valid.size
        assert stats.nan_fraction == pytest.approx(np.isnan(values).mean())
        assert stats.min == float(valid.min()) and stats.max == float(valid.max())
        assert stats.mean == pytest.approx(float(valid.astype(np.float64).mean()), rel=1e-12)
        assert stats.wet_fraction == pytest.approx((valid > 0).mean())
        for q, v in stats.quantiles.items():
            assert v == pytest.approx(float(np.quantile(valid, float(q))), rel=1e-6), (name, q)
        edges = np.linspace(float(valid.min()), float(valid.max()), 13)
        np.testing.assert_allclose(stats.histogram_edges, edges)
        np.testing.assert_array_equal(stats.histogram_counts, np.histogram(valid, bins=edges)[0])
        assert stats.units == "1"


def test_statistics_are_exact_for_negative_values_and_ties(tmp_path):
    rng = np.random.default_rng(0)
    t = pd.date_range("2001-01-01", periods=6, freq="1h")
    a = rng.normal(-3.0, 50.0, (6, 5, 8)).astype(np.float32)
    a[a > 40] = -0.0
    a[0, 0, :3] = np.nan
    b = np.round(rng.gamma(2.0, 3.0, (6, 5, 8))).astype(np.float32)  # many ties
    ds = xr.Dataset(
        {"a": (("time", "y", "x"), a), "b": (("time", "y", "x"), b)},
        coords={"time": t, "y": np.arange(5.0), "x": np.arange(8.0)},
    )
    res = ingest(ds, str(tmp_path / "n.zarr"), variables=["a", "b"], progress=False)
    for name, v in (("a", a), ("b", b)):
        valid = v[~np.isnan(v)]
        st = res.variables[name]
        assert st.min == float(valid.min())
        for q, got in st.quantiles.items():
            assert got == pytest.approx(float(np.quantile(valid, float(q))), rel=1e-6, abs=1e-6)


def test_bad_variable_or_grid_names_are_refused_naming_the_choices(pair, tmp_path):
    src = pair[0]
    with pytest.raises(SourceError, match="nope") as info:
        ingest_pair(src, tmp_path / "a.zarr", variables=["vis", "nope"])
    assert "vis" in str(info.value) and "nir" in str(info.value)
    with pytest.raises(SourceError, match="grid 'ir'") as info:
        ingest_pair(src, tmp_path / "b.zarr", grid="ir")
    assert "vis, nir" in str(info.value)
    with pytest.raises(SourceError, match="different grids") as info:
        ingest_pair(src, tmp_path / "c.zarr", grid=None)
    assert "grid:" in str(info.value)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    with pytest.raises(ValidationError, match="grid 'ir' must be one of"):
        IngestConfig(source=src, variables=["vis", "nir"], grid="ir")
    with pytest.raises(ValidationError, match="not both"):
        IngestConfig(source=src, variable="vis", variables=["vis", "nir"])
    with pytest.raises(ValidationError, match="need variables"):
        IngestConfig(source=src, grid="vis")


def test_rerun_is_idempotent_and_incomplete_store_is_refused(pair, tmp_path):
    src, _, _ = pair
    store = tmp_path / "p.zarr"
    cfg = IngestConfig(source=src, target=str(store), variables=["vis", "nir"], grid="vis")
    first = ingest_config(cfg, progress=False)
    again = ingest_config(cfg, progress=False)
    assert again.skipped and again.variables == first.variables
    info = describe(str(store))
    assert set(info["variables"]) == {"vis", "nir"} and info["grid"] == "vis"
    storage.remove(storage.join(str(store), MARKER), recursive=False)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(str(store))
    with pytest.raises(FileNotFoundError, match="not a complete"):
        WindowDataset(str(store), None, variable="vis")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- loader


def test_paired_windows_are_aligned_and_scaled_by_their_own_statistics(pair):
    _, store, _ = pair
    ds, _ = open_store(store)
    windows = WindowConfig(length=1, size=8, stride=4, max_nan_fraction=0.0)
    index = build_index(ds, windows)
    assert len(index) > 0 and (index.origins[:, 2] >= 1).all()  # the NaN column is avoided
    data = DataConfig(store=store, windows=windows, input="nir", target="vis")
    per = variable_stats(store)
    dataset = dataset_for(data, index, per, shuffle=True, seed=1, rank=0, world_size=1)
    group = zarr.open_group(store, mode="r", zarr_format=3)
    seen = 0
    for batch in make_loader(dataset, batch_size=5):
        assert batch["x"].shape[1:] == (1, 1, 8, 8) and batch["target"].shape == batch["x"].shape
        for k, (t, y, x) in enumerate(batch["origin"].tolist()):
            sl = (slice(t, t + 1), slice(y, y + 8), slice(x, x + 8))
            for key, mask, name in (("x", "mask", "nir"), ("target", "target_mask", "vis")):
                raw = np.asarray(group[name][sl])
                st = per[name]
                expected = (raw - st.min) / (st.max - st.min)
                np.testing.assert_allclose(batch[key][k, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(batch[mask][k, 0].numpy(), ~np.isnan(raw))
            seen += 1
    assert seen == len(index)
    assert per["nir"].min != per["vis"].min  # two different scalings were checked


def test_loader_names_the_variables_when_input_is_missing(pair):
    _, store, _ = pair
    ds, _ = open_store(store)
    index = build_index(ds, WindowConfig(length=1, size=8, stride=8))
    with pytest.raises(ValueError, match="several variables \\(vis, nir\\)"):
        WindowDataset(store, index)
    with pytest.raises(ValueError, match="'ir' is not in the store; it has vis, nir"):
        WindowDataset(store, index, variable="vis", target="ir")
    with pytest.raises(ValidationError, match="target needs input"):
        DataConfig(store=store, target="vis")


# ---------------------------------------------------------------------------- frames split


def frame_index(n: int = 25) -> tuple[object, np.ndarray]:
    times = pd.date_range("2020-04-01T12:00", periods=n, freq="5min")
    ds = xr.Dataset(
        {"a": (("time", "y", "x"), np.zeros((n, 4, 4), np.float32))},
        coords={"time": times, "y": np.arange(4.0), "x": np.arange(4.0)},
    )
    return build_index(ds, WindowConfig(length=1, size=2, stride=2)), times.values


@pytest.mark.parametrize("guard", [0, 1])
def test_frame_hold_out_keeps_test_frames_out_of_training(guard):
    index, times = frame_index()
    split = SplitConfig(scheme="frames", every=5, val_fraction=0.2, seed=2, guard=guard)
    parts = {p: set(split_index(index, split, p).origins[:, 0].tolist()) for p in PARTS}
    assert parts["test"] == {4, 9, 14, 19, 24}
    assert parts["train"] and parts["val"]
    assert not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert not parts["train"] & parts["val"]
    if guard:
        near = {t + d for t in parts["test"] for d in (-1, 1)}
        assert not near & (parts["train"] | parts["val"])
    else:
        assert parts["train"] | parts["val"] | parts["test"] == set(range(25))


def test_frame_hold_out_by_named_times_and_errors():
    index, times = frame_index()
    split = SplitConfig(scheme="frames", test_times=["2020-04-01T12:30", "2020-04-01 13:45:00"])
    test = split_index(index, split, "test").origins[:, 0]
    assert set(test.tolist()) == {6, 21}
    train = split_index(index, split, "train").origins[:, 0]
    assert not set(train.tolist()) & {6, 21}
    with pytest.raises(WindowError, match="not a time step of the store"):
        split_index(index, SplitConfig(scheme="frames", test_times=["2020-04-01T12:31"]), "test")
    split, part = parse_split("test@frames:4")
    assert (split.scheme, split.every, part) == ("frames", 4, "test")
    with pytest.raises(ValidationError, match="belong to scheme 'frames'"):
        SplitConfig(scheme="seasons", guard=1)


PARTS = ("train", "val", "test")


# ---------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_seviri_crop_ir_values_at_coincident_hrv_points(tmp_path):
    path = needs_data("seviri_uk_20200401.nc")
    bbox = (-400000.0, 4.60e6, -250000.0, 4.70e6)  # x/y metres: 150 x 100 hrv cells
    res = ingest(
        str(path),
        str(tmp_path / "sev.zarr"),
        variables=["ir_016", "hrv"],
        grid="hrv",
        units="1",
        bbox=bbox,
        time_end="2020-04-01T12:10",
        progress=False,
    )
    assert res.shape[0] == 3 and 90 <= res.shape[1] <= 110 and 140 <= res.shape[2] <= 160
    ds, _ = open_store(str(tmp_path / "sev.zarr"))
    raw = xr.open_dataset(path).isel(time=slice(0, 3))
    hy, hx = ds["y"].values, ds["x"].values
    np.testing.assert_array_equal(
        ds["hrv"].values,
        raw["hrv"].sel(y_hrv=hy, x_hrv=hx).values.astype(np.float32),
    )
    # ir_016 points inside the crop lie within a metre or so of an hrv point (every 3rd)
    ry, rx = raw["y"].values, raw["x"].values
    iy = [(j, int(np.argmin(np.abs(hy - v)))) for j, v in enumerate(ry) if hy[0] <= v <= hy[-1]]
    ix = [(i, int(np.argmin(np.abs(hx - v)))) for i, v in enumerate(rx) if hx[-1] <= v <= hx[0]]
    assert len(iy) > 20 and len(ix) > 30
    assert max(abs(hy[h] - ry[j]) for j, h in iy) < 5 and max(abs(hx[h] - rx[i]) for i, h in ix) < 5
    stored = ds["ir_016"].values[:, [h for _, h in iy]][:, :, [h for _, h in ix]]
    source = raw["ir_016"].values[:, [j for j, _ in iy]][:, :, [i for i, _ in ix]]
    np.testing.assert_allclose(stored, source.astype(np.float32), atol=0.5)
    assert not np.isnan(ds["ir_016"].values).any()  # the crop lies inside the ir extent


def test_a_missing_value_becomes_nan_before_regridding(tmp_path):
    """0 counts mark a missing tile: they become NaN, and so does every fine cell whose
    bicubic stencil (4 x 4 coarse points) reaches one; the other cells are untouched."""
    src = pair_source(tmp_path / "tiles.nc")
    raw = xr.open_dataset(src)
    nir = raw["nir"].values.copy()
    nir[:, 3, 4] = 0  # one missing coarse point
    raw = raw.assign(nir=(raw["nir"].dims, nir, raw["nir"].attrs))
    raw.to_netcdf(tmp_path / "tiles2.nc")
    plain = ingest_pair(src, tmp_path / "plain.zarr")
    assert plain.variables is not None
    made = ingest_pair(str(tmp_path / "tiles2.nc"), tmp_path / "m.zarr", missing_values={"nir": 0})
    ds, _ = open_store(str(tmp_path / "m.zarr"))
    got = ds["nir"].values
    yf, xf, yc, xc = grids()
    # fine cell (j, i) of the coarse point (3, 4) is (3 K, 1 + 4 K): NaN, and its neighbours
    assert np.isnan(got[:, 3 * K, 1 + 4 * K]).all()
    # cells more than 2 coarse cells away in y keep finite values
    far = np.abs(yf - yc[3]) > 2 * STEP
    assert np.isfinite(got[:, far, 1:]).all()
    assert made.variables is not None and made.variables["nir"].nan_fraction > 0
    assert ds["nir"].attrs["missing_value_in_source"] == 0.0
    # vis has no missing value: unchanged
    np.testing.assert_array_equal(ds["vis"].values, raw["vis"].values.astype(np.float32))
    with pytest.raises(ValidationError, match="missing_values given for"):
        IngestConfig(variables=["vis", "nir"], grid="vis", missing_values={"ir": 0})


def test_regridded_values_stay_within_the_source_range(tmp_path):
    """Bicubic interpolation overshoots at a step; the stored values do not leave the range
    of the source values."""
    src = pair_source(tmp_path / "step.nc")
    raw = xr.open_dataset(src)
    nir = np.zeros_like(raw["nir"].values)
    nir[:, :, NXC // 2 :] = 800  # a sharp edge
    nir[:, :, : NXC // 2] = 10
    raw.assign(nir=(raw["nir"].dims, nir, raw["nir"].attrs)).to_netcdf(tmp_path / "edge.nc")
    ingest_pair(str(tmp_path / "edge.nc"), tmp_path / "e.zarr")
    ds, _ = open_store(str(tmp_path / "e.zarr"))
    got = ds["nir"].values[:, :, 1:]
    assert got.min() >= 10.0 and got.max() <= 800.0
    # the edge is still resolved between the two levels (not flattened)
    assert (got < 100).any() and (got > 700).any() and ((got > 10) & (got < 800)).any()
