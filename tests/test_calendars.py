"""Non-standard calendars end to end: a UKCP18-shaped source (360-day calendar, hourly,
``ensemble_member``, projected grid in metres, ``pr`` in kg m-2 s-1) through ingest, windows,
a conditional read and a forecast ensemble; no-leap, 365-day and Gregorian sources alongside."""

from __future__ import annotations

import json
from pathlib import Path

import cftime
import numpy as np
import pytest
import torch
import xarray as xr

from cloudburst.config import SplitConfig, WindowConfig
from cloudburst.data import calendars
from cloudburst.data.ingest import describe, ingest, open_store, read_marker
from cloudburst.data.sources import SourceError
from cloudburst.data.windows import build_index, season_keys, split_index
from cloudburst.ensembles.condition import ConditionError, read_condition
from cloudburst.ensembles.generate import ResolvedModel, generate
from cloudburst.ensembles.provenance import coordinates
from cloudburst.ensembles.request import EnsembleRequest, Scenario

GAP = slice(1000, 1003)  # three missing hours: windows must not span them
MEMBERS = [1, 4]  # UKCP18 labels its members 01, 04, 05, ...


def ukcp_like(
    path,
    calendar: str = "360_day",
    *,
    start: str = "2061-01-01",
    years: int = 2,
    hours: int = 1,
    members: list[int] | None = MEMBERS,
    ny: int = 4,
    nx: int = 4,
) -> xr.Dataset:
    """A small NetCDF shaped like a UKCP18 CPM file, written to ``path``; its raw Dataset."""
    days = {"360_day": 360, "noleap": 365, "365_day": 365}.get(calendar, 366)
    t = cftime.num2date(
        np.arange(0, years * days * 24, hours),
        f"hours since {start} 00:00:00",
        calendar=calendar,
        only_use_cftime_datetimes=True,
    )
    keep = np.ones(len(t), bool)
    keep[GAP] = False
    t = t[keep]
    rng = np.random.default_rng(0)
    n = len(members) if members else 1
    pr = (rng.gamma(0.3, 2e-4, (n, len(t), ny, nx)) * (rng.random((n, len(t), 1, 1)) < 0.3)).astype(
        "f4"
    )
    dims = ("ensemble_member", "time", "projection_y_coordinate", "projection_x_coordinate")
    coords = {
        "time": ("time", t, {"standard_name": "time", "axis": "T"}),
        "projection_y_coordinate": (
            "projection_y_coordinate",
            -2.0e5 + 2200.0 * np.arange(ny),
            {"standard_name": "projection_y_coordinate", "units": "m", "axis": "Y"},
        ),
        "projection_x_coordinate": (
            "projection_x_coordinate",
            1.0e5 + 2200.0 * np.arange(nx),
            {"standard_name": "projection_x_coordinate", "units": "m", "axis": "X"},
        ),
        "yyyymmddhh": ("time", np.array([s.strftime("%Y%m%d%H") for s in t])),
        "latitude": (dims[2:], 51.0 + 0.02 * rng.random((ny, nx)), {"units": "degrees_north"}),
        "longitude": (dims[2:], -1.0 + 0.03 * rng.random((ny, nx)), {"units": "degrees_east"}),
    }
    if members:
        coords["ensemble_member"] = ("ensemble_member", np.asarray(members, dtype=np.int32))
        coords["ensemble_member_id"] = (
            "ensemble_member",
            np.array([f"r001i1p{m:05d}".encode() for m in members]),
        )
    else:
        pr, dims = pr[0], dims[1:]
    ds = xr.Dataset(
        {
            "pr": (
                dims,
                pr,
                {"standard_name": "precipitation_flux", "units": "kg m-2 s-1"},
            )
        },
        coords=coords,
    )
    ds.time.encoding.update({"units": f"hours since {start} 00:00:00", "calendar": calendar})
    ds.to_netcdf(path)
    return ds


