"""Time axes in any CF calendar: numpy ``datetime64`` (standard) or ``cftime`` objects.

Real-world archives decode to ``datetime64``; climate-model output often comes in a model
calendar (UKCP18's ``360_day``: twelve 30-day months; ``noleap`` / ``365_day``; ``all_leap``),
which xarray decodes to ``cftime`` objects. Everything downstream that looks at times (time
steps and gaps, day of year, months and years, ISO times) goes through these helpers, so the
two kinds have one code path:

- :func:`calendar_of` names the calendar (``"standard"`` for ``datetime64``);
- :func:`deltas` / :func:`since` give ``timedelta64[ns]`` differences in either kind;
- :func:`fields` gives year, month, day-of-year (1..360 in a 360-day year), hour, minute;
- :func:`parse` reads an ISO time in a calendar (``2061-02-30T00:00`` is a 360-day time);
- :func:`iso` writes one.

Standard-calendar ``cftime`` objects (``gregorian``, ``proleptic_gregorian``) are turned into
``datetime64`` by :func:`standardise`, so real calendars keep exactly today's path.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

STANDARD = "standard"
STANDARD_NAMES = ("standard", "gregorian", "proleptic_gregorian")
_ISO = re.compile(
    r"\s*(-?\d{1,4})-(\d{1,2})-(\d{1,2})"
    r"(?:[T ](\d{1,2})(?::(\d{1,2})(?::(\d{1,2})(?:\.\d*)?)?)?)?\s*(?:Z|[+-]00:?00)?\s*"
)


class CalendarError(ValueError):
    """A time cannot be read in the calendar asked for; the message says why."""


def is_cftime(times: Any) -> bool:
    """Whether ``times`` (array, index or one value) holds cftime objects."""
    import cftime

    if isinstance(times, cftime.datetime):
        return True
    arr = np.asarray(times)
    if arr.dtype != object or arr.size == 0:
        return False
    return isinstance(arr.flat[0], cftime.datetime)


def is_time(values: Any) -> bool:
    """Whether an array or coordinate holds times: datetime64 or cftime."""
    dtype = getattr(values, "dtype", None)
    if dtype is not None and np.issubdtype(dtype, np.datetime64):
        return True
    if dtype is not None and np.dtype(dtype).kind != "O":
        return False
    return is_cftime(np.asarray(values).ravel()[:1])


def calendar_of(times: Any) -> str:
    """The CF calendar of ``times``: ``standard`` for datetime64, else the cftime calendar."""
    arr = np.asarray(times)
    if not is_cftime(arr):
        return STANDARD
    first = arr.item() if arr.ndim == 0 else arr.flat[0]
    cal = str(getattr(first, "calendar", "") or STANDARD)
    return STANDARD if cal in STANDARD_NAMES else cal


def standardise(times: np.ndarray) -> np.ndarray:
    """``times`` as datetime64[ns] where the calendar is a real one; cftime objects otherwise."""
    arr = np.asarray(times)
    if not is_cftime(arr) or calendar_of(arr) != STANDARD:
        return arr
    try:
        return np.asarray(
            xr.CFTimeIndex(arr).to_datetimeindex(time_unit="ns").values, dtype="datetime64[ns]"
        )
    except (ValueError, OverflowError, TypeError):  # outside datetime64's range: stay cftime
        return arr


def _to_timedelta(values: np.ndarray) -> np.ndarray:
    """An object array of ``datetime.timedelta`` as timedelta64[ns]."""
    out = np.asarray(values)
    if out.dtype == object:
        out = np.array([np.timedelta64(v, "us") for v in out.ravel()], dtype="timedelta64[us]")
        out = out.reshape(np.shape(values))
    return out.astype("timedelta64[ns]")


def deltas(times: np.ndarray) -> np.ndarray:
    """Consecutive differences of ``times`` as timedelta64[ns] (either kind of time)."""
    arr = np.asarray(times)
    if len(arr) < 2:
        return np.zeros(0, dtype="timedelta64[ns]")
    return _to_timedelta(np.diff(arr))


def since(times: np.ndarray, origin: Any) -> np.ndarray:
    """``times - origin`` as timedelta64[ns] (either kind of time); ``origin`` is one time or
    an array of the shape of ``times`` (element-wise)."""
    arr = np.asarray(times)
    org = np.asarray(origin)
    if is_cftime(arr):
        pairs = zip(arr.ravel(), np.broadcast_to(org, arr.shape).ravel(), strict=True)
        diffs = np.array([t - o for t, o in pairs], dtype=object)
        return _to_timedelta(diffs).reshape(arr.shape)
    return (arr - org.astype("datetime64[ns]")).astype("timedelta64[ns]")


def shift(origin: Any, offsets: np.ndarray) -> np.ndarray:
    """``origin + offsets`` (timedelta64) as times of ``origin``'s kind."""
    off = np.asarray(offsets).astype("timedelta64[us]")
    if is_cftime(origin):
        return np.array(
            [origin + _dt.timedelta(microseconds=int(o.astype(np.int64))) for o in off],
            dtype=object,
        )
    return (np.datetime64(origin, "ns") + off).astype("datetime64[ns]")


