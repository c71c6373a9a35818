"""The sample index: which (time, y, x) windows of a store make training samples.

A window is an origin ``(t0, y0, x0)`` and a fixed shape ``(length, size, size)``. The index
holds every valid origin, after:

- time contiguity (a window never spans a gap in the record) and a time stride;
- a day-of-year filter (every step of the window inside, e.g. the monsoon 150-300);
- a NaN policy (drop windows above ``max_nan_fraction``; the loader fills the rest with 0 and
  returns a validity mask);
- a split into train / val / test: by year ranges, season-stratified (every n-th season
  to test, never two test seasons in one year), or by frames (every n-th time step, or named
  times, to test, with an optional guard of steps either side kept out of train and val: for
  short records of images, e.g. one day of satellite frames). Validation is carved from train
  in contiguous time blocks, never mixed with it inside one window. Windows straddling two
  parts are dropped.

Times may be in any CF calendar (datetime64 or cftime, see :mod:`cloudburst.data.calendars`):
in a 360-day year the day of year runs 1..360 and every month (so every season) has 30 days.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import xarray as xr
from pydantic import ValidationError

from cloudburst.config import SplitConfig, WindowConfig
from cloudburst.data import calendars
from cloudburst.data.ingest import store_variables

PARTS = ("train", "val", "test")
_LABEL = {"train": 0, "val": 1, "test": 2}


class WindowError(ValueError):
    """Windows cannot be cut as asked; the message says why and what would work."""


@dataclass(frozen=True)
class WindowIndex:
    """Origins of valid windows, with their shape and the store's time axis."""

    origins: np.ndarray  # (n, 3) int64: t0, y0, x0
    shape: tuple[int, int, int]  # (length, size_y, size_x)
    nan_fraction: np.ndarray  # (n,) float32
    times: np.ndarray  # the store's time coordinate (datetime64, or cftime in a model calendar)
    grid: tuple[int, int, int]  # the store's (nt, ny, nx)

    def __len__(self) -> int:
        return int(self.origins.shape[0])

    def subset(self, keep: np.ndarray) -> WindowIndex:
        return replace(self, origins=self.origins[keep], nan_fraction=self.nan_fraction[keep])

    def start_times(self) -> np.ndarray:
        return self.times[self.origins[:, 0]]

    def table(self, limit: int = 10) -> list[dict[str, Any]]:
        rows = []
        for (t0, y0, x0), frac in zip(self.origins[:limit], self.nan_fraction[:limit], strict=True):
            rows.append(
                {
                    "t0": int(t0),
                    "y0": int(y0),
                    "x0": int(x0),
                    "start": calendars.iso(self.times[t0], unit="s"),
                    "end": calendars.iso(self.times[t0 + self.shape[0] - 1], unit="s"),
                    "nan_fraction": round(float(frac), 4),
                }
            )
        return rows


def _positions(n: int, size: int, stride: int, what: str) -> np.ndarray:
    if size > n:
        raise WindowError(
            f"window {what} {size} is larger than the store's {what} {n}. "
            f"Use a window of at most {n}, or ingest a larger region."
        )
    return np.arange(0, n - size + 1, stride, dtype=np.int64)


def _doy_inside(times: np.ndarray, doy: tuple[int, int] | None) -> np.ndarray:
    if doy is None:
        return np.ones(len(times), dtype=bool)
    d = calendars.fields(times)["dayofyear"]
    lo, hi = doy
    return (d >= lo) & (d <= hi) if lo <= hi else (d >= lo) | (d <= hi)


def _all_true_runs(ok: np.ndarray, length: int) -> np.ndarray:
    """For each start t, whether ok[t:t+length] is all True (for t <= len(ok) - length)."""
    bad = np.concatenate([[0], np.cumsum(~ok)])
    return (bad[length:] - bad[:-length]) == 0


