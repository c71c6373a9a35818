"""Model-comparison figures of the evaluation: intensity histograms, QQ plots against the
observed, bias maps, power spectra, wet- and dry-spell lengths, rank histograms, reliability
diagrams, return levels, the input transformation and conditional skill by hour.

Each function draws several models on the same axes from a mapping label -> data (one
legend entry per label, one colour per label across panels) and puts the caller's ``title``
(which should name the models and the data) above the figure. Every function returns a
matplotlib ``Figure`` on the Agg canvas built by :func:`cloudburst.evaluation.figures.figure`,
outside pyplot: no global state, nothing to close, no display.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cloudburst.evaluation.figures import as_vector, axis_label, diagonal, figure, wrapped_title

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "bias_maps",
    "conditional_skill",
    "intensity_histograms",
    "qq_compare",
    "rank_histograms",
    "reliability_diagram",
    "return_levels",
    "spectra",
    "transformation_curve",
    "wet_dry_spells",
]


def _models(data: Any, what: str) -> dict[str, Any]:
    """``data`` as a dict label -> value; ValueError if it is not a non-empty mapping."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a mapping label -> data, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{what}: the mapping is empty, there is no model to plot")
    return {str(k): v for k, v in data.items()}


def _units(units: str) -> str:
    return f" ({units})" if units else ""


