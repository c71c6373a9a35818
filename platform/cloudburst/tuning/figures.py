"""A sweep's figures: the Pareto front of tail error against bulk bias, and the trials on
parallel coordinates (each hyperparameter and the objective on its own normalised axis)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cloudburst.evaluation.figures import figure
from cloudburst.tuning.config import Objective

__all__ = ["parallel", "pareto"]

STATUS_COLOURS = {"finished": "tab:blue", "stopped": "tab:grey", "error": "tab:red"}


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def pareto(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    objective: Objective,
    title: str,
) -> Any | None:
    """Objective against |bias| per trial (finished and stopped), the front joined and the
    bias bound drawn; None when no trial reports both."""
    if objective.bias_metric is None:
        return None
    pts = [
        (abs(_num(r.get(objective.bias_metric))), _num(r.get(objective.metric)), r) for r in rows
    ]
    pts = [(b, s, r) for b, s, r in pts if math.isfinite(b) and math.isfinite(s)]
    if not pts:
        return None
    fig = figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for status, colour in STATUS_COLOURS.items():
        mine = [(b, s) for b, s, r in pts if r.get("status") == status]
        if mine:
            ax.scatter(*zip(*mine, strict=True), c=colour, label=f"{status} ({len(mine)})")
    line = sorted(
        (abs(_num(r.get(objective.bias_metric))), _num(r.get(objective.metric))) for r in front
    )
    if line:
        ax.plot(*zip(*line, strict=True), "k--", lw=1, label="Pareto front")
    for b, s, r in pts:
        ax.annotate(str(r.get("trial_id", ""))[-5:], (b, s), fontsize=7, alpha=0.7)
    if objective.bias_bound is not None:
        ax.axvline(objective.bias_bound, color="tab:red", lw=1, ls=":", label="bias bound")
    ax.set_xlabel(f"|{objective.bias_metric}|")
    ax.set_ylabel(f"{objective.metric} ({objective.mode})")
    ax.set_title(f"{title}: tail error against bulk bias")
    ax.legend(fontsize=8)
    return fig


def parallel(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], objective: Objective
) -> Any | None:
    """One line per trial across the space's keys and the objective, each axis scaled to
    [0, 1] over the trials (categorical values by their order of appearance; log scale for
    keys spanning more than a decade); None without rows."""
    if not rows:
        return None
    axes = [f"param:{k}" for k in keys] + [objective.metric]
    columns: list[list[float]] = []
    labels: list[str] = []
    for axis in axes:
        raw = [r.get(axis) for r in rows]
        values = [_num(v) for v in raw]
        if any(v is not None and not math.isfinite(n) for v, n in zip(raw, values, strict=True)):
            order = list(dict.fromkeys(str(v) for v in raw))
            values = [float(order.index(str(v))) for v in raw]
        finite = [v for v in values if math.isfinite(v)]
        log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 10
        if log:
            values = [math.log10(v) if v > 0 else math.nan for v in values]
            finite = [v for v in values if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        span = hi - lo or 1.0
        columns.append([(v - lo) / span for v in values])
        labels.append(axis.removeprefix("param:") + (" (log)" if log else ""))
    fig = figure(figsize=(max(6.4, 1.6 * len(axes)), 4.8))
    ax = fig.add_subplot()
    xs = list(range(len(axes)))
    for i, row in enumerate(rows):
        ys = [col[i] for col in columns]
        colour = STATUS_COLOURS.get(str(row.get("status")), "tab:grey")
        ax.plot(xs, ys, color=colour, alpha=0.7, marker="o", ms=3)
    ax.set_xticks(xs, labels, rotation=20, fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    for x in xs:
        ax.axvline(x, color="k", lw=0.5)
    ax.set_title("trials (blue finished, grey stopped early, red failed)")
    return fig
