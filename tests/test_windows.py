"""The window index and its splits, checked against brute-force enumerations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from cloudburst.config import SplitConfig, WindowConfig
from cloudburst.data.ingest import ingest, open_store
from cloudburst.data.windows import (
    WindowError,
    WindowIndex,
    build_index,
    parse_split,
    split_index,
    step_labels,
)

DAY = np.timedelta64(1, "D")


# ---------------------------------------------------------------------------- helpers


def source_dataset(times: np.ndarray, ny: int, nx: int, seed: int = 0) -> xr.Dataset:
    """Rain-like values in mm/day with NaN: a fixed 'sea' corner, scattered cells, one bad step."""
    rng = np.random.default_rng(seed)
    nt = len(times)
    values = rng.gamma(0.7, 8.0, size=(nt, ny, nx)).astype(np.float32)
    values[rng.random((nt, ny, nx)) < 0.5] = 0.0
    values[:, : ny // 3, : nx // 4] = np.nan  # sea
    values[rng.random((nt, ny, nx)) < 0.04] = np.nan  # scattered gaps
    values[nt // 3] = np.nan  # a whole missing step
    return xr.Dataset(
        {"precip": (("time", "lat", "lon"), values, {"units": "mm/day"})},
        coords={
            "time": ("time", times),
            "lat": ("lat", 10.0 - 0.1 * np.arange(ny), {"units": "degrees_north"}),
            "lon": ("lon", 20.0 + 0.1 * np.arange(nx), {"units": "degrees_east"}),
        },
    )


def make_store(path: str, times: np.ndarray, ny: int, nx: int, **kw: object) -> xr.Dataset:
    ingest(source_dataset(times, ny, nx), path, progress=False, **kw)
    ds, _ = open_store(path)
    return ds


def in_memory(times: np.ndarray, ny: int = 4, nx: int = 4) -> xr.Dataset:
    """A store-shaped dataset (precip (time, y, x)) without NaN, for split tests."""
    return xr.Dataset(
        {"precip": (("time", "y", "x"), np.zeros((len(times), ny, nx), np.float32))},
        coords={"time": ("time", times)},
    )


def inside_doy(doy: np.ndarray, lo: int, hi: int) -> np.ndarray:
    if lo <= hi:
        return np.array([lo <= d <= hi for d in doy])
    return np.array([d >= lo or d <= hi for d in doy])


def brute_force(
    values: np.ndarray,
    times: np.ndarray,
    wc: WindowConfig,
    size_x: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every window by explicit enumeration: (origins (n, 3), NaN fraction (n,))."""
    nt, ny, nx = values.shape
    length, sy, sx = wc.length, wc.size, size_x or wc.size
    step = np.median(np.diff(times))
    doy = pd.DatetimeIndex(times).day_of_year.to_numpy()
    starts = []
    for t0 in range(nt - length + 1):
        if length > 1 and not all(np.diff(times[t0 : t0 + length]) == step):
            continue
        if wc.doy is not None and not inside_doy(doy[t0 : t0 + length], *wc.doy).all():
            continue
        starts.append(t0)
    starts = starts[:: wc.time_stride]  # the stride thins the valid starts
    origins, fracs = [], []
    for t0 in starts:
        for y0 in range(0, ny - sy + 1, wc.stride):
            for x0 in range(0, nx - sx + 1, wc.stride):
                window = values[t0 : t0 + length, y0 : y0 + sy, x0 : x0 + sx]
                frac = np.isnan(window).sum() / window.size
                if frac <= wc.max_nan_fraction:
                    origins.append((t0, y0, x0))
                    fracs.append(frac)
    return np.asarray(origins, dtype=np.int64).reshape(-1, 3), np.asarray(fracs)


def as_set(index: WindowIndex) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in o) for o in index.origins}


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of True."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    starts, stops = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    return [(int(a), int(b - a)) for a, b in zip(starts, stops, strict=True)]