def _fields(name: str, entry: Any, keys: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays at ``keys`` of one model's mapping, flattened, checked to share one length."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{name}: expected a mapping with keys {list(keys)}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{name}: missing key(s) {missing}, expected {list(keys)}")
    arrays = [as_vector(entry[k]) for k in keys]
    sizes = {k: a.size for k, a in zip(keys, arrays, strict=True)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: arrays differ in length {sizes}")
    return arrays


def intensity_histograms(
    edges: Any,
    counts: Mapping[str, Any],
    units: str,
    title: str,
    low_threshold: float | None = None,
) -> Figure:
    """Intensity distributions as probability densities, full range and low end side by side.

    ``edges``: (B+1,) strictly increasing bin edges in ``units`` (non-uniform allowed);
    ``counts``: label -> (B,) values per bin. The density of a bin is
    count / (total count * bin width), so it integrates to 1 over the full range; it is drawn
    as a step line on a log y axis, and empty bins (zero density) are left out (NaN).
    Left panel: all bins. Right panel: the bins whose upper edge is <= ``low_threshold``
    (the light-rain end, where diffusion noise shows); None takes the upper edge of the
    10th bin (or of the last one when there are fewer).
    """
    e = as_vector(edges)
    if e.size < 2 or not np.isfinite(e).all() or not (np.diff(e) > 0).all():
        raise ValueError(f"edges must be >= 2 finite, strictly increasing values, got {e.size}")
    width = np.diff(e)
    models = _models(counts, "counts")
    threshold = float(e[min(10, width.size)] if low_threshold is None else low_threshold)
    low = int(np.sum(e[1:] <= threshold))
    if low == 0:
        raise ValueError(
            f"low_threshold {threshold:g} is below the first bin's upper edge {e[1]:g}"
        )
    fig = figure(figsize=(11.0, 4.2), layout="constrained")
    full, tail = fig.subplots(1, 2)
    for i, (name, values) in enumerate(models.items()):
        c = as_vector(values)
        if c.size != width.size:
            raise ValueError(f"{name}: {c.size} counts for {width.size} bins")
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError(f"{name}: counts must be finite and non-negative")
        total = float(c.sum())
        if total <= 0:
            raise ValueError(f"{name}: total count is zero, no density to plot")
        density = c / (total * width)
        density[density <= 0] = np.nan
        steps = np.append(density, density[-1])
        full.plot(e, steps, drawstyle="steps-post", lw=1.2, color=f"C{i}", label=name)
        tail.plot(
            e[: low + 1],
            np.append(density[:low], density[low - 1]),
            drawstyle="steps-post",
            lw=1.2,
            color=f"C{i}",
            label=name,
        )
    density_label = f"probability density (per {units})" if units else "probability density"
    for ax, panel in ((full, "full range"), (tail, f"low end, <= {threshold:g}{_units(units)}")):
        ax.set_yscale("log")
        ax.set_xlabel(axis_label(units))
        ax.set_ylabel(density_label)
        ax.set_title(panel, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    full.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig


def qq_compare(
    levels: Any,
    reference: Any,
    others: Mapping[str, Any],
    units: str,
    title: str,
    reference_label: str = "observed",
) -> Figure:
    """Precomputed quantiles of several models against the reference's, one line per model.

    ``levels``, ``reference`` and each array of ``others`` hold the quantiles at the same
    levels. Log-log when the positive reference quantiles span two decades or more (points
    with a non-positive quantile are then dropped), linear otherwise, as in
    :func:`cloudburst.evaluation.figures.qq_plot`;
    a dashed y = x line, and the highest level in the legend's title.
    """
    lv, qr = as_vector(levels), as_vector(reference)
    if lv.size == 0:
        raise ValueError("levels is empty, there are no quantiles to plot")
    if qr.size != lv.size:
        raise ValueError(f"reference: {qr.size} quantiles for {lv.size} levels")
    models = _models(others, "others")
    curves = {}
    for name, values in models.items():
        qo = as_vector(values)
        if qo.size != lv.size:
            raise ValueError(f"{name}: {qo.size} quantiles for {lv.size} levels")
        curves[name] = qo
    pos = qr[np.isfinite(qr) & (qr > 0)]
    log = pos.size >= 2 and pos.max() / pos.min() >= 100.0
    fig = figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    shown: list[np.ndarray] = []
    for name, qo in curves.items():
        keep = np.isfinite(qr) & np.isfinite(qo)
        if log:
            keep &= (qr > 0) & (qo > 0)
        ax.plot(qr[keep], qo[keep], "o-", ms=3, lw=1, label=name)
        shown += [qr[keep], qo[keep]]
    diagonal(ax, np.concatenate(shown), log)
    ax.set_xlabel(f"{reference_label} quantiles{_units(units)}")
    ax.set_ylabel(f"model quantiles{_units(units)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title=f"levels up to {float(np.nanmax(lv)):.10g}", title_fontsize=8)
    wrapped_title(fig, title)
    return fig


def bias_maps(maps: Mapping[str, Any], title: str, label: str = "mean-normalised bias") -> Figure:
    """One (y, x) bias map per model, side by side, on one diverging scale centred on 0.

    Colour limits are +-(the largest finite absolute value over all maps, at least 1e-6),
    shared by one colourbar labelled ``label``; NaN cells are grey.
    """
    from matplotlib import colormaps

    models = _models(maps, "maps")
    grids = {}
    for name, values in models.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        grid = np.asarray(values, dtype=np.float64)
        if grid.ndim != 2:
            raise ValueError(f"{name}: expected a (y, x) map, got shape {grid.shape}")
        grids[name] = grid
    finite = [np.abs(g[np.isfinite(g)]).max() for g in grids.values() if np.isfinite(g).any()]
    limit = max(float(max(finite, default=0.0)), 1e-6)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.6")
    n = len(grids)
    fig = figure(figsize=(2.8 * n + 1.2, 3.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid, cmap=cmap, vmin=-limit, vmax=limit, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(image, ax=axes.tolist(), shrink=0.9, pad=0.02)
    cbar.set_label(label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    wrapped_title(fig, title)
    return fig


def spectra(
    curves: Mapping[str, tuple[Any, Any]], xlabel: str, title: str, ylabel: str = "power"
) -> Figure:
    """Power spectra, label -> (frequencies, power), as log-log lines.

    Points with a non-positive or non-finite frequency or power are skipped. ``xlabel`` and
    ``ylabel`` should carry the units (e.g. "wavenumber (1/km)").
    """
    models = _models(curves, "curves")
    fig = figure(figsize=(6.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, curve in models.items():
        if not isinstance(curve, tuple | list) or len(curve) != 2:
            raise ValueError(f"{name}: expected a pair (frequencies, power)")
        f, p = as_vector(curve[0]), as_vector(curve[1])
        if f.size != p.size:
            raise ValueError(f"{name}: {f.size} frequencies and {p.size} power values")
        keep = np.isfinite(f) & np.isfinite(p) & (f > 0) & (p > 0)
        ax.plot(f[keep], p[keep], lw=1.2, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig


def wet_dry_spells(curves: Mapping[str, Mapping[str, Any]], title: str, step: str = "") -> Figure:
    """Wet- and dry-spell length distributions, one line per source in each of two panels.

    ``curves``: label -> {"wet": (T,) probabilities of wet-spell lengths 1..T, "dry": the
    same for dry spells, "wet_fraction": the share of wet pixels (shown in the legend);
    optional "length": the (T,) lengths, 1..T by default}. Zero or NaN probabilities are left
    out of the log y axis. ``step`` names the time step (e.g. "hours") for the x label.
    Generated fields that drizzle everywhere show a wet fraction near 1 and dry spells that
    stop at length 1 or 2.
    """
    models = _models(curves, "curves")
    lines = {}
    for name, entry in models.items():
        wet, dry = _fields(name, entry, ("wet", "dry"))
        length = as_vector(entry["length"]) if "length" in entry else np.arange(1, wet.size + 1)
        if length.size != wet.size:
            raise ValueError(f"{name}: {length.size} lengths for {wet.size} probabilities")
        if (wet[np.isfinite(wet)] < 0).any() or (dry[np.isfinite(dry)] < 0).any():
            raise ValueError(f"{name}: probabilities must be non-negative")
        fraction = float(entry.get("wet_fraction", np.nan))
        label = name if not np.isfinite(fraction) else f"{name} (wet fraction {fraction:.3f})"
        lines[name] = (length, wet, dry, label)
    fig = figure(figsize=(11.0, 4.2), layout="constrained")
    wet_ax, dry_ax = fig.subplots(1, 2, sharey=True)
    for i, (length, wet, dry, label) in enumerate(lines.values()):
        for ax, p in ((wet_ax, wet), (dry_ax, dry)):
            shown = np.where(np.isfinite(p) & (p > 0), p, np.nan)
            ax.plot(length, shown, marker="o", ms=3, lw=1.2, color=f"C{i}", label=label)
    unit = f" ({step})" if step else " (time steps)"
    for ax, kind in ((wet_ax, "wet"), (dry_ax, "dry")):
        ax.set_yscale("log")
        ax.set_xlabel(f"{kind}-spell length{unit}")
        ax.set_title(f"{kind} spells", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    wet_ax.set_ylabel("probability")
    wet_ax.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig


def rank_histograms(hists: Mapping[str, Any], title: str) -> Figure:
    """Rank histograms, label -> (K,) relative frequencies, as step outlines on [0, 1].

    Bin k of a model with K bins spans [k/K, (k+1)/K] (centre (k + 0.5)/K), so models with
    different K share the axis. A dashed horizontal line at 1/K marks a calibrated ensemble
    (one per distinct K, labelled with K when they differ).
    """
    models = _models(hists, "hists")
    outlines = {}
    for name, values in models.items():
        h = as_vector(values)
        if h.size == 0:
            raise ValueError(f"{name}: empty rank histogram")
        if not np.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"{name}: relative frequencies must be finite and non-negative")
        outlines[name] = h
    fig = figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, h in outlines.items():
        edges = np.linspace(0.0, 1.0, h.size + 1)
        ax.plot(edges, np.append(h, h[-1]), drawstyle="steps-post", lw=1.4, label=name)
    sizes = sorted({h.size for h in outlines.values()})
    for k in sizes:
        text = "calibrated" if len(sizes) == 1 else f"calibrated (K = {k})"
        ax.axhline(1.0 / k, color="k", ls="--", lw=0.8, label=text)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("rank of observation (normalised)")
    ax.set_ylabel("relative frequency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig


def reliability_diagram(curves: Mapping[str, Mapping[str, Any]], title: str) -> Figure:
    """Reliability diagram: label -> {"forecast", "observed", "cases"}, arrays per bin.

    Main panel: mean forecast probability against observed frequency on [0, 1] x [0, 1]
    with the diagonal; bins with a NaN are skipped. Panel below: cases per bin on a log
    y axis (empty bins skipped).
    """
    models = _models(curves, "curves")
    data = {
        name: _fields(name, entry, ("forecast", "observed", "cases"))
        for name, entry in models.items()
    }
    fig = figure(figsize=(5.5, 6.5), layout="constrained")
    main, below = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    main.plot([0.0, 1.0], [0.0, 1.0], "k--", lw=0.8, label="perfect reliability")
    for i, (name, (f, o, n)) in enumerate(data.items()):
        keep = np.isfinite(f) & np.isfinite(o)
        main.plot(f[keep], o[keep], "o-", ms=3, lw=1.2, color=f"C{i}", label=name)
        has = np.isfinite(f) & np.isfinite(n) & (n > 0)
        below.plot(f[has], n[has], "o-", ms=3, lw=1, color=f"C{i}", label=name)
    main.set_xlim(0.0, 1.0)
    main.set_ylim(0.0, 1.0)
    main.set_ylabel("observed frequency")
    main.grid(True, alpha=0.3)
    main.legend(fontsize=8)
    below.set_yscale("log")
    below.set_xlabel("forecast probability")
    below.set_ylabel("cases")
    below.grid(True, which="both", alpha=0.3)
    wrapped_title(fig, title)
    return fig


def return_levels(
    curves: Mapping[str, Mapping[str, Any]],
    units: str,
    title: str,
    period_label: str = "return period (years)",
) -> Figure:
    """Return levels against return period (log x): a line per model and a shaded band.

    ``curves``: label -> {"periods", "levels", "lower", "upper"} arrays of one length; the
    band (alpha 0.2) fills lower .. upper where both are finite, so NaN bounds leave gaps.
    Non-positive or non-finite periods are dropped.
    """
    models = _models(curves, "curves")
    data = {
        name: _fields(name, entry, ("periods", "levels", "lower", "upper"))
        for name, entry in models.items()
    }
    fig = figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, (t, level, lower, upper) in data.items():
        keep = np.isfinite(t) & (t > 0)
        order = np.argsort(t[keep])
        t, level, lower, upper = (a[keep][order] for a in (t, level, lower, upper))
        (line,) = ax.plot(t, level, "o-", ms=3, lw=1.2, label=name)
        band = np.isfinite(lower) & np.isfinite(upper)
        ax.fill_between(
            t,
            np.where(band, lower, 0.0),
            np.where(band, upper, 0.0),
            where=band,
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set_xscale("log")
    ax.set_xlabel(period_label)
    ax.set_ylabel(f"return level{_units(units)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig


def transformation_curve(values: Any, transformed: Any, units: str, title: str) -> Figure:
    """The input transformation h: precipitation (physical units, x) to model space (y)."""
    x, y = as_vector(values), as_vector(transformed)
    if x.size != y.size or x.size < 2:
        raise ValueError(f"{x.size} values and {y.size} transformed values: give >= 2 pairs")
    fig = figure(figsize=(5.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(x, y, lw=1.5, label="h")
    ax.set_xlabel(axis_label(units))
    ax.set_ylabel("model space")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig


def conditional_skill(curves: Mapping[str, Mapping[str, Any]], units: str, title: str) -> Figure:
    """CRPS of conditional ensembles by hour, label -> {"hours", "crps", "baseline_mae",
    "baseline"}: a solid line per ensemble and its baseline's MAE (a deterministic forecast's
    CRPS) dashed in the same colour."""
    models = _models(curves, "curves")
    fig = figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, c in models.items():
        hours = as_vector(c["hours"])
        (line,) = ax.plot(hours, as_vector(c["crps"]), marker="o", ms=3, lw=1.4, label=name)
        ax.plot(
            hours,
            as_vector(c["baseline_mae"]),
            ls="--",
            lw=1.0,
            color=line.get_color(),
            label=f"{c.get('baseline', 'baseline')} (MAE)",
        )
    ax.set_xlabel("hours since the window's first step")
    ax.set_ylabel(f"CRPS{_units(units)}")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    wrapped_title(fig, title)
    return fig
