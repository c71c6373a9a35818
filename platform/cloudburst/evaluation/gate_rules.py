"""The promotion gate's rules: the metrics a candidate must not be worse on per model family,
their tolerances, one comparison row per metric, and the verdict (see
:mod:`cloudburst.evaluation.gate`, which runs the evaluation and moves the alias)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "GATE_METRICS",
    "GENERATION_GATE",
    "VAE_GATE",
    "GateMetric",
    "GateRow",
    "GateVerdict",
    "compare",
    "gate_metrics",
    "metric_value",
]

Goal = Literal["min", "max"]
Status = Literal["passed", "refused", "forced", "no-champion", "same"]


@dataclass(frozen=True)
class GateMetric:
    """A metric the candidate must not be worse on: ``goal`` ``min`` (lower is better) or
    ``max``; worse beyond ``rtol`` times the holder's value plus ``atol`` refuses it."""

    name: str
    goal: Goal
    rtol: float
    atol: float = 0.0

    def allowed(self, champion: float) -> float:
        """The worst value the candidate may have against ``champion``."""
        slack = self.rtol * abs(champion) + self.atol
        return champion + slack if self.goal == "min" else champion - slack

    def tolerance(self) -> str:
        text = f"{self.rtol:.0%}"
        return f"{text} + {self.atol:g}" if self.atol else text


def _extreme_window_fraction_error(metrics: Mapping[str, Any]) -> float | None:
    generated = metrics.get("extreme_window_fraction")
    observed = metrics.get("observed_extreme_window_fraction")
    if generated is None or observed is None:
        return None
    return abs(float(generated) - float(observed))


# Gate metrics computed from the engine's own: name -> f(an entry's metrics).
DERIVED: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
    # |share of generated windows with a pixel above the training q0.99 - observed share|
    "extreme_window_fraction_error": _extreme_window_fraction_error,
}

# The VAE reconstructs and is verified as a conditional ensemble (score_models.evaluate_model):
# quantized MSE of the wettest 5 bins, fair-less CRPS of its posterior draws, and the bias of
# its generated windows (entries.generation_metrics).
VAE_GATE: tuple[GateMetric, ...] = (
    GateMetric("qmse_top5", "min", 0.05),
    GateMetric("cond_crps", "min", 0.05),
    GateMetric("mean_abs_bias", "min", 0.10),
)
# Every other family is only sampled: its generated windows against the observed ones.
GENERATION_GATE: tuple[GateMetric, ...] = (
    GateMetric("psd_spatial_log_error", "min", 0.10),
    GateMetric("mean_abs_bias", "min", 0.10),
    GateMetric("extreme_window_fraction_error", "min", 0.25, atol=0.02),
)
GATE_METRICS: dict[str, tuple[GateMetric, ...]] = {
    "vae": VAE_GATE,
    "diffusion": GENERATION_GATE,
}


def gate_metrics(family: str | None) -> tuple[GateMetric, ...]:
    """The gate metrics of a model family (``model`` tag); generation metrics if unlisted."""
    return GATE_METRICS.get(family or "", GENERATION_GATE)


def metric_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """An entry's value of a gate metric (derived ones computed); None if absent or NaN."""
    value = DERIVED[name](metrics) if name in DERIVED else metrics.get(name)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class GateRow:
    """One gate metric of the candidate against the holder. ``passed``: None when it could
    not be compared (the holder has no value)."""

    metric: str
    goal: Goal
    tolerance: str
    candidate: float | None
    champion: float | None
    allowed: float | None
    passed: bool | None

    def describe(self, version: str, champion: str) -> str:
        cand = "none" if self.candidate is None else f"{self.candidate:.4g}"
        held = "none" if self.champion is None else f"{self.champion:.4g}"
        better = "lower" if self.goal == "min" else "higher"
        text = (
            f"{self.metric} ({better} is better): candidate v{version} {cand}, "
            f"champion v{champion} {held}, tolerance {self.tolerance}"
        )
        if self.allowed is not None:
            text += f" (allowed {'<=' if self.goal == 'min' else '>='} {self.allowed:.4g})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "goal": self.goal,
            "tolerance": self.tolerance,
            "candidate": self.candidate,
            "champion": self.champion,
            "allowed": self.allowed,
            "passed": self.passed,
        }