def season_of(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(season-year, season 0..3) of every step: DJF belongs to the year of its January."""
    idx = pd.DatetimeIndex(times)
    month = idx.month.to_numpy()
    season = np.select([np.isin(month, [12, 1, 2]), month <= 5, month <= 8], [0, 1, 2], 3)
    return idx.year.to_numpy() + (month == 12), season


# ---------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """Two years of daily data, 10 x 12 cells, with NaN and three holes in the time axis."""
    times = pd.date_range("2001-01-01", periods=740, freq="1D").values
    times = np.delete(times, [40, 41, 90, 520])  # gaps of 2, 1 and 1 days
    path = str(tmp_path_factory.mktemp("windows") / "gappy.zarr")
    ds = make_store(path, times, 10, 12, chunks={"time": 64})
    return ds, ds["precip"].values, ds["time"].values


@pytest.fixture(scope="module")
def regular(tmp_path_factory):
    """90 regular daily steps, 9 x 11 cells, with NaN."""
    times = pd.date_range("2003-03-01", periods=90, freq="1D").values
    path = str(tmp_path_factory.mktemp("windows") / "regular.zarr")
    ds = make_store(path, times, 9, 11)
    return ds, ds["precip"].values, ds["time"].values


# ---------------------------------------------------------------------------- build_index


@pytest.mark.parametrize(
    "wc, size_x",
    [
        (WindowConfig(length=5, size=6, stride=2, max_nan_fraction=1.0), None),
        (WindowConfig(length=4, size=4, stride=3, time_stride=3, max_nan_fraction=0.25), None),
        (WindowConfig(length=7, size=6, stride=1, doy=(150, 300), max_nan_fraction=0.1), None),
        (
            WindowConfig(
                length=3, size=5, stride=2, time_stride=2, doy=(300, 60), max_nan_fraction=0.5
            ),
            None,
        ),
        (WindowConfig(length=1, size=10, stride=1, max_nan_fraction=0.15), None),
        (WindowConfig(length=6, size=4, stride=2, max_nan_fraction=0.3), 12),
    ],
    ids=["all", "strides", "monsoon", "wrapping-doy", "full-height", "size-x"],
)
def test_index_equals_brute_force(gappy, wc, size_x):
    ds, values, times = gappy
    index = build_index(ds, wc, size_x=size_x)
    origins, fracs = brute_force(values, times, wc, size_x)
    assert len(index) == len(origins) > 0
    np.testing.assert_array_equal(index.origins, origins)
    np.testing.assert_allclose(index.nan_fraction, fracs, atol=1e-6)
    assert index.shape == (wc.length, wc.size, size_x or wc.size)
    assert index.grid == values.shape
    np.testing.assert_array_equal(index.start_times(), times[origins[:, 0]])


def test_time_stride_without_gaps_is_a_plain_range(regular):
    ds, values, times = regular
    for length, k in [(1, 1), (5, 3), (8, 7)]:
        wc = WindowConfig(length=length, size=3, stride=4, time_stride=k, max_nan_fraction=1.0)
        index = build_index(ds, wc)
        t0s = np.unique(index.origins[:, 0])
        np.testing.assert_array_equal(t0s, np.arange(0, len(times) - length + 1, k))
        ys = np.unique(index.origins[:, 1])
        xs = np.unique(index.origins[:, 2])
        np.testing.assert_array_equal(ys, np.arange(0, values.shape[1] - 3 + 1, 4))
        np.testing.assert_array_equal(xs, np.arange(0, values.shape[2] - 3 + 1, 4))
        assert len(index) == len(t0s) * len(ys) * len(xs)


def test_nan_fraction_and_max_nan_filter(gappy):
    """With V a power of two the fractions are exact: thresholds at and between them."""
    ds, values, times = gappy
    wc = WindowConfig(length=4, size=8, stride=2, max_nan_fraction=1.0)  # 4 * 8 * 8 = 256 cells
    full = build_index(ds, wc)
    _, fracs = brute_force(values, times, wc)
    np.testing.assert_array_equal(full.nan_fraction, fracs.astype(np.float32))
    levels = np.unique(fracs)
    assert len(levels) > 5
    for threshold in [0.0, levels[1], levels[len(levels) // 2], (levels[2] + levels[3]) / 2]:
        kept = build_index(ds, wc.model_copy(update={"max_nan_fraction": float(threshold)}))
        want = full.origins[fracs <= threshold]
        np.testing.assert_array_equal(kept.origins, want)
        assert (kept.nan_fraction <= threshold).all()
        assert len(kept) < len(full)


def test_windows_never_span_a_time_gap(gappy):
    ds, _, times = gappy
    for length in (2, 5, 30):
        index = build_index(ds, WindowConfig(length=length, size=4, max_nan_fraction=1.0))
        t0 = np.unique(index.origins[:, 0])
        steps = times[t0[:, None] + np.arange(length)]
        assert (np.diff(steps, axis=1) == DAY).all()
        # every contiguous start is there, right up to and right after each gap
        contiguous = [
            t
            for t in range(len(times) - length + 1)
            if (times[t + length - 1] - times[t]) == (length - 1) * DAY
        ]
        np.testing.assert_array_equal(t0, contiguous)


@pytest.mark.parametrize("doy", [(150, 300), (300, 60), (60, 60)])
def test_day_of_year_filter_keeps_every_step_inside(gappy, doy):
    ds, _, times = gappy
    length = 1 if doy[0] == doy[1] else 6
    index = build_index(ds, WindowConfig(length=length, size=5, doy=doy, max_nan_fraction=1.0))
    day = pd.DatetimeIndex(times).day_of_year.to_numpy()
    t0 = np.unique(index.origins[:, 0])
    inside = inside_doy(day, *doy)
    for t in t0:
        assert inside[t : t + length].all()
    # nothing that fits was left out
    fits = [
        t
        for t in range(len(times) - length + 1)
        if inside[t : t + length].all() and (times[t + length - 1] - times[t]) == (length - 1) * DAY
    ]
    np.testing.assert_array_equal(t0, fits)


def test_too_large_windows_raise_helpful_errors(regular):
    ds, values, _ = regular
    nt, ny, nx = values.shape
    with pytest.raises(WindowError, match=rf"height {ny + 1} is larger .* height {ny}"):
        build_index(ds, WindowConfig(length=2, size=ny + 1))
    with pytest.raises(WindowError, match=rf"width {nx + 1} is larger .* width {nx}"):
        build_index(ds, WindowConfig(length=2, size=3), size_x=nx + 1)
    with pytest.raises(WindowError, match=rf"length {nt + 1} is longer than the record \({nt}"):
        build_index(ds, WindowConfig(length=nt + 1, size=3))
    # the record is March-May: a winter filter leaves nothing
    with pytest.raises(WindowError, match="day-of-year"):
        build_index(ds, WindowConfig(length=2, size=3, doy=(330, 20)))
    # the largest windows that fit are fine
    index = build_index(ds, WindowConfig(length=nt, size=ny, max_nan_fraction=1.0), size_x=nx)
    np.testing.assert_array_equal(index.origins, [[0, 0, 0]])


# ---------------------------------------------------------------------------- splits


def daily(start: str, years: int) -> np.ndarray:
    return pd.date_range(start, periods=int(365.25 * years), freq="1D").values


def windows_all_in(labels: np.ndarray, index: WindowIndex, want: int) -> set:
    """Brute force: windows of ``index`` whose every step has label ``want``."""
    length = index.shape[0]
    return {
        tuple(int(v) for v in o)
        for o in index.origins
        if (labels[o[0] : o[0] + length] == want).all()
    }


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_years_split(val_fraction):
    times = daily("2001-01-01", 6)
    index = build_index(in_memory(times), WindowConfig(length=10, size=4, stride=4))
    split = SplitConfig(
        scheme="years", train_years=(2001, 2003), test_years=(2005, 2006), val_fraction=val_fraction
    )
    parts = {p: as_set(split_index(index, split, p)) for p in ("train", "val", "test")}
    year = pd.DatetimeIndex(times).year.to_numpy()
    length = index.shape[0]

    def all_in(lo: int, hi: int) -> set:
        return {
            tuple(int(v) for v in o)
            for o in index.origins
            if ((year[o[0] : o[0] + length] >= lo) & (year[o[0] : o[0] + length] <= hi)).all()
        }

    train_years, test_years = all_in(2001, 2003), all_in(2005, 2006)
    assert parts["test"] == test_years
    if val_fraction == 0:
        assert parts["train"] == train_years
        assert not parts["val"]
    else:
        assert parts["val"]
        assert parts["train"] | parts["val"] < train_years  # windows across train/val dropped
        assert len(parts["train"]) > len(parts["val"])
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"])
    assert not parts["val"] & parts["test"]
    # windows straddling 2003/2004 or inside 2004 (neither part) are nowhere
    straddling = as_set(index) - train_years - test_years
    assert straddling
    assert not straddling & (parts["train"] | parts["val"] | parts["test"])


@pytest.mark.parametrize("start", ["1990-01-01", "1990-07-15"])
def test_seasons_split_every_fifth_season(start):
    times = daily(start, 20)
    labels = step_labels(times, SplitConfig(scheme="seasons", every=5, val_fraction=0.0), 8)
    season_year, season = season_of(times)
    key = season_year * 4 + season
    seasons = np.unique(key)
    test = [k for k in seasons if (labels[key == k] == 2).all()]
    # a season is wholly test or wholly train
    for k in seasons:
        assert len(np.unique(labels[key == k])) == 1
    assert set(np.unique(labels)) == {0, 2}
    # every fifth season (counting from the first one in the record) goes to test
    np.testing.assert_array_equal(test, seasons[4::5])
    assert len({k // 4 for k in test}) == len(test)  # never two in one season-year
    assert 0.15 <= len(test) / len(seasons) <= 0.25


@pytest.mark.parametrize("every", [2, 3, 4, 7])
def test_seasons_split_never_two_test_seasons_in_a_year(every):
    times = daily("2000-03-01", 12)
    labels = step_labels(times, SplitConfig(scheme="seasons", every=every, val_fraction=0.0), 4)
    season_year, season = season_of(times)
    test = np.unique((season_year * 4 + season)[labels == 2])
    assert len(test) > 0
    assert len({k // 4 for k in test}) == len(test)
    ordinal = {k: i for i, k in enumerate(np.unique(season_year * 4 + season))}
    assert all((ordinal[k] + 1) % every == 0 for k in test)


@pytest.mark.parametrize(
    "split",
    [
        SplitConfig(scheme="seasons", every=5, val_fraction=0.1, seed=3),
        SplitConfig(scheme="years", train_years=(1990, 2003), test_years=(2004, 2009), seed=1),
        SplitConfig(scheme="none", val_fraction=0.25, seed=7),
    ],
    ids=["seasons", "years", "none"],
)
def test_parts_disjoint_and_made_of_whole_windows(split):
    times = daily("1990-01-01", 20)
    wc = WindowConfig(length=8, size=4, stride=4, time_stride=3)
    index = build_index(in_memory(times), wc)
    labels = step_labels(times, split, wc.length, np.unique(index.origins[:, 0]))
    parts = {p: split_index(index, split, p) for p in ("train", "val", "test")}
    for want, part in enumerate(("train", "val", "test")):
        assert as_set(parts[part]) == windows_all_in(labels, index, want)
    sets = [as_set(p) for p in parts.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert parts["train"] and parts["val"]
    assert bool(len(parts["test"])) == (split.scheme != "none")
    # validation: contiguous blocks carved out of train (in train order), none tiny
    carved = np.nonzero((labels == 0) | (labels == 1))[0]
    is_val = labels[carved] == 1
    for a, n in runs(is_val):
        assert n >= 4 * wc.length or a + n == len(carved)
    n_val_steps = int(is_val.sum())
    assert 0 < n_val_steps < len(carved) // 2


def test_validation_is_seeded():
    times = daily("1990-01-01", 20)
    wc = WindowConfig(length=8, size=4, stride=4)
    index = build_index(in_memory(times), wc)

    def val(seed: int) -> set:
        return as_set(split_index(index, SplitConfig(scheme="seasons", seed=seed), "val"))

    assert val(0) == val(0)
    assert val(0) != val(1)
    assert val(1) == val(1)
    a = step_labels(times, SplitConfig(scheme="seasons", seed=5), 8)
    b = step_labels(times, SplitConfig(scheme="seasons", seed=5), 8)
    np.testing.assert_array_equal(a, b)
    # the test part does not depend on the seed
    tests = [
        as_set(split_index(index, SplitConfig(scheme="seasons", seed=s), "test")) for s in (0, 1)
    ]
    assert tests[0] == tests[1]


def test_split_index_unknown_part():
    index = build_index(in_memory(daily("2001-01-01", 1)), WindowConfig(length=4, size=4))
    with pytest.raises(WindowError, match="unknown split part"):
        split_index(index, SplitConfig(), "holdout")


# ---------------------------------------------------------------------------- parse_split


@pytest.mark.parametrize(
    "spec, part, fields",
    [
        ("test", "test", {"scheme": "seasons", "every": 5}),
        ("train", "train", {"scheme": "seasons", "every": 5}),
        ("val@seasons:7", "val", {"scheme": "seasons", "every": 7}),
        ("@seasons", "train", {"scheme": "seasons", "every": 5}),
        ("train@none", "train", {"scheme": "none"}),
        (" test @ none ", "test", {"scheme": "none"}),
        (
            "train@years:1981-2010/2011-2019",
            "train",
            {"scheme": "years", "train_years": (1981, 2010), "test_years": (2011, 2019)},
        ),
        (
            "test@years:2011-2019/1981-2010",
            "test",
            {"scheme": "years", "train_years": (2011, 2019), "test_years": (1981, 2010)},
        ),
    ],
)
def test_parse_split_grammar(spec, part, fields):
    split, got = parse_split(spec, val_fraction=0.25, seed=9)
    assert got == part
    assert split.val_fraction == 0.25 and split.seed == 9
    for name, value in fields.items():
        assert getattr(split, name) == value


@pytest.mark.parametrize(
    "spec, kw, message",
    [
        ("holdout", {}, "part must be one of train, val, test"),
        ("TEST", {}, "part must be one of"),
        ("test@season", {}, "not understood"),
        ("test@seasons:", {}, "not understood"),
        ("test@seasons:x", {}, "not understood"),
        ("test@years:1981-2010", {}, "not understood"),
        ("test@years:81-10/11-19", {}, "not understood"),
        ("test@seasons:1", {}, "every"),
        ("test@years:2010-1981/2011-2019", {}, "ordered"),
        ("test@years:1981-2010/2000-2019", {}, "overlap"),
        ("test", {"val_fraction": 1.5}, "val_fraction"),
    ],
)
def test_parse_split_errors(spec, kw, message):
    with pytest.raises(WindowError, match=message) as info:
        parse_split(spec, **kw)
    assert "\n" not in str(info.value)
