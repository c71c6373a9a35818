"""ingest / open_store / describe: source archive -> analysis-ready Zarr store + statistics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from samples import needs_data

from cloudburst.data import ingest as ingest_mod
from cloudburst.data.ingest import (
    MARKER,
    StoreError,
    default_chunks,
    describe,
    ingest,
    open_store,
)
from cloudburst.data.sources import SourceError, open_source


def rain(shape: tuple[int, ...], seed: int = 0, nan_frac: float = 0.0) -> np.ndarray:
    """Sparse gamma rain with exact zeros and optional NaNs."""
    rng = np.random.default_rng(seed)
    v = rng.gamma(0.6, 4.0, shape).astype("float32")
    v[rng.random(shape) < 0.5] = 0.0
    if nan_frac:
        v[rng.random(shape) < nan_frac] = np.nan
    return v


def grid_ds(
    values: np.ndarray,
    *,
    freq: str = "1D",
    units: str = "mm/day",
    coords: str = "latlon1d",
    name: str = "pr",
) -> xr.Dataset:
    nt, ny, nx = values.shape
    times = pd.date_range("2001-01-01", periods=nt, freq=freq)
    if coords == "latlon1d":
        lat = 20.0 - 0.5 * np.arange(ny)  # descending, as CHIRPS
        lon = 70.0 + 0.5 * np.arange(nx)
        return xr.Dataset(
            {name: (("time", "lat", "lon"), values, {"units": units})},
            coords={"time": times, "lat": lat, "lon": lon},
        )
    if coords == "latlon2d":
        jj, ii = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        lat = 50.0 + 0.3 * jj + 0.05 * ii  # a sheared (rotated-like) grid
        lon = -3.0 + 0.4 * ii - 0.05 * jj
        return xr.Dataset(
            {name: (("time", "rlat", "rlon"), values, {"units": units})},
            coords={
                "time": times,
                "lat": (("rlat", "rlon"), lat),
                "lon": (("rlat", "rlon"), lon),
            },
        )
    if coords == "xy":
        return xr.Dataset(
            {name: (("time", "y", "x"), values, {"units": units})},
            coords={"time": times, "y": 1000.0 * np.arange(ny), "x": 1000.0 * np.arange(nx)},
        )
    raise AssertionError(coords)


def to_nc(ds: xr.Dataset, path: Path) -> str:
    ds.to_netcdf(path)
    return str(path)


def mtimes(root: Path) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(root)
        for f in files
    }


def run(source, target, **kw) -> ingest_mod.IngestResult:
    return ingest(source, str(target), progress=False, **kw)


def block_mean(v: np.ndarray, k: int) -> np.ndarray:
    nt, ny, nx = v.shape
    ty, tx = ny // k, nx // k
    b = v[:, : ty * k, : tx * k].reshape(nt, ty, k, tx, k)
    return b.mean(axis=(2, 4))  # NaN anywhere in a block makes it NaN


# ---------------------------------------------------------------------------- values, stats


def test_store_holds_the_normalised_source(tmp_path):
    v = rain((12, 5, 7), nan_frac=0.1)
    src = to_nc(grid_ds(v, freq="3h", units="mm"), tmp_path / "s.nc")
    res = run(src, tmp_path / "st.zarr")
    assert not res.skipped and res.shape == (12, 5, 7)
    assert (tmp_path / "st.zarr" / "zarr.json").exists()
    assert (tmp_path / "st.zarr" / MARKER).exists()
    ds, stats = open_store(str(tmp_path / "st.zarr"))
    expected = open_source(src)
    np.testing.assert_array_equal(ds["precip"].values, expected["precip"].values)
    np.testing.assert_allclose(ds["precip"].values, v / 3, rtol=1e-6)  # mm per 3 h -> mm/h
    np.testing.assert_array_equal(ds["time"].values, expected["time"].values)
    np.testing.assert_array_equal(ds["lat"].values, expected["lat"].values)
    np.testing.assert_array_equal(ds["lon"].values, expected["lon"].values)
    assert ds["precip"].dtype == np.float32
    assert ds["precip"].attrs["units"] == "mm/h"
    assert ds["precip"].attrs["source_variable"] == "pr"
    assert stats.units == "mm/h"


def test_stats_equal_numpy(tmp_path):
    v = rain((30, 6, 8), seed=3, nan_frac=0.15)
    res = run(grid_ds(v), tmp_path / "s.zarr", bins=16)
    ds, stats = open_store(str(tmp_path / "s.zarr"))
    vals = ds["precip"].values
    valid = vals[~np.isnan(vals)]
    assert stats.count == valid.size
    assert stats.nan_fraction == pytest.approx(np.isnan(vals).mean())
    assert stats.max == pytest.approx(float(valid.max()))
    assert stats.mean == pytest.approx(float(valid.astype(np.float64).mean()), rel=1e-9)
    assert stats.wet_fraction == pytest.approx((valid > 0).mean())
    for q in ingest_mod.QUANTILES:
        assert stats.quantile(q) == pytest.approx(
            float(np.nanquantile(vals.astype(np.float64), q)), rel=1e-6, abs=1e-9
        ), q
    edges = np.asarray(stats.histogram_edges)
    assert stats.bins == 16 and len(edges) == 17
    assert edges[0] == 0.0 and edges[-1] == pytest.approx(stats.max)
    assert np.all(np.diff(edges) > 0)
    assert sum(stats.histogram_counts) == valid.size
    np.testing.assert_array_equal(stats.histogram_counts, np.histogram(valid, bins=edges)[0])
    assert res.stats == stats


def test_quantiles_with_mostly_dry_data(tmp_path):
    v = np.zeros((20, 4, 4), "float32")
    v[3, 1, 1], v[7, 2, 3], v[19, 0, 0] = 5.0, 10.0, 1.0
    stats = run(grid_ds(v), tmp_path / "d.zarr").stats
    for q in ingest_mod.QUANTILES:
        assert stats.quantile(q) == pytest.approx(
            float(np.quantile(v.astype(np.float64), q)), abs=1e-9
        )
    assert stats.max == 10.0 and stats.wet_fraction == pytest.approx(3 / v.size)


def test_describe(tmp_path):
    v = rain((10, 4, 6), nan_frac=0.1)
    src = to_nc(grid_ds(v, freq="1h", units="mm/h"), tmp_path / "h.nc")
    run(src, tmp_path / "h.zarr", chunks={"time": 4})
    info = describe(str(tmp_path / "h.zarr"))
    _, stats = open_store(str(tmp_path / "h.zarr"))
    assert info["variable"] == "precip" and info["source_variable"] == "pr"
    assert info["units"] == "mm/h"
    assert info["dims"] == ["time", "y", "x"] and info["shape"] == [10, 4, 6]
    assert info["chunks"] == {"time": 4, "y": 4, "x": 6}
    assert info["time_step_hours"] == 1.0
    assert info["time_start"] == "2001-01-01T00:00:00"
    assert info["time_end"] == "2001-01-01T09:00:00"
    assert {"lat", "lon", "time"} <= set(info["coords"])
    assert info["nan_fraction"] == stats.nan_fraction and info["max"] == stats.max
    assert info["quantiles"] == stats.quantiles
    assert info["source"] == src
    json.dumps(info)  # printable as JSON


def test_hourly_time_survives_block_writes(tmp_path):
    v = rain((50, 3, 3))
    src = grid_ds(v, freq="1h", units="mm/h")
    run(src, tmp_path / "h.zarr", chunks={"time": 7})
    ds, _ = open_store(str(tmp_path / "h.zarr"))
    np.testing.assert_array_equal(ds["time"].values, src["time"].values)
    np.testing.assert_array_equal(ds["precip"].values, v)


def test_time_range(tmp_path):
    v = rain((10, 3, 3))
    res = run(grid_ds(v), tmp_path / "t.zarr", time_start="2001-01-03", time_end="2001-01-06")
    ds, _ = open_store(str(tmp_path / "t.zarr"))
    assert res.shape == (4, 3, 3)
    np.testing.assert_array_equal(ds["precip"].values, v[2:6])


# ---------------------------------------------------------------------------- region


def test_bbox_crop_1d_lat_lon(tmp_path):
    v = rain((4, 10, 12), seed=1)
    src = grid_ds(v)  # lat 20.0 .. 15.5 (descending), lon 70.0 .. 75.5
    res = run(src, tmp_path / "c.zarr", bbox=(71.0, 17.0, 73.2, 18.6))
    ds, stats = open_store(str(tmp_path / "c.zarr"))
    lat, lon = src["lat"].values, src["lon"].values
    rows = np.nonzero((lat >= 17.0) & (lat <= 18.6))[0]
    cols = np.nonzero((lon >= 71.0) & (lon <= 73.2))[0]
    assert res.shape == (4, rows.size, cols.size)
    np.testing.assert_array_equal(ds["lat"].values, lat[rows])
    np.testing.assert_array_equal(ds["lon"].values, lon[cols])
    np.testing.assert_array_equal(ds["precip"].values, v[:, rows][:, :, cols])
    assert stats.count == rows.size * cols.size * 4  # statistics of the region only


def test_bbox_crop_0_360_longitudes(tmp_path):
    v = rain((3, 4, 8))
    src = grid_ds(v)
    src = src.assign_coords(lon=np.array([350.0, 352, 354, 356, 358, 0, 2, 4]))
    res = run(src, tmp_path / "w.zarr", bbox=(-5.0, 15.0, 1.0, 21.0))
    ds, _ = open_store(str(tmp_path / "w.zarr"))
    assert res.shape == (3, 4, 3)
    np.testing.assert_array_equal(ds["precip"].values, v[:, :, 3:6])


def test_bbox_crop_2d_lat_lon(tmp_path):
    v = rain((3, 9, 11), seed=2)
    src = grid_ds(v, coords="latlon2d")
    bbox = (-2.0, 51.0, 0.0, 52.0)
    run(src, tmp_path / "c2.zarr", bbox=bbox)
    ds, _ = open_store(str(tmp_path / "c2.zarr"))
    lat, lon = src["lat"].values, src["lon"].values
    inside = (lon >= bbox[0]) & (lon <= bbox[2]) & (lat >= bbox[1]) & (lat <= bbox[3])
    ys, xs = np.nonzero(inside)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    np.testing.assert_array_equal(ds["precip"].values, v[:, sl[0], sl[1]])
    np.testing.assert_array_equal(ds["lat"].values, lat[sl])
    np.testing.assert_array_equal(ds["lon"].values, lon[sl])
    assert ds["lat"].dims == ("y", "x")


def test_bbox_crop_x_y(tmp_path):
    v = rain((3, 8, 10), seed=4)
    run(grid_ds(v, coords="xy"), tmp_path / "xy.zarr", bbox=(2500.0, 1000.0, 5000.0, 4200.0))
    ds, _ = open_store(str(tmp_path / "xy.zarr"))
    np.testing.assert_array_equal(ds["y"].values, [1000.0, 2000.0, 3000.0, 4000.0])
    np.testing.assert_array_equal(ds["x"].values, [3000.0, 4000.0, 5000.0])
    np.testing.assert_array_equal(ds["precip"].values, v[:, 1:5, 3:6])


def test_bbox_crop_projection_coordinates_and_2d_latitude_longitude(tmp_path):
    # UKCP18-like: projection_[yx]_coordinate dims plus 2-D latitude/longitude
    v = rain((2, 6, 7))
    src = grid_ds(v, coords="latlon2d").rename(
        rlat="projection_y_coordinate",
        rlon="projection_x_coordinate",
        lat="latitude",
        lon="longitude",
    )
    src = src.assign_coords(
        projection_y_coordinate=2200.0 * np.arange(6), projection_x_coordinate=2200.0 * np.arange(7)
    )
    cropped = ingest_mod.crop(open_source(src), (-2.0, 50.5, 0.0, 51.5))
    lat, lon = src["latitude"].values, src["longitude"].values
    inside = (lon >= -2) & (lon <= 0) & (lat >= 50.5) & (lat <= 51.5)
    ys, xs = np.nonzero(inside)
    assert cropped.sizes["y"] == ys.max() - ys.min() + 1
    assert cropped.sizes["x"] == xs.max() - xs.min() + 1
    projected = ingest_mod.crop(
        open_source(src.drop_vars(["latitude", "longitude"])), (2000.0, 4000.0, 7000.0, 9000.0)
    )
    np.testing.assert_array_equal(
        projected["projection_x_coordinate"].values, [2200.0, 4400.0, 6600.0]
    )
    np.testing.assert_array_equal(
        projected["projection_y_coordinate"].values, [4400.0, 6600.0, 8800.0]
    )


def test_bbox_selecting_nothing_names_the_extent(tmp_path):
    src = grid_ds(rain((3, 4, 5)))  # lat 18.5..20, lon 70..72
    with pytest.raises(SourceError, match="selects no cell") as err:
        run(src, tmp_path / "n.zarr", bbox=(10.0, 0.0, 20.0, 5.0))
    msg = str(err.value)
    assert "lon/lat" in msg and "[70, 18.5, 72, 20]" in msg
    assert not (tmp_path / "n.zarr").exists()


@pytest.mark.parametrize("k", [2, 4])
def test_coarsen_equals_numpy_block_mean(tmp_path, k):
    v = rain((5, 10, 9), seed=k, nan_frac=0.05)
    src = grid_ds(v)
    res = run(src, tmp_path / f"k{k}.zarr", coarsen_by=k)
    ds, stats = open_store(str(tmp_path / f"k{k}.zarr"))
    expected = block_mean(v, k)
    assert res.shape == expected.shape
    np.testing.assert_allclose(ds["precip"].values, expected, rtol=1e-6)
    assert np.array_equal(np.isnan(ds["precip"].values), np.isnan(expected))
    assert np.isnan(expected).any()  # the test really exercises NaN propagation
    lat = src["lat"].values[: (10 // k) * k].reshape(-1, k).mean(axis=1)
    np.testing.assert_allclose(ds["lat"].values, lat)
    assert stats.count == np.isfinite(expected).sum()
    assert ds.attrs["cloudburst_coarsen"] == k


def test_coarsen_2d_lat_lon_coordinates(tmp_path):
    v = rain((2, 6, 8))
    src = grid_ds(v, coords="latlon2d")
    run(src, tmp_path / "c.zarr", coarsen_by=2)
    ds, _ = open_store(str(tmp_path / "c.zarr"))
    lat = src["lat"].values.reshape(3, 2, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(ds["lat"].values, lat)
    np.testing.assert_allclose(ds["precip"].values, block_mean(v, 2), rtol=1e-6)


def test_coarsen_larger_than_region(tmp_path):
    with pytest.raises(SourceError, match="cannot coarsen 4x5 cells by 6"):
        run(grid_ds(rain((3, 4, 5))), tmp_path / "k.zarr", coarsen_by=6)
    assert not (tmp_path / "k.zarr").exists()


def test_all_nan_region_raises_and_leaves_nothing(tmp_path):
    v = rain((4, 6, 6))
    v[:, :, :3] = np.nan  # the western half has no data (sea)
    src = grid_ds(v)  # lon 70.0 .. 72.5
    with pytest.raises(SourceError, match="every value .* is NaN"):
        run(src, tmp_path / "sea.zarr", bbox=(69.0, 0.0, 71.0, 90.0))
    assert not (tmp_path / "sea.zarr").exists()


# ---------------------------------------------------------------------------- chunks


def test_default_chunks_function():
    assert default_chunks(100, 48, 48) == {"time": 100, "y": 48, "x": 48}
    assert default_chunks(1000, 300, 300) == {"time": 16, "y": 256, "x": 256}
    assert default_chunks(1000, 2048, 2048, min_time=32) == {"time": 32, "y": 256, "x": 256}
    c = default_chunks(10_000, 64, 64)
    assert c["time"] * 64 * 64 * 4 <= ingest_mod.CHUNK_TARGET_BYTES


def test_default_chunk_layout_in_store(tmp_path):
    res = run(grid_ds(rain((40, 6, 5))), tmp_path / "d.zarr")
    assert res.chunks == default_chunks(40, 6, 5) == {"time": 40, "y": 6, "x": 5}
    assert zarr.open_array(str(tmp_path / "d.zarr" / "precip"), mode="r").chunks == (40, 6, 5)


def test_explicit_chunk_layout(tmp_path):
    v = rain((20, 6, 10))
    res = run(grid_ds(v), tmp_path / "e.zarr", chunks={"time": 3, "y": 4, "x": 50})
    assert res.chunks == {"time": 3, "y": 4, "x": 10}  # clipped to the data
    arr = zarr.open_array(str(tmp_path / "e.zarr" / "precip"), mode="r")
    assert arr.chunks == (3, 4, 10)
    assert arr.metadata.zarr_format == 3
    np.testing.assert_array_equal(arr[:], v)


# ---------------------------------------------------------------------------- idempotence


def test_rerun_is_skipped_and_touches_nothing(tmp_path):
    src = to_nc(grid_ds(rain((8, 4, 4), nan_frac=0.1)), tmp_path / "s.nc")
    target = tmp_path / "i.zarr"
    first = run(src, target, chunks={"time": 2})
    before = mtimes(target)
    again = run(src, target, chunks={"time": 2})
    assert again.skipped and not first.skipped
    assert mtimes(target) == before
    assert again.stats == first.stats and again.shape == first.shape


@pytest.mark.parametrize(
    "change",
    [{"bins": 10}, {"bbox": (70.4, 18.0, 72.0, 20.0)}, {"coarsen_by": 2}, {"units": "m"}],
)
def test_changed_request_rewrites(tmp_path, change):
    v = rain((6, 4, 4))
    src = to_nc(grid_ds(v, units="mm"), tmp_path / "s.nc")
    target = tmp_path / "r.zarr"
    run(src, target)
    res = run(src, target, **change)
    assert not res.skipped
    ds, stats = open_store(str(target))
    expected = ingest_mod.coarsen(
        ingest_mod.crop(open_source(src, units=change.get("units")), change.get("bbox")),
        change.get("coarsen_by", 1),
    )
    np.testing.assert_allclose(ds["precip"].values, expected["precip"].values, rtol=1e-6)
    assert stats.bins == change.get("bins", 100)
    marker = json.loads((target / MARKER).read_text())
    assert marker["request"]["bins"] == stats.bins
    assert run(src, target, **change).skipped


def test_interrupted_ingest_leaves_no_usable_store(tmp_path, monkeypatch):
    # ingest writes blocks of whole time chunks of about WRITE_BLOCK_BYTES; with blocks of one
    # 4-step chunk, 5 steps make two blocks, so the failure comes after one block was written
    v = np.zeros((5, 32, 32), "float32")
    v[:, ::7, ::5] = 1.5
    monkeypatch.setattr(ingest_mod, "WRITE_BLOCK_BYTES", 4 * 32 * 32 * 4)
    src = grid_ds(v, freq="1h", units="mm/h", coords="xy")
    calls = []
    real_add = ingest_mod.StatsAccumulator.add

    def failing_add(self, block):
        calls.append(block.shape[0])
        if len(calls) == 2:
            raise RuntimeError("disk full (simulated)")
        real_add(self, block)

    monkeypatch.setattr(ingest_mod.StatsAccumulator, "add", failing_add)
    target = tmp_path / "x.zarr"
    with pytest.raises(RuntimeError, match="simulated"):
        run(src, target, chunks={"time": 4})
    assert calls == [4, 1]
    # whether what was written is removed or left without its marker, nothing opens
    assert not (target / MARKER).exists()
    with pytest.raises(StoreError, match="incomplete|no store at"):
        open_store(str(target))


def test_failed_rewrite_does_not_leave_the_old_store_complete(tmp_path, monkeypatch):
    src = grid_ds(rain((6, 4, 4)))
    target = tmp_path / "o.zarr"
    run(src, target)

    def boom(self, block):
        raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(ingest_mod.StatsAccumulator, "add", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        run(src, target, bins=12)
    with pytest.raises(StoreError):
        open_store(str(target))


def test_markerless_store_is_refused_then_repaired(tmp_path):
    src = grid_ds(rain((6, 4, 4)))
    target = tmp_path / "m.zarr"
    run(src, target)
    (target / MARKER).unlink()  # as if the process died before the marker
    for fn in (open_store, describe):
        with pytest.raises(StoreError, match="incomplete") as err:
            fn(str(target))
        assert "Re-run the ingest" in str(err.value)
    res = run(src, target)
    assert not res.skipped
    ds, _ = open_store(str(target))
    np.testing.assert_array_equal(ds["precip"].values, src["pr"].values)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no store at") as err:
        open_store(str(tmp_path / "nothing.zarr"))
    assert "cloudburst ingest" in str(err.value)


def test_non_store_directory_refused_and_left_intact(tmp_path):
    target = tmp_path / "mydata"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    (target / "sub").mkdir()
    (target / "sub" / "a.csv").write_text("1,2")
    before = mtimes(target)
    with pytest.raises(StoreError, match="not a Cloudburst store"):
        run(grid_ds(rain((4, 3, 3))), target)
    assert mtimes(target) == before
    assert (target / "notes.txt").read_text() == "precious"


def test_empty_directory_target_is_used(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    run(grid_ds(rain((4, 3, 3))), target)
    assert open_store(str(target))[0].sizes["time"] == 4


def test_bins_below_two_rejected(tmp_path):
    with pytest.raises(ValueError, match="bins must be >= 2"):
        run(grid_ds(rain((4, 3, 3))), tmp_path / "b.zarr", bins=1)


# ---------------------------------------------------------------------------- real samples


@pytest.mark.data
def test_real_chirps_crop_coarsen_and_stats(tmp_path):
    path = str(needs_data("chirps_nicaragua_daily_1981_1985.nc"))
    bbox = (-87.5, 11.5, -83.5, 15.0)  # reaches the Caribbean: NaN over sea
    res = run(path, tmp_path / "chirps.zarr", bbox=bbox, coarsen_by=2, time_end="1982-12-31")
    ds, stats = open_store(str(tmp_path / "chirps.zarr"))
    full = open_source(path, time_end="1982-12-31")
    raw = ingest_mod.crop(full, bbox)["precip"].values
    expected = block_mean(raw, 2)
    assert res.shape == expected.shape
    vals = ds["precip"].values
    np.testing.assert_allclose(vals, expected, rtol=1e-5)
    assert np.array_equal(np.isnan(vals), np.isnan(expected))
    assert 0 < stats.nan_fraction < 1
    for q in (0.5, 0.99, 0.999):
        assert stats.quantile(q) == pytest.approx(float(np.nanquantile(vals, q)), rel=1e-5)
    assert stats.max == pytest.approx(float(np.nanmax(vals)))
    assert ds["precip"].attrs["units"] == "mm/day"
