"""Which trial wins: the tail objective under a bulk-bias bound, and the Pareto front.

A trial row is a mapping with the trial's ``trial_id``, ``status`` (``finished``: its model
was logged; ``stopped``: the scheduler stopped it early; ``error``), its point of the space,
and its metrics (those of the epoch whose checkpoint was packaged, for a finished trial).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloudburst.tuning.config import Objective

__all__ = ["Selection", "pareto_front", "select"]


@dataclass(frozen=True)
class Selection:
    """``best``: the winning row (None: no finished trial reports the metric);
    ``feasible``: whether it met the bias bound (False: none did, the best overall is taken);
    ``reason``: one line saying why."""

    best: Mapping[str, Any] | None
    feasible: bool
    reason: str


def _value(row: Mapping[str, Any], key: str | None) -> float:
    if key is None:
        return math.nan
    try:
        v = float(row.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return v


def _score(row: Mapping[str, Any], objective: Objective) -> float:
    """The objective as a value to minimise (NaN: not reported)."""
    v = _value(row, objective.metric)
    return v if objective.mode == "min" else -v


def select(rows: Sequence[Mapping[str, Any]], objective: Objective) -> Selection:
    """The best finished trial by ``objective`` among those within its bias bound."""
    finished = [
        r for r in rows if r.get("status") == "finished" and math.isfinite(_score(r, objective))
    ]
    if not finished:
        return Selection(None, False, f"no finished trial reports {objective.metric}")
    bounded = objective.bias_metric is not None and objective.bias_bound is not None
    if bounded:
        feasible = [
            r
            for r in finished
            if abs(_value(r, objective.bias_metric)) <= float(objective.bias_bound)  # type: ignore[arg-type]
        ]
    else:
        feasible = finished
    pool = feasible or finished
    best = min(pool, key=lambda r: _score(r, objective))
    if not bounded:
        reason = f"{objective.mode} {objective.metric} over {len(finished)} finished trials"
    elif feasible:
        reason = (
            f"{objective.mode} {objective.metric} among the {len(feasible)} of {len(finished)} "
            f"finished trials with |{objective.bias_metric}| <= {objective.bias_bound:g}"
        )
    else:
        reason = (
            f"no finished trial has |{objective.bias_metric}| <= {objective.bias_bound:g}; "
            f"{objective.mode} {objective.metric} over all {len(finished)} taken instead"
        )
    return Selection(best, bool(feasible) or not bounded, reason)


def pareto_front(
    rows: Sequence[Mapping[str, Any]], objective: Objective
) -> list[Mapping[str, Any]]:
    """The rows no other row beats on both the objective and |bias| (finished rows with
    both values), sorted by the objective."""
    if objective.bias_metric is None:
        return []
    points = [
        (r, _score(r, objective), abs(_value(r, objective.bias_metric)))
        for r in rows
        if r.get("status") == "finished"
    ]
    points = [(r, s, b) for r, s, b in points if math.isfinite(s) and math.isfinite(b)]
    front = [
        (r, s, b)
        for r, s, b in points
        if not any((s2 <= s and b2 <= b) and (s2 < s or b2 < b) for _, s2, b2 in points)
    ]
    return [r for r, _, _ in sorted(front, key=lambda p: p[1])]
