"""The ``cloudburst`` command, run as a user runs it (a subprocess from the repository root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from cloudburst.config import WindowConfig
from cloudburst.data.ingest import open_store
from cloudburst.data.windows import build_index, parse_split, split_index

ROOT = Path(__file__).resolve().parents[1]
NT, NY, NX = 800, 10, 12


def cloudburst(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudburst.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Non-zero exit, no traceback, and one error line naming the problem; returns that line."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A NetCDF file: daily rain (variable ``rain``) over two years with NaN, and its values."""
    rng = np.random.default_rng(7)
    values = rng.gamma(0.6, 9.0, (NT, NY, NX)) * (rng.random((NT, NY, NX)) < 0.35)
    values = values.astype(np.float32)
    values[rng.random((NT, NY, NX)) < 0.05] = np.nan
    values[:, -2:, :3] = np.nan
    ds = xr.Dataset(
        {"rain": (("time", "lat", "lon"), values, {"units": "mm/day"})},
        coords={
            "time": pd.date_range("2010-01-01", periods=NT, freq="1D"),
            "lat": ("lat", 45.0 - 0.25 * np.arange(NY), {"units": "degrees_north"}),
            "lon": ("lon", -5.0 + 0.25 * np.arange(NX), {"units": "degrees_east"}),
        },
    )
    path = tmp_path_factory.mktemp("cli") / "rain.nc"
    ds.to_netcdf(path)
    return path, ds


@pytest.fixture(scope="module")
def store(source, tmp_path_factory):
    path, _ = source
    target = tmp_path_factory.mktemp("cli") / "rain.zarr"
    proc = cloudburst("ingest", str(path), str(target), "--chunks", "time=100", "--quiet")
    assert f"{NT} x {NY} x {NX}" in proc.stdout
    assert "written" in proc.stdout
    return target


def test_info_matches_numpy_on_the_source(source, store):
    _, ds = source
    info = json.loads(cloudburst("info", str(store)).stdout)
    values = ds["rain"].values.astype(np.float64)
    assert info["variable"] == "precip"
    assert info["source_variable"] == "rain"
    assert info["units"] == "mm/day"
    assert info["dims"] == ["time", "y", "x"]
    assert info["shape"] == [NT, NY, NX]
    times = pd.DatetimeIndex(ds.time.values)
    assert pd.Timestamp(info["time_start"]) == times[0]
    assert pd.Timestamp(info["time_end"]) == times[-1]
    assert info["nan_fraction"] == pytest.approx(np.isnan(values).mean(), rel=1e-12)
    assert info["max"] == pytest.approx(np.nanmax(values), rel=1e-7)
    valid = values[~np.isnan(values)]
    assert info["mean"] == pytest.approx(valid.mean(), rel=1e-9)
    assert info["wet_fraction"] == pytest.approx((valid > 0).mean(), rel=1e-12)
    for q in (0.5, 0.9, 0.99, 0.999):
        assert info["quantiles"][f"{q:g}"] == pytest.approx(np.quantile(valid, q), rel=1e-7)
    assert info["time_step_hours"] == 24.0


def test_ingest_again_is_a_no_op(source, store):
    path, _ = source
    proc = cloudburst("ingest", str(path), str(store), "--chunks", "time=100", "--quiet")
    assert "up to date (nothing written)" in proc.stdout


def test_ingest_with_bbox_crops_to_the_box(source, tmp_path):
    path, ds = source
    west, south, east, north = -4.6, 43.2, -3.1, 44.6
    target = tmp_path / "crop.zarr"
    cloudburst("ingest", str(path), str(target), f"--bbox={west},{south},{east},{north}", "--quiet")
    lat, lon = ds.lat.values, ds.lon.values
    ny = int(((lat >= south) & (lat <= north)).sum())
    nx = int(((lon >= west) & (lon <= east)).sum())
    info = json.loads(cloudburst("info", str(target)).stdout)
    assert info["shape"] == [NT, ny, nx]
    assert 0 < ny < NY and 0 < nx < NX


