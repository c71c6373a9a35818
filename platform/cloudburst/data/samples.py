"""What a training job takes from its store beyond the windows themselves.

- :func:`split_windows`: windows of one split, read exactly as the training workers read
  them: what the post-training evaluation and the dry threshold are computed on;
- :func:`split_stats`: the store's statistics (quantiles, histogram edges, the scaling
  maximum) over the time steps the training windows cover only, streamed: what the model is
  scaled, binned and thresholded with, so the test years never leak into it. The store's own
  whole-record statistics stay its description.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cloudburst import storage
from cloudburst.data import calendars
from cloudburst.data.ingest import (
    FieldStatsAccumulator,
    StatsAccumulator,
    StoreStats,
    open_store,
    variable_stats,
)
from cloudburst.data.loader import WindowDataset, data_variables
from cloudburst.data.sources import PRECIP
from cloudburst.data.windows import build_index, split_index

if TYPE_CHECKING:
    from cloudburst.config import TrainJobConfig

__all__ = ["TIME_BLOCK", "split_stats", "split_windows"]

TIME_BLOCK = 64  # time steps read at once by split_stats


def split_windows(
    cfg: TrainJobConfig,
    transform: Any,
    limit: int | None = 256,
    part: str = "val",
    *,
    target_transform: Any = None,
) -> dict[str, Any]:
    """Windows (model space) of split ``part`` (val falls back to train when empty).

    With ``limit``, that many windows evenly spread over the part (in index order), so a
    small evaluation still covers every season and year of the split. Returns ``x``
    (n, 1, t, y, x) float32, ``mask`` bool alike, ``part`` and ``stats`` (the input
    variable's); with ``cfg.data.target`` also ``target`` and ``target_mask`` (scaled by
    ``target_transform``) and ``target_stats``.
    """
    opts = storage.options_from(cfg.data.store, cfg.storage)
    ds, stats = open_store(cfg.data.store, opts)
    names = data_variables(cfg.data)
    if cfg.data.input is not None:
        stats = variable_stats(cfg.data.store, opts)[cfg.data.input]
    index = build_index(ds, cfg.data.windows, variables=names)
    chosen = split_index(index, cfg.data.split, part)
    if len(chosen) == 0 and part == "val":
        part, chosen = "train", split_index(index, cfg.data.split, "train")
    if limit is not None and len(chosen) > limit:
        chosen = chosen.subset(np.unique(np.linspace(0, len(chosen) - 1, int(limit)).astype(int)))
    dataset = WindowDataset(
        cfg.data.store,
        chosen,
        storage_options=opts,
        transform=transform,
        shuffle=False,
        cache_blocks=cfg.data.loader.cache_blocks,
        prefetch_requests=cfg.data.loader.prefetch_requests,
        rank=0,
        world_size=1,
        variable=cfg.data.input,
        target=cfg.data.target,
        target_transform=target_transform,
    )
    items = list(dataset)
    if not items:
        raise ValueError(f"no {part} windows to evaluate in {cfg.data.store}")
    out = {
        "x": torch.stack([it["x"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "part": part,
        "stats": stats,
    }
    if cfg.data.target is not None:
        out["target"] = torch.stack([it["target"] for it in items])
        out["target_mask"] = torch.stack([it["target_mask"] for it in items])
        out["target_stats"] = variable_stats(cfg.data.store, opts)[cfg.data.target]
    return out


def split_stats(
    cfg: TrainJobConfig, part: str = "train", variable: str | None = None
) -> tuple[StoreStats, str]:
    """(statistics, scope): the store's statistics over the time steps that the windows of
    split ``part`` cover (every grid cell at those steps), with the store's bin count and
    units; ``scope`` says what they cover. An empty split gives the whole-record statistics.

    ``variable``: one variable of a several-variable store (e.g. ``cfg.data.input`` or
    ``cfg.data.target``), its statistics computed as at ingest (with its minimum).
    """
    opts = storage.options_from(cfg.data.store, cfg.storage)
    ds, whole = open_store(cfg.data.store, opts)
    if variable is not None:
        per = variable_stats(cfg.data.store, opts)
        if variable not in per:
            raise ValueError(f"no variable {variable!r} in {cfg.data.store}; it has {list(per)}")
        whole = per[variable]
    index = build_index(ds, cfg.data.windows, variables=data_variables(cfg.data))
    chosen = split_index(index, cfg.data.split, part)
    if len(chosen) == 0:
        return whole, f"whole record (the {part} split is empty)"
    covered = np.zeros(index.grid[0], dtype=bool)
    for k in range(index.shape[0]):
        covered[chosen.origins[:, 0] + k] = True
    steps = np.flatnonzero(covered)
    if variable is None:
        acc = StatsAccumulator()
        values = ds[PRECIP]
        for a in range(0, len(steps), TIME_BLOCK):
            block = steps[a : a + TIME_BLOCK]
            acc.add(np.asarray(values.isel(time=block).values))
        stats = acc.finish(whole.bins, whole.units)
    else:
        fields = FieldStatsAccumulator()
        values = ds[variable]
        blocks = [steps[a : a + TIME_BLOCK] for a in range(0, len(steps), TIME_BLOCK)]
        for block in blocks:
            fields.add(np.asarray(values.isel(time=block).values))
        fields.begin_refine(whole.bins)
        for block in blocks:
            fields.refine(np.asarray(values.isel(time=block).values))
        stats = fields.finish(whole.units)
    first = calendars.iso(index.times[steps[0]], unit="s")
    last = calendars.iso(index.times[steps[-1]], unit="s")
    scope = f"{part} split: {len(steps)} of {index.grid[0]} time steps, {first} to {last}"
    return stats, scope
