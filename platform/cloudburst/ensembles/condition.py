"""Observed frames that conditional ensembles (interpolation, forecast, extension) are tied to.

A scenario's ``condition`` names a window of an ingested store (``cloudburst ingest``): its
first time step and its top-left grid cell. :func:`read_condition` checks it against the model
(units, window size, the store's extent) and reads the frames the scenario keeps as known, in
physical units, with the coordinates the ensemble store then carries (real times and the
store's y / x), so a conditional ensemble says where and when it is.

The known frames of each kind, for a model window of ``t`` steps:

- ``interpolation``: steps 0, every, 2 every, ... of the window (every other hour by default);
- ``forecast``: the first ``context`` steps (half the window by default);
- ``extension``: the first ``context`` steps when a condition is given (the sequence starts
  from them); each later window is conditioned on the last ``context`` steps generated.

The condition's ``time`` is an ISO time in the store's calendar: on a store of a model in a
360-day calendar (UKCP18) ``2061-02-30T00:00`` is a valid time, and the output's times are
cftime times of that calendar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudburst.ensembles.request import Scenario

CONDITIONAL = ("interpolation", "forecast", "extension")
# the registry version tag a guidance sweep (cloudburst.tuning.guidance) writes per scenario:
# the engine's weight when a request gives none
GUIDANCE_TAG = "guidance_{kind}"


class ConditionError(ValueError):
    """The condition cannot be read or does not fit the model (message says why and what to do)."""


@dataclass
class ObservedWindow:
    """What a conditional ensemble keeps: ``values`` (frames, y, x) physical, NaN where the
    store has no value, ``known`` (frames,) which of those frames are given to the sampler,
    and the coordinates for the output store."""

    values: np.ndarray
    known: np.ndarray
    times: np.ndarray  # the output's time steps: datetime64[ns], or cftime in a model calendar
    step_hours: float
    y: np.ndarray
    x: np.ndarray
    y_attrs: dict[str, Any] = field(default_factory=dict)
    x_attrs: dict[str, Any] = field(default_factory=dict)
    store_fingerprint: str = ""
    calendar: str = "standard"  # CF calendar of ``times``

    @property
    def mask(self) -> np.ndarray:
        """(frames, y, x) True where a value is given: a known frame and a finite value."""
        return self.known[:, None, None] & np.isfinite(self.values)


def context_frames(scenario: Scenario, frames: int) -> int:
    """Known leading frames of a forecast / conditioning frames of an extension."""
    k = scenario.context if scenario.context is not None else frames // 2
    if not 0 < k < frames:
        raise ConditionError(
            f"scenario.context must be between 1 and {frames - 1} for this model's "
            f"{frames}-step windows (got {k})"
        )
    return k


def output_frames(scenario: Scenario, frames: int) -> int:
    """Time steps of each member: the model's window, or ``length`` for an extension."""
    if scenario.kind == "extension":
        assert scenario.length is not None
        return int(scenario.length)
    return frames


def known_steps(scenario: Scenario, frames: int) -> np.ndarray:
    """(frames,) bool: which steps of the first window are given (see the module doc)."""
    known = np.zeros(frames, dtype=bool)
    if scenario.kind == "interpolation":
        if scenario.every >= frames:
            raise ConditionError(
                f"scenario.every = {scenario.every} leaves only the first of the model's "
                f"{frames} steps known; use 2 to {frames - 1}"
            )
        known[:: scenario.every] = True
    elif scenario.kind in ("forecast", "extension"):
        known[: context_frames(scenario, frames)] = True
    return known


