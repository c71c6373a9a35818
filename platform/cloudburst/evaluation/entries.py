"""One evaluated source (a model, an ensemble store, a conditional store) and its scores.

:class:`Entry` holds the scalars and curves of one source; :func:`generation_metrics` scores
its generated windows against the observed ones, :func:`split_scores` files verification
scores as metrics or curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudburst.evaluation.observations import FieldSummary

__all__ = ["Entry", "generation_metrics", "model_label", "spell_metrics", "split_scores"]


@dataclass
class Entry:
    """One evaluated source (a model or an ensemble store): scalars and curves."""

    label: str
    kind: str  # "model" | "ensemble"
    source: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    summary: FieldSummary | None = None
    recon_top: np.ndarray | None = None
    interpolation: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            **self.source,
            "metrics": self.metrics,
            "curves": self.curves,
        }


def model_label(version_uri: str) -> str:
    name, _, version = version_uri[len("models:/") :].rpartition("/")
    return f"{name} v{version}"


def generation_metrics(
    entry: Entry, obs: FieldSummary, q99: float, low_threshold: float = 1.0
) -> None:
    s = entry.summary
    assert s is not None
    mean_obs, mean_gen = obs.cell_mean(), s.cell_mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        bias = np.where(mean_obs > 0, (mean_gen - mean_obs) / mean_obs, np.nan)
    maxima, totals, weights = s.arrays()
    o_max, _, _ = obs.arrays()
    w = weights / weights.sum()
    entry.metrics.update(
        {
            "mean_bias": float(np.nanmean(bias)),
            "mean_abs_bias": float(np.nanmean(np.abs(bias))),
            "mean": float((s.cell_sum.sum()) / max(s.cell_weight.sum(), 1e-12)),
            "extreme_window_fraction": float(w[maxima > q99].sum()),
            "observed_extreme_window_fraction": float(np.mean(o_max[np.isfinite(o_max)] > q99)),
        }
    )
    entry.curves["bias_map"] = bias
    k, p = s.spatial.compute()
    f, pt = s.temporal.compute()
    # spectra against the observed: mean |log10 ratio| over frequencies (0: identical)
    for name, mine, theirs in (
        ("psd_spatial_log_error", p, obs.spatial.compute()[1]),
        ("psd_temporal_log_error", pt, obs.temporal.compute()[1]),
    ):
        ok = (mine > 0) & (theirs > 0)
        if ok.any():
            entry.metrics[name] = float(np.mean(np.abs(np.log10(mine[ok] / theirs[ok]))))
    # the low end, where sampling noise shows: share of pixels in (0, low_threshold]
    edges = s.edges
    low = edges[1:] <= low_threshold
    low[0] = False  # the first bin [0, 0.01) holds the dry pixels
    for prefix, hist in (("", s.hist.counts), ("observed_", obs.hist.counts)):
        total = hist.sum()
        entry.metrics[f"{prefix}low_end_fraction"] = (
            float(hist[low].sum() / total) if total else 0.0
        )
    spell_metrics(entry, obs)
    entry.curves["psd_spatial"] = {"wavenumber": k, "power": p}
    entry.curves["psd_temporal"] = {"frequency": f, "power": pt}
    entry.curves["histogram"] = {"edges": s.edges, "counts": s.hist.counts}


def spell_metrics(entry: Entry, obs: FieldSummary) -> None:
    """Wet fraction and wet- and dry-spell lengths of the entry's windows and the observed.

    Metrics ``wet_fraction``, ``mean_wet_spell`` and ``mean_dry_spell`` (time steps), each
    beside its ``observed_`` counterpart; curves ``wet_spells`` and ``dry_spells``: the
    probabilities of spell lengths 1..T (``length``), the entry's (``probability``) and the
    observed (``observed``). Definitions:
    :class:`~cloudburst.evaluation.observations.SpellAccumulator` (a pixel is wet above the
    summaries' ``wet_threshold``, 0 by default: strictly positive).
    """
    s = entry.summary
    assert s is not None
    for prefix, spells in (("", s.spells), ("observed_", obs.spells)):
        entry.metrics[f"{prefix}wet_fraction"] = float(spells.wet_fraction())
        entry.metrics[f"{prefix}mean_wet_spell"] = spells.mean_spell("wet")
        entry.metrics[f"{prefix}mean_dry_spell"] = spells.mean_spell("dry")
    length = np.arange(1, s.spells.length + 1)
    for kind in ("wet", "dry"):
        entry.curves[f"{kind}_spells"] = {
            "length": length,
            "probability": s.spells.distribution(kind),
            "observed": obs.spells.distribution(kind),
            "wet_threshold": s.spells.wet_threshold,
        }


def split_scores(entry: Entry, scores: dict[str, Any], prefix: str) -> None:
    for key, value in scores.items():
        if isinstance(value, dict | list):
            entry.curves[f"{prefix}{key}"] = value
        else:
            entry.metrics[f"{prefix}{key}"] = float(value)