@pytest.fixture(scope="module")
def ukcp(tmp_path_factory) -> tuple[str, xr.Dataset, str]:
    """(store of member 4, the raw source Dataset, the source file)."""
    root = tmp_path_factory.mktemp("ukcp")
    source = str(root / "pr_rcp85_land-cpm_uk_2.2km_01_1hr.nc")
    raw = ukcp_like(source)
    target = str(root / "ukcp.zarr")
    ingest(source, target, member=4, progress=False)
    return target, raw, source


# ---------------------------------------------------------------------------- ingest


def test_a_ukcp18_source_ingests_one_member_keeping_its_360_day_times(ukcp, tmp_path):
    target, raw, source = ukcp
    ds, stats = open_store(target)
    src = raw.pr.sel(ensemble_member=4)
    # the same times, decoded as 360-day cftime times; 2061-02-30 exists
    assert calendars.calendar_of(ds.time.values) == "360_day"
    assert isinstance(ds.time.values[0], cftime.Datetime360Day)
    assert list(ds.time.values) == list(src.time.values)
    assert cftime.Datetime360Day(2061, 2, 30, 5) in set(ds.time.values)
    # stored as CF numbers with units and calendar
    attrs = json.loads((Path(target) / "time" / "zarr.json").read_text())
    assert attrs["attributes"]["calendar"] == "360_day"
    assert attrs["attributes"]["units"].startswith("hours since 2061-01-01")
    # kg m-2 s-1 at hourly steps -> mm/h; member 4 picked; projected grid as y / x
    assert stats.units == "mm/h" and ds.precip.attrs["units"] == "mm/h"
    np.testing.assert_allclose(ds.precip.values, src.values * 3600, rtol=1e-6)
    assert ds.precip.dims == ("time", "y", "x")
    assert ds.projection_y_coordinate.dims == ("y",) and ds.projection_x_coordinate.dims == ("x",)
    np.testing.assert_array_equal(ds.projection_y_coordinate.values, raw.projection_y_coordinate)
    assert ds.attrs["cloudburst_member"] == "4" and ds.attrs["cloudburst_calendar"] == "360_day"
    request = read_marker(target)["request"]
    assert request["calendar"] == "360_day" and request["member"] == "4"
    info = describe(target)
    assert info["calendar"] == "360_day" and info["time_step_hours"] == 1.0
    assert info["time_start"] == "2061-01-01T00:00:00" and info["time_end"] == "2062-12-30T23:00:00"
    # the same request again is a no-op; the member by its id is the same store
    again = ingest(source, target, member=4, progress=False)
    assert again.skipped


def test_a_member_is_picked_by_label_or_id_and_several_without_one_are_refused(ukcp, tmp_path):
    _, raw, source = ukcp
    with pytest.raises(SourceError, match=r"2 ensemble members.*ensemble_member.*member"):
        ingest(source, str(tmp_path / "none.zarr"), progress=False)
    with pytest.raises(SourceError, match="not one of the 2 members"):
        ingest(source, str(tmp_path / "bad.zarr"), member=2, progress=False)
    ingest(source, str(tmp_path / "id.zarr"), member="r001i1p00001", progress=False)
    ds, _ = open_store(str(tmp_path / "id.zarr"))
    np.testing.assert_allclose(
        ds.precip.values[:50], raw.pr.sel(ensemble_member=1).values[:50] * 3600, rtol=1e-6
    )
    # a single-member source needs no member; asking for one where there is none is an error
    ukcp_like(tmp_path / "one.nc", years=1, members=None)
    ingest(str(tmp_path / "one.nc"), str(tmp_path / "one.zarr"), progress=False)
    with pytest.raises(SourceError, match="no ensemble dimension"):
        ingest(str(tmp_path / "one.nc"), str(tmp_path / "x.zarr"), member=1, progress=False)


def test_a_time_range_is_read_in_the_sources_calendar(ukcp, tmp_path):
    ingest(
        ukcp[2],
        str(tmp_path / "feb.zarr"),
        member=1,
        time_start="2061-02-29T00:00",
        time_end="2061-02-30T23:00",
        progress=False,
    )
    ds, _ = open_store(str(tmp_path / "feb.zarr"))
    assert ds.sizes["time"] == 48
    assert calendars.iso(ds.time.values[-1]) == "2061-02-30T23:00"


