"""Bicubic regridding of one (time, y, x) field onto another rectilinear grid.

The interpolation is Keys' cubic convolution (``a = -0.5``), applied separably along y and x
as two sparse weight matrices, so one output cell depends on the 4 x 4 source cells around it
only: a NaN in the source spoils its neighbourhood, not the whole row (as a global spline
would). At the edges Keys' boundary condition (a ghost row ``3 f0 - 3 f1 + f2``) keeps the
scheme exact for quadratic fields everywhere inside the source's extent.

- Target points that coincide with source points (within ``SNAP`` of a source cell) take the
  source values exactly;
- target points outside the source's extent (beyond ``SNAP`` of a cell) are NaN and counted
  (:attr:`Regridder.outside_cells`); nothing is extrapolated.

Coordinates must be 1-D and strictly monotonic (ascending or descending, e.g. projected x
decreasing); the spacing need not be regular (the fractional position is piecewise linear in
the coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

KEYS_A = -0.5
SNAP = 1e-3  # in source cells: closer than this to a source point (or the edge) counts as on it
METHOD = "bicubic (Keys cubic convolution, a=-0.5)"


class RegridError(ValueError):
    """A field cannot be regridded as asked; the message says why."""


def keys_kernel(s: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    """Keys' cubic convolution kernel at offsets ``s`` (in cells)."""
    s = np.abs(np.asarray(s, dtype=np.float64))
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def fractional_positions(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of every target coordinate in source index units, outside mask).

    Positions within ``SNAP`` cells of an integer are snapped to it; targets beyond the first or
    last source coordinate by more than ``SNAP`` cells are outside (their position is clipped).
    """
    src = np.asarray(source, dtype=np.float64)
    tgt = np.asarray(target, dtype=np.float64)
    n = src.size
    if n < 3:
        raise RegridError(f"bicubic regridding needs at least 3 source points per axis (got {n})")
    steps = np.diff(src)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise RegridError("source coordinates must be strictly monotonic to regrid from them")
    idx = np.arange(n, dtype=np.float64)
    if steps[0] < 0:
        src, idx = src[::-1], idx[::-1]
    pos = np.interp(tgt, src, idx)  # clamped at the ends
    # how far beyond the extent, in cells of the nearest edge
    below = (src[0] - tgt) / abs(src[1] - src[0])
    above = (tgt - src[-1]) / abs(src[-1] - src[-2])
    outside = (below > SNAP) | (above > SNAP)
    nearest = np.round(pos)
    pos = np.where(np.abs(pos - nearest) < SNAP, nearest, pos)
    return pos, outside


def axis_weights(source: np.ndarray, target: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(W, outside): W (len(target) x len(source)) bicubic weights along one axis (rows of
    outside targets empty), and the outside mask."""
    pos, outside = fractional_positions(source, target)
    n = len(source)
    base = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    frac = pos - base
    rows, cols, vals = [], [], []
    for k in (-1, 0, 1, 2):
        w = keys_kernel(frac - k)
        col = base + k
        # ghost points fold back onto the edge (Keys' boundary condition, exact for quadratics)
        for c, scale in _fold(col, n):
            keep = ~outside & (c >= 0)
            rows.append(np.nonzero(keep)[0])
            cols.append(c[keep])
            vals.append((w * scale)[keep])
    m = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(target), n),
    ).tocsr()
    m.sum_duplicates()
    m.data[np.abs(m.data) < 1e-12] = 0.0  # coincident points: exact zeros, so NaN stays local
    m.eliminate_zeros()
    return m, outside


def _fold(col: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(columns, factor) pairs that express column ``col`` (possibly a ghost -1 or n) in real
    columns; a column of -1 in the result means no contribution."""
    low, high = col < 0, col >= n
    inner = np.where(low | high, -1, col)
    out = [(inner, np.ones(col.shape))]
    for offset, factor in ((0, 3.0), (1, -3.0), (2, 1.0)):
        c = np.full(col.shape, -1, dtype=np.int64)
        c[low] = offset
        c[high] = n - 1 - offset
        out.append((c, np.where(low | high, factor, 0.0)))
    return out


@dataclass
class Regridder:
    """Bicubic weights from one (y, x) grid onto another; apply with :meth:`__call__`."""

    wy: sp.csr_matrix
    wx: sp.csr_matrix
    outside_y: np.ndarray
    outside_x: np.ndarray

    @classmethod
    def between(
        cls, src_y: np.ndarray, src_x: np.ndarray, dst_y: np.ndarray, dst_x: np.ndarray
    ) -> Regridder:
        wy, oy = axis_weights(src_y, dst_y)
        wx, ox = axis_weights(src_x, dst_x)
        return cls(wy, wx, oy, ox)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.wy.shape[0]), int(self.wx.shape[0])

    @property
    def outside_cells(self) -> int:
        """Cells of the target grid outside the source's extent (NaN in every frame)."""
        ny, nx = self.shape
        oy, ox = int(self.outside_y.sum()), int(self.outside_x.sum())
        return oy * nx + ny * ox - oy * ox

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """``values`` (..., ny_src, nx_src) regridded to (..., ny, nx) float32."""
        v = np.asarray(values)
        lead = v.shape[:-2]
        v = v.reshape((-1, *v.shape[-2:]))
        ny, nx = self.shape
        out = np.empty((v.shape[0], ny, nx), dtype=np.float32)
        for i, frame in enumerate(v):  # one frame at a time: float64 intermediates stay small
            rows = self.wy @ np.asarray(frame, dtype=np.float64)  # (ny, nx_src)
            out[i] = (self.wx @ rows.T).T
        out[:, self.outside_y, :] = np.nan
        out[:, :, self.outside_x] = np.nan
        return out.reshape((*lead, ny, nx))