def fields(times: np.ndarray) -> dict[str, np.ndarray]:
    """year, month, day, dayofyear (1-based), hour, minute of every step, as int arrays."""
    arr = np.asarray(times)
    if is_cftime(arr):
        idx: Any = xr.CFTimeIndex(arr)
        doy = idx.dayofyear
    else:
        idx = pd.DatetimeIndex(arr)
        doy = idx.day_of_year
    return {
        "year": np.asarray(idx.year, dtype=np.int64),
        "month": np.asarray(idx.month, dtype=np.int64),
        "day": np.asarray(idx.day, dtype=np.int64),
        "dayofyear": np.asarray(doy, dtype=np.int64),
        "hour": np.asarray(idx.hour, dtype=np.int64),
        "minute": np.asarray(idx.minute, dtype=np.int64),
    }


def parse(text: str, calendar: str = STANDARD) -> Any:
    """The ISO time ``text`` in ``calendar``: datetime64[ns] for the standard calendar, a cftime
    object otherwise. Raises :class:`CalendarError` when it is not an ISO time or not a date of
    that calendar (e.g. 2061-02-30 outside a 360-day calendar)."""
    if calendar in STANDARD_NAMES:
        try:
            return np.datetime64(text, "ns")
        except ValueError:
            raise CalendarError(f"{text!r} is not an ISO time (e.g. 2022-10-18T00:50)") from None
    import cftime

    m = _ISO.fullmatch(str(text))
    if not m:
        raise CalendarError(f"{text!r} is not an ISO time (e.g. 2061-02-30T00:00)")
    parts = [int(g) if g is not None else 0 for g in m.groups()]
    try:
        return cftime.datetime(*parts, calendar=calendar)
    except ValueError as exc:
        raise CalendarError(f"{text!r} is not a date in the {calendar} calendar ({exc})") from None


def iso(t: Any, unit: str = "m") -> str:
    """``t`` (datetime64 or cftime) as ISO text to the minute (``unit="m"``) or second."""
    if is_cftime(t):
        fmt = "%Y-%m-%dT%H:%M" if unit == "m" else "%Y-%m-%dT%H:%M:%S"
        return str(t.strftime(fmt))
    return str(np.datetime_as_string(np.datetime64(t, "ns"), unit=unit))


def cf_time(times: np.ndarray, unit: str = "hours") -> tuple[np.ndarray, dict[str, str]]:
    """``times`` as CF numbers ``<unit> since <first time>`` and their attributes (with the
    calendar), e.g. ``hours since 2061-02-30T00:00:00`` with ``calendar: 360_day``."""
    arr = np.asarray(times)
    per = np.timedelta64(1, {"hours": "h", "minutes": "m", "seconds": "s", "days": "D"}[unit])
    values = since(arr, arr[0]) / per
    attrs = {
        "standard_name": "time",
        "units": f"{unit} since {iso(arr[0], unit='s')}",
        "calendar": calendar_of(arr),
    }
    return np.asarray(values, dtype=np.float64), attrs