# ---------------------------------------------------------------------------- windows


def test_windows_on_360_day_times_are_contiguous_and_filtered_by_a_360_day_year(ukcp):
    ds, _ = open_store(ukcp[0])
    times = ds.time.values
    index = build_index(ds, WindowConfig(length=6, size=4, stride=4))
    assert index.shape == (6, 4, 4) and set(index.origins[:, 1]) == set(index.origins[:, 2]) == {0}
    deltas = calendars.since(times[index.origins[:, 0] + 5], times[index.origins[:, 0]])
    assert (deltas == np.timedelta64(5, "h")).all()  # never across the three-hour gap
    # every start but those whose window would reach into the gap (or past the end)
    assert len(index) == len(times) - 5 - 5
    assert index.table(1)[0]["start"] == "2061-01-01T00:00:00"
    # the last days of a 360-day year: 355..360, i.e. 2061-12-25 .. 2061-12-30
    late = build_index(ds, WindowConfig(length=6, size=4, stride=4, doy=(355, 360)))
    f = calendars.fields(late.start_times())
    assert f["dayofyear"].min() == 355 and f["dayofyear"].max() == 360
    assert set(zip(f["month"], f["day"], strict=True)) == {(12, d) for d in range(25, 31)}
    assert calendars.fields(times)["dayofyear"].max() == 360
    # a window over 2061-02-29 / 30 (dates no real calendar has) is an ordinary one
    feb = build_index(ds, WindowConfig(length=48, size=4, stride=4, doy=(59, 60)))
    assert [calendars.iso(t) for t in feb.start_times()] == ["2061-02-29T00:00", "2062-02-29T00:00"]