def _nan_counts(
    da: xr.DataArray | list[xr.DataArray],
    starts_t: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    shape: tuple[int, int, int],
    block_bytes: int = 64 * 2**20,
) -> np.ndarray:
    """NaN count of every window (t0 in starts_t) x ys x xs, reading the data in time blocks;
    with several arrays, a cell counts where any of them is NaN."""
    arrays = da if isinstance(da, list) else [da]
    length, sy, sx = shape
    nt = arrays[0].sizes["time"]
    block = max(1, block_bytes // (4 * arrays[0].sizes["y"] * arrays[0].sizes["x"]))
    per_step = np.zeros((nt, len(ys), len(xs)), dtype=np.int32)
    for a in range(0, nt, block):
        chunk = np.isnan(arrays[0].isel(time=slice(a, a + block)).values)
        for other in arrays[1:]:
            chunk |= np.isnan(other.isel(time=slice(a, a + block)).values)
        integral = np.zeros((chunk.shape[0], chunk.shape[1] + 1, chunk.shape[2] + 1), np.int32)
        integral[:, 1:, 1:] = chunk.cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
        y1, x1 = ys + sy, xs + sx
        per_step[a : a + chunk.shape[0]] = (
            integral[:, y1][:, :, x1]
            - integral[:, ys][:, :, x1]
            - integral[:, y1][:, :, xs]
            + integral[:, ys][:, :, xs]
        )
    cum = np.concatenate([np.zeros((1, len(ys), len(xs)), np.int64), per_step.cumsum(0)])
    return cum[starts_t + length] - cum[starts_t]


def build_index(
    ds: xr.Dataset,
    windows: WindowConfig,
    *,
    size_x: int | None = None,
    variables: list[str] | None = None,
) -> WindowIndex:
    """Every valid window of the store ``ds`` (opened by ``ingest.open_store``).

    In a store of several variables the windows are shared by all of them: a cell is missing
    where any of ``variables`` (default: all the store's) is NaN.
    """
    names = list(variables) if variables else store_variables(ds)
    unknown = [v for v in names if v not in ds.data_vars]
    if unknown:
        raise WindowError(
            f"variable(s) {unknown} not in the store; it has {', '.join(store_variables(ds))}"
        )
    da = ds[names[0]]
    nt, ny, nx = (int(da.sizes[d]) for d in ("time", "y", "x"))
    length, sy, sx = windows.length, windows.size, size_x or windows.size
    if length > nt:
        raise WindowError(
            f"window length {length} is longer than the record ({nt} steps). "
            f"Use --length <= {nt} or ingest a longer period."
        )
    ys = _positions(ny, sy, windows.stride, "height")
    xs = _positions(nx, sx, windows.stride, "width")
    times = np.asarray(ds["time"].values)

    ok = np.ones(nt, dtype=bool)
    if nt > 1:  # contiguity: a window never spans a gap in the record
        dt = calendars.deltas(times)
        step = np.median(dt)
        regular = np.concatenate([dt == step, [True]])
        # window [t, t+L) is contiguous if every diff inside (t .. t+L-2) is regular
        gaps_ok = _all_true_runs(regular[:-1], length - 1) if length > 1 else np.ones(nt, bool)
        ok[: len(gaps_ok)] &= gaps_ok
    starts = np.nonzero(
        ok[: nt - length + 1] & _all_true_runs(_doy_inside(times, windows.doy), length)
    )[0]
    starts = starts[:: windows.time_stride] if windows.time_stride > 1 else starts
    if starts.size == 0:
        raise WindowError(
            f"no window of {length} steps fits the record with day-of-year filter {windows.doy}; "
            "widen the filter or shorten the window."
        )
    counts = _nan_counts([ds[n] for n in names], starts, ys, xs, (length, sy, sx))
    frac = counts.astype(np.float32) / float(length * sy * sx)
    t_grid, y_grid, x_grid = np.meshgrid(starts, ys, xs, indexing="ij")
    origins = np.stack([t_grid.ravel(), y_grid.ravel(), x_grid.ravel()], axis=1).astype(np.int64)
    frac = frac.ravel()
    keep = frac <= windows.max_nan_fraction + 1e-9
    return WindowIndex(origins[keep], (length, sy, sx), frac[keep], times, (nt, ny, nx))


# ---------------------------------------------------------------------------- splits


def season_keys(times: np.ndarray) -> np.ndarray:
    """(season year, season) as one int per step: DJF counts to the year of its January."""
    f = calendars.fields(times)
    season = (f["month"] % 12) // 3  # 0 DJF, 1 MAM, 2 JJA, 3 SON
    year = f["year"] + (f["month"] == 12)
    return year * 4 + season


def step_labels(
    times: np.ndarray, split: SplitConfig, length: int, starts: np.ndarray | None = None
) -> np.ndarray:
    """Part of every time step: 0 train, 1 val, 2 test, -1 none.

    ``starts`` (window start steps) lets validation blocks be drawn where windows exist.
    """
    n = len(times)
    labels = np.zeros(n, dtype=np.int8)
    years = calendars.fields(times)["year"]
    if split.scheme == "years":
        assert split.train_years is not None and split.test_years is not None
        (a, b), (c, d) = split.train_years, split.test_years
        labels[:] = -1
        labels[(years >= a) & (years <= b)] = 0
        labels[(years >= c) & (years <= d)] = 2
    elif split.scheme == "seasons":
        keys = season_keys(times)
        used_years: set[int] = set()
        for k, key in enumerate(np.unique(keys)):
            year = int(key) // 4
            if k % split.every == split.every - 1 and year not in used_years:
                labels[keys == key] = 2
                used_years.add(year)
    elif split.scheme == "frames":
        labels[frame_tests(times, split)] = 2
        if split.guard:
            test = np.flatnonzero(labels == 2)
            near = np.zeros(n, dtype=bool)
            for k in range(1, split.guard + 1):
                near[np.clip(test - k, 0, n - 1)] = True
                near[np.clip(test + k, 0, n - 1)] = True
            labels[near & (labels != 2)] = -1
    if split.val_fraction > 0:
        _carve_validation(labels, times, split, length, starts)
    return labels


def frame_tests(times: np.ndarray, split: SplitConfig) -> np.ndarray:
    """Steps the frames scheme holds out for test: ``test_times``, or every n-th step (the
    n-th, 2n-th, ... counting from the first)."""
    n = len(times)
    if split.test_times is None:
        return np.arange(split.every - 1, n, split.every)
    stamps = {calendars.iso(t, unit="s"): i for i, t in enumerate(times)}
    chosen = []
    for text in split.test_times:
        try:
            key = str(np.datetime_as_string(np.datetime64(text.strip(), "s"), unit="s"))
        except ValueError:
            key = text.strip()
        if key not in stamps:
            shown = ", ".join(list(stamps)[:3])
            raise WindowError(
                f"test time {text!r} is not a time step of the store (it has {n} steps: "
                f"{shown}{', ...' if n > 3 else ''}); give times of the store"
            )
        chosen.append(stamps[key])
    return np.asarray(sorted(set(chosen)), dtype=np.int64)


def _carve_validation(
    labels: np.ndarray,
    times: np.ndarray,
    split: SplitConfig,
    length: int,
    starts: np.ndarray | None,
) -> None:
    """Turn a seeded fraction of contiguous train blocks into validation, in place."""
    train = np.nonzero(labels == 0)[0]
    if train.size == 0:
        return
    step = np.median(calendars.deltas(times)) if len(times) > 1 else np.timedelta64(1, "D")
    per_season = max(1, int(np.timedelta64(91, "D") / step))
    block = max(4 * length, min(per_season, train.size // 10))
    block_id = np.zeros(len(labels), dtype=np.int64)
    block_id[train] = np.arange(train.size) // block
    ids = np.unique(block_id[train])
    if starts is not None:  # only blocks where windows start (e.g. inside a season filter)
        starts = starts[labels[starts] == 0]
        ids = np.unique(block_id[starts])
    if ids.size < 2:
        return
    n_val = max(1, int(round(split.val_fraction * ids.size)))
    rng = np.random.default_rng(split.seed)
    chosen = rng.choice(ids, size=min(n_val, ids.size - 1), replace=False)
    labels[train[np.isin(block_id[train], chosen)]] = 1


def split_index(index: WindowIndex, split: SplitConfig, part: str) -> WindowIndex:
    """The windows of ``part`` (train, val or test): every step of the window in that part."""
    if part not in PARTS:
        raise WindowError(f"unknown split part {part!r}; use one of {', '.join(PARTS)}")
    length = index.shape[0]
    labels = step_labels(index.times, split, length, np.unique(index.origins[:, 0]))
    want = _LABEL[part]
    inside = _all_true_runs(labels == want, length)
    return index.subset(inside[index.origins[:, 0]])


def _split_config(spec: str, **fields: Any) -> SplitConfig:
    """SplitConfig for ``spec``; a value it rejects is a one-line WindowError naming it."""
    try:
        return SplitConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'split'} {err['input']!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise WindowError(f"split {spec!r}: {problems}") from None


def parse_split(spec: str, *, val_fraction: float = 0.1, seed: int = 0) -> tuple[SplitConfig, str]:
    """``PART[@SCHEME]`` -> (SplitConfig, part).

    SCHEME is ``seasons`` or ``seasons:N`` (every N-th season to test; the default, N = 5),
    ``years:A-B/C-D`` (train years A-B, test years C-D), ``frames`` or ``frames:N`` (every
    N-th time step to test, default 5) or ``none`` (no test part).
    Examples: ``test``, ``train@years:1981-2010/2011-2019``, ``val@seasons:5``, ``test@frames:4``.
    """
    part, _, scheme = spec.partition("@")
    part = part.strip() or "train"
    if part not in PARTS:
        raise WindowError(f"split {spec!r}: part must be one of {', '.join(PARTS)}")
    scheme = scheme.strip() or "seasons"
    if scheme == "none":
        return _split_config(spec, scheme="none", val_fraction=val_fraction, seed=seed), part
    m = re.fullmatch(r"seasons(?::(\d+))?", scheme)
    if m:
        every = int(m.group(1) or 5)
        return _split_config(
            spec, scheme="seasons", every=every, val_fraction=val_fraction, seed=seed
        ), part
    m = re.fullmatch(r"frames(?::(\d+))?", scheme)
    if m:
        every = int(m.group(1) or 5)
        return _split_config(
            spec, scheme="frames", every=every, val_fraction=val_fraction, seed=seed
        ), part
    m = re.fullmatch(r"years:(\d{4})-(\d{4})/(\d{4})-(\d{4})", scheme)
    if m:
        a, b, c, d = (int(g) for g in m.groups())
        if a > b or c > d or not (b < c or d < a):
            raise WindowError(
                f"split {spec!r}: year ranges must be ordered (A <= B, C <= D) and must not "
                f"overlap (train {a}-{b}, test {c}-{d})"
            )
        return _split_config(
            spec,
            scheme="years",
            train_years=(a, b),
            test_years=(c, d),
            val_fraction=val_fraction,
            seed=seed,
        ), part
    raise WindowError(
        f"split scheme {scheme!r} not understood; use seasons, seasons:N, "
        "years:1981-2010/2011-2019, frames, frames:N or none"
    )