def read_condition(
    scenario: Scenario,
    window: tuple[int, int, int],
    units: str,
    options: dict[str, Any] | None = None,
) -> ObservedWindow | None:
    """The observed frames ``scenario`` is conditioned on, checked against a model of
    ``window`` (time, y, x) trained in ``units``; None when it has no condition."""
    if scenario.kind not in CONDITIONAL:
        return None
    frames, ny, nx = window
    known = known_steps(scenario, frames)
    if scenario.condition is None:
        return None
    from cloudburst.data import calendars
    from cloudburst.data.ingest import PRECIP, StoreError, open_store, read_marker
    from cloudburst.data.sources import time_step

    c = scenario.condition
    try:
        ds, stats = open_store(c.data, options)
    except (StoreError, OSError) as exc:
        raise ConditionError(f"scenario.condition.data: {exc}") from None
    if units and stats.units and stats.units != units:
        raise ConditionError(
            f"{c.data} is in {stats.units} but the model was trained in {units}; condition on "
            "a store ingested like the model's training data"
        )
    da = ds[PRECIP]
    times = ds["time"].values
    calendar = calendars.calendar_of(times)
    try:
        start = calendars.parse(c.time, calendar)
    except calendars.CalendarError as exc:
        raise ConditionError(
            f"scenario.condition.time: {exc}; {c.data} is in the {calendar} calendar"
        ) from None
    offsets = calendars.since(times, start)
    found = np.flatnonzero(offsets == np.timedelta64(0, "ns"))
    if not len(found):
        near = times[np.argsort(np.abs(offsets.astype(np.int64)))[:3]]
        raise ConditionError(
            f"{c.data} has no time step at {c.time}; it runs from {_iso(times[0])} to "
            f"{_iso(times[-1])} (nearest: {', '.join(_iso(t) for t in sorted(near))})"
        )
    i = int(found[0])
    if i + frames > len(times):
        raise ConditionError(
            f"the {frames}-step window from {c.time} runs past the end of {c.data} "
            f"({_iso(times[-1])}); start at {_iso(times[max(0, len(times) - frames)])} or earlier"
        )
    dims = [d for d in da.dims if d != "time"]
    sy, sx = (int(da.sizes[d]) for d in dims)
    if c.y + ny > sy or c.x + nx > sx:
        raise ConditionError(
            f"the {ny} x {nx} window at (y={c.y}, x={c.x}) runs past {c.data}'s {sy} x {sx} grid; "
            f"y must be <= {sy - ny} and x <= {sx - nx}"
        )
    span = times[i : i + frames]
    gaps = np.unique(calendars.deltas(span))
    if len(gaps) > 1:
        raise ConditionError(
            f"{c.data} has irregular time steps between {_iso(span[0])} and {_iso(span[-1])}; "
            "choose a window without gaps"
        )
    step = time_step(times)
    step_hours = float(step / np.timedelta64(1, "h")) if step is not None else 1.0
    values = window_values(da, i, frames, c.y, c.x, (ny, nx))
    if not np.isfinite(values[known]).any():
        raise ConditionError(
            f"the known frames of the window at {c.time}, (y={c.y}, x={c.x}) of {c.data} have no "
            "value (outside the radar's range?); choose another window"
        )
    out_frames = output_frames(scenario, frames)
    spacing = calendars.deltas(span)[0] if frames > 1 else step
    out_times = calendars.shift(times[i], np.arange(out_frames) * spacing)
    marker = read_marker(c.data, options) or {}
    return ObservedWindow(
        values=values,
        known=known,
        times=out_times,
        step_hours=step_hours,
        y=np.asarray(ds[dims[0]].values[c.y : c.y + ny]),
        x=np.asarray(ds[dims[1]].values[c.x : c.x + nx]),
        y_attrs=_plain(ds[dims[0]].attrs),
        x_attrs=_plain(ds[dims[1]].attrs),
        store_fingerprint=str(marker.get("fingerprint", "")),
        calendar=calendar,
    )


def window_values(
    da: Any, start: int, frames: int, y: int, x: int, shape: tuple[int, int]
) -> np.ndarray:
    """float32 (frames, ny, nx) of the (time, y, x) array ``da`` from step ``start`` and cell
    (y, x); fewer frames where the array ends."""
    dims = [d for d in da.dims if d != "time"]
    region = {
        "time": slice(start, start + frames),
        dims[0]: slice(y, y + shape[0]),
        dims[1]: slice(x, x + shape[1]),
    }
    return np.asarray(da.isel(region).values, dtype=np.float32)


def _iso(t: Any) -> str:
    from cloudburst.data import calendars

    return calendars.iso(t, unit="m")


def _plain(attrs: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in attrs.items() if isinstance(v, str | int | float)}


def tuned_weight(tags: dict[str, str], kind: str) -> float | None:
    """The swept weight a version's tags give for scenario ``kind`` (extension takes the
    forecast's), or None."""
    for key in (kind, "forecast") if kind == "extension" else (kind,):
        raw = tags.get(GUIDANCE_TAG.format(kind=key))
        if raw is not None:
            try:
                value = float(raw)
            except ValueError:
                continue
            if math.isfinite(value) and value >= 0:
                return value
    return None
