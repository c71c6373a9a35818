"""Evaluation figures of the quantized-loss study (Szwarcman et al., Quantizing reconstruction
losses for improving weather data synthesis), in physical units.

Every function returns a matplotlib ``Figure`` on the Agg canvas built by
:func:`figure`, outside pyplot: no global state, nothing to close, no display.
Windows are (n, time, y, x) numpy arrays or tensors; a channel axis (n, 1, time, y, x) is dropped.
Figures that compare several models on one axis are in
:mod:`cloudburst.evaluation.comparisons`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def figure(**kwargs: Any) -> Any:
    """A matplotlib Figure on the Agg canvas, outside pyplot (nothing to close, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


__all__ = [
    "as_vector",
    "axis_label",
    "diagonal",
    "figure",
    "inputs_and_reconstructions",
    "latent_interpolation",
    "latent_line",
    "qq_levels",
    "qq_plot",
    "qq_quantiles",
    "quantized_mse_per_bin",
    "samples_grid",
    "wrapped_title",
]

CMAP = "viridis"
PANEL = 1.1  # inches per image panel


def _windows(a: Any) -> np.ndarray:
    """float64 (n, time, y, x) from an array or tensor, dropping a channel axis of size 1."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 5 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 4:
        raise ValueError(f"expected windows (n, time, y, x), got shape {arr.shape}")
    return arr


def axis_label(units: str) -> str:
    """The precipitation axis label, with ``units`` in brackets when given."""
    return f"precipitation ({units})" if units else "precipitation"


def wrapped_title(fig: Any, title: str) -> None:
    """The figure's title, wrapped to its width (long model lists stay readable)."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 13))
    fig.suptitle(textwrap.fill(title, width=width), fontsize=10)


def _vmax(*arrays: np.ndarray) -> float:
    finite = [np.nanmax(a) for a in arrays if a.size and np.isfinite(a).any()]
    return max(float(max(finite, default=0.0)), 1e-6)


def _frame_grid(
    rows: list[np.ndarray],
    row_labels: list[str],
    row_group: list[int],
    group_vmax: list[float],
    units: str,
    title: str,
    col_labels: list[str] | None = None,
) -> Any:
    """Rows of frames (each (time, y, x)); rows of one group share a scale and a colourbar."""
    ncols = max(r.shape[0] for r in rows)
    fig = figure(figsize=(PANEL * ncols + 1.4, PANEL * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    members: dict[int, list[Any]] = {}
    images: dict[int, Any] = {}
    for i, (frames, g) in enumerate(zip(rows, row_group, strict=True)):
        for j in range(ncols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < frames.shape[0]:
                images[g] = ax.imshow(
                    frames[j], cmap=CMAP, vmin=0.0, vmax=group_vmax[g], origin="lower"
                )
            else:
                ax.set_axis_off()
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
        members.setdefault(g, []).extend(axes[i].tolist())
    for g, axs in members.items():
        cbar = fig.colorbar(images[g], ax=axs, shrink=0.9, pad=0.01)
        cbar.set_label(units, fontsize=8)
        cbar.ax.tick_params(labelsize=7)
    wrapped_title(fig, title)
    return fig


def inputs_and_reconstructions(x: Any, x_hat: Any, units: str, n: int = 4) -> Any:
    """``n`` samples: an input row above its reconstruction row, time steps across.

    Input and reconstruction of one sample share a colour scale (0 to the larger maximum),
    with a colourbar in ``units``.
    """
    xs, hs = _windows(x), _windows(x_hat)
    if xs.shape != hs.shape:
        raise ValueError(f"x {xs.shape} and x_hat {hs.shape} differ in shape")
    n = max(1, min(int(n), xs.shape[0]))
    rows, labels, groups = [], [], []
    for k in range(n):
        rows += [xs[k], hs[k]]
        labels += [f"#{k} input", f"#{k} recon."]
        groups += [k, k]
    vmax = [_vmax(xs[k], hs[k]) for k in range(n)]
    cols = [f"t={j}" for j in range(xs.shape[1])]
    return _frame_grid(rows, labels, groups, vmax, units, "inputs and reconstructions", cols)


def samples_grid(samples: Any, units: str) -> Any:
    """Generated samples (n, time, y, x): one row per sample, one shared colour scale."""
    s = _windows(samples)
    cols = [f"t={j}" for j in range(s.shape[1])]
    return _frame_grid(
        list(s),
        [f"sample {k}" for k in range(s.shape[0])],
        [0] * s.shape[0],
        [_vmax(s)],
        units,
        "generated samples, z ~ N(0, I)",
        cols,
    )


def latent_line(z0: torch.Tensor, z1: torch.Tensor, points: int = 5) -> torch.Tensor:
    """``points`` codes evenly spaced on the straight line from ``z0`` to ``z1`` (both included).

    z0, z1: (latent,) or (1, latent); returns (points, latent).
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    a, b = torch.as_tensor(z0).reshape(-1), torch.as_tensor(z1).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"z0 {tuple(a.shape)} and z1 {tuple(b.shape)} differ in shape")
    t = torch.linspace(0.0, 1.0, points, dtype=a.dtype, device=a.device)[:, None]
    return a[None] + t * (b - a)[None]


def latent_interpolation(frames: Any, units: str, time: int | str | None = None) -> Any:
    """Decoded windows along a latent line (rows: endpoints and the points between).

    ``time``: None shows all time steps, ``"middle"`` the middle one, an int that step.
    """
    f = _windows(frames)
    if time == "middle":
        f = f[:, f.shape[1] // 2 : f.shape[1] // 2 + 1]
    elif isinstance(time, int):
        f = f[:, time : time + 1]
    m = f.shape[0]
    labels = ["z0" if k == 0 else "z1" if k == m - 1 else f"{k / (m - 1):.2f}" for k in range(m)]
    cols = [f"t={j}" for j in range(f.shape[1])] if time is None else None
    return _frame_grid(list(f), labels, [0] * m, [_vmax(f)], units, "latent interpolation", cols)


# ------------------------------------------------------------------------------ QQ plot


def qq_levels(n: int, depth: int = 9) -> np.ndarray:
    """Quantile levels a sample of ``n`` values supports, sorted and unique.

    The ramp 0, 0.1, ..., 0.9 plus the quantized-loss study's tail set 1 - 10^-n1 + n2
    10^-(n1+1) (n1 = 1..depth, n2 = 0..9), keeping levels q with (1 - q) n >= 1 (at least one
    value above the quantile).
    """
    ramp = np.round(np.arange(10) / 10.0, 12)
    tail = [
        1 - 10.0**-n1 + n2 * 10.0 ** -(n1 + 1) for n1 in range(1, depth + 1) for n2 in range(10)
    ]
    levels = np.unique(np.round(np.concatenate([ramp, tail]), 12))
    if n < 1:
        return levels[:0]
    return levels[(1.0 - levels) * n >= 1.0 - 1e-9]


def _finite(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    flat = np.asarray(a, dtype=np.float64).ravel()
    return flat[np.isfinite(flat)]


def qq_quantiles(reference: Any, other: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, reference quantiles, other quantiles); NaNs dropped, levels from the smaller."""
    ref, oth = _finite(reference), _finite(other)
    levels = qq_levels(min(ref.size, oth.size))
    if levels.size == 0:
        return levels, levels.copy(), levels.copy()
    return levels, np.quantile(ref, levels), np.quantile(oth, levels)


def diagonal(ax: Any, values: np.ndarray, log: bool) -> None:
    """Log-log or linear axes (linear ones from 0) and the y = x line over ``values``' span."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        lo = min(lo, 0.0)
    hi = hi if hi > lo else lo + 1.0
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")


def qq_plot(reference: Any, other: Any, units: str, label: str = "reconstruction") -> Any:
    """Quantiles of ``other`` (model values) against those of ``reference`` (the inputs).

    Log-log when the positive reference quantiles span two decades or more (precipitation's
    heavy tail; zero quantiles, i.e. dry pixels, cannot be shown there), linear otherwise.
    One line for the quantiles, one for y = x.
    """
    levels, qr, qo = qq_quantiles(reference, other)
    fig = figure(figsize=(5.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    positive = (qr > 0) & (qo > 0)
    log = positive.sum() >= 2 and qr[positive].max() / qr[positive].min() >= 100.0
    xs, ys = (qr[positive], qo[positive]) if log else (qr, qo)
    ax.plot(xs, ys, "o-", ms=3, lw=1, label=label)
    diagonal(ax, np.concatenate([xs, ys]), log)
    unit = f" ({units})" if units else ""
    ax.set_xlabel(f"input quantiles{unit}")
    ax.set_ylabel(f"{label} quantiles{unit}")
    top = f"{levels[-1]:.10g}" if levels.size else "-"
    ax.set_title(f"QQ plot, levels 0 .. {top}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------------- quantized MSE


def as_vector(a: Any) -> np.ndarray:
    """A flat float64 array from an array, sequence or tensor (NaNs kept)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64).ravel()


def quantized_mse_per_bin(
    edges: Any,
    mse: Any | Mapping[str, Any],
    counts: Any | Mapping[str, Any],
    label: str = "model",
    units: str = "",
) -> Any:
    """MSE per bin of a fixed histogram on a log y axis, bin centres on x (physical units).

    ``mse``: one (B,) array or a dict label -> (B,) array (models to compare); ``counts``:
    pixels per bin, one array for all curves or a dict with the same labels. Bins with no pixel
    (or a NaN or non-positive MSE, which a log axis cannot show) are skipped.
    """
    e = as_vector(edges)
    centres = 0.5 * (e[:-1] + e[1:])
    curves = dict(mse) if isinstance(mse, Mapping) else {label: mse}
    fig = figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, values in curves.items():
        v = as_vector(values)
        c = as_vector(counts[name] if isinstance(counts, Mapping) else counts)
        if v.size != centres.size or c.size != centres.size:
            raise ValueError(
                f"{name}: {v.size} MSE values and {c.size} counts for {centres.size} bins"
            )
        keep = (c > 0) & np.isfinite(v) & (v > 0)
        ax.plot(centres[keep], v[keep], "o-", ms=3, lw=1, label=str(name))
    ax.set_yscale("log")
    ax.set_xlabel(f"bin centre ({units})" if units else "bin centre")
    ax.set_ylabel(f"MSE in bin (({units})²)" if units else "MSE in bin")
    ax.set_title("quantized MSE (training histogram)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