def compare(
    candidate: Mapping[str, Any], champion: Mapping[str, Any], metrics: Sequence[GateMetric]
) -> list[GateRow]:
    """The gate rows of two entries' metrics (both from one evaluation)."""
    rows = []
    for m in metrics:
        cand, held = metric_value(candidate, m.name), metric_value(champion, m.name)
        if held is None:
            rows.append(GateRow(m.name, m.goal, m.tolerance(), cand, None, None, None))
            continue
        allowed = m.allowed(held)
        if cand is None:
            passed = False  # the candidate has no finite value where the holder has one
        else:
            passed = cand <= allowed if m.goal == "min" else cand >= allowed
        rows.append(GateRow(m.name, m.goal, m.tolerance(), cand, held, allowed, passed))
    return rows


@dataclass
class GateVerdict:
    """What the gate decided about ``name`` version ``version`` for ``alias``.

    ``status``: ``passed`` / ``refused`` (compared), ``forced`` (refused or not comparable,
    promoted anyway), ``no-champion`` (nothing to compare with), ``same`` (the alias already
    points at it). ``champion``: the version the alias pointed at. ``run_id`` / ``out``: the
    evaluation's MLflow run and output folder (``out/figures``, ``out/metrics.json``).
    """

    name: str
    version: str
    alias: str
    champion: str | None
    passed: bool
    status: Status
    rows: list[GateRow] = field(default_factory=list)
    run_id: str | None = None
    out: Path | None = None
    family: str | None = None
    data: str | None = None
    split: str | None = None
    error: str | None = None
    reason: str | None = None
    promoted: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[GateRow]:
        return [r for r in self.rows if r.passed is False]

    def lines(self) -> list[str]:
        """The comparison, one line per gate metric, and where the evaluation is."""
        if self.champion is None or self.status == "same":
            return []
        out = [
            f"gate for {self.name}@{self.alias}: v{self.version} against v{self.champion}"
            + (f" ({self.family})" if self.family else "")
            + (f" on {self.data} ({self.split})" if self.data else "")
        ]
        mark = {True: "ok     ", False: "WORSE  ", None: "skipped"}
        out += [f"  {mark[r.passed]} {r.describe(self.version, self.champion)}" for r in self.rows]
        if self.error:
            out.append(f"  not compared: {self.error}")
        out += [f"  note: {n}" for n in self.notes]
        if self.run_id or self.out:
            out.append(f"  evaluation: {self.where()}")
        return out

    def where(self) -> str:
        parts = []
        if self.out is not None:
            parts.append(f"{self.out / 'figures'} (scores: {self.out / 'metrics.json'})")
        if self.run_id:
            parts.append(f"MLflow run {self.run_id}")
        return ", ".join(parts) or "not run"

    def refusal(self, advice: bool = True) -> str:
        """Why the candidate is refused, the figures that decided it, and (``advice``) how to
        override."""
        if self.error:
            why = f"it could not be compared with version {self.champion}: {self.error}"
        elif self.failed:
            why = "it is worse than version {} beyond the tolerance on {}".format(
                self.champion,
                "; ".join(r.describe(self.version, str(self.champion)) for r in self.failed),
            )
        else:
            why = f"no gate metric could be compared with version {self.champion}"
        text = (
            f"version {self.version} of {self.name} refused as {self.name}@{self.alias}: {why}. "
            f"The figures that decided it: {self.where()}."
        )
        if advice:
            text += (
                f" To promote it anyway: cloudburst models promote {self.name} {self.version} "
                f"--alias {self.alias} --force --reason TEXT"
            )
        return text

    def comparison_json(self) -> str:
        return json.dumps(
            {
                "champion": self.champion,
                "family": self.family,
                "data": self.data,
                "split": self.split,
                "rows": [r.to_json() for r in self.rows],
                **({"error": self.error} if self.error else {}),
            }
        )
