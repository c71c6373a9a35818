"""sources.open_source: any archive in, one CF-normalised (time, y, x) precipitation rate out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from samples import needs_data

from cloudburst.data import references, sources
from cloudburst.data.sources import SourceError, open_source


def make_ds(
    values: np.ndarray | None = None,
    *,
    nt: int = 6,
    ny: int = 3,
    nx: int = 4,
    freq: str = "1D",
    units: str | None = "mm/day",
    name: str = "pr",
    attrs: dict | None = None,
    start: str = "2001-01-01",
) -> xr.Dataset:
    """A (time, y, x) dataset; values default to distinct positive numbers."""
    if values is None:
        values = np.arange(1, nt * ny * nx + 1, dtype="float32").reshape(nt, ny, nx)
    nt = values.shape[0]
    a = {} if units is None else {"units": units}
    a.update(attrs or {})
    times = pd.date_range(start, periods=nt, freq=freq)
    return xr.Dataset({name: (("time", "y", "x"), values, a)}, coords={"time": times})


def write_nc(ds: xr.Dataset, path: Path, **kwargs) -> str:
    ds.to_netcdf(path, **kwargs)
    return str(path)


# ---------------------------------------------------------------------------- variable


def test_output_contract_one_float32_variable_in_time_y_x():
    out = open_source(make_ds())
    assert list(out.data_vars) == ["precip"]
    da = out["precip"]
    assert da.dims == ("time", "y", "x")
    assert da.dtype == np.float32
    assert da.attrs["units"] == "mm/day"
    assert da.attrs["standard_name"] == "lwe_precipitation_rate"
    assert da.attrs["source_variable"] == "pr"
    assert out.attrs["Conventions"] == "CF-1.8"


def test_variable_found_by_standard_name_before_name():
    ds = make_ds(name="pr", units="mm/day")
    ds["field_7"] = ds["pr"] * 2
    ds["field_7"].attrs = {"standard_name": "precipitation_flux", "units": "mm/day"}
    out = open_source(ds)
    assert out["precip"].attrs["source_variable"] == "field_7"
    np.testing.assert_allclose(out["precip"].values, ds["field_7"].values)


def test_variable_found_by_name_among_others():
    ds = make_ds(name="tas", units="K")
    ds["tp"] = ds["tas"] + 100
    ds["tp"].attrs = {"units": "mm"}
    out = open_source(ds)
    assert out["precip"].attrs["source_variable"] == "tp"
    np.testing.assert_allclose(out["precip"].values, ds["tp"].values)


def test_name_beats_units_only_match():
    ds = make_ds(name="field_1", units="kg m-2 s-1")
    ds["rainfall"] = ds["field_1"] * 0 + 3
    ds["rainfall"].attrs = {"units": "mm/day"}
    assert open_source(ds)["precip"].attrs["source_variable"] == "rainfall"


def test_variable_found_by_units_only():
    ds = make_ds(name="tas", units="K")
    ds["field_9"] = ds["tas"] + 1
    ds["field_9"].attrs = {"units": "kg m-2 s-1"}
    out = open_source(ds)
    assert out["precip"].attrs["source_variable"] == "field_9"


def test_explicit_variable_wins_over_better_match():
    ds = make_ds(name="pr", attrs={"standard_name": "precipitation_flux"})
    ds["other"] = ds["pr"] * 10
    ds["other"].attrs = {"units": "mm/day"}
    out = open_source(ds, variable="other")
    assert out["precip"].attrs["source_variable"] == "other"
    np.testing.assert_allclose(out["precip"].values, ds["other"].values)


# ---------------------------------------------------------------------------- units

UNIT_CASES = [
    # freq, units, value in file, expected value, expected units
    ("1D", "kg m-2 s-1", 1e-3, 86.4, "mm/day"),
    ("1h", "kg m-2 s-1", 1e-3, 3.6, "mm/h"),
    ("1D", "kg m**-2 s**-1", 1e-3, 86.4, "mm/day"),
    ("1D", "m", 0.002, 2.0, "mm/day"),  # metres per daily step
    ("6h", "m", 0.003, 0.5, "mm/h"),  # 3 mm in 6 hours
    ("1h", "m", 0.002, 2.0, "mm/h"),
    ("3h", "mm", 6.0, 2.0, "mm/h"),  # 3-hourly amounts become a rate
    ("1D", "mm", 5.0, 5.0, "mm/day"),
    ("1h", "mm", 1.5, 1.5, "mm/h"),
    ("1h", "mm/day", 48.0, 2.0, "mm/h"),
    ("1D", "mm/h", 1.0, 24.0, "mm/day"),
    ("1h", "mm hr-1", 2.0, 2.0, "mm/h"),
    ("1h", "mm/hour", 2.0, 2.0, "mm/h"),
    ("1D", "mm day-1", 7.0, 7.0, "mm/day"),
    ("1D", "kg m-2", 4.0, 4.0, "mm/day"),
]


@pytest.mark.parametrize(("freq", "units", "value", "expected", "out_units"), UNIT_CASES)
def test_unit_conversion(tmp_path, freq, units, value, expected, out_units):
    ds = make_ds(np.full((5, 2, 3), value, dtype="float32"), freq=freq, units=units)
    out = open_source(write_nc(ds, tmp_path / "u.nc"))
    da = out["precip"]
    assert da.attrs["units"] == out_units
    assert da.attrs["source_units"] == units
    np.testing.assert_allclose(da.values, expected, rtol=1e-5)


def test_explicit_units_for_a_file_without_them():
    ds = make_ds(np.full((4, 2, 2), 3.0, "float32"), freq="3h", units=None)
    with pytest.raises(SourceError, match="not understood"):
        open_source(ds)
    out = open_source(ds, units="mm")
    np.testing.assert_allclose(out["precip"].values, 1.0)
    assert out["precip"].attrs["units"] == "mm/h"


def test_explicit_units_override_the_file():
    ds = make_ds(np.full((4, 2, 2), 2.0, "float32"), units="mm/day")
    out = open_source(ds, units="kg m-2 s-1")
    np.testing.assert_allclose(out["precip"].values, 2.0 * 86400, rtol=1e-6)


# ---------------------------------------------------------------------------- masking


def _dirty() -> np.ndarray:
    v = np.full((4, 3, 4), 2.5, dtype="float32")
    v[0, 0, 0] = -9999.0
    v[1, 2, 3] = -9999.0
    v[2, 1, 1] = -0.5  # negative rain
    v[3, 0, 2] = np.nan
    v[3, 1, 2] = np.inf
    v[3, 2, 2] = 0.0  # dry is valid
    return v


@pytest.mark.parametrize("declared", [True, False])
def test_fill_negative_and_non_finite_become_nan(tmp_path, declared):
    ds = make_ds(_dirty())
    if declared:
        ds["pr"].encoding["_FillValue"] = -9999.0
    out = open_source(write_nc(ds, tmp_path / "f.nc"))["precip"].values
    bad = np.zeros(out.shape, bool)
    for idx in [(0, 0, 0), (1, 2, 3), (2, 1, 1), (3, 0, 2), (3, 1, 2)]:
        bad[idx] = True
    assert np.array_equal(np.isnan(out), bad)
    assert out[3, 2, 2] == 0.0
    keep = ~bad
    keep[3, 2, 2] = False
    np.testing.assert_array_equal(out[keep], 2.5)


def test_packed_int16_with_declared_fill(tmp_path):
    v = np.full((3, 2, 2), 1.2, dtype="float32")
    v[0, 0, 0] = np.nan
    ds = make_ds(v)
    ds["pr"].encoding.update({"dtype": "int16", "scale_factor": 0.1, "_FillValue": -9999})
    out = open_source(write_nc(ds, tmp_path / "p.nc"))["precip"].values
    assert np.isnan(out[0, 0, 0])
    assert np.isnan(out).sum() == 1
    np.testing.assert_allclose(out[1], 1.2, rtol=1e-6)


def test_fill_value_masked_before_unit_conversion(tmp_path):
    v = np.full((3, 2, 2), 6.0, dtype="float32")
    v[1, 1, 1] = -9999.0
    out = open_source(write_nc(make_ds(v, freq="3h", units="mm"), tmp_path / "a.nc"))
    vals = out["precip"].values
    assert np.isnan(vals[1, 1, 1]) and np.isnan(vals).sum() == 1
    np.testing.assert_allclose(vals[0], 2.0)


# ---------------------------------------------------------------------------- coordinates


def test_1d_lat_lon_dims_become_coords_along_y_x(tmp_path):
    v = np.arange(4 * 3 * 5, dtype="float32").reshape(4, 3, 5)
    lat = np.array([12.0, 11.0, 10.0])  # descending, as CHIRPS has it
    lon = np.linspace(70, 74, 5)
    ds = xr.Dataset(
        {"precip": (("time", "lat", "lon"), v, {"units": "mm/day"})},
        coords={"time": pd.date_range("2001-01-01", periods=4), "lat": lat, "lon": lon},
    )
    out = open_source(write_nc(ds, tmp_path / "ll.nc"))
    assert out["precip"].dims == ("time", "y", "x")
    assert out["lat"].dims == ("y",) and out["lon"].dims == ("x",)
    np.testing.assert_array_equal(out["lat"].values, lat)
    np.testing.assert_array_equal(out["lon"].values, lon)
    np.testing.assert_array_equal(out["precip"].values, v)


def test_latitude_longitude_dims_renamed_lat_lon():
    v = np.ones((3, 2, 4), "float32")
    ds = xr.Dataset(
        {"pr": (("time", "latitude", "longitude"), v, {"units": "mm/day"})},
        coords={
            "time": pd.date_range("2001-01-01", periods=3),
            "latitude": [1.0, 2.0],
            "longitude": [5.0, 6.0, 7.0, 8.0],
        },
    )
    out = open_source(ds)
    assert out["precip"].dims == ("time", "y", "x")
    np.testing.assert_array_equal(out["lat"].values, [1.0, 2.0])
    np.testing.assert_array_equal(out["lon"].values, [5.0, 6.0, 7.0, 8.0])
    assert "latitude" not in out.variables


def test_lon_lat_order_is_transposed_to_y_x():
    v = np.arange(3 * 4 * 2, dtype="float32").reshape(3, 4, 2)  # (time, lon, lat)
    ds = xr.Dataset(
        {"pr": (("time", "lon", "lat"), v, {"units": "mm/day"})},
        coords={
            "time": pd.date_range("2001-01-01", periods=3),
            "lon": [10.0, 11.0, 12.0, 13.0],
            "lat": [40.0, 41.0],
        },
    )
    out = open_source(ds)
    assert dict(out.sizes) == {"time": 3, "y": 2, "x": 4}
    np.testing.assert_array_equal(out["precip"].values, v.transpose(0, 2, 1))
    np.testing.assert_array_equal(out["lat"].values, [40.0, 41.0])


def test_time_not_first_is_moved_first():
    v = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 3, 4)  # (y, x, time)
    ds = xr.Dataset(
        {"pr": (("y", "x", "time"), v, {"units": "mm/h"})},
        coords={"time": pd.date_range("2001-01-01", periods=4, freq="1h")},
    )
    out = open_source(ds)
    assert out["precip"].dims == ("time", "y", "x")
    np.testing.assert_array_equal(out["precip"].values, v.transpose(2, 0, 1))


def test_1d_lat_lon_coordinates_on_y_x_dims_are_kept():
    v = np.ones((3, 2, 4), "float32")
    ds = xr.Dataset(
        {"pr": (("time", "y", "x"), v, {"units": "mm/day"})},
        coords={
            "time": pd.date_range("2001-01-01", periods=3),
            "lat": ("y", [1.0, 2.0]),
            "lon": ("x", [5.0, 6.0, 7.0, 8.0]),
            "height": 2.0,  # scalar coordinates go
        },
    )
    out = open_source(ds)
    np.testing.assert_array_equal(out["lat"].values, [1.0, 2.0])
    np.testing.assert_array_equal(out["lon"].values, [5.0, 6.0, 7.0, 8.0])
    assert "height" not in out.coords


def test_2d_lat_lon_kept_on_rotated_grid():
    v = np.ones((3, 2, 4), "float32")
    lat2 = np.add.outer([50.0, 51.0], np.arange(4) * 0.1)
    lon2 = np.add.outer([0.0, 0.2], np.arange(4.0))
    ds = xr.Dataset(
        {"pr": (("time", "rlat", "rlon"), v, {"units": "mm/h"})},
        coords={
            "time": pd.date_range("2001-01-01", periods=3, freq="1h"),
            "rlat": [0.0, 1.0],
            "rlon": [0.0, 1.0, 2.0, 3.0],
            "lat": (("rlat", "rlon"), lat2),
            "lon": (("rlat", "rlon"), lon2),
        },
    )
    out = open_source(ds)
    assert out["precip"].dims == ("time", "y", "x")
    assert out["lat"].dims == ("y", "x") and out["lon"].dims == ("y", "x")
    np.testing.assert_array_equal(out["lat"].values, lat2)
    np.testing.assert_array_equal(out["lon"].values, lon2)


def test_projected_x_y_kept(tmp_path):
    v = np.ones((3, 2, 4), "float32")
    y = np.array([2200.0, 0.0])
    x = np.arange(4) * 2200.0
    ds = xr.Dataset(
        {"pr": (("time", "y", "x"), v, {"units": "mm/h"})},
        coords={"time": pd.date_range("2001-01-01", periods=3, freq="1h"), "y": y, "x": x},
    )
    out = open_source(write_nc(ds, tmp_path / "xy.nc"))
    np.testing.assert_array_equal(out["y"].values, y)
    np.testing.assert_array_equal(out["x"].values, x)


def test_projection_coordinates_keep_their_names_along_y_x():
    v = np.ones((3, 2, 4), "float32")
    ds = xr.Dataset(
        {"pr": (("time", "projection_y_coordinate", "projection_x_coordinate"), v)},
        coords={
            "time": pd.date_range("2001-01-01", periods=3, freq="1h"),
            "projection_y_coordinate": [0.0, 2200.0],
            "projection_x_coordinate": np.arange(4) * 2200.0,
        },
    )
    ds["pr"].attrs["units"] = "mm/h"
    out = open_source(ds)
    assert out["precip"].dims == ("time", "y", "x")
    assert out["projection_y_coordinate"].dims == ("y",)
    np.testing.assert_array_equal(out["projection_x_coordinate"].values, np.arange(4) * 2200.0)


# ---------------------------------------------------------------------------- time


def test_unsorted_time_sorted_and_duplicates_dropped(tmp_path):
    days = pd.to_datetime(["2001-01-03", "2001-01-01", "2001-01-02", "2001-01-01", "2001-01-04"])
    v = np.stack([np.full((2, 2), d.day, "float32") for d in days])  # value = day of month
    ds = xr.Dataset({"pr": (("time", "y", "x"), v, {"units": "mm/day"})}, coords={"time": days})
    out = open_source(write_nc(ds, tmp_path / "t.nc"))
    times = out["time"].values
    assert len(times) == 4
    assert np.all(np.diff(times) > np.timedelta64(0, "s"))
    np.testing.assert_array_equal(pd.DatetimeIndex(times).day, [1, 2, 3, 4])
    np.testing.assert_array_equal(out["precip"].values[:, 0, 0], [1, 2, 3, 4])
    assert out["precip"].attrs["units"] == "mm/day"


def test_step_is_judged_after_sorting():
    # hourly data given backwards: the median step must still be one hour (not negative)
    v = np.full((5, 2, 2), 3.0, "float32")
    times = pd.date_range("2001-01-01", periods=5, freq="1h")[::-1]
    ds = xr.Dataset({"pr": (("time", "y", "x"), v, {"units": "mm"})}, coords={"time": times})
    out = open_source(ds)
    assert out["precip"].attrs["units"] == "mm/h"
    np.testing.assert_allclose(out["precip"].values, 3.0)


def test_time_start_end_select():
    out = open_source(make_ds(nt=10), time_start="2001-01-03", time_end="2001-01-05")
    assert out.sizes["time"] == 3
    assert str(out["time"].values[0])[:10] == "2001-01-03"
    with pytest.raises(SourceError, match="no time steps between"):
        open_source(make_ds(nt=10), time_start="2005-01-01")


# ---------------------------------------------------------------------------- dims


def test_length_one_extra_dim_squeezed():
    v = np.arange(4 * 2 * 3, dtype="float32").reshape(4, 1, 2, 3)
    ds = xr.Dataset(
        {"pr": (("time", "lev", "y", "x"), v, {"units": "mm/day"})},
        coords={"time": pd.date_range("2001-01-01", periods=4), "lev": [850.0]},
    )
    out = open_source(ds)
    assert out["precip"].dims == ("time", "y", "x")
    assert "lev" not in out.coords
    np.testing.assert_array_equal(out["precip"].values, v[:, 0])


def test_leading_member_dim_squeezed(tmp_path):
    # UKCP18 layout: (ensemble_member, time, y, x) with one member
    v = np.arange(3 * 2 * 2, dtype="float32").reshape(1, 3, 2, 2)
    ds = xr.Dataset(
        {"pr": (("ensemble_member", "time", "y", "x"), v, {"units": "mm/h"})},
        coords={"time": pd.date_range("2001-01-01", periods=3, freq="1h")},
    )
    out = open_source(write_nc(ds, tmp_path / "m.nc"))
    assert out["precip"].dims == ("time", "y", "x")
    np.testing.assert_array_equal(out["precip"].values, v[0])


def test_single_time_step_is_read_as_daily():
    out = open_source(make_ds(nt=1, units="mm"))
    assert out.sizes["time"] == 1
    assert out["precip"].attrs["units"] == "mm/day"


# ---------------------------------------------------------------------------- formats


def test_netcdf3_file(tmp_path):
    ds = make_ds(freq="1h", units="mm/h")
    path = write_nc(ds, tmp_path / "n3.nc", format="NETCDF3_CLASSIC")
    assert Path(path).read_bytes()[:3] == b"CDF"
    out = open_source(path)
    np.testing.assert_array_equal(out["precip"].values, ds["pr"].values)
    assert out["precip"].attrs["units"] == "mm/h"


def test_result_is_lazy_for_files(tmp_path):
    out = open_source(write_nc(make_ds(), tmp_path / "l.nc"))
    assert out["precip"].chunks is not None


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("suffix", [".zarr", ""])
def test_zarr_input(tmp_path, zarr_format, suffix):
    ds = make_ds(freq="1h", units="kg m-2 s-1")
    path = tmp_path / f"store{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, zarr_format=zarr_format, consolidated=False)
        out = open_source(str(path))
    np.testing.assert_allclose(out["precip"].values, ds["pr"].values * 3600, rtol=1e-6)
    assert out["precip"].attrs["units"] == "mm/h"


def test_file_url(tmp_path):
    path = write_nc(make_ds(), tmp_path / "u.nc")
    out = open_source("file://" + path)
    assert out.sizes["time"] == 6


def _split_files(tmp_path: Path, names: list[str], fmt: str = "NETCDF4") -> xr.Dataset:
    full = make_ds(nt=9, freq="1h", units="mm")
    for i, name in enumerate(names):
        full.isel(time=slice(3 * i, 3 * i + 3)).to_netcdf(tmp_path / name, format=fmt)
    return full


@pytest.mark.parametrize("fmt", ["NETCDF4", "NETCDF3_64BIT"])
def test_glob_of_files_combined_along_time(tmp_path, fmt):
    full = _split_files(tmp_path, ["p_0.nc", "p_1.nc", "p_2.nc"], fmt)
    out = open_source(str(tmp_path / "p_*.nc"))
    assert out.sizes["time"] == 9
    np.testing.assert_array_equal(out["time"].values, full["time"].values)
    np.testing.assert_allclose(out["precip"].values, full["pr"].values)
    assert out["precip"].attrs["units"] == "mm/h"


def test_list_of_files_in_any_order(tmp_path):
    full = _split_files(tmp_path, ["c.nc", "a.nc", "b.nc"])  # c holds the first hours
    out = open_source([str(tmp_path / n) for n in ("a.nc", "c.nc", "b.nc")])
    np.testing.assert_array_equal(out["time"].values, full["time"].values)
    np.testing.assert_allclose(out["precip"].values, full["pr"].values)


def test_saved_reference_json(tmp_path):
    full = _split_files(tmp_path, ["r0.nc", "r1.nc", "r2.nc"])
    refs = references.build_references(str(tmp_path / "r*.nc"))
    references.write_references(refs, str(tmp_path / "refs.json"))
    for url in (str(tmp_path / "refs.json"), "reference://" + str(tmp_path / "refs.json")):
        out = open_source(url)
        np.testing.assert_allclose(out["precip"].values, full["pr"].values)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["missing.nc", "missing.zarr"])
def test_missing_file(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(SourceError, match="no such file") as err:
        open_source(path)
    assert path in str(err.value)


def test_missing_file_url(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source("file://" + str(tmp_path / "gone.nc"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(references.ReferenceError, match="no files match"):
        open_source(str(tmp_path / "none_*.nc"))


def test_not_a_netcdf_file(tmp_path):
    path = tmp_path / "junk.nc"
    path.write_text("this is not a netcdf file\n")
    with pytest.raises(SourceError, match="cannot read"):
        open_source(str(path))


def test_unknown_variable_lists_the_available_ones():
    ds = make_ds(name="pr")
    ds["tas"] = ds["pr"]
    ds["tas"].attrs = {"units": "K"}
    with pytest.raises(SourceError) as err:
        open_source(ds, variable="rain")
    msg = str(err.value)
    assert "'rain'" in msg and "not in the source" in msg
    assert "pr" in msg and "tas" in msg and "[K]" in msg and "--variable" in msg


def test_no_precipitation_like_variable():
    ds = make_ds(name="tas", units="K")
    ds["hus"] = ds["tas"]
    ds["hus"].attrs = {"units": "1"}
    with pytest.raises(SourceError, match="no precipitation variable") as err:
        open_source(ds)
    assert "tas" in str(err.value) and "hus" in str(err.value)


def test_no_time_dimension_2d():
    ds = xr.Dataset({"pr": (("y", "x"), np.ones((3, 4), "float32"), {"units": "mm/day"})})
    with pytest.raises(SourceError, match="none of them is time"):
        open_source(ds)


def test_2d_time_and_one_space_dim():
    ds = xr.Dataset(
        {"pr": (("time", "station"), np.ones((3, 4), "float32"), {"units": "mm/day"})},
        coords={"time": pd.date_range("2001-01-01", periods=3)},
    )
    with pytest.raises(SourceError, match="exactly two spatial dims"):
        open_source(ds)


def test_4d_with_a_real_extra_dim():
    ds = xr.Dataset(
        {"pr": (("time", "level", "y", "x"), np.ones((3, 2, 2, 2), "float32"))},
        coords={"time": pd.date_range("2001-01-01", periods=3)},
    )
    ds["pr"].attrs["units"] = "mm/day"
    # (an ensemble dimension gets its own message: see tests/test_calendars.py)
    with pytest.raises(SourceError, match="exactly two spatial dims") as err:
        open_source(ds)
    assert "member" in str(err.value)


def test_no_time_dim_in_3d():
    ds = xr.Dataset(
        {"pr": (("step", "y", "x"), np.ones((3, 2, 2), "float32"), {"units": "mm"})},
        coords={"step": [1, 2, 3]},
    )
    with pytest.raises(SourceError, match="none of them is time"):
        open_source(ds)


def test_time_that_is_not_dates():
    ds = xr.Dataset(
        {"pr": (("time", "y", "x"), np.ones((3, 2, 2), "float32"), {"units": "mm"})},
        coords={"time": [1, 2, 3]},
    )
    with pytest.raises(SourceError, match="not decodable as dates"):
        open_source(ds)


@pytest.mark.parametrize("units", ["furlongs", "K", ""])
def test_units_not_understood(units):
    ds = make_ds(units=units)
    with pytest.raises(SourceError, match="not understood as precipitation") as err:
        open_source(ds)
    assert repr(units) in str(err.value)


# ---------------------------------------------------------------------------- real samples


@pytest.mark.data
@pytest.mark.parametrize(
    ("name", "units", "coords"),
    [
        ("chirps_nicaragua_daily_1981_1985.nc", "mm/day", ("lat", "lon")),
        ("fraser_daily_1986_2017.nc", "mm/day", ("lat", "lon")),
        ("radolan_germany_hourly_20221018.nc", "mm/h", ("y", "x")),
        ("bom_brisbane_hourly_20201031.nc", "mm/h", ("y", "x")),
    ],
)
def test_real_samples_open(name, units, coords):
    out = open_source(str(needs_data(name)))
    da = out["precip"]
    assert da.dims == ("time", "y", "x")
    assert da.dtype == np.float32 and da.attrs["units"] == units
    for c in coords:
        assert c in out.coords
    assert np.all(np.diff(out["time"].values) > np.timedelta64(0, "s"))
    first = da.isel(time=slice(0, 3)).values
    assert not np.any(first < 0)


@pytest.mark.data
def test_real_chirps_values():
    out = open_source(str(needs_data("chirps_nicaragua_daily_1981_1985.nc")))
    v = out["precip"].values
    assert v.shape == (1826, 20, 20)
    assert 0.1 < np.isnan(v).mean() < 0.2  # sea is NaN (15%)
    assert np.nanmin(v) >= 0
    assert 400 < np.nanmax(v) < 500


@pytest.mark.data
def test_real_satellite_file_has_no_precipitation():
    with pytest.raises(SourceError, match="no precipitation variable") as err:
        open_source(str(needs_data("seviri_uk_20200401.nc")))
    assert "hrv" in str(err.value) and "ir_016" in str(err.value)


def test_rate_factor_table_is_consistent():
    # every rate entry agrees with the mm/h definition of its own canonical name
    assert sources._rate_factor("mm/day", None) == pytest.approx(1 / 24)
    assert sources._rate_factor("kg m-2 s-1", None) == pytest.approx(3600.0)
    assert sources._rate_factor("m", np.timedelta64(2, "h")) == pytest.approx(500.0)
    assert sources._rate_factor("parsecs", None) is None
