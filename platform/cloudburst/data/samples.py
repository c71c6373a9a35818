"""Windows of one split of a training job's store, read exactly as the training workers read
them: what the post-training evaluation and the dry threshold are computed on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cloudburst import storage
from cloudburst.data.ingest import open_store
from cloudburst.data.loader import WindowDataset
from cloudburst.data.windows import build_index, split_index

if TYPE_CHECKING:
    from cloudburst.config import TrainJobConfig

__all__ = ["split_windows"]


def split_windows(
    cfg: TrainJobConfig, transform: Any, limit: int | None = 256, part: str = "val"
) -> dict[str, Any]:
    """Windows (model space) of split ``part`` (val falls back to train when empty).

    With ``limit``, that many windows evenly spread over the part (in index order), so a
    small evaluation still covers every season and year of the split. Returns ``x``
    (n, 1, t, y, x) float32, ``mask`` bool alike, ``part`` and ``stats``.
    """
    opts = storage.options_from(cfg.data.store, cfg.storage)
    ds, stats = open_store(cfg.data.store, opts)
    index = build_index(ds, cfg.data.windows)
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
        rank=0,
        world_size=1,
    )
    items = list(dataset)
    if not items:
        raise ValueError(f"no {part} windows to evaluate in {cfg.data.store}")
    return {
        "x": torch.stack([it["x"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "part": part,
        "stats": stats,
    }