@pytest.mark.parametrize(
    "flags",
    [
        ["--length", "5", "--size", "4", "--stride", "2", "--max-nan", "0.2"],
        ["--length", "3", "--size", "6", "--time-stride", "4", "--doy", "300-60", "--max-nan", "1"],
    ],
    ids=["nan-filter", "wrapping-doy"],
)
def test_windows_count_matches_build_index(store, flags):
    proc = cloudburst("windows", str(store), *flags, "--count")
    opts = dict(zip(flags[::2], flags[1::2], strict=True))
    doy = tuple(int(v) for v in opts["--doy"].split("-")) if "--doy" in opts else None
    wc = WindowConfig(
        length=int(opts["--length"]),
        size=int(opts["--size"]),
        stride=int(opts.get("--stride", opts["--size"])),
        time_stride=int(opts.get("--time-stride", 1)),
        doy=doy,
        max_nan_fraction=float(opts["--max-nan"]),
    )
    ds, _ = open_store(str(store))
    n = len(build_index(ds, wc))
    assert 0 < n
    assert proc.stdout.strip() == str(n)


@pytest.mark.parametrize("spec", ["test", "val@seasons:3", "train@years:2010-2010/2011-2012"])
def test_windows_with_split(store, spec):
    args = ["--length", "5", "--size", "4", "--stride", "4", "--max-nan", "0.5"]
    proc = cloudburst("windows", str(store), *args, "--split", spec, "--seed", "2", "--limit", "3")
    ds, _ = open_store(str(store))
    index = build_index(ds, WindowConfig(length=5, size=4, stride=4, max_nan_fraction=0.5))
    split, part = parse_split(spec, val_fraction=0.1, seed=2)
    want = split_index(index, split, part)
    assert 0 < len(want) < len(index)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{len(want)} windows of 5 x 4 x 4") and spec in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 3
    for row, origin in zip(rows, want.origins[:3], strict=True):
        assert [int(v) for v in row[:3]] == origin.tolist()


def test_missing_source_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere.nc"
    proc = cloudburst("ingest", str(missing), str(tmp_path / "out.zarr"), check=False)
    assert_user_error(proc, "nowhere.nc", "no such file")
    assert not (tmp_path / "out.zarr").exists()


def test_bad_bbox_syntax_is_rejected(source, tmp_path):
    path, _ = source
    proc = cloudburst("ingest", str(path), str(tmp_path / "o.zarr"), "--bbox=1,2,x,4", check=False)
    assert_user_error(proc, "--bbox", "4 comma-separated numbers")
    proc = cloudburst("ingest", str(path), str(tmp_path / "o.zarr"), "--bbox=5,2,1,4", check=False)
    assert_user_error(proc, "bbox", "W < E")


def test_window_too_large_and_bad_split_are_one_line_errors(store):
    proc = cloudburst("windows", str(store), "--length", "5", "--size", "40", check=False)
    assert_user_error(proc, "height 40", "larger", str(NY))
    proc = cloudburst("windows", str(store), "--length", str(NT + 1), "--size", "4", check=False)
    assert_user_error(proc, f"length {NT + 1}", "longer than the record")
    proc = cloudburst(
        "windows",
        str(store),
        "--length",
        "5",
        "--size",
        "4",
        "--split",
        "test@seasons:1",
        check=False,
    )
    assert_user_error(proc, "every")


def test_info_on_a_missing_store(tmp_path):
    proc = cloudburst("info", str(tmp_path / "none.zarr"), check=False)
    assert_user_error(proc, "none.zarr", "no store")


def test_console_script_is_the_same_command(store):
    script = Path(sys.executable).parent / "cloudburst"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = subprocess.run(
        [str(script), "info", str(store)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(cloudburst("info", str(store)).stdout)