def test_seasons_and_years_split_a_360_day_record(ukcp):
    ds, _ = open_store(ukcp[0])
    times = ds.time.values
    keys = season_keys(times)
    sizes = np.unique(keys, return_counts=True)[1]
    # 90-day seasons (30-day months); the first (JF 2061, with the gap) and last (D 2062) partial
    assert sizes.tolist() == [60 * 24 - 3] + [90 * 24] * 7 + [30 * 24]
    index = build_index(ds, WindowConfig(length=6, size=4, stride=4))

    seasons = SplitConfig(scheme="seasons", every=2, val_fraction=0.0)
    test = split_index(index, seasons, "test")
    train = split_index(index, seasons, "train")
    assert len(test) and len(train)
    test_keys = {int(k) for k in season_keys(test.start_times())}
    assert not test_keys & {int(k) for k in season_keys(train.start_times())}
    assert len({k // 4 for k in test_keys}) == len(test_keys)  # one test season a year

    years = SplitConfig(scheme="years", train_years=(2061, 2061), test_years=(2062, 2062))
    parts = {p: split_index(index, years, p) for p in ("train", "val", "test")}
    assert all(len(p) for p in parts.values())
    assert set(calendars.fields(parts["train"].start_times())["year"]) == {2061}
    assert set(calendars.fields(parts["val"].start_times())["year"]) == {2061}
    assert set(calendars.fields(parts["test"].start_times())["year"]) == {2062}
    assert not set(parts["train"].origins[:, 0]) & set(parts["val"].origins[:, 0])


@pytest.mark.parametrize("calendar", ["360_day", "noleap", "365_day", "gregorian"])
def test_each_calendar_ingests_and_windows(calendar, tmp_path):
    raw = ukcp_like(tmp_path / "pr.nc", calendar, start="2063-01-01", years=2, hours=3)
    target = str(tmp_path / "pr.zarr")
    ingest(str(tmp_path / "pr.nc"), target, member=1, progress=False)
    ds, stats = open_store(target)
    times = ds.time.values
    src = xr.open_dataset(tmp_path / "pr.nc").time.values
    assert stats.units == "mm/h"
    request = read_marker(target)["request"]
    if calendar == "gregorian":  # a real calendar: datetime64, exactly today's store
        assert np.issubdtype(times.dtype, np.datetime64) and np.issubdtype(src.dtype, np.datetime64)
        assert "calendar" not in request and "cloudburst_calendar" not in ds.attrs
        np.testing.assert_array_equal(times, src)
        assert calendars.fields(times)["dayofyear"].max() == 366  # 2064 is a leap year
    else:
        assert calendars.calendar_of(times) == calendars.calendar_of(raw.time.values)
        assert request["calendar"] == calendars.calendar_of(times)
        assert list(times) == list(src)
        top = {"360_day": 360}.get(calendar, 365)
        assert calendars.fields(times)["dayofyear"].max() == top
    np.testing.assert_allclose(
        ds.precip.values, raw.pr.isel(ensemble_member=0).values * 3600, rtol=1e-6
    )

    index = build_index(ds, WindowConfig(length=4, size=2, stride=2))
    starts = index.origins[:, 0]
    assert (calendars.since(times[starts + 3], times[starts]) == np.timedelta64(9, "h")).all()
    assert len(np.unique(starts)) == len(times) - 3 - 3  # the gap cuts 3 starts
    doy = build_index(ds, WindowConfig(length=4, size=2, stride=2, doy=(150, 160)))
    d = calendars.fields(doy.start_times())["dayofyear"]
    assert d.min() == 150 and d.max() == 160
    years = SplitConfig(scheme="years", train_years=(2063, 2063), test_years=(2064, 2064))
    assert set(calendars.fields(split_index(index, years, "test").start_times())["year"]) == {2064}
    seasons = SplitConfig(scheme="seasons", every=3, val_fraction=0.1)
    test, train = split_index(index, seasons, "test"), split_index(index, seasons, "train")
    assert len(test) and len(train) and len(split_index(index, seasons, "val"))
    test_keys = {int(k) for k in season_keys(test.start_times())}
    assert not test_keys & {int(k) for k in season_keys(train.start_times())}


# ---------------------------------------------------------------------------- conditions


def forecast(store: str, time: str, **extra) -> Scenario:
    return Scenario.model_validate(
        {"kind": "forecast", "context": 2, "condition": {"data": store, "time": time, **extra}}
    )


def test_a_condition_at_a_360_day_only_time_reads_its_frames(ukcp):
    target, raw, _ = ukcp
    observed = read_condition(forecast(target, "2061-02-30T00:00", y=1, x=0), (4, 3, 3), "mm/h")
    assert observed is not None and observed.calendar == "360_day"
    src = raw.pr.sel(ensemble_member=4).sel(time=slice("2061-02-30T00:00", "2061-02-30T03:00"))
    np.testing.assert_allclose(observed.values, src.values[:, 1:4, 0:3] * 3600, rtol=1e-6)
    assert observed.known.tolist() == [True, True, False, False]
    assert [calendars.iso(t) for t in observed.times] == [f"2061-02-30T0{h}:00" for h in range(4)]
    np.testing.assert_array_equal(observed.y, [1, 2, 3])
    # the ensemble's CF time: hours since the first step, in the 360-day calendar
    hours, attrs = coordinates(observed)["time"]
    np.testing.assert_array_equal(hours, [0.0, 1.0, 2.0, 3.0])
    assert attrs["calendar"] == "360_day" and attrs["units"] == "hours since 2061-02-30T00:00:00"
    decoded = xr.decode_cf(xr.Dataset(coords={"time": ("time", hours, attrs)}))
    assert list(decoded.time.values) == list(observed.times)


def test_a_condition_time_outside_the_stores_calendar_says_so(ukcp):
    target = ukcp[0]
    with pytest.raises(ConditionError, match="not a date in the 360_day calendar"):
        read_condition(forecast(target, "2061-02-31T00:00"), (4, 3, 3), "mm/h")
    with pytest.raises(ConditionError, match="not an ISO time"):
        read_condition(forecast(target, "yesterday"), (4, 3, 3), "mm/h")
    with pytest.raises(ConditionError, match=r"no time step at 2061-02-05T01:30.*nearest: "):
        read_condition(forecast(target, "2061-02-05T01:30"), (4, 3, 3), "mm/h")
    with pytest.raises(ConditionError, match="irregular time steps"):  # across the gap
        read_condition(forecast(target, "2061-02-12T14:00"), (4, 3, 3), "mm/h")


def test_a_forecast_ensemble_on_a_360_day_store_carries_360_day_times(ukcp, tmp_path):
    from cloudburst.config import DiffusionConfig
    from cloudburst.data.transforms import Scale
    from cloudburst.models import registry
    from cloudburst.models.package import PrecipitationModel

    target = ukcp[0]
    _, stats = open_store(target)
    window = (4, 4, 4)
    torch.manual_seed(0)
    cfg = DiffusionConfig(widths=(8, 16), embedding=16, transform="learnt", steps=4)
    net = registry.build("diffusion", cfg, window)
    packaged = PrecipitationModel(
        net, "diffusion", cfg, window, Scale(0.0, stats.max, "unit"), stats
    )
    model = ResolvedModel(packaged, "models:/d/1", "models:/d/1", None)
    request = EnsembleRequest.model_validate(
        {
            "model": "models:/d/1",
            "members": 2,
            "seed": 1,
            "output": str(tmp_path / "f.zarr"),
            "batch_size": 2,
            "scenario": {
                "kind": "forecast",
                "context": 2,
                "guidance": 1.0,
                "condition": {"data": target, "time": "2061-02-30T22:00"},
            },
        }
    )
    generate(request, model=model)
    ens = xr.open_zarr(tmp_path / "f.zarr", consolidated=False)
    assert isinstance(ens.time.values[0], cftime.Datetime360Day)
    assert [calendars.iso(t) for t in ens.time.values] == [
        "2061-02-30T22:00",
        "2061-02-30T23:00",
        "2061-03-01T00:00",
        "2061-03-01T01:00",
    ]
    assert ens.time.encoding["calendar"] == "360_day"


def test_the_cli_and_the_ingest_config_pick_a_member(ukcp, tmp_path):
    from cloudburst import cli
    from cloudburst.config import IngestConfig
    from cloudburst.data.ingest import ingest_config

    _, raw, source = ukcp
    target = str(tmp_path / "cli.zarr")
    assert cli.main(["ingest", source, target, "--member", "1", "--quiet"]) == 0
    ds, _ = open_store(target)
    expected = raw.pr.sel(ensemble_member=1).values[:24] * 3600
    np.testing.assert_allclose(ds.precip.values[:24], expected, rtol=1e-6)
    cfg = IngestConfig(source=source, target=str(tmp_path / "cfg.zarr"), member=4)
    ingest_config(cfg, progress=False)
    ds4, _ = open_store(str(tmp_path / "cfg.zarr"))
    expected4 = raw.pr.sel(ensemble_member=4).values[:24] * 3600
    np.testing.assert_allclose(ds4.precip.values[:24], expected4, rtol=1e-6)


@pytest.mark.integration
def test_a_model_trains_on_a_360_day_store(ukcp, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    store, _, _ = ukcp
    root = Path(__file__).resolve().parents[1]
    registry = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        sys.executable,
        "jobs/train.py",
        "--config",
        "jobs/configs/vae-demo.yaml",
        f"data.store={store}",
        "data.windows.size=4",
        "data.windows.length=4",
        "data.windows.stride=4",
        "data.windows.time_stride=24",
        "model.widths=[4, 8]",
        "model.latent=4",
        "train.epochs=1",
        "train.max_steps_per_epoch=3",
        "train.max_val_batches=2",
        f"run.storage_path={tmp_path / 'ray'}",
        f"run.tracking_uri={registry}",
        "run.name=ukcp",
        "run.registered_model=ukcp-vae",
        "run.system_metrics_interval=null",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", MLFLOW_DISABLE_TELEMETRY="true")
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: models:/ukcp-vae/1" in result.stdout
    client = MlflowClient(tracking_uri=registry, registry_uri=registry)
    version = client.get_model_version("ukcp-vae", "1")
    assert version.tags["units"] == "mm/h" and version.tags["stats_scope"].startswith("train")
    # the training split's statistics name 360-day dates
    assert "2061-" in version.tags["stats_scope"]
